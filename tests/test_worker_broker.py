"""The worker driven by the broker: republished retries, lost tasks, lost workers, lost brokers."""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import MaxRetriesExceededError, Reject, WorkerLostError, WorkerShutdown
from kombu.exceptions import OperationalError

from pytest_celery_retry import UsageError
from tests.conftest import actions, consumer_connects, make_app, make_poll_app


def test_seed_task_delayed_and_run_until_idle(app, flaky_broker, retry_worker):
    result = app.tasks["foo.task"].delay()

    runs = retry_worker.run_until_idle()

    run = runs[result.id]
    assert run.countdowns == [1, 3, 9]
    assert [m.retries for m in flaky_broker.messages()] == [0, 1, 2, 3]
    assert {m.task_id for m in flaky_broker.messages()} == {result.id}
    assert run.state == "FAILURE"
    assert isinstance(run.exception, MaxRetriesExceededError)
    assert actions(retry_worker) == ["acked"] * 4
    assert flaky_broker.pending() == 0


def test_broker_down_during_the_second_retrys_republish_loses_the_task(
    app, flaky_broker, retry_worker
):
    # delay() and the first retry publish; from the second retry on, every publish is refused.
    # Celery's Task.retry turns the failed republish into Reject(requeue=False).
    flaky_broker.fail_next(100, on="publish", after=2)
    result = app.tasks["foo.task"].delay()

    run = retry_worker.run_until_idle()[result.id]

    assert [a.outcome for a in run.attempts] == ["retry", "rejected"]
    assert run.lost
    assert isinstance(run.attempts[-1].raised, Reject)
    assert "LOST" in run.timeline()
    assert "task is lost" in run.timeline()
    # Without acks_late each message was acked when the worker accepted it: Celery's reject
    # of the second one comes too late to matter, the retry message simply never existed.
    assert actions(retry_worker) == ["acked", "acked"]
    assert [m.retries for m in flaky_broker.messages()] == [0, 1]  # nothing invented
    # Celery's retry publish used the app's default task_publish_retry_policy first.
    assert flaky_broker.last_publish.outcome == "failed"
    assert flaky_broker.last_publish.attempts == 4


def test_acks_late_does_not_save_a_retry_whose_republish_failed(app, flaky_broker, retry_worker):
    # Task.retry raises Reject(requeue=False) when the republish fails: with acks_late the
    # worker rejects the message without requeueing it, so it is dropped all the same.
    task = app.tasks["foo.task"]
    task.acks_late = True
    try:
        flaky_broker.fail_next(100, on="publish", after=2)
        result = task.delay()
        run = retry_worker.run_until_idle()[result.id]
    finally:
        del task.acks_late

    assert [a.outcome for a in run.attempts] == ["retry", "rejected"]
    assert run.lost
    assert actions(retry_worker) == ["acked", "rejected"]
    assert flaky_broker.redeliveries == []


class TestWorkerLost:
    """``crash_during``: the pool loses its process after accepting the job; Celery decides."""

    @pytest.fixture
    def celery_retry_app(self, request: pytest.FixtureRequest) -> Any:
        app = make_app(**getattr(request, "param", {}))

        @app.task(name="charge", acks_late=True, shared=False)
        def charge(amount: int) -> int:
            return amount

        @app.task(name="charge_early", shared=False)
        def charge_early(amount: int) -> int:
            return amount

        return app

    @pytest.mark.parametrize(
        "celery_retry_app", [{"task_reject_on_worker_lost": True}], indirect=True
    )
    def test_acks_late_and_reject_on_worker_lost_redeliver(
        self, celery_retry_app, flaky_broker, retry_worker
    ):
        charge = celery_retry_app.tasks["charge"]
        retry_worker.crash_during(charge)
        result = charge.delay(42)

        run = retry_worker.run_until_idle()[result.id]

        assert [a.outcome for a in run.attempts] == ["worker-lost", "success"]
        assert isinstance(run.attempts[0].exc, WorkerLostError)
        assert "requeued" in run.attempts[0].note
        assert run.state == "SUCCESS"
        assert run.result == 42
        assert actions(retry_worker) == ["requeued", "acked"]
        assert [(task_id, name) for _, task_id, name in flaky_broker.redeliveries] == [
            (result.id, "charge")
        ]
        assert len(flaky_broker.messages()) == 1  # redelivered, not republished

    def test_without_acks_late_the_task_is_lost(self, celery_retry_app, flaky_broker, retry_worker):
        retry_worker.crash_during("charge_early")
        result = celery_retry_app.tasks["charge_early"].delay(1)

        run = retry_worker.run_until_idle()[result.id]

        assert [a.outcome for a in run.attempts] == ["worker-lost"]
        assert run.state == "FAILURE"
        assert isinstance(run.exception, WorkerLostError)
        assert "acked before it ran" in run.attempts[0].note
        assert actions(retry_worker) == ["acked"]
        assert celery_retry_app.AsyncResult(result.id).state == "FAILURE"

    def test_acks_late_alone_acks_it_as_failed(self, celery_retry_app, flaky_broker, retry_worker):
        retry_worker.crash_during(celery_retry_app.tasks["charge"])
        result = celery_retry_app.tasks["charge"].delay(1)

        run = retry_worker.run_until_idle()[result.id]

        assert [a.outcome for a in run.attempts] == ["worker-lost"]
        assert "acks_late acked it" in run.attempts[0].note
        assert actions(retry_worker) == ["acked"]
        assert flaky_broker.redeliveries == []

    def test_bad_input(self, retry_worker):
        with pytest.raises(UsageError, match="times=0"):
            retry_worker.crash_during("charge", times=0)
        with pytest.raises(UsageError, match="pass a task"):
            retry_worker.crash_during(42)


class TestConsumerConnection:
    """The worker's own connection, lost while it waits for an ETA, as Celery's consumer."""

    @pytest.fixture
    def celery_retry_app(self, request: pytest.FixtureRequest) -> Any:
        return make_poll_app(**getattr(request, "param", {}))

    def test_reconnects_and_the_held_message_is_redelivered(
        self, celery_retry_app, flaky_broker, retry_worker
    ):
        result = celery_retry_app.tasks["poll"].delay()
        # Down from t=5 to t=25: the worker holds the retry (ETA t=10) when the broker goes,
        # and notices at once, as a waiting worker whose connection drops does.
        flaky_broker.outage(seconds=20, starting_in=5)

        run = retry_worker.run_until_idle()[result.id]

        assert run.state == "SUCCESS"
        assert [a.t for a in run.attempts] == [0, 25]
        # Celery's consumer reconnects through kombu's ensure_connection defaults: at once,
        # then 2, 4, 6, 8 s later; the broker is back at t=25, the connect then succeeds.
        assert consumer_connects(flaky_broker) == [
            (0, True),
            (5, False),
            (7, False),
            (11, False),
            (17, False),
            (25, True),
        ]
        assert actions(retry_worker) == ["acked", "connection lost", "reconnected", "acked"]
        # The held message went back to the broker when the connection dropped, then came again.
        assert [task_id for _, task_id, _ in flaky_broker.redeliveries] == [result.id]

    @pytest.mark.parametrize(
        "celery_retry_app", [{"broker_connection_retry": False}], indirect=True
    )
    def test_without_broker_connection_retry_the_worker_shuts_down(
        self, celery_retry_app, flaky_broker, retry_worker
    ):
        celery_retry_app.tasks["poll"].delay()
        flaky_broker.outage(seconds=20, starting_in=5)

        with pytest.raises(WorkerShutdown):
            retry_worker.run_until_idle()

        assert actions(retry_worker)[-2:] == ["connection lost", "worker shutdown"]

    @pytest.mark.parametrize(
        "celery_retry_app", [{"broker_connection_max_retries": 2}], indirect=True
    )
    def test_broker_connection_max_retries_ends_the_reconnects(
        self, celery_retry_app, flaky_broker, retry_worker
    ):
        celery_retry_app.tasks["poll"].delay()
        flaky_broker.outage(seconds=100, starting_in=5)

        # kombu gives up after the allowed reconnects and the worker stops with its error,
        # as a real worker's consumer does.
        with pytest.raises(OperationalError):
            retry_worker.run_until_idle()

        assert consumer_connects(flaky_broker) == [(0, True), (5, False), (7, False), (11, False)]


def test_outage_arguments_are_checked(flaky_broker):
    with pytest.raises(UsageError, match="starting_in=-1"):
        flaky_broker.outage(seconds=5, starting_in=-1)
    with pytest.raises(UsageError, match="seconds=0"):
        flaky_broker.outage(seconds=0)
