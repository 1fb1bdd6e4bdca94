"""The schedules the explorer shrinks to, applied to a real RabbitMQ in scaled real time.

For each recipe of docs/exploring-outages.md: the property fails in the simulation with a
shrunk schedule (checked here first, so the two can't drift apart), then a real
``celery worker -P prefork`` (production's pool, in a process of its own) runs the same task
through ``broker_proxy`` while the proxy applies that schedule, scaled down, from the moment
the task's first attempt starts, and the real worker shows the same outcome.

Skipped without CELERY_RETRY_AMQP_URL (a failure in CI).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_cleanup import forget
from hypothesis import given, settings

from pytest_celery_retry import FaultSchedule, Outage, assert_no_task_lost, assert_side_effect
from pytest_celery_retry.explorer import FaultExplorer
from pytest_celery_retry.proxy import BrokerProxy
from pytest_celery_retry.session import Settings
from pytest_celery_retry.strategies import fault_schedules

pytestmark = pytest.mark.real_broker

# Real seconds per virtual second: each schedule's outage begins a virtual second from what
# it must hit, and a loaded machine may be late by a good part of that.
SCALE = 1.0
HERE = Path(__file__).resolve().parent
ProxyFactory = Callable[[str], BrokerProxy]


@pytest.fixture
def recipes() -> Any:
    """tests/exploring_real_app.py as the test process imports it: scale 1, in memory."""
    sys.path.insert(0, str(HERE))
    try:
        import exploring_real_app
    finally:
        sys.path.remove(str(HERE))
    assert exploring_real_app.SCALE == 1
    return exploring_real_app


def shrunk(check: Callable[[FaultSchedule], None], **bounds: Any) -> FaultSchedule:
    """The schedule Hypothesis shrinks to when ``check`` fails (seeded: the same each run)."""
    found: list[FaultSchedule] = []

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(schedule=fault_schedules(kinds=["outage"], **bounds))
    def explore(schedule: FaultSchedule) -> None:
        try:
            check(schedule)
        except AssertionError:
            found.append(schedule)
            raise

    with pytest.raises(AssertionError):
        explore()
    return found[-1]  # Hypothesis replays the shrunk example last


class RealWorker:
    """``celery worker -P prefork -c 1`` on tests/exploring_real_app.py, with its event log."""

    def __init__(self, url: str, queue: str, log: Path) -> None:
        self.log = log
        env = {
            **os.environ,
            "EXPLORE_BROKER_URL": url,
            "EXPLORE_QUEUE": queue,
            "EXPLORE_SCALE": str(SCALE),
            "EXPLORE_LOG": str(log),
        }
        log.touch()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "exploring_real_app", "worker"),
                *("-P", "prefork", "-c", "1", "-Q", queue, "-n", f"{queue}@%h", "-l", "WARNING"),
                *("--without-gossip", "--without-mingle"),
            ],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def events(self) -> list[tuple[float, list[str]]]:
        lines = self.log.read_text().splitlines()
        return [(float(line.split()[0]), line.split()[1:]) for line in lines]

    def wait_for(self, *what: str, timeout: float, count: int = 1) -> float:
        """When the ``count``-th event ``what`` was logged (fails after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [t for t, fields in self.events() if fields[: len(what)] == list(what)]
            if len(seen) >= count:
                return seen[count - 1]
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        pytest.fail(f"no {' '.join(what)} (x{count}) within {timeout} s: {self.report()}")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def report(self) -> str:
        return f"events: {self.events()}"


def run_schedule_on_proxy(schedule: FaultSchedule, proxy: BrokerProxy, t0: float) -> list[float]:
    """The schedule's outages at ``t0 + start * SCALE`` (wall clock), in the background.

    Returns the list the virtual times they began at are appended to.
    """
    began: list[float] = []

    def outage(seconds: float) -> None:
        began.append((time.time() - t0) / SCALE)
        proxy.outage(seconds)

    for fault in schedule:
        assert isinstance(fault, Outage), fault
        delay = max(0.0, t0 + fault.start * SCALE - time.time())
        timer = threading.Timer(delay, outage, args=(fault.seconds * SCALE,))
        timer.daemon = True
        timer.start()
    return began


def on_time(began: list[float], schedule: FaultSchedule) -> None:
    """The outages began within half a virtual second of their moment (else the machine was
    too loaded for this test to mean anything)."""
    planned = [fault.start for fault in schedule]
    assert len(began) == len(planned), (began, planned)
    late = [b - p for b, p in zip(began, planned)]
    assert all(abs(x) < 0.5 for x in late), f"outages began {late} virtual s late: machine loaded"


@pytest.fixture
def real(
    broker_proxy: ProxyFactory, tmp_path: Path
) -> Iterator[tuple[BrokerProxy, RealWorker, Any]]:
    from celery import Celery

    proxy = broker_proxy("amqp")
    queue = f"celery-retry-explore-{uuid.uuid4().hex[:12]}"
    worker = RealWorker(proxy.url, queue, tmp_path / "events.log")
    # The test publishes straight to the broker, not through the proxy.
    publisher = Celery(f"explore-client-{queue}", broker=os.environ["CELERY_RETRY_AMQP_URL"])
    publisher.conf.task_default_queue = queue
    try:
        worker.wait_for("ready", timeout=60)
        publisher.send_task("explore.warm_up")
        worker.wait_for("warm", timeout=30)
        yield proxy, worker, publisher
    finally:
        # The worker's output goes with a failure's report.
        print(worker.stop()[-4000:])
        try:
            forget("amqp", queue)
            forget("amqp", f"{queue}-sink")
        finally:
            publisher.close()


# -- recipe 1: the seed's publish policy loses build_report's retry ----------------------------
def test_the_outage_that_loses_build_report_loses_it_on_rabbitmq(
    real: tuple[BrokerProxy, RealWorker, Any], recipes: Any
) -> None:
    proxy, worker, publisher = real
    explorer = FaultExplorer(Settings())

    def never_lost(schedule: FaultSchedule) -> None:
        with explorer.example(schedule, app=recipes.app) as (simulated, _):
            simulated.apply(recipes.build_report)
            assert_no_task_lost(simulated)

    schedule = shrunk(never_lost, horizon=30, max_faults=1)
    assert schedule == FaultSchedule([Outage(start=1, seconds=14)])

    publisher.send_task("explore.build_report")
    t0 = worker.wait_for("start", "0", timeout=30)
    began = run_schedule_on_proxy(schedule, proxy, t0)
    rejected = worker.wait_for("rejected", "0", timeout=30 * SCALE + 20)
    on_time(began, schedule)
    # The retry's publish gave up while the broker was down, as simulated at t=14.
    gave_up_at = (rejected - t0) / SCALE
    assert 13 <= gave_up_at < 15, (gave_up_at, worker.report())
    # The broker is back at t=15; the retry was due at t=3: nothing runs again.
    time.sleep(SCALE * 4 + 3)
    assert [f for _, f in worker.events() if f[0] == "start"] == [["start", "0"]], proxy.timeline()
    assert not [f for _, f in worker.events() if f[0] == "retry-published"]


# -- recipe 2: acks_late charge_order is charged twice ------------------------------------------
def test_the_outage_that_charges_twice_charges_twice_on_rabbitmq(
    real: tuple[BrokerProxy, RealWorker, Any], recipes: Any
) -> None:
    proxy, worker, publisher = real
    explorer = FaultExplorer(Settings())

    def charged_once(schedule: FaultSchedule) -> None:
        with explorer.example(schedule, app=recipes.app) as (simulated, _):
            charges = simulated.track(recipes.gateway, "charge")
            simulated.apply(recipes.charge_order, args=(7,))
            simulated.run_until_idle()  # what apply() left: a second retry, if any
            assert_side_effect(charges, times=1)

    schedule = shrunk(charged_once, horizon=10, max_faults=1)
    assert schedule == FaultSchedule([Outage(start=1, seconds=1)])

    publisher.send_task("explore.charge_order", args=(7,))
    t0 = worker.wait_for("start", "0", timeout=30)
    began = run_schedule_on_proxy(schedule, proxy, t0)
    worker.wait_for("charge", "7", timeout=30)
    on_time(began, schedule)
    # The first attempt's late ack goes into the connection the outage dropped: RabbitMQ
    # delivers the message again, the first attempt runs again and retries again, and both
    # retries charge the card.
    worker.wait_for("charge", "7", count=2, timeout=30)
    time.sleep(SCALE * 2 + 1)  # room for a third
    starts = [f for _, f in worker.events() if f[0] == "start"]
    assert starts == [["start", "0"], ["start", "0"], ["start", "1"], ["start", "1"]], (
        worker.report()
    )
    assert [f for _, f in worker.events() if f[0] == "charge"] == [["charge", "7"]] * 2
