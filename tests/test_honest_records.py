"""Honest records: what a run reports is what the task asked for and what the worker did."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import chain, group
from celery.exceptions import WorkerLostError

from pytest_celery_retry import EndlessRetryError, UsageError, worker
from tests.conftest import SEED_POLICY, actions


def test_countdown_is_what_the_task_asked_even_when_the_publish_took_longer(
    app, flaky_broker, retry_worker
):
    # The case: the broker goes down as the attempt starts; the retry's publish is
    # retried by kombu (intervals 3, 4, 5 s) and gets through at t=12, after its ETA (t=1).
    @app.task(name="outage_then_retry", bind=True, max_retries=1, shared=False)
    def outage_then_retry(self: Any) -> str:
        if self.request.retries == 0:
            flaky_broker.outage(10)
            raise self.retry(countdown=1, retry=True, retry_policy=SEED_POLICY)
        return "done"

    run = retry_worker.apply(outage_then_retry)

    assert [a.outcome for a in run.attempts] == ["retry", "success"]
    assert flaky_broker.last_publish is not None
    assert flaky_broker.last_publish.ended_at == 12
    assert run.countdowns == [1]
    assert run.attempts[0].eta == run.attempts[0].started_at + timedelta(seconds=1)
    assert run.attempts[1].t == 12  # the ETA had passed when the message arrived
    # The message's own countdown is measured from when the broker accepted it.
    assert [m.countdown for m in flaky_broker.messages() if m.retries == 1] == [-11]
    # ("-11" alone could be part of the task id.)
    assert "countdown" in run.timeline() and "-11s" not in run.timeline()


class Custom(BaseException):
    """A BaseException that is no Exception, as some libraries raise."""


class TestBaseExceptionInATask:
    """As a prefork worker reports it (measured with Celery 5.7 / billiard 4.3.2, pool="prefork",
    concurrency=1): SystemExit ends the child, WorkerLostError('Worker exited prematurely:
    exitcode 3.'), FAILURE (requeued with acks_late + reject_on_worker_lost); another
    BaseException is the job's failure, FAILURE with it. (A solo worker dies of the TypeError.)
    """

    def test_system_exit_loses_the_worker_process(self, app, retry_worker):
        @app.task(name="exits", shared=False)
        def exits() -> None:
            raise SystemExit(3)

        run = retry_worker.apply(exits)

        assert [a.outcome for a in run.attempts] == ["worker-lost"]
        assert run.state == "FAILURE"
        assert isinstance(run.exception, WorkerLostError)
        assert str(run.exception) == "Worker exited prematurely: exitcode 3."
        assert isinstance(run.attempts[0].exc, SystemExit)
        assert "SystemExit" in run.attempts[0].note
        assert "acked when it was accepted" in run.attempts[0].note
        assert "SystemExit('3')" in run.timeline()
        result = app.AsyncResult(run.task_id)
        assert result.state == "FAILURE"
        assert isinstance(result.result, WorkerLostError)
        assert actions(retry_worker) == ["acked"]

    def test_with_reject_on_worker_lost_it_runs_again(self, app, flaky_broker, retry_worker):
        @app.task(
            name="exits_once", bind=True, acks_late=True, reject_on_worker_lost=True, shared=False
        )
        def exits_once(self: Any) -> str:
            if not self.request.delivery_info.get("redelivered") and not flaky_broker.redeliveries:
                raise SystemExit()
            return "done"

        run = retry_worker.apply(exits_once)

        assert [a.outcome for a in run.attempts] == ["worker-lost", "success"]
        assert "requeued" in run.attempts[0].note
        assert run.result == "done"
        assert actions(retry_worker) == ["requeued", "acked"]

    @pytest.mark.skipif(
        not worker._BILLIARD_REPORTS_BASE_EXCEPTIONS,
        reason="billiard < 4.3 ends the child for any BaseException (the next test covers it)",
    )
    def test_another_base_exception_fails_the_task_with_it(self, app, retry_worker):
        @app.task(name="custom", shared=False)
        def custom() -> None:
            raise Custom("not an Exception")

        run = retry_worker.apply(custom)

        assert [a.outcome for a in run.attempts] == ["failure"]
        assert isinstance(run.exception, Custom)
        assert run.attempts[0].exc is run.exception
        assert "Custom('not an Exception')" in run.timeline()
        assert app.AsyncResult(run.task_id).state == "FAILURE"

    def test_a_later_task_still_runs(self, app, flaky_broker, retry_worker):
        @app.task(name="exits_too", shared=False)
        def exits_too() -> None:
            raise SystemExit(1)

        first = exits_too.delay()
        second = app.tasks["foo.task"].delay()

        runs = retry_worker.run_until_idle()

        assert runs[first.id].state == "FAILURE"
        assert runs[second.id].countdowns == [1, 3, 9]

    def test_before_billiard_4_3_any_base_exception_ends_the_process(
        self, app, retry_worker, monkeypatch
    ):
        # billiard 4.2's child loop catches Exception only: anything else ends the child.
        monkeypatch.setattr(worker, "_BILLIARD_REPORTS_BASE_EXCEPTIONS", False)

        @app.task(name="custom_old", shared=False)
        def custom_old() -> None:
            raise Custom("ends the child")

        run = retry_worker.apply(custom_old)

        assert [a.outcome for a in run.attempts] == ["worker-lost"]
        assert str(run.exception) == "Worker exited prematurely: exitcode 1."
        assert isinstance(run.attempts[0].exc, Custom)

    @pytest.mark.parametrize(
        "stop", [pytest.fail.Exception("from the test"), pytest.skip.Exception("from the test")]
    )
    def test_pytest_outcomes_end_the_test(self, app, retry_worker, stop):
        @app.task(name="stops", shared=False)
        def stops() -> None:
            raise stop

        with pytest.raises(type(stop), match="from the test"):
            retry_worker.apply(stops)


def test_ctrl_c_in_a_task_stops_the_session(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from celery import Celery

        app = Celery("ctrl_c", set_as_current=False)

        @app.task(name="interrupted")
        def interrupted():
            raise KeyboardInterrupt

        @pytest.fixture
        def celery_retry_app():
            return app
        """
    )
    pytester.makepyfile(
        """
        from conftest import interrupted

        def test_a(retry_worker):
            retry_worker.apply(interrupted)

        def test_b(flaky_broker, retry_worker):
            interrupted.delay()
            retry_worker.run_until_idle()

        def test_c():
            pass
        """
    )
    for name in ("test_a", "test_b"):
        result = pytester.runpytest("-p", "no:randomly", "-k", f"{name} or test_c")
        assert result.ret == pytest.ExitCode.INTERRUPTED
        result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
        result.stdout.no_fnmatch_line("*1 passed*")


class TestEndlessRetryGuard:
    def test_a_finite_max_retries_above_the_guard_is_its_own_limit(self, app, retry_worker):
        @app.task(name="patient", bind=True, max_retries=1500, shared=False)
        def patient(self: Any) -> int:
            if self.request.retries < 1200:
                raise self.retry(countdown=1)
            return int(self.request.retries)

        run = retry_worker.apply(patient)  # the guard's default limit is 1000 attempts

        assert run.state == "SUCCESS"
        assert run.retries == 1200

    @pytest.mark.parametrize("caller", ["apply", "run_until_idle"])
    def test_an_explicit_limit_is_named(self, app, flaky_broker, retry_worker, caller):
        with pytest.raises(EndlessRetryError) as excinfo:
            if caller == "apply":
                retry_worker.apply(app.tasks["foo.task"], max_attempts=2)
            else:
                app.tasks["foo.task"].delay()
                retry_worker.run_until_idle(max_attempts=2)

        message = str(excinfo.value)
        assert f"max_attempts=2 passed to {caller}()" in message
        assert "max_retries=3" in message
        assert "max_retries=None" not in message and "forever" not in message

    def test_max_retries_none_is_blamed_with_the_guards_limit(self, app, retry_worker):
        retry_worker.settings.max_attempts = 20  # what --celery-retry-max-attempts=20 sets

        @app.task(name="forever", bind=True, max_retries=None, shared=False)
        def forever(self: Any) -> None:
            raise self.retry(countdown=60)

        with pytest.raises(EndlessRetryError) as excinfo:
            retry_worker.apply(forever)

        message = str(excinfo.value)
        assert "still retrying after 20 attempts" in message
        assert "max_retries=None retries forever" in message
        assert "the endless-retry guard stops a task after 20 attempts" in message

    def test_redeliveries_past_a_finite_max_retries_are_stopped(
        self, app, flaky_broker, retry_worker
    ):
        # Every run of it loses its worker process and the message comes back: forever.
        retry_worker.settings.max_attempts = 5

        @app.task(
            name="doomed", bind=True, acks_late=True, reject_on_worker_lost=True, shared=False
        )
        def doomed(self: Any) -> None:
            if self.request.retries < 2:
                raise self.retry(countdown=1, max_retries=2)
            raise SystemExit(1)

        app.tasks["doomed"].max_retries = 1  # the per-call max_retries=2 allows 3 attempts

        with pytest.raises(EndlessRetryError) as excinfo:
            retry_worker.apply(doomed)

        run = retry_worker.runs[next(iter(retry_worker.runs))]
        assert len(run.attempts) == 3 + 5
        message = str(excinfo.value)
        assert "still delivered again after 8 attempts" in message
        assert "max_retries=1 allows 3 attempt(s)" in message
        assert "the endless-retry guard stops a task after 5 attempts past those" in message


class TestWhatApplyRuns:
    """apply() works until its task is finished; what the task sent runs when it is due first."""

    @staticmethod
    def family(app: Any) -> tuple[Any, Any, list[int]]:
        ran: list[int] = []

        @app.task(name="child", shared=False)
        def child(x: int) -> int:
            ran.append(x)
            return x * 2

        @app.task(name="parent", bind=True, max_retries=1, shared=False)
        def parent(self: Any, retry: bool = False) -> str:
            child.delay(self.request.retries)
            if self.request.retries == 0 and retry:
                raise self.retry(countdown=5)
            return "sent"

        return parent, child, ran

    def test_a_child_sent_by_the_last_attempt_waits_for_run_until_idle(
        self, app, flaky_broker, retry_worker
    ):
        parent, _, ran = self.family(app)

        run = retry_worker.apply(parent)

        assert run.state == "SUCCESS"
        assert ran == []
        assert flaky_broker.pending() == 1
        child_runs = retry_worker.run_until_idle()
        assert ran == [0]
        assert [r.task_name for r in child_runs.values()] == ["child"]

    def test_a_child_sent_before_a_retry_runs_meanwhile(self, app, flaky_broker, retry_worker):
        parent, _, ran = self.family(app)

        run = retry_worker.apply(parent, kwargs={"retry": True})

        assert [a.outcome for a in run.attempts] == ["retry", "success"]
        assert ran == [0]  # ran while the worker waited for the retry's ETA
        assert flaky_broker.pending() == 1  # the second attempt's child

    def test_a_chain_returns_the_run_of_its_last_task(self, app, retry_worker):
        @app.task(name="add", shared=False)
        def add(x: int, y: int) -> int:
            return x + y

        run = retry_worker.apply(chain(add.s(1, 2), add.s(10), app.tasks["foo.task"].si()))

        assert run.task_name == "foo.task" and run.countdowns == [1, 3, 9]
        assert [(r.task_name, r.result) for r in retry_worker.runs.values()] == [
            ("add", 3),
            ("add", 13),
            ("foo.task", None),
        ]

    def test_a_chain_whose_first_task_fails_never_runs_the_last(self, app, retry_worker):
        @app.task(name="fails", shared=False)
        def fails() -> None:
            raise ValueError("no")

        @app.task(name="never", shared=False)
        def never(x: Any) -> None:
            raise AssertionError("ran after a failed link")

        run = retry_worker.apply(chain(fails.s(), never.s()))

        assert run.task_name == "never"
        # Celery fails the chain's rest in the result backend: the run says what it holds.
        assert run.attempts == [] and run.state == "FAILURE"
        assert isinstance(run.exception, ValueError) and str(run.exception) == "no"
        assert [(r.task_name, r.state) for r in retry_worker.runs.values()] == [
            ("fails", "FAILURE")
        ]
        assert app.AsyncResult(run.task_id).state == "FAILURE"

    def test_a_group_is_refused(self, app, retry_worker):
        with pytest.raises(UsageError, match="run_until_idle"):
            retry_worker.apply(group(app.tasks["foo.task"].s(), app.tasks["foo.task"].s()))


def test_reject_on_worker_lost_set_in_the_configuration_after_binding_has_no_effect(
    app, retry_worker
):
    # Celery copies task_* settings onto each task when it binds the task to the app.
    @app.task(name="charge", acks_late=True, shared=False)
    def charge() -> int:
        return 1

    app.finalize()
    app.conf.task_reject_on_worker_lost = True
    retry_worker.crash_during(charge)

    assert [a.outcome for a in retry_worker.apply(charge).attempts] == ["worker-lost"]
    charge.reject_on_worker_lost = True
    retry_worker.crash_during(charge)
    assert [a.outcome for a in retry_worker.apply(charge).attempts] == ["worker-lost", "success"]
