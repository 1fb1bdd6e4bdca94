"""A test that fails in the middle of a retry leaves nothing behind for the next test.

Both the failing tests and the checks run in one inner pytest session, in file order
(``-p no:randomly``), so the checks see exactly the process state the failures left. A
control session leaks on purpose, to show that each check can fail.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import datetime
import time

import pytest
from celery import Celery

app = Celery("isolation", broker="memory://", set_as_current=False)
app.conf.task_default_queue = "work"
assert app.conf.broker_url  # finalizes the configuration: only then is .changes just the changes
CONF_BEFORE = dict(app.conf.changes)
# Taken at collection, before any test starts a clock.
REAL = {"time": time.time, "sleep": time.sleep, "datetime": datetime.datetime}


@app.task(name="forever", bind=True, max_retries=None)
def forever(self):
    raise self.retry(countdown=60)


@app.task(name="sometimes", bind=True, max_retries=5)
def sometimes(self):
    raise self.retry(countdown=2 ** self.request.retries)


@pytest.fixture
def celery_retry_app():
    return app
"""

FAILING = """
import pytest
from conftest import app, forever, sometimes


def test_endless_retry_stops_the_run_mid_retry(retry_worker, flaky_broker):
    flaky_broker.fail_next(2, on="publish")
    retry_worker.apply(forever, max_attempts=5)  # raises EndlessRetryError mid-run


def test_assertion_fails_while_the_broker_is_down(retry_worker, flaky_broker):
    app.conf.task_publish_retry_policy = {"max_retries": 1}
    run = retry_worker.apply(sometimes)
    flaky_broker.down()
    retry_worker.clock.advance(3600)
    assert run.countdowns == [], "fails on purpose with a connection open and the broker down"
"""

LEAKING = """
from conftest import app, forever
from pytest_celery_retry.session import RetrySession
from pytest_celery_retry.worker import RetryWorker

KEPT = []


def test_leaves_everything_running():
    # What the fixtures would do, without their teardown.
    session = RetrySession().start()
    session.installation(app)
    worker = RetryWorker(session)
    KEPT.append(worker)
    worker.apply(forever, max_attempts=3)
"""

CHECKS = """
import gc
import sys
import time

import kombu
from celery import _state, signals
from kombu import pools

from conftest import CONF_BEFORE, REAL, app
from pytest_celery_retry import broker, clock, worker


def test_time_is_real():
    assert time.time is REAL["time"]
    import datetime

    assert datetime.datetime is REAL["datetime"]
    before = time.time()
    time.sleep(0.01)
    assert time.time() > before


def test_library_sleeps_are_time_sleep():
    def virtual(sleep):
        return isinstance(getattr(sleep, "__self__", None), clock.VirtualClock)

    patched = [
        name
        for name, module in list(sys.modules.items())
        if name.startswith(("kombu.", "celery.")) and virtual(getattr(module, "sleep", None))
    ]
    assert patched == []
    import kombu.utils.functional

    assert kombu.utils.functional.sleep is REAL["sleep"]


def test_app_config_is_restored():
    assert dict(app.conf.changes) == CONF_BEFORE
    assert app.conf.broker_url == "memory://"
    assert not app.conf.task_always_eager
    assert app._pool is None
    assert broker._brokers == {}
    assert getattr(_state._tls, "current_app", None) is not app


def test_no_connection_is_left_open():
    assert dict(pools.connections) == {}
    assert dict(pools.producers) == {}
    # type(), not isinstance(): isinstance() reads __class__, which makes a lazy object such as
    # django.conf.settings (pytest-django imports it) load itself, and fail without settings.
    open_connections = [
        obj
        for obj in gc.get_objects()
        if issubclass(type(obj), kombu.Connection)
        and obj._connection is not None
        and not obj._closed
    ]
    assert open_connections == []


def test_signal_receivers_are_disconnected():
    def plugin_receivers(signal):
        found = []
        for _, receiver in signal.receivers:
            target = receiver() if callable(getattr(receiver, "__callback__", None)) else receiver
            owner = getattr(target, "__self__", None)
            if isinstance(owner, worker.RetryWorker) or target is broker.announce_publish:
                found.append(target)
        return found

    assert plugin_receivers(signals.task_prerun) == []
    assert plugin_receivers(signals.task_postrun) == []
    assert plugin_receivers(signals.before_task_publish) == []
"""

CHECK_NAMES = (
    "test_time_is_real",
    "test_library_sleeps_are_time_sleep",
    "test_app_config_is_restored",
    "test_no_connection_is_left_open",
    "test_signal_receivers_are_disconnected",
)


def run_in_order(pytester: pytest.Pytester, first: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_1_first=first, test_2_checks=CHECKS)
    pytester.syspathinsert()
    return pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider", "-rA")


def test_a_test_failing_mid_retry_leaves_nothing_behind(pytester: pytest.Pytester) -> None:
    result = run_in_order(pytester, FAILING)
    result.assert_outcomes(failed=2, passed=len(CHECK_NAMES))
    result.stdout.fnmatch_lines(
        [
            "E*EndlessRetryError: forever*still retrying after 5 attempts*",
            "E*fails on purpose*",
            "FAILED test_1_first.py::test_endless_retry_stops_the_run_mid_retry*",
            "FAILED test_1_first.py::test_assertion_fails_while_the_broker_is_down*",
        ]
    )


def test_the_checks_catch_a_leak(pytester: pytest.Pytester) -> None:
    result = run_in_order(pytester, LEAKING)
    result.assert_outcomes(failed=1 + len(CHECK_NAMES))
    result.stdout.fnmatch_lines([f"FAILED test_2_checks.py::{name}*" for name in CHECK_NAMES])
