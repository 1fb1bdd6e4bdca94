"""The two recipes of docs/exploring-outages.md (proj.build_report, proj.charge_order).

``tests/test_exploring_real.py`` explores them in the simulation (as imported there, at
scale 1 on the in-memory broker), then starts ``celery worker -P prefork`` on this module
through the fault proxy and applies the schedule the explorer printed, in scaled real time.
For the worker, the environment gives the broker URL (the proxy's), the queue, the time scale
and a log file, where the tasks write what happened (the worker process is not the test's).
Not the example project itself: importing ``proj`` in the test process would register its
shared ``foo.task`` over every test app's own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.exceptions import Reject, Retry
from celery.signals import worker_ready

SCALE = float(os.environ.get("EXPLORE_SCALE", "1"))
QUEUE = os.environ.get("EXPLORE_QUEUE", "celery")
LOG = os.environ.get("EXPLORE_LOG", os.devnull)

app = Celery("exploring-real", broker=os.environ.get("EXPLORE_BROKER_URL", "memory://"))
app.conf.update(
    task_default_queue=QUEUE,
    # The seed's publish policy (3, 4, 5 s apart), scaled.
    task_publish_retry_policy={
        "max_retries": 3,
        "interval_start": 3 * SCALE,
        "interval_step": 1 * SCALE,
        "interval_max": 6 * SCALE,
    },
    # Without publisher confirms py-amqp "publishes" into a dropped connection unnoticed.
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # No pidbox queue: several of these workers may run at once on one broker.
    worker_enable_remote_control=False,
)


def note(*fields: Any) -> None:
    """One line per event, with the wall-clock time (the test reads them back)."""
    with open(LOG, "a") as log:
        log.write(" ".join([f"{time.time():.3f}", *map(str, fields)]) + "\n")


@worker_ready.connect
def _ready(**_: Any) -> None:
    note("ready")


@app.task(name="explore.warm_up")
def warm_up() -> None:
    """Publishes once, so the worker process holds a pooled connection, as after any publish
    (the simulated worker's retries go out over the connection the test published with)."""
    app.send_task("explore.sink", queue=f"{QUEUE}-sink")
    note("warm")


@app.task(name="explore.build_report", bind=True, max_retries=3)
def build_report(self: Any) -> None:
    """proj.build_report: 2 s of work, then the seed's retry (countdowns 1, 3, 9 s)."""
    note("start", self.request.retries)
    time.sleep(2 * SCALE)
    try:
        self.retry(countdown=SCALE * 3**self.request.retries)
    except Retry:
        note("retry-published", self.request.retries)
        raise
    except Reject:
        note("rejected", self.request.retries)
        raise


class PaymentGateway:
    def charge(self, order_id: int) -> str:
        note("charge", order_id)
        return f"charge for order {order_id}"


gateway = PaymentGateway()


@app.task(name="explore.charge_order", bind=True, acks_late=True, max_retries=3)
def charge_order(self: Any, order_id: int) -> str:
    """proj.charge_order: acks_late, retried once after a 2 s check, then charges."""
    note("start", self.request.retries)
    time.sleep(2 * SCALE)
    if self.request.retries == 0:
        raise self.retry(countdown=5 * SCALE)
    return gateway.charge(order_id)
