"""Tasks that retry, each in one of the ways Celery offers."""

from __future__ import annotations

import logging
import time

from .celery import app

logger = logging.getLogger(__name__)

# The publish retry policy of the project's first example: 4 tries, 3 s, 4 s, 5 s apart.
PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 3,
    "interval_step": 1,
    "interval_max": 6,
}


@app.task(name="foo.task", bind=True, max_retries=3)
def foo_task(self):
    """Explicit retry: countdowns 1, 3, 9 s, then MaxRetriesExceededError."""
    try:
        raise RuntimeError("boom")
    except Exception as exc:
        logger.warning("foo.task failed: %r, retrying", exc)
        self.retry(countdown=3**self.request.retries)


@app.task(
    name="proj.sync_inventory",
    autoretry_for=(ConnectionError,),
    retry_backoff=True,
    retry_backoff_max=600,
    retry_jitter=False,
    max_retries=5,
)
def sync_inventory(sku: str) -> None:
    """Automatic retry with exponential backoff: 1, 2, 4, 8, 16 s."""
    raise ConnectionError(f"inventory service unreachable for {sku}")


@app.task(
    name="proj.refresh_cache",
    autoretry_for=(TimeoutError,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=4,
)
def refresh_cache(key: str) -> None:
    """Backoff with full jitter: countdowns drawn from 0..2, 0..4, 0..8, 0..16 s."""
    raise TimeoutError(f"cache node timed out refreshing {key}")


class TransientHTTPError(Exception):
    """A 503 from an upstream service: worth retrying."""


class ExchangeRateAPI:
    """Stands in for an HTTP client: a 503 while the service is down."""

    def __init__(self) -> None:
        self.down = False

    def get_rate(self, currency: str) -> float:
        if self.down:
            raise TransientHTTPError("503 Service Unavailable")
        return {"EUR": 0.92, "GBP": 0.79}[currency]


rates_api = ExchangeRateAPI()


@app.task(name="proj.fetch_rate", bind=True, max_retries=5, default_retry_delay=10)
def fetch_rate(self, currency: str) -> float:
    """Retry on a 503 only, 10 s apart, up to 5 times."""
    try:
        return rates_api.get_rate(currency)
    except TransientHTTPError as exc:
        raise self.retry(exc=exc) from exc


@app.task(name="proj.send_receipt")
def send_receipt(order_id: int) -> str:
    return f"receipt for order {order_id}"


@app.task(name="proj.place_order")
def place_order(order_id: int) -> int:
    """Publishes a follow-up task; kombu retries the publish if the broker is away."""
    send_receipt.apply_async(args=(order_id,), retry=True, retry_policy=PUBLISH_RETRY_POLICY)
    return order_id


@app.task(name="proj.build_report", bind=True, max_retries=3)
def build_report(self):
    """The seed's retry (countdowns 1, 3, 9 s) after a slow call: each attempt takes 2 s."""
    time.sleep(2)  # the reporting service answers after 2 s, with an error
    self.retry(countdown=3**self.request.retries)


class PaymentGateway:
    """Stands in for a payment provider's client: every call charges the card."""

    def charge(self, order_id: int) -> str:
        return f"charge for order {order_id}"


gateway = PaymentGateway()


@app.task(name="proj.charge_order", bind=True, acks_late=True, max_retries=3)
def charge_order(self, order_id: int) -> str:
    """acks_late, retried once while the fraud check is pending, then charges the card."""
    time.sleep(2)  # the fraud check takes 2 s
    if self.request.retries == 0:
        raise self.retry(countdown=5)  # pending: look again in 5 s
    return gateway.charge(order_id)
