"""A payment gateway that times out now and then, and the tasks that call it."""

from __future__ import annotations

from typing import Any

from .celery import app


class GatewayTimeout(Exception):
    pass


class Gateway:
    """Stands in for the payment provider: fails the next ``failures`` calls."""

    def __init__(self) -> None:
        self.failures = 0
        self.charges: list[int] = []

    def charge(self, order_id: int) -> str:
        if order_id < 0:
            raise ValueError(f"no order {order_id}")
        if self.failures:
            self.failures -= 1
            raise GatewayTimeout(f"order {order_id}: gateway timed out")
        self.charges.append(order_id)
        return f"charged {order_id}"


gateway = Gateway()
outbox: list[str] = []


@app.task(
    autoretry_for=(GatewayTimeout,),
    retry_backoff=True,
    retry_jitter=False,
    max_retries=3,
)
def charge(order_id: int) -> str:
    return gateway.charge(order_id)


@app.task(bind=True, max_retries=5)
def send_receipt(self: Any, order_id: int) -> str:
    if gateway.failures:
        gateway.failures -= 1
        raise self.retry(countdown=60)
    outbox.append(f"receipt for order {order_id}")
    return "sent"


@app.task
def place_order(order_id: int) -> str:
    result = charge(order_id)
    send_receipt.delay(order_id)
    return result


@app.task
def reminder(order_id: int) -> str:
    outbox.append(f"reminder for order {order_id}")
    return "reminded"
