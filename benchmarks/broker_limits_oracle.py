"""Oracle: what the real Redis and RabbitMQ do to a retry that waits (issue #13). Asserts nothing.

The measurements too slow or too shared for tests/real_limits_cases.py, which pins the
fast ones. Needs the local Redis and RabbitMQ (and rabbitmqctl for ``tick``). Run from the
repository root:

    .venv/bin/python benchmarks/broker_limits_oracle.py copies   # ~25 s
    .venv/bin/python benchmarks/broker_limits_oracle.py workers  # ~10 s, two processes
    .venv/bin/python benchmarks/broker_limits_oracle.py tick     # ~75 s, lowers consumer_timeout

Measured with Celery 5.7.0 / kombu 5.7.0 / redis-py 8.1 / Redis 7 / RabbitMQ 3.10.8
(2026-11-26), times in seconds after the first run:

    copies (visibility_timeout=2, sweeps every 1 s):
      countdown=5: retry received at [0.03, 2.98, 4.99], run at [5.0, 5.0, 5.0]
      countdown=9: retry received at [0.01, 2.99, 5.0, 7.0, 9.01], run at [9.0 (x4), 9.01]
    workers (two worker processes on one queue, countdown=5, visibility_timeout=2):
      retry received at [0.01, 2.98, 4.99], run at [5.0, 5.0, 5.0], by both workers (in an
      earlier run all three by one): a second worker adds no copy
    tick (consumer_timeout=2000 ms, channel_tick_interval left at its 60000 ms default; the
    same steps in a scratch script, not rerun here to keep the shared node's timeout low for
    as short a time as possible):
      "Unrecoverable error: PreconditionFailed" at 59.99 s: the timeout is checked on the
      channel's tick, so a held delivery is closed up to one tick after the timeout

Two start_worker() workers in one process are not two workers: they share Celery's
worker state, and ran the retry twice instead of three times; hence the second process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def worker(app: Any, queue: str) -> Any:
    from celery.contrib.testing.worker import start_worker

    return start_worker(
        app,
        pool="solo",
        perform_ping_check=False,
        queues=[queue],
        shutdown_timeout=10,
        without_heartbeat=False,
        loglevel="WARNING",
    )


def redis_app(queue: str, log_key: str, role: str, countdown: float) -> Any:
    """An app whose ``waits`` task retries once; runs and receipts go to a Redis list."""
    import redis
    from celery import Celery
    from celery.signals import task_received

    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"oracle-{role}", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        worker_hijack_root_logger=False,
        broker_transport_options={
            "visibility_timeout": 2,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # Our own keys: a 2 s sweep of the shared ones would restore other workers' messages.
            "unacked_key": f"{queue}-unacked",
            "unacked_index_key": f"{queue}-unacked_index",
            "unacked_mutex_key": f"{queue}-unacked_mutex",
        },
    )

    def log(what: str, retries: int) -> None:
        client.rpush(log_key, json.dumps([what, time.time(), role, retries]))

    def on_received(request: Any, **_: Any) -> None:
        if request.task.app is app:  # the signal is global: other apps' workers send it too
            log("received", request.request_dict.get("retries", 0))

    task_received.connect(on_received, weak=False)

    @app.task(name="waits", bind=True, max_retries=1, shared=False)  # type: ignore[untyped-decorator]
    def waits(self: Any) -> None:
        log("run", self.request.retries)
        if self.request.retries == 0:
            raise self.retry(countdown=countdown)

    return app


def report_redis(queue: str, log_key: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    entries = [json.loads(line) for line in client.lrange(log_key, 0, -1)]
    start = min(t for what, t, _, _ in entries if what == "run")
    for what, role in (("received", None), ("run", None)):
        times = [round(t - start, 2) for w, t, r, n in entries if w == what and n == 1]
        roles = sorted({r for w, _, r, n in entries if w == what and n == 1})
        print(f"  retry {what} at {times} by {roles or role}")
    bindings = list(client.scan_iter(f"_kombu.binding*.{queue}"))
    for suffix in ("", "_index", "_mutex"):
        client.delete(f"{queue}-unacked{suffix}")
    client.delete(queue, log_key, *bindings)


def copies() -> None:
    for countdown in (5, 9):
        queue = f"oracle-limits-{uuid.uuid4().hex[:8]}"
        app = redis_app(queue, f"{queue}-log", "worker", countdown)
        with worker(app, queue):
            app.tasks["waits"].apply_async(queue=queue)
            time.sleep(countdown + 2.5)
        print(f"countdown={countdown}:")
        report_redis(queue, f"{queue}-log")


def workers() -> None:
    queue = f"oracle-limits-{uuid.uuid4().hex[:8]}"
    second = subprocess.Popen([sys.executable, __file__, "second-worker", queue])
    time.sleep(2)  # the second worker is consuming
    app = redis_app(queue, f"{queue}-log", "first", 5)
    with worker(app, queue):
        app.tasks["waits"].apply_async(queue=queue)
        time.sleep(7.5)
    second.wait()
    print("two workers, countdown=5:")
    report_redis(queue, f"{queue}-log")


def second_worker(queue: str) -> None:
    with worker(redis_app(queue, f"{queue}-log", "second", 5), queue):
        time.sleep(10)


def rabbitmqctl(expression: str) -> str:
    command = ["rabbitmqctl", "eval", expression]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def tick() -> None:
    import logging

    from celery import Celery

    lost: list[float] = []
    started = time.monotonic()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Unrecoverable error" in record.getMessage():
                lost.append(time.monotonic() - started)

    logging.getLogger().addHandler(Catch())
    queue = f"oracle-limits-{uuid.uuid4().hex[:8]}"
    app = Celery("oracle-tick", broker=AMQP_URL, set_as_current=False)
    app.conf.update(worker_hijack_root_logger=False, broker_heartbeat=2)

    @app.task(name="waits", bind=True, max_retries=1, shared=False)  # type: ignore[untyped-decorator]
    def waits(self: Any) -> None:
        if self.request.retries == 0:
            raise self.retry(countdown=70)

    before = rabbitmqctl("application:get_env(rabbit, consumer_timeout).")
    try:
        rabbitmqctl("application:set_env(rabbit, consumer_timeout, 2000).")
        with worker(app, queue):
            started = time.monotonic()
            waits.apply_async(queue=queue)
            deadline = started + 75
            while not lost and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        rabbitmqctl(f"application:set_env(rabbit, consumer_timeout, {before[4:-1]}).")
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)
    print(f"consumer_timeout=2000 ms, default tick: Unrecoverable error at {lost}")


if __name__ == "__main__":
    if sys.argv[1] == "second-worker":
        second_worker(sys.argv[2])
    else:
        {"copies": copies, "workers": workers, "tick": tick}[sys.argv[1]]()
