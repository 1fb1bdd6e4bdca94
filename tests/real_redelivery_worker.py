"""A real Celery worker that dies after running a task, before its ack leaves.

Run by tests/test_real_redelivery.py, one process per worker:
``python real_redelivery_worker.py <broker url> <queue> <record file> <acks_late 0|1>``.
The worker appends a line to the record file when it is ready, the task one with what Celery
told it (task id, retries, redelivered). Once the tracer is done (``task_postrun``: the body
ran, its result is handled) the whole worker dies of SIGKILL, its main process first, unless
the message was a redelivery: what ``retry_worker.redeliver(task, when="after_run")``
simulates. The next worker started on the queue shows whether, and when, the broker delivers
the message again.

The pool is prefork, as in production: its main process acks an early-acked message when the
child accepts the job (the solo pool sends that ack only after the body, so a worker killed
at the end of the body loses it too). The body takes a second, as a real task does, for the
main process to send that ack.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from celery import Celery
from celery.signals import task_postrun, worker_ready

# A visibility sweep every second, for messages unacknowledged for 3 s (redis; kombu 5.7).
VISIBILITY_TIMEOUT = 3


def unacked_keys(queue: str) -> dict[str, str]:
    """kombu's unacked hash, index and mutex for this queue alone (the broker is shared)."""
    return {f"unacked{part}_key": f"{queue}-unacked{part}" for part in ("", "_index", "_mutex")}


def make_app(url: str, queue: str, acks_late: bool) -> Celery:
    app = Celery("real-redelivery", broker=url, set_as_current=False)
    options: dict[str, Any] = {}
    if url.startswith("redis"):
        options = {
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # A worker killed while it sweeps leaves the sweep's mutex taken, for 5 min by
            # default: the next worker's sweeps then restore nothing (a real race, seen once
            # in CI as a missing redelivery). The test's worker is killed on purpose.
            "unacked_mutex_expire": 1,
            **unacked_keys(queue),
        }
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_acks_late=acks_late,
        task_default_queue=queue,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
    )
    return app


def main(url: str, queue: str, record: str, acks_late: bool) -> None:
    app = make_app(url, queue, acks_late)

    @app.task(name="redelivery.write_row", bind=True, shared=False)
    def write_row(self: Any, order: int) -> None:
        request = self.request
        line = {
            "id": request.id,
            "retries": request.retries,
            "redelivered": bool((request.delivery_info or {}).get("redelivered")),
            "header": getattr(request, "redelivered", None),
            "order": order,
            "at": time.time(),
        }
        with open(record, "a") as out:
            out.write(json.dumps(line) + "\n")
        time.sleep(1)

    @worker_ready.connect(weak=False)
    def ready(**_: Any) -> None:
        with open(record, "a") as out:
            out.write(json.dumps({"ready": time.time()}) + "\n")

    @task_postrun.connect(weak=False)
    def die_after_the_run(task: Any = None, **_: Any) -> None:
        if not (task.request.delivery_info or {}).get("redelivered"):
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={queue}",
            # A node name of its own: two of these workers at once (the tests of two xdist
            # processes) would both declare celery@host's exclusive pidbox queue, and the
            # second die of ResourceLocked.
            f"--hostname={queue}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ]
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1")
