"""Time inside a task: its sleeps, its time limits, and local time on the virtual clock.

The expected outcomes were measured on a real prefork worker (Celery 5.7, billiard 4.3,
Redis broker, soft limit 0.5 s, hard limit 1 s, real time): see ``pytest_celery_retry.task_time``
and docs/worker.md.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from time import sleep
from typing import Any

import freezegun.api
import pytest
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from pytest_celery_retry import EndlessRetryError
from pytest_celery_retry.clock import VirtualClock
from tests.conftest import actions, make_app


def _celery_version() -> tuple[int, int]:
    import celery

    major, minor = celery.__version__.split(".")[:2]
    return int(major), int(minor)


# What Celery's own Request does after the pool reports a hard time limit changed: from 5.5 an
# acks_late task not acked on timeout is requeued (before, rejected and dropped), and from 5.7
# Request.on_timeout also runs the task's on_failure and sends task_failure (a second time).
REQUEUES_ON_TIMEOUT = _celery_version() >= (5, 5)
FAILURE_HOOKS_ON_TIMEOUT = _celery_version() >= (5, 7)


def test_sleep_in_a_task_moves_the_virtual_clock(app, retry_worker):
    @app.task(name="nap", bind=True, max_retries=1, shared=False)
    def nap(self: Any) -> str:
        time.sleep(2)
        if not self.request.retries:
            raise self.retry(countdown=10)
        return "rested"

    wall = freezegun.api.real_perf_counter()
    run = retry_worker.apply(nap)

    assert freezegun.api.real_perf_counter() - wall < 3.5  # nobody waited the 2 + 2 s
    assert run.result == "rested"
    # The retry's ETA counts from the end of the sleep, as on a real worker.
    assert [a.t for a in run.attempts] == [0, 12]
    assert retry_worker.clock.elapsed == 14


def test_a_polling_loop_in_a_task_ends(app, retry_worker):
    @app.task(name="wait_for_ready", shared=False)
    def wait_for_ready() -> int:
        deadline = time.monotonic() + 60
        polls = 0
        while time.monotonic() < deadline:
            polls += 1
            sleep(5)  # the module's own ``from time import sleep``
        return polls

    assert retry_worker.apply(wait_for_ready).result == 12
    assert retry_worker.clock.elapsed == 60


def test_only_the_worker_thread_sleeps_virtually(app, retry_worker):
    real_waits: list[float] = []

    def other_thread() -> None:
        started = freezegun.api.real_perf_counter()
        time.sleep(0.2)
        real_waits.append(freezegun.api.real_perf_counter() - started)

    @app.task(name="with_a_thread", shared=False)
    def with_a_thread() -> None:
        helper = threading.Thread(target=other_thread)
        helper.start()
        time.sleep(30)
        helper.join()

    retry_worker.apply(with_a_thread)

    assert real_waits[0] >= 0.2
    assert retry_worker.clock.elapsed == 30
    started = freezegun.api.real_perf_counter()
    time.sleep(0.05)  # the test's own thread, outside any task: real
    assert freezegun.api.real_perf_counter() - started >= 0.05
    assert retry_worker.clock.elapsed == 30


def test_a_module_imported_while_the_clock_runs_gets_the_real_sleep_back(tmp_path, monkeypatch):
    (tmp_path / "late_sleeper.py").write_text("from time import sleep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "late_sleeper", raising=False)
    real_sleep = time.sleep
    clock = VirtualClock().start()
    try:
        late = importlib.import_module("late_sleeper")
        assert late.sleep is not real_sleep
    finally:
        clock.stop()
    assert late.sleep is real_sleep
    assert time.sleep is real_sleep


def soft_limit_app(**task_options: Any) -> Any:
    """``timed`` sleeps 3 s; on SoftTimeLimitExceeded it retries after 1 s, then returns."""
    app = make_app()

    @app.task(name="timed", bind=True, max_retries=1, shared=False, **task_options)
    def timed(self: Any) -> str:
        if self.request.retries:
            return "done"
        try:
            time.sleep(3)
        except SoftTimeLimitExceeded as exc:
            raise self.retry(countdown=1, exc=exc) from exc
        return "slept through"

    return app


def test_soft_time_limit_raises_in_the_sleep_and_the_task_retries(retry_worker, caplog):
    app = soft_limit_app(soft_time_limit=0.5, time_limit=1)
    caplog.set_level(logging.WARNING)

    run = retry_worker.apply(app.tasks["timed"])

    # Real prefork: SoftTimeLimitExceeded 0.50 s into the sleep, next attempt 1.51 s later.
    assert run.result == "done"
    assert [a.t for a in run.attempts] == [0, 1.5]
    assert [a.outcome for a in run.attempts] == ["retry", "success"]
    assert isinstance(run.attempts[0].exc, SoftTimeLimitExceeded)
    assert run.attempts[0].note == "soft time limit (0.5 s) exceeded"
    # Celery's own Request.on_timeout(soft=True) ran, as the pool calls it.
    assert "Soft time limit (0.5s) exceeded for timed" in caplog.text


def test_time_limits_from_the_call_and_from_the_settings(retry_worker):
    app = soft_limit_app()
    run = retry_worker.apply(app.tasks["timed"], soft_time_limit=0.5, time_limit=1)
    assert [a.t for a in run.attempts] == [0, 1.5]

    # Set after the task was bound: a real worker's pool still applies them.
    app.conf.task_soft_time_limit = 2
    app.conf.task_time_limit = 4
    run = retry_worker.apply(app.tasks["timed"])
    assert [a.t - run.attempts[0].t for a in run.attempts] == [0, 3]

    app.conf.task_soft_time_limit = app.conf.task_time_limit = None
    assert retry_worker.apply(app.tasks["timed"]).result == "slept through"


def hard_limit_app(**task_options: Any) -> tuple[Any, list[str]]:
    """``stubborn`` ignores its soft limit and sleeps on into its hard limit."""
    app = make_app()
    seen: list[str] = []

    class Recorded(app.Task):  # type: ignore[name-defined,misc]
        def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            seen.append(f"Task.on_failure {exc!r}")

    @app.task(
        name="stubborn",
        base=Recorded,
        bind=True,
        shared=False,
        soft_time_limit=0.5,
        time_limit=1,
        **task_options,
    )
    def stubborn(self: Any) -> str:
        try:
            time.sleep(3)
        except SoftTimeLimitExceeded:
            seen.append("caught the soft limit")
            try:
                time.sleep(3)
            except BaseException as exc:
                seen.append(f"unwound by {exc!r}")
                raise
        return "survived"

    return app, seen


def test_hard_time_limit_kills_the_task_as_prefork_does(retry_worker):
    app, seen = hard_limit_app()
    failures: list[str] = []
    postruns: list[Any] = []

    def on_failure(exception: Any = None, **_: Any) -> None:
        failures.append(repr(exception))

    def on_postrun(state: Any = None, **_: Any) -> None:
        postruns.append(state)

    signals.task_failure.connect(on_failure, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    try:
        run = retry_worker.apply(app.tasks["stubborn"])
    finally:
        signals.task_failure.disconnect(on_failure)
        signals.task_postrun.disconnect(on_postrun)

    assert run.state == "FAILURE"
    assert isinstance(run.exception, TimeLimitExceeded)
    assert run.exception.args == (1,)
    assert run.attempts[0].note == (
        "hard time limit (1 s) exceeded: the pool killed the worker process"
    )
    assert retry_worker.clock.elapsed == 1
    # Measured (Celery 5.7): the pool's Request.on_failure and Request.on_timeout both send
    # task_failure; the task's on_failure runs once; the child unwinds with SystemExit(-241)
    # and its tracer sends task_postrun with state None.
    hooks = ["Task.on_failure TimeLimitExceeded(1)"] if FAILURE_HOOKS_ON_TIMEOUT else []
    assert failures == ["TimeLimitExceeded(1)"] * (1 + len(hooks))
    assert seen == ["caught the soft limit", *hooks, "unwound by ChildTerminated(-241)"]
    assert postruns == [None]
    result = app.AsyncResult(run.task_id)
    assert result.state == "FAILURE"
    assert isinstance(result.result, TimeLimitExceeded)
    assert actions(retry_worker, run.task_id) == ["acked"]


def test_hard_time_limit_with_acks_late_requeues_unless_acks_on_timeout(retry_worker):
    app, _ = hard_limit_app(acks_late=True)
    run = retry_worker.apply(app.tasks["stubborn"])
    assert run.state == "FAILURE"
    assert actions(retry_worker, run.task_id) == ["acked"]

    app, seen = hard_limit_app(acks_late=True, acks_on_failure_or_timeout=False)
    if not REQUEUES_ON_TIMEOUT:
        run = retry_worker.apply(app.tasks["stubborn"])
        assert actions(retry_worker, run.task_id) == ["rejected"]
        return
    # Measured (Celery 5.7): the message is requeued and the task runs again, and again.
    with pytest.raises(EndlessRetryError):
        retry_worker.apply(app.tasks["stubborn"], max_attempts=3)
    run = list(retry_worker.runs.values())[-1]
    assert [a.t - run.attempts[0].t for a in run.attempts] == [0, 1, 2]
    assert run.attempts[0].requeued
    assert run.attempts[0].note == (
        "hard time limit (1 s) exceeded: the pool killed the worker process; "
        "message requeued (acks_late, not acked on timeout)"
    )
    assert seen.count("caught the soft limit") == 3


NEW_YORK_TESTS = """
import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from celery import Celery

NEW_YORK = ZoneInfo("America/New_York")
app = Celery("tz", broker="memory://", set_as_current=False)


@app.task(name="remind", bind=True, max_retries=1)
def remind(self):
    if not self.request.retries:
        # The bug to catch: a naive local ETA, which Celery reads as UTC.
        raise self.retry(eta=datetime.now() + timedelta(seconds=30))
    return "reminded"


@app.task(name="later", bind=True, max_retries=1)
def later(self):
    if not self.request.retries:
        raise self.retry(countdown=30)
    return "later"


@app.task(name="readings")
def readings():
    return {
        "now": datetime.now().isoformat(),
        "today": datetime.today().isoformat(),
        "date": date.today().isoformat(),
        "fromtimestamp": datetime.fromtimestamp(time.time()).isoformat(),
        "localtime": list(time.localtime()[:6]),
        "astimezone": datetime.now().astimezone().isoformat(),
        "utc": datetime.now(timezone.utc).isoformat(),
        "new_york": datetime.now(NEW_YORK).isoformat(),
        "utcnow": datetime.utcnow().isoformat(),
        "time": time.time(),
        "app.now": app.now().isoformat(),
    }


def test_naive_local_time_is_local(retry_worker):
    assert time.localtime(0).tm_gmtoff != 0  # the subprocess really runs in New York
    utc = retry_worker.clock.now()
    local = utc.astimezone(NEW_YORK).replace(tzinfo=None)

    seen = retry_worker.apply(readings).result

    assert seen["now"] == seen["today"] == seen["fromtimestamp"] == local.isoformat()
    assert seen["date"] == local.date().isoformat()
    assert datetime.fromisoformat(seen["astimezone"]) == utc
    assert datetime.fromisoformat(seen["new_york"]) == utc
    assert seen["utc"] == seen["app.now"] == utc.isoformat()
    assert seen["utcnow"] == utc.replace(tzinfo=None).isoformat()
    assert seen["time"] == utc.timestamp()
    if not time.localtime(utc.timestamp()).tm_isdst:  # freezegun's localtime() knows no DST
        assert seen["localtime"] == list(local.timetuple()[:6])


def test_naive_local_time_follows_a_dst_change():
    from pytest_celery_retry import VirtualClock

    # 01:30 EST on the night New York moves its clocks from 02:00 to 03:00.
    with VirtualClock(start=datetime(2026, 3, 8, 6, 30, tzinfo=timezone.utc)) as clock:
        assert datetime.now() == datetime(2026, 3, 8, 1, 30)
        clock.advance(3600)
        assert datetime.now() == datetime(2026, 3, 8, 3, 30)
        assert datetime.now(timezone.utc) == datetime(2026, 3, 8, 7, 30, tzinfo=timezone.utc)
    assert datetime.now().year >= 2026  # the real clock again


def test_a_naive_local_eta_runs_at_once_as_in_new_york(retry_worker):
    run = retry_worker.apply(remind)
    # Real Celery in New York: the retry ran 0.00 s after the first attempt, not 30 s.
    assert run.result == "reminded"
    assert [a.t for a in run.attempts] == [0, 0]


def test_countdowns_are_not_shifted(retry_worker):
    run = retry_worker.apply(later)
    assert [a.t for a in run.attempts] == [0, 30]
    assert run.countdowns == [30]
"""


def test_naive_local_time_stays_local_under_the_clock(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        zoneinfo.ZoneInfo("America/New_York")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database for America/New_York")
    monkeypatch.setenv("TZ", "America/New_York")
    pytester.makepyfile(test_new_york=NEW_YORK_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
