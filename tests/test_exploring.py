"""Fault exploration: schedules, strategies, the fault_explorer fixture and the invariants.

The pytester tests run what a user writes (a ``@given`` property over ``fault_schedules``)
against the example project, with Hypothesis's pytest plugin on, and read its report.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import find, given, settings

from pytest_celery_retry import (
    FaultSchedule,
    OperationFault,
    Outage,
    UsageError,
    WorkerCrash,
    assert_finishes_within,
    assert_no_task_lost,
    assert_publish_succeeds_or_raises,
)
from pytest_celery_retry.explorer import FaultExplorer
from pytest_celery_retry.session import Settings
from pytest_celery_retry.strategies import fault_schedules
from tests.conftest import SEED_POLICY, make_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def slow_app(**config: Any) -> Any:
    """An app whose ``slow`` task is the seed's retry after a 2 s body (proj.build_report)."""
    app = make_app(task_publish_retry_policy=SEED_POLICY, **config)

    @app.task(name="slow", bind=True, max_retries=3, shared=False)
    def slow(self: Any) -> None:
        time.sleep(2)
        self.retry(countdown=3**self.request.retries)

    return app


# -- the records -------------------------------------------------------------------------------
SCHEDULE = FaultSchedule(
    [
        WorkerCrash("foo.task", start=4),
        Outage(start=3, seconds=9),
        OperationFault("ack", start=20, times=2),
    ]
)


def test_a_schedule_reads_as_sentences_in_the_order_the_faults_begin() -> None:
    assert str(SCHEDULE) == (
        "broker down from t=3 s for 9 s; "
        "from t=4 s, the worker process dies during the next run of foo.task; "
        "from t=20 s, the next 2 acks are lost (the broker delivers the messages again)"
    )
    assert str(FaultSchedule()) == "no faults"


def test_a_schedule_prints_as_the_python_that_builds_it() -> None:
    namespace = {"FaultSchedule": FaultSchedule, "Outage": Outage}
    namespace.update(OperationFault=OperationFault, WorkerCrash=WorkerCrash)
    assert eval(repr(SCHEDULE), namespace) == SCHEDULE
    assert SCHEDULE.as_code() == (
        "flaky_broker.outage(9, starting_in=3)\n"
        "retry_worker.crash_during('foo.task', times=1, starting_in=4)\n"
        "flaky_broker.fail_next(2, on='ack', starting_in=20)"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Outage(start=-1, seconds=3), "Outage(start=-1): give virtual seconds"),
        (lambda: Outage(start=0, seconds=0), "Outage(seconds=0): give virtual seconds, a"),
        (lambda: OperationFault("boom", 0), "OperationFault(on='boom'): choose one of"),  # type: ignore[arg-type]
        (lambda: OperationFault("ack", 0, times=0), "OperationFault(times=0): a whole number"),
        (lambda: WorkerCrash("", 0), "WorkerCrash(task=''): give the task's name"),
        (lambda: FaultSchedule(["outage"]), "a schedule holds Outage, OperationFault and"),  # type: ignore[list-item]
        (lambda: fault_schedules(kinds=["flood"]), "unknown kind(s) 'flood'"),
        (lambda: fault_schedules(kinds=["crash"]), "name the tasks whose worker process"),
        (lambda: fault_schedules(max_faults=0), "fault_schedules(max_faults=0): a whole number"),
        (lambda: fault_schedules(horizon=float("nan")), "fault_schedules(horizon=nan)"),
    ],
)
def test_bad_faults_are_refused_with_the_fix(make: Any, message: str) -> None:
    with pytest.raises(UsageError, match=None) as raised:
        make()
    assert message in str(raised.value)


# -- the faults a schedule uses ----------------------------------------------------------------
def test_several_outages_and_timed_faults_apply_on_the_virtual_clock() -> None:
    explorer = FaultExplorer(Settings())
    schedule = FaultSchedule(
        [Outage(2, 3), Outage(10, 2), OperationFault("publish", start=20, times=1)]
    )
    app = make_app()
    with explorer.example(schedule, app=app) as (_, broker):
        down = []
        for _ in range(25):
            down.append(broker.is_down)
            broker.clock.advance(1)
        assert [t for t, is_down in enumerate(down) if is_down] == [2, 3, 4, 10, 11]
        assert broker.fault_schedule is schedule
        with broker.suspend_faults():
            app.send_task("foo.task")  # a connection, before the fault's moment has passed
        app.send_task("foo.task", retry=True, retry_policy=SEED_POLICY)
        assert [op.ok for op in broker.publish_attempts] == [True, False, True]


def test_scheduled_outages_keep_each_its_own_way_of_being_away(flaky_broker: Any) -> None:
    flaky_broker.outage(2, starting_in=1, how="hang")
    flaky_broker.outage(2, starting_in=5)
    seen = []
    for _ in range(8):
        seen.append((flaky_broker.is_down, flaky_broker.next_outage_start))
        flaky_broker.clock.advance(1)
    assert seen == [
        (False, 1),
        (True, 5),  # hanging
        (True, 5),
        (False, 5),
        (False, 5),
        (True, None),  # refusing
        (True, None),
        (False, None),
    ]


def test_a_timed_crash_spares_the_runs_before_it() -> None:
    explorer = FaultExplorer(Settings())
    app = make_app()
    with explorer.example(FaultSchedule([WorkerCrash("foo.task", start=3)]), app=app) as ex:
        run = ex.worker.apply(app.tasks["foo.task"])
    # Attempts at 0 and 1 run; the one at 4 loses its process (acks early: not redelivered).
    assert [a.outcome for a in run.attempts] == ["retry", "retry", "worker-lost"]


# -- the explorer ------------------------------------------------------------------------------
def test_each_example_starts_fresh_and_leaves_nothing_behind() -> None:
    explorer = FaultExplorer(Settings(seed=7))
    app = slow_app()
    url = app.conf.broker_url
    seen = []
    for schedule in (FaultSchedule([Outage(1, 14)]), FaultSchedule()):
        with pytest.raises(RuntimeError), explorer.example(schedule, app=app) as (worker, broker):
            app.conf.task_default_queue = "changed by the example"
            run = worker.apply(app.tasks["slow"])
            seen.append((run.state, run.lost, worker.clock.elapsed, len(broker.operations)))
            raise RuntimeError("the example fails")
        assert app.conf.broker_url == url
        assert app.conf.task_default_queue == "celery"
    # The second example saw no outage, a clock from 0 and a broker of its own.
    assert seen == [("FAILURE", True, 14.0, 8), ("FAILURE", False, 21.0, 6)]
    assert explorer.examples == 2


def test_example_refuses_what_is_not_a_schedule() -> None:
    with (
        pytest.raises(UsageError, match="pass a FaultSchedule"),
        FaultExplorer(Settings()).example([Outage(1, 2)]),  # type: ignore[arg-type]
    ):
        pass


@settings(max_examples=30, deadline=None, database=None)
@given(schedule=fault_schedules(max_faults=3, horizon=30))
def test_drawn_schedules_stay_within_their_bounds(schedule: FaultSchedule) -> None:
    assert len(schedule) <= 3
    for fault in schedule:
        assert 0 <= fault.start <= 30 and fault.start == int(fault.start)
    assert list(schedule) == sorted(schedule, key=lambda f: (f.start, type(f).__name__, repr(f)))


# -- the invariants ----------------------------------------------------------------------------
def test_no_task_lost_passes_for_a_task_that_fails_and_names_a_lost_one() -> None:
    explorer = FaultExplorer(Settings())
    app = slow_app()
    with explorer.example(app=app) as (worker, _):
        worker.apply(app.tasks["slow"])
        assert_no_task_lost(worker)  # FAILURE after its retries is not lost
    with explorer.example(FaultSchedule([Outage(1, 14)]), app=app) as (worker, _):
        worker.apply(app.tasks["slow"])
        with pytest.raises(AssertionError) as failed:
            assert_no_task_lost(worker)
    message = str(failed.value)
    assert "1 of 1 task(s) lost" in message
    assert "published at t=2 s never reached the broker" in message
    assert "fault schedule: broker down from t=1 s for 14 s" in message
    assert "    flaky_broker.outage(14, starting_in=1)" in message
    assert "reproduce with --celery-retry-seed=1234" in message
    assert "publish 2: slow -> failed after 5 attempt(s) at t=2s, 2s, 5s, 9s, 14s" in message


def test_a_message_that_never_ran_is_lost(flaky_broker: Any, retry_worker: Any, app: Any) -> None:
    result = app.send_task("foo.task")
    with pytest.raises(AssertionError, match=rf"foo.task\[{result.id}\] was published at t=0s"):
        assert_no_task_lost(retry_worker)


def test_finishes_within(retry_worker: Any, app: Any) -> None:
    retry_worker.apply(app.tasks["foo.task"])  # attempts at 0, 1, 4, 13
    assert_finishes_within(retry_worker, 13)
    with pytest.raises(AssertionError, match=r"within 12 virtual seconds:\n.*finished at t=13s"):
        assert_finishes_within(retry_worker, 12)
    with pytest.raises(UsageError, match="seconds=-1"):
        assert_finishes_within(retry_worker, -1)


def test_publish_succeeds_or_raises(flaky_broker: Any, app: Any) -> None:
    from kombu.exceptions import OperationalError

    flaky_broker.fail_next(3, on="connect")
    outcome = assert_publish_succeeds_or_raises(
        flaky_broker, lambda: app.send_task("foo.task", retry=True, retry_policy=SEED_POLICY)
    )
    assert isinstance(outcome.error, OperationalError)  # raised to the caller: fine

    def enqueue_swallowing_errors() -> None:
        # The bug: the caller never learns.
        with contextlib.suppress(OperationalError):
            app.send_task("foo.task", retry=True, retry_policy=SEED_POLICY)

    flaky_broker.fail_next(3, on="connect")
    with pytest.raises(AssertionError, match="returned without an error, but no message") as e:
        assert_publish_succeeds_or_raises(flaky_broker, enqueue_swallowing_errors)
    assert "broker timeline" in str(e.value)
    delivered = assert_publish_succeeds_or_raises(flaky_broker, lambda: app.send_task("x"))
    assert [m.task_name for m in delivered.delivered] == ["x"]


def test_a_publish_that_raises_after_its_message_arrived_fails(flaky_broker: Any, app: Any) -> None:
    def publish_then_raise() -> None:
        app.send_task("x")
        raise RuntimeError("after the publish")

    def publish_another() -> Any:
        app.send_task("x")
        return app.AsyncResult("not-sent")

    with pytest.raises(AssertionError, match=r"raised RuntimeError\('after the publish'\) alth"):
        assert_publish_succeeds_or_raises(flaky_broker, publish_then_raise)
    with pytest.raises(AssertionError, match="returned the result of not-sent, whose message"):
        assert_publish_succeeds_or_raises(flaky_broker, publish_another)


def test_invariants_refuse_what_they_cannot_check(flaky_broker: Any) -> None:
    with pytest.raises(UsageError, match="pass the retry worker"):
        assert_no_task_lost(object())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="pass the in-memory broker"):
        assert_publish_succeeds_or_raises(object(), lambda: None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"publish=3\): pass a function that publishes"):
        assert_publish_succeeds_or_raises(flaky_broker, 3)  # type: ignore[arg-type]


def test_timed_faults_refuse_a_bad_start(flaky_broker: Any, retry_worker: Any) -> None:
    with pytest.raises(UsageError, match=r"fail_next\(starting_in=-1\): give the virtual"):
        flaky_broker.fail_next(1, on="publish", starting_in=-1)
    with pytest.raises(UsageError, match=r"crash_during\(starting_in=nan\): give the virtual"):
        retry_worker.crash_during("foo.task", starting_in=float("nan"))
    with pytest.raises(UsageError, match="a worker crash needs the retry worker"):
        FaultSchedule([WorkerCrash("foo.task", 1)]).apply(flaky_broker)


# -- what a user writes ------------------------------------------------------------------------
PROPERTY = """
from hypothesis import given, settings
from proj.tasks import build_report

from pytest_celery_retry import assert_no_task_lost
from pytest_celery_retry.strategies import fault_schedules


@settings(max_examples=200, deadline=None, database=None)
@given(schedule=fault_schedules(kinds=["outage"], horizon=30, max_faults=2))
def test_build_report_is_never_lost(fault_explorer, schedule):
    with fault_explorer.example(schedule) as (worker, broker):
        worker.apply(build_report)
        assert_no_task_lost(worker)
"""

REGRESSION = """
from proj.tasks import build_report
from pytest_celery_retry import assert_no_task_lost


def test_pasted(flaky_broker, retry_worker):
    {code}
    retry_worker.apply(build_report)
    assert_no_task_lost(retry_worker)
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # Hypothesis's own plugin on, as in a user's run (tests/conftest.py turns it off).
    monkeypatch.setenv("PYTEST_ADDOPTS", "")
    pytester.makeini(f"[pytest]\npythonpath = {EXAMPLES}\ncelery_retry_app = proj.celery:app\n")
    return pytester


@pytest.mark.slow
def test_a_failing_property_reports_the_shrunk_schedule_as_a_regression_test(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(test_property=PROPERTY)
    first = project.runpytest("-p", "no:randomly", "--hypothesis-seed=3")
    first.assert_outcomes(failed=1)
    output = first.stdout.str()
    first.stdout.fnmatch_lines(
        [
            "*1 of 1 task(s) lost:",
            "*the retry of proj.build_report*published at t=2 s never reached the broker*",
            "*fault schedule: broker down from t=1 s for 14 s",
            "*as a regression test (at t=0):",
            "*    flaky_broker.outage(14, starting_in=1)",
        ]
    )
    assert "schedule=FaultSchedule([Outage(start=1.0, seconds=14.0)])," in output
    # The same seeds find the same schedule.
    again = project.runpytest("-p", "no:randomly", "--hypothesis-seed=3")
    assert "broker down from t=1 s for 14 s" in again.stdout.str()
    # The printed line, pasted into a plain test, loses the task the same way.
    code = output.split("as a regression test (at t=0):\n")[1].splitlines()[0].split("E")[-1]
    project.makepyfile(test_property="", test_pasted=REGRESSION.format(code=code.strip()))
    pasted = project.runpytest("-p", "no:randomly")
    pasted.assert_outcomes(failed=1)
    pasted.stdout.fnmatch_lines(["*published at t=2 s never reached the broker*"])


@pytest.mark.slow
def test_each_examples_schedule_is_noted_for_hypothesis(project: pytest.Pytester) -> None:
    project.makepyfile(
        # One outage of at most 10 s never outlasts the publish policy's 12 s (two can).
        PROPERTY.replace("horizon=30, max_faults=2", "horizon=30, max_outage=10, max_faults=1")
        + """

@settings(max_examples=5, deadline=None, database=None)
@given(schedule=fault_schedules(kinds=["outage"], horizon=5))
def test_my_own_assertion_fails(fault_explorer, schedule):
    with fault_explorer.example(schedule) as (worker, broker):
        assert len(schedule) == 0


from proj import tasks
from pytest_celery_retry import assert_side_effect


@settings(max_examples=50, deadline=None, database=None)
@given(schedule=fault_schedules(kinds=["outage"], horizon=10, max_faults=1))
def test_charged_exactly_once(fault_explorer, schedule):
    with fault_explorer.example(schedule) as (worker, broker):
        charges = worker.track(tasks.gateway, "charge")
        worker.apply(tasks.charge_order, args=(7,))
        worker.run_until_idle()
        assert_side_effect(charges, times=1)
"""
    )
    result = project.runpytest("-p", "no:randomly", "--hypothesis-show-statistics")
    result.assert_outcomes(passed=1, failed=2)
    # A plain assertion's report shows the schedule too, from hypothesis.note().
    result.stdout.fnmatch_lines(
        ["*fault schedule: broker down from t=0 s for 1 s", "*celery-retry seed 1234*"]
    )
    # So does the side-effect assertion's: exactly once, broken by a one-second outage.
    result.stdout.fnmatch_lines(
        [
            "*expected *.charge to be called exactly 1 time(s), it was called 2 time(s)*",
            "*fault schedule: broker down from t=1 s for 1 s",
            "*    flaky_broker.outage(1, starting_in=1)",
        ]
    )
    # hypothesis.event() counts the kinds of schedules tried.
    result.stdout.fnmatch_lines(["*schedule with Outage*", "*schedule with no faults*"])


def test_strategies_without_hypothesis_name_the_extra() -> None:
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import pytest_celery_retry\n"
        "try:\n    import pytest_celery_retry.strategies\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'pytest-celery-retry[hypothesis]'" in out.stdout


def test_schedules_shrink_to_fewer_earlier_shorter_faults() -> None:
    # The simplest schedule of all is no fault; the simplest outage starts at 0 and lasts 1 s.
    assert find(fault_schedules(), lambda _: True) == FaultSchedule()
    one = find(fault_schedules(kinds=["outage"]), lambda s: len(s) > 0)
    assert one == FaultSchedule([Outage(start=0, seconds=1)])
    longer = find(fault_schedules(kinds=["outage"]), lambda s: any(f.start >= 5 for f in s))
    assert longer == FaultSchedule([Outage(start=5, seconds=1)])
