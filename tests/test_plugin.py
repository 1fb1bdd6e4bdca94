"""The plugin as pytest runs it: test files run through ``pytester``, outcome and output checked."""

from __future__ import annotations

import pytest

from tests.conftest import SEED_FRESH_INTERVALS, SEED_FRESH_TRIES

pytest_plugins = ["pytester"]

APP = """
import logging
from celery import Celery

app = Celery("proj", broker="memory://", set_as_current=False)
log = logging.getLogger(__name__)

@app.task(name="foo.task", bind=True, max_retries=3)
def foo_task(self):
    try:
        raise RuntimeError("boom")
    except Exception as exc:
        log.warning("foo.task failed: %r", exc)
        self.retry(countdown=3 ** self.request.retries)

@app.task(name="backoff", autoretry_for=(ValueError,), retry_backoff=True, max_retries=6)
def backoff():
    raise ValueError("flaky")

@app.task(name="forever", bind=True, max_retries=None)
def forever(self):
    raise self.retry(countdown=60)
"""


def match_lines(result: pytest.RunResult, *patterns: str) -> None:
    """fnmatch_lines with ``*`` as the only wildcard: brackets in expected lists stay literal."""
    result.stdout.fnmatch_lines([p.replace("[", "[[]") for p in patterns])


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(proj=APP)
    pytester.makeini("[pytest]\ncelery_retry_app = proj:app\n")
    pytester.syspathinsert()
    return pytester


def test_seed_task_through_pytest(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from celery.exceptions import MaxRetriesExceededError
        from pytest_celery_retry import assert_backoff, assert_retried
        from proj import foo_task

        def test_seed(retry_worker):
            run = retry_worker.apply(foo_task)
            assert len(run.attempts) == 4
            assert run.countdowns == [1, 3, 9]
            assert run.state == "FAILURE"
            assert isinstance(run.exception, MaxRetriesExceededError)
            assert retry_worker.clock.elapsed == 13
            assert_retried(run, times=3)
            assert_backoff(run, [1, 3, 9])
        """
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    match_lines(result, *["celery-retry: seed=1234 (--celery-retry-seed), max attempts=1000"])


def test_failed_assertion_shows_expected_recorded_and_timeline(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from pytest_celery_retry import assert_backoff
        from proj import foo_task

        def test_wrong_schedule(retry_worker):
            assert_backoff(retry_worker.apply(foo_task), [1, 2, 4])
        """
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        *[
            "*expected retry countdowns [1, 2, 4]",
            "*recorded retry countdowns [1, 3, 9]",
            "*retry timeline of foo.task*",
            "*1*+0.000s*0*retry*1s*RuntimeError('boom')*",
            "*4*+13.000s*3*failure*MaxRetriesExceededError*",
            "*final: FAILURE after 4 attempt(s), 3 retries, 13 s of virtual time*",
        ],
    )


def test_assert_retried_and_not_retried_failures(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from pytest_celery_retry import assert_not_retried, assert_retried
        from proj import foo_task

        def test_count(retry_worker):
            assert_retried(retry_worker.apply(foo_task), times=2)

        def test_none(retry_worker):
            assert_not_retried(retry_worker.apply(foo_task))
        """
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=2)
    match_lines(
        result,
        *[
            "*expected foo.task to retry 2 time(s), it retried 3 time(s) (countdowns [1, 3, 9])",
            "*expected foo.task not to retry, it retried 3 time(s)*",
        ],
    )


JITTER_TEST = """
from pytest_celery_retry import assert_backoff
from proj import backoff

def test_jitter(retry_worker):
    run = retry_worker.apply(backoff)
    assert_backoff(run, jitter=[1, 2, 4, 8, 16, 32])
    print("SCHEDULE", run.countdowns)
"""


def _schedule(result: pytest.RunResult) -> str:
    line = next(line for line in result.stdout.lines if "SCHEDULE" in line)
    return line[line.index("SCHEDULE") :]


def test_jitter_schedule_is_reproducible_from_the_seed(project: pytest.Pytester) -> None:
    project.makepyfile(JITTER_TEST)
    first = project.runpytest("-s", "-p", "no:randomly")
    second = project.runpytest("-s", "-p", "no:randomly")
    other = project.runpytest("-s", "-p", "no:randomly", "--celery-retry-seed=99")
    for result in (first, second, other):
        result.assert_outcomes(passed=1)
    assert _schedule(first) == _schedule(second)
    assert _schedule(first) != _schedule(other)
    match_lines(other, *["celery-retry: seed=99*"])


def test_endless_retry_guard_names_task_limit_and_fix(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from proj import forever

        def test_forever(retry_worker):
            retry_worker.apply(forever)
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-max-attempts=50")
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        *[
            "*EndlessRetryError: forever[*] was still retrying after 50 attempts*"
            "max_attempts=N), --celery-retry-max-attempts=N or the ini option "
            "celery_retry_max_attempts.",
            "*50*+2940.000s*49*retry*60s*",
        ],
    )


def test_ini_max_attempts(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\ncelery_retry_app = proj:app\ncelery_retry_max_attempts = 7\n")
    project.makepyfile(
        """
        import pytest
        from pytest_celery_retry import EndlessRetryError
        from proj import forever

        def test_forever(retry_worker):
            with pytest.raises(EndlessRetryError, match="after 7 attempts"):
                retry_worker.apply(forever)
        """
    )
    project.runpytest("-p", "no:randomly").assert_outcomes(passed=1)


def test_broker_outage_marker(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import pytest
        from kombu.exceptions import OperationalError
        from pytest_celery_retry import assert_publish_retries
        from proj import app

        POLICY = dict(max_retries=3, interval_start=3, interval_step=1, interval_max=6)

        @pytest.mark.broker_outage(fail_next=2)
        def test_two_refusals(flaky_broker):
            app.send_task("foo.task", retry=True, retry_policy=POLICY)
            assert_publish_retries(flaky_broker, attempts=3, intervals=INTERVALS, delivered=True)

        @pytest.mark.broker_outage(seconds=10)
        def test_outage_without_naming_the_fixture():
            with pytest.raises(OperationalError):
                app.send_task("foo.task", retry=True, retry_policy=POLICY)

        @pytest.mark.broker_outage(fail_next=2, seconds=3)
        def test_bad_marker():
            pass
        """.replace("INTERVALS", str(SEED_FRESH_INTERVALS))
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    match_lines(result, *["*give one of fail_next=, seconds= or down=True*"])


def test_broker_driven_worker(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from celery.exceptions import WorkerLostError
        from proj import app, foo_task

        @app.task(name="charge", acks_late=True, reject_on_worker_lost=True)
        def charge(amount):
            return amount

        def test_delay_then_run_until_idle(flaky_broker, retry_worker):
            result = foo_task.delay()
            run = retry_worker.run_until_idle()[result.id]
            assert run.countdowns == [1, 3, 9]
            assert len(flaky_broker.messages()) == 4
            assert run.state == "FAILURE"

        def test_lost_republish_is_reported(flaky_broker, retry_worker):
            flaky_broker.fail_next(100, on="publish", after=2)
            result = foo_task.delay()
            run = retry_worker.run_until_idle()[result.id]
            assert run.lost
            print(run.timeline())

        def test_crash_redelivers(flaky_broker, retry_worker):
            retry_worker.crash_during(charge)
            result = charge.delay(5)
            run = retry_worker.run_until_idle()[result.id]
            assert [a.outcome for a in run.attempts] == ["worker-lost", "success"]
            assert isinstance(run.attempts[0].exc, WorkerLostError)
        """
    )
    result = project.runpytest("-p", "no:randomly", "-s")
    result.assert_outcomes(passed=3)
    match_lines(
        result,
        *[
            "*2*+1.000s*1*rejected*-*Reject(*retry not published: Celery rejected the message*",
            "*the task is LOST*",
        ],
    )


def test_celerys_own_celery_app_and_celery_config_fixtures_work_beside_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest('pytest_plugins = ["celery.contrib.pytest"]')
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def celery_config():
            return {"broker_url": "memory://", "task_acks_late": True}

        def test_worker_on_celery_app(celery_app, retry_worker, flaky_broker):
            @celery_app.task(bind=True, max_retries=2, default_retry_delay=7)
            def flaky(self):
                raise self.retry()

            run = retry_worker.apply(flaky)
            assert run.countdowns == [7, 7]
            assert celery_app.conf.broker_url == flaky_broker.url
            assert flaky.acks_late  # celery_config reached the app the worker ran

        def test_celery_app_alone_is_untouched(celery_app):
            assert celery_app.conf.broker_url == "memory://"
            assert celery_app.conf.task_acks_late
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2)


def test_publish_assertion_failure_shows_broker_timeline(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from pytest_celery_retry import assert_publish_retries
        from proj import app

        def test_intervals(flaky_broker):
            flaky_broker.fail_next(2)
            app.send_task("foo.task", retry=True, retry_policy=dict(
                max_retries=3, interval_start=3, interval_step=1, interval_max=6))
            assert_publish_retries(flaky_broker, attempts=4, intervals=[3, 4, 5])
        """
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    _, second, third = SEED_FRESH_TRIES
    match_lines(
        result,
        *[
            "*publish of foo.task: expected 4 attempt(s), recorded 3; "
            f"expected intervals [3, 4, 5], recorded {SEED_FRESH_INTERVALS}*",
            "*broker timeline (pyamqp flavour*",
            f"*{second}.000s*connect*producer*FAILED*foo.task*ConnectionRefusedError*",
            f"*publish 1: foo.task -> delivered after 3 attempt(s) at t=0s, {second}s, {third}s*",
        ],
    )


def test_everything_is_restored_after_a_failing_test(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import random
        import time
        from datetime import datetime
        import kombu.utils.functional as kombu_functional
        from celery import current_app
        from proj import app, foo_task

        def test_fails_mid_retry(retry_worker, flaky_broker):
            app.conf.task_default_queue = "changed-by-the-test"
            flaky_broker.fail_next(100, on="publish")  # every retry republish fails
            run = retry_worker.apply(foo_task)
            assert run.lost
            assert type(datetime.now()).__name__ == "FakeDatetime"  # frozen while installed
            assert False, "fail while everything is installed"

        def test_the_next_test_sees_nothing_left():
            assert app.conf.task_default_queue == "celery"
            assert app.conf.broker_url == "memory://"
            assert app.conf.result_backend is None
            assert app.conf.task_always_eager is False
            assert app._pool is None
            assert type(app.backend).__name__ == "DisabledBackend"
            assert all(task.__trace__ is None for task in app.tasks.values())
            assert kombu_functional.sleep is time.sleep
            assert type(datetime.now()).__name__ == "datetime"
            assert abs(time.time() - datetime.now().timestamp()) < 5
            assert current_app.main != "proj" or current_app is not app
        """
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    match_lines(result, *["*fail while everything is installed*"])


def test_plugin_does_not_import_celery_until_a_fixture_is_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import sys

        def test_no_celery():
            assert "pytest_celery_retry.plugin" in sys.modules
            assert not [m for m in sys.modules if m == "celery" or m.startswith("celery.")]
            assert "kombu" not in sys.modules
            # Fault exploration's strategies need it; the plugin and its records do not.
            import pytest_celery_retry
            assert pytest_celery_retry.FaultSchedule is not None
            assert "hypothesis" not in sys.modules
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=1)


def test_celery_retry_app_fixture_override(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from celery import Celery

        app = Celery("override", set_as_current=False)

        @app.task(name="hello", bind=True, max_retries=1, default_retry_delay=5)
        def hello(self):
            raise self.retry()

        @pytest.fixture
        def celery_retry_app():
            return app
        """
    )
    pytester.makepyfile(
        """
        from conftest import app

        def test_override(flaky_broker, retry_worker):
            assert flaky_broker is retry_worker._session.installation(app).broker
            run = retry_worker.apply(app.tasks["hello"])
            assert run.countdowns == [5]
            assert [m.retries for m in flaky_broker.messages()] == [0, 1]
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=1)


def test_real_broker_skip_fails_when_real_brokers_are_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.real_broker
        def test_needs_redis():
            pytest.skip("set CELERY_RETRY_REDIS_URL=redis://127.0.0.1:6379/0 to run")

        def test_other_skips_stay_skips():
            pytest.skip("not a real-broker test")
        """
    )
    monkeypatch.delenv("CELERY_RETRY_REQUIRE_REAL_BROKERS", raising=False)
    pytester.runpytest("-p", "no:randomly").assert_outcomes(skipped=2)
    monkeypatch.setenv("CELERY_RETRY_REQUIRE_REAL_BROKERS", "1")
    result = pytester.runpytest("-p", "no:randomly", "-rf")
    result.assert_outcomes(failed=1, skipped=1)
    match_lines(result, *["*CELERY_RETRY_REQUIRE_REAL_BROKERS is set*CELERY_RETRY_REDIS_URL*"])
