"""The eager switch: an eager suite's tests, unchanged, run their tasks on the retry worker."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SECTION = "celery-retry: what eager mode would have hidden"

APP = """
import time

from celery import Celery

app = Celery("ep", broker="redis://127.0.0.1:1/0")
app.conf.task_always_eager = True
attempts = []
sent = []


@app.task(bind=True, max_retries=3)
def flaky(self, failures):
    attempts.append(time.time())
    if self.request.retries < failures:
        raise self.retry(countdown=2 ** self.request.retries)
    return "done"


@app.task
def fails():
    raise ValueError("no such order")


@app.task
def echo(value):
    return value


@app.task
def child(n):
    sent.append(n)


@app.task
def parent(n):
    child.delay(n)
    return sent.copy()
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(ep=APP)
    pytester.syspathinsert()
    return pytester


GAPS_TEST = """
from ep import attempts, flaky

def test_gaps():
    result = flaky.delay(2)
    assert (result.state, result.get()) == ("SUCCESS", "done")
    print("gaps", [round(b - a) for a, b in zip(attempts, attempts[1:])])
"""


def test_switch_off_leaves_celerys_eager_mode(project: pytest.Pytester) -> None:
    project.makepyfile(GAPS_TEST)
    result = project.runpytest("-s", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*gaps [[]0, 0[]]*"])
    assert SECTION not in result.stdout.str()


@pytest.mark.parametrize(
    "switch", [["--celery-retry-eager"], ["-o", "celery_retry_eager=true"]], ids=["flag", "ini"]
)
def test_switch_runs_tasks_on_the_worker_and_reports(
    project: pytest.Pytester, switch: list[str]
) -> None:
    project.makepyfile(GAPS_TEST)
    result = project.runpytest("-s", "-p", "no:randomly", *switch)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*eager tasks run on the retry worker (--celery-retry-eager)*",
            "*gaps [[]1, 2[]]*",
            f"*{SECTION}*",
            "test_switch_runs_tasks_on_the_worker_and_reports.py::test_gaps",
            "  ep.flaky: retried 2 times with countdowns 1, 2 s (eager mode ignores countdowns; "
            "recursion depth 2)",
        ]
    )


def test_no_report_when_nothing_differs(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from ep import echo

        def test_echo():
            assert echo.delay("x").get() == "x"
            assert echo.apply(args=("y",)).result == "y"
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-eager")
    result.assert_outcomes(passed=1)
    assert SECTION not in result.stdout.str()


def test_exceptions_propagate_as_in_eager_mode(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import pytest
        from ep import app, fails, flaky

        def test_not_propagated():
            result = fails.delay()
            assert result.state == "FAILURE" and result.failed()
            assert isinstance(result.result, ValueError)
            assert "no such order" in result.traceback
            with pytest.raises(ValueError, match="no such order"):
                result.get()
            assert isinstance(result.get(propagate=False), ValueError)

        def test_apply_throw():
            with pytest.raises(ValueError, match="no such order"):
                fails.apply(throw=True)

        def test_task_eager_propagates():
            app.conf.task_eager_propagates = True
            try:
                with pytest.raises(ValueError, match="no such order"):
                    fails.delay()
                assert fails.apply(throw=False).state == "FAILURE"
                # Eager mode would raise Retry at the first retry: the worker runs them all.
                assert flaky.delay(1).get() == "done"
            finally:
                app.conf.task_eager_propagates = False
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-eager")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_task_eager_propagates",
            "  ep.flaky: retried 1 time with countdowns 1 s (eager mode raises Retry at the first "
            "retry instead: throw=True)",
        ]
    )


def test_countdown_nested_tasks_and_serialized_arguments(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import time
        from ep import echo, parent, sent

        def test_countdown():
            start = time.time()
            assert echo.apply_async(("x",), countdown=600).get() == "x"
            assert time.time() - start < 60  # the virtual clock stopped with the call

        def test_nested_delay_ran_after_its_sender():
            assert parent.delay(7).get() == []
            assert sent == [7]

        def test_arguments_serialized():
            assert echo.apply(args=((1, 2),)).get() == [1, 2]
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-eager")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_countdown",
            "  ep.echo: ran 600 s after it was sent (eager mode ignores countdown and eta and runs "
            "it at once)",
            "*::test_nested_delay_ran_after_its_sender",
            "  ep.child: sent while ep.parent ran, executed after it returned (eager mode "
            "runs it inside the sender, before the sender returns)",
            "*::test_arguments_serialized",
            "  ep.echo: the serializer delivered args=((1, 2),) kwargs={} as args=([[]1, 2[]],) "
            "kwargs={} (Task.apply() passes them unserialized)",
        ]
    )


def test_a_test_without_tasks_pays_nothing(project: pytest.Pytester) -> None:
    project.makeconftest(
        """
        import pytest
        from pytest_celery_retry import session

        starts = []
        original = session.RetrySession.start

        def counting_start(self):
            starts.append(self)
            return original(self)

        session.RetrySession.start = counting_start

        @pytest.fixture
        def sessions_started():
            return starts
        """
    )
    project.makepyfile(
        """
        from ep import echo

        def test_1_no_task(sessions_started):
            assert sessions_started == []

        def test_2_one_session_per_call(sessions_started):
            echo.delay(1)
            echo.delay(2)
            assert len(sessions_started) == 2

        def test_3_no_task_again(sessions_started):
            assert len(sessions_started) == 2
        """
    )
    project.runpytest("-p", "no:randomly", "--celery-retry-eager").assert_outcomes(passed=3)


def test_a_test_with_its_own_retry_worker_keeps_celerys_apply(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\ncelery_retry_app = ep:app\n")
    project.makepyfile(
        """
        from ep import attempts, flaky

        def test_both(retry_worker):
            assert retry_worker.apply(flaky, args=(1,)).countdowns == [1]
            # Task.apply() in a retry_worker test: Celery's own, countdowns ignored.
            assert flaky.apply(args=(1,)).get() == "done"
            assert round(attempts[-1] - attempts[-2]) == 0
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-eager")
    result.assert_outcomes(passed=1)
    assert SECTION not in result.stdout.str()


def test_report_under_xdist(project: pytest.Pytester) -> None:
    project.makepyfile(GAPS_TEST)
    result = project.runpytest("-p", "no:randomly", "-n", "2", "--celery-retry-eager")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*{SECTION}*", "  ep.flaky: retried 2 times*"])


def test_report_counts_repeated_findings_once_per_call(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from ep import flaky

        def test_once():
            flaky.delay(1)

        def test_twice():
            flaky.delay(1)
            flaky.delay(1)
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-eager")
    result.assert_outcomes(passed=2)
    finding = "  ep.flaky: retried 1 time with countdowns 1 s (eager mode ignores countdowns; "
    result.stdout.fnmatch_lines(
        [
            "*::test_once",
            finding + "recursion depth 1)",
            "*::test_twice",
            finding + "recursion depth 1) [[]x2[]]",
        ]
    )


def test_the_test_sees_what_a_worker_does_and_the_report_says_so(
    project: pytest.Pytester,
) -> None:
    # Eager mode has no time limits: the task would sleep its 30 s and return "slept".
    project.makepyfile(
        """
        import time
        from celery.exceptions import SoftTimeLimitExceeded
        from ep import app

        @app.task(soft_time_limit=1)
        def slow():
            try:
                time.sleep(30)
            except SoftTimeLimitExceeded:
                return "cut short"
            return "slept"

        def test_slow():
            assert slow.delay().get() == "cut short"
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-eager")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*::test_slow",
            "  test_the_test_sees_what_a_worker_does_and_the_report_says_so.slow: attempt 1: "
            "soft time limit (1 s) exceeded (a worker's doing; eager mode has no worker)",
        ]
    )


def test_a_passed_countdown_or_eta_runs_at_once_as_in_celery(project: pytest.Pytester) -> None:
    # The worker's apply() refuses them as a test's mistake; in an eager suite they are none.
    project.makepyfile(
        """
        from datetime import datetime, timedelta, timezone
        from ep import echo

        def test_passed():
            hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
            assert echo.apply_async((1,), eta=hour_ago).get() == 1
            assert echo.apply_async((2,), eta=hour_ago.replace(tzinfo=None)).get() == 2
            assert echo.apply_async((3,), countdown=-5).get() == 3
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-retry-eager")
    result.assert_outcomes(passed=1)
    assert SECTION not in result.stdout.str()
