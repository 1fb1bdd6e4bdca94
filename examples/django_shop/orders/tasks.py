from celery import shared_task
from django.db.models import F
from django.utils import timezone

from .models import Order
from .payments import GatewayUnavailable, gateway


@shared_task(
    name="orders.charge_order",
    autoretry_for=(GatewayUnavailable,),
    retry_backoff=True,  # countdowns 1, 2, 4, 8, 16 s
    retry_jitter=False,
    max_retries=5,
)
def charge_order(order_id: int) -> str:
    """Charge the order; a 503 from the gateway is retried with exponential backoff."""
    Order.objects.filter(pk=order_id).update(charge_attempts=F("charge_attempts") + 1)
    order = Order.objects.get(pk=order_id)
    order.charge_id = gateway.charge(order.pk, order.amount_cents)
    order.status = Order.Status.PAID
    order.paid_at = timezone.now()
    order.save(update_fields=["charge_id", "status", "paid_at"])
    return order.charge_id
