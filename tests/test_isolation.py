"""A test that fails in the middle of a retry leaves nothing behind for the next test.

Both the failing tests and the checks run in one inner pytest session, in file order
(``-p no:randomly``), so the checks see exactly the process state the failures left. A
control session leaks on purpose, to show that each check can fail.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_retry import ConfigurationError
from tests.conftest import make_app

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
from pytest_celery_retry import broker, clock, transport, worker


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
    assert not app.conf.task_always_eager
    assert app._pool is None
    assert transport._brokers == {}
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
            if isinstance(owner, (worker.RetryWorker, broker.PublishAnnouncements)):
                found.append(target)
        return found

    assert plugin_receivers(signals.task_prerun) == []
    assert plugin_receivers(signals.task_postrun) == []
    assert plugin_receivers(signals.before_task_publish) == []


def test_celery_is_not_hooked():
    from celery import Celery

    assert Celery._connection.__module__ == "celery.app.base"
    for name in ("pool", "producer_pool", "backend"):
        assert vars(Celery)[name].fget.__module__ == "celery.app.base"
"""

CHECK_NAMES = (
    "test_time_is_real",
    "test_library_sleeps_are_time_sleep",
    "test_app_config_is_restored",
    "test_no_connection_is_left_open",
    "test_signal_receivers_are_disconnected",
    "test_celery_is_not_hooked",
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


# -- what a test changes on its apps ------------------------------------------------------------
# A test may change its apps' settings before the plugin installs anything (or instead of it):
# the settings are taken when the fixtures are set up, and put back at teardown on every path.
SETTINGS_CONFTEST = """
import pytest
from celery import Celery

app = Celery("settings", broker="memory://", set_as_current=False)
other = Celery("other", broker="memory://", set_as_current=False)
for configured in (app, other):
    assert configured.conf.broker_url  # loads the configuration
lazy = Celery("lazy", broker="memory://", set_as_current=False)  # not configured yet
BEFORE = {"app": dict(app.conf.changes), "other": dict(other.conf.changes)}
LAZY_BEFORE = dict(lazy._preconf)


@app.task(name="ok")
def ok():
    return "ok"


@other.task(name="other.ok")
def other_ok():
    return "other"


@pytest.fixture
def celery_retry_app():
    return app


@pytest.fixture
def changes_settings_then_fails():
    app.conf.task_acks_late = True
    raise RuntimeError("the fixture fails after changing the app")


@pytest.fixture
def changes_settings_and_env(monkeypatch):
    app.conf.task_default_queue = "elsewhere"
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://127.0.0.1:9//")  # refused by the install
"""

CHANGES_SETTINGS = """
import pytest
from conftest import app, lazy, ok, other, other_ok
from pytest_celery_retry import UsageError


def test_settings_before_the_first_apply(retry_worker):
    app.conf.task_default_queue = "elsewhere"
    app.conf.task_acks_late = True
    app.conf.broker_connection_timeout = 30
    assert retry_worker.apply(ok).state == "SUCCESS"


def test_settings_of_another_app(retry_worker):
    other.conf.task_default_queue = "other-queue"
    assert retry_worker.apply(other_ok).result == "other"


def test_settings_of_an_app_not_configured_yet(retry_worker):
    lazy.conf.task_acks_late = True
    assert not lazy.configured


def test_settings_of_an_app_used_by_no_fixture(celery_retry_clock):
    other.conf.broker_connection_timeout = 30


def test_a_bad_retry_policy_is_refused(retry_worker):
    app.conf.task_publish_retry_policy = {"max_retries": 2, "interval_strat": 1}
    with pytest.raises(UsageError, match="interval_strat"):
        retry_worker.apply(ok)


def test_a_bad_retry_policy_fails_the_test(retry_worker):
    app.conf.task_publish_retry_policy = {"max_retry": 2}
    retry_worker.apply(ok)


def test_the_fixture_set_up_fails(celery_retry_session, changes_settings_then_fails):
    pass


def test_the_install_is_refused(celery_retry_session, changes_settings_and_env, retry_worker):
    pass
"""

SETTINGS_CHECKS = """
from conftest import BEFORE, LAZY_BEFORE, app, lazy, ok, other


def test_settings_are_as_before():
    assert dict(app.conf.changes) == BEFORE["app"]
    assert dict(other.conf.changes) == BEFORE["other"]
    assert not lazy.configured
    assert lazy._preconf == LAZY_BEFORE


def test_the_app_still_works(retry_worker):
    assert retry_worker.apply(ok).state == "SUCCESS"
"""


def run_settings_suite(pytester: pytest.Pytester, *options: str) -> pytest.RunResult:
    pytester.makeconftest(SETTINGS_CONFTEST)
    pytester.makepyfile(test_1_changes=CHANGES_SETTINGS, test_2_checks=SETTINGS_CHECKS)
    pytester.syspathinsert()
    return pytester.runpytest("-p", "no:cacheprovider", "-rA", *options)


def test_settings_a_test_changes_are_restored_on_every_path(pytester: pytest.Pytester) -> None:
    result = run_settings_suite(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=7, failed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*RuntimeError: the fixture fails after changing the app*",
            "*ConfigurationError: the environment variable(s) CELERY_BROKER_URL override*",
            "*UsageError: task_publish_retry_policy has unknown key(s) 'max_retry'*",
            "ERROR test_1_changes.py::test_the_fixture_set_up_fails*",
            "ERROR test_1_changes.py::test_the_install_is_refused*",
            "FAILED test_1_changes.py::test_a_bad_retry_policy_fails_the_test*",
        ]
    )


@pytest.mark.parametrize(
    "options",
    [
        *(("-p", "randomly", f"--randomly-seed={seed}") for seed in (1, 2, 3, 4)),
        ("-p", "randomly", "--randomly-seed=5", "-p", "xdist", "-n", "2"),
    ],
    ids=["seed-1", "seed-2", "seed-3", "seed-4", "xdist"],
)
def test_in_any_order_only_the_failing_tests_fail(
    pytester: pytest.Pytester, options: tuple[str, ...]
) -> None:
    run_settings_suite(pytester, *options).assert_outcomes(passed=7, failed=1, errors=2)


@pytest.fixture
def made_before_the_session() -> Any:
    return make_app()


def test_a_refused_install_keeps_the_tests_own_settings(
    made_before_the_session: Any, retry_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = made_before_the_session
    app.conf.task_acks_late = True
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://127.0.0.1:9//")

    with pytest.raises(ConfigurationError, match="CELERY_BROKER_URL"):
        retry_worker.apply(app.tasks["foo.task"])

    assert app.conf.task_acks_late  # undone at teardown, not by the refusal


def test_an_app_the_test_leaves_alone_keeps_its_pools_and_backend() -> None:
    from pytest_celery_retry.session import RetrySession
    from pytest_celery_retry.worker import RetryWorker

    untouched, used = make_app(), make_app()
    pool, producer_pool, backend = untouched.pool, untouched.producer_pool, untouched.backend
    session = RetrySession().start()
    worker = RetryWorker(session)
    try:
        worker.apply(used.tasks["foo.task"])
    finally:
        worker.close()
        session.close()

    assert (untouched._pool, untouched.amqp._producer_pool) == (pool, producer_pool)
    assert untouched.backend is backend
