"""Oracle: what a real Celery worker does with rate-limited tasks that retry. Asserts nothing.

Run from the repository root (about 30 s of real time):

    .venv/bin/python benchmarks/rate_limit_oracle.py

Each case runs on Celery's own test worker (``start_worker``: solo pool, memory transport
polled every 0.05 s) and prints when each attempt started, in seconds after the first
attempt, per task. tests/test_rate_limit.py pins the plugin to these figures.

Measured with Celery 5.7.0 / kombu 5.7.0 (2026-11-26):

    1/s, countdown=0: attempts at [[0.0, 1.0, 2.0, 3.0]]
    1/s, countdown=0.2: attempts at [[0.0, 1.0, 2.0]]
    2/s, countdown=0: attempts at [[0.0, 0.5, 1.0, 1.5]]
    30/m, countdown=0: attempts at [[0.0, 2.0, 4.0]]
    1/s, countdown=1.5: attempts at [[0.0, 1.5, 3.0]]
    0.5/s, countdown=1.5: attempts at [[0.0, 2.0, 4.0]]
    1/s, countdown=0, 3 tasks at once: attempts at [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    1/s, countdown=0, worker_disable_rate_limits: attempts at [[0.0, 0.0, 0.01, 0.01]]

and, by hand, six "1/s" tasks without retries published before a task without a rate limit:
that task started 2.06, 4.08, 5.08 and 0.06 s after publishing with worker_prefetch_multiplier
4 (the default), 2, 1 and 0 (the rate-limited ones at 0.05, 1.05, ..., 5.05 s).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker


def measure(
    rate_limit: str,
    countdown: float,
    retries: int,
    tasks: int = 1,
    **config: Any,
) -> list[list[float]]:
    app = Celery("rate_oracle", broker="memory://", backend="cache+memory://")
    app.conf.broker_transport_options = {"polling_interval": 0.05}
    app.conf.update(config)
    starts: dict[str, list[float]] = {}
    done = threading.Semaphore(0)

    @app.task(  # type: ignore[untyped-decorator]
        bind=True, max_retries=retries, rate_limit=rate_limit, shared=False
    )
    def limited(self: Any) -> str:
        starts.setdefault(self.request.id, []).append(time.monotonic())
        if self.request.retries < retries:
            raise self.retry(countdown=countdown)
        done.release()
        return "ok"

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=5):
        ids = [limited.delay().id for _ in range(tasks)]
        for _ in ids:
            assert done.acquire(timeout=60)
    first = min(t for times in starts.values() for t in times)
    return [[round(t - first, 2) for t in starts[task_id]] for task_id in ids]


CASES: list[tuple[str, dict[str, Any]]] = [
    ("1/s, countdown=0", dict(rate_limit="1/s", countdown=0, retries=3)),
    ("1/s, countdown=0.2", dict(rate_limit="1/s", countdown=0.2, retries=2)),
    ("2/s, countdown=0", dict(rate_limit="2/s", countdown=0, retries=3)),
    ("30/m, countdown=0", dict(rate_limit="30/m", countdown=0, retries=2)),
    ("1/s, countdown=1.5", dict(rate_limit="1/s", countdown=1.5, retries=2)),
    ("0.5/s, countdown=1.5", dict(rate_limit="0.5/s", countdown=1.5, retries=2)),
    ("1/s, countdown=0, 3 tasks at once", dict(rate_limit="1/s", countdown=0, retries=1, tasks=3)),
    (
        "1/s, countdown=0, worker_disable_rate_limits",
        dict(rate_limit="1/s", countdown=0, retries=3, worker_disable_rate_limits=True),
    ),
]

if __name__ == "__main__":
    for title, case in CASES:
        print(f"{title}: attempts at {measure(**case)}", flush=True)
