"""Redelivery against real brokers: a real worker killed after the run, before its ack left.

``retry_worker.redeliver(task)`` (when="after_run") predicts what the broker does then; here
a real prefork worker does it (tests/real_redelivery_worker.py, a process per worker) and a
second worker shows what comes back. Both sides are held to the same table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from broker_cleanup import forget

from tests.conftest import real_broker_url
from tests.limits_figures import SWEEP_OPTIONS_WORK
from tests.real_redelivery_worker import VISIBILITY_TIMEOUT, make_app, unacked_keys

WORKER = Path(__file__).with_name("real_redelivery_worker.py")
# (retries, redelivered) of each run of the message, by acks_late: the broker delivers an
# acks_late message again, with the same retries, marked redelivered; an early-acked one was
# acked when the worker accepted it.
RUNS = {True: [(0, False), (0, True)], False: [(0, False)]}
FLAVOR = {"amqp": "pyamqp", "redis": "redis"}
# request.redelivered of a redelivery: kombu's redis transport marks the message's headers.
HEADER = {"amqp": None, "redis": True}
# kombu < 5.7 has no unacked_restore_interval: its redis sweep runs every 100 s, too rarely
# to wait for here (a skip would fail the run where real brokers are required).
REAL_KINDS = ["amqp", "redis"] if SWEEP_OPTIONS_WORK else ["amqp"]
# Time for a worker process to start and connect on a loaded two-core machine.
START_UP = 20.0


def read_lines(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def read_runs(record: Path) -> list[dict[str, Any]]:
    return [line for line in read_lines(record) if "id" in line]


def readies(record: Path) -> int:
    return sum(1 for line in read_lines(record) if "ready" in line)


def start_worker(url: str, queue: str, record: Path, acks_late: bool) -> subprocess.Popen[bytes]:
    number = len(list(record.parent.glob("worker-*.log"))) + 1
    with record.with_name(f"worker-{number}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, str(WORKER), url, queue, str(record), "1" if acks_late else "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def logs(record: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(record.parent.glob("worker-*.log")))


def stop(worker: subprocess.Popen[bytes]) -> None:
    import os
    import signal

    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)


def wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


@pytest.mark.real_broker
@pytest.mark.parametrize("acks_late", [True, False], ids=["acks_late", "early_ack"])
@pytest.mark.parametrize("kind", REAL_KINDS)
def test_real_worker_killed_after_the_run(kind: str, acks_late: bool, tmp_path: Path) -> None:
    url = real_broker_url(kind)
    queue = f"celery-retry-redeliver-{uuid.uuid4().hex[:12]}"
    record = tmp_path / "runs.jsonl"
    app = make_app(url, queue, acks_late)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        result = app.send_task("redelivery.write_row", args=(7,), queue=queue)
        workers.append(start_worker(url, queue, record, acks_late))
        assert workers[0].wait(START_UP + 10) == -9, logs(record)
        first_at = read_runs(record)[0]["at"]
        up = readies(record)
        workers.append(start_worker(url, queue, record, acks_late))
        assert wait_until(lambda: readies(record) > up, START_UP), logs(record)
        # Wait for a second run, or long enough for one to come (redis: the sweep after
        # visibility_timeout; the second worker sweeps every second).
        wait_until(lambda: len(read_runs(record)) == 2, VISIBILITY_TIMEOUT + 3)
        time.sleep(1.0)  # room for a third
    finally:
        for worker in workers:
            stop(worker)
        forget(kind, queue, *unacked_keys(queue).values())
    runs = read_runs(record)
    assert {run["id"] for run in runs} == {result.id}
    assert [(run["retries"], run["redelivered"]) for run in runs] == RUNS[acks_late]
    # kombu's redis transport also marks the message's headers: request.redelivered.
    assert [run["header"] for run in runs[1:]] == [HEADER[kind]] * (len(runs) - 1)
    if acks_late and kind == "redis":
        # A killed redis client puts nothing back: the message waited for a visibility sweep
        # (measured: 3.0 s after the first run began; RabbitMQ: 1.5 s, once the second
        # worker was up).
        assert runs[1]["at"] - first_at >= VISIBILITY_TIMEOUT


@pytest.mark.parametrize("acks_late", [True, False], ids=["acks_late", "early_ack"])
@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_simulated_worker_killed_after_the_run(
    kind: str, acks_late: bool, celery_retry_session: Any
) -> None:
    from celery import Celery

    from pytest_celery_retry.worker import RetryWorker

    app = Celery("simulated-redelivery", broker=f"{kind}://localhost", set_as_current=False)
    app.conf.broker_transport_options = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    runs: list[tuple[int, bool]] = []
    headers: list[Any] = []

    @app.task(name="redelivery.write_row", bind=True, acks_late=acks_late, shared=False)
    def write_row(self: Any, order: int) -> None:
        runs.append((self.request.retries, bool(self.request.delivery_info.get("redelivered"))))
        headers.append(getattr(self.request, "redelivered", None))

    installed = celery_retry_session.installation(app)
    assert installed.broker.flavor == FLAVOR[kind]
    worker = RetryWorker(celery_retry_session)
    try:
        worker.redeliver(write_row)
        run = worker.apply(write_row, args=(7,))
    finally:
        worker.close()
    assert runs == RUNS[acks_late]
    assert headers[1:] == [HEADER[kind]] * (len(runs) - 1)
    if acks_late and kind == "redis":
        assert run.attempts[1].t >= VISIBILITY_TIMEOUT
    elif acks_late:
        assert run.attempts[1].t == 0
