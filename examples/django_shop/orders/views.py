from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_POST

from .models import Order
from .tasks import charge_order


@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        order = Order.objects.create(amount_cents=int(request.POST["amount_cents"]))
        # Publish once the order is committed: a worker that got the message earlier would
        # not find the row. The callback runs when the atomic block commits, in this request.
        transaction.on_commit(lambda: charge_order.delay(order.pk))
    return JsonResponse({"order": order.pk, "status": order.status}, status=202)


@require_POST
def retry_charge(request: HttpRequest, order_id: int) -> JsonResponse:
    """Support's button for an order whose charge gave up: a fresh round of retries."""
    with transaction.atomic():
        order = get_object_or_404(Order.objects.select_for_update(), pk=order_id)
        if order.status != Order.Status.PENDING:
            return JsonResponse({"order": order.pk, "status": order.status}, status=409)
        order.charge_attempts = 0
        order.save(update_fields=["charge_attempts"])
        # Celery 5.4+: the same as transaction.on_commit(lambda: charge_order.delay(order.pk)).
        charge_order.delay_on_commit(order.pk)
    return JsonResponse({"order": order.pk, "status": order.status}, status=202)
