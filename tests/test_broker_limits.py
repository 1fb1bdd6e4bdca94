"""What the broker does to a retry the worker holds past its limits, on the virtual clock.

Redis's visibility sweep restores the held retry and every copy runs (celery#2481);
RabbitMQ's consumer_timeout closes the worker's channel, which stops the worker or, with
broker_channel_error_retry, makes it reconnect (celery#6760). The figures are the ones
measured on the real brokers (tests/limits_figures.py, tests/real_limits_cases.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_retry import UsageError, WorkerStoppedError
from pytest_celery_retry.flavors import ConsumerTimeout, VisibilityTimeout
from tests.conftest import actions, make_app
from tests.limits_figures import (
    RABBITMQ,
    REDIS,
    RabbitClose,
    RedisCopies,
    needs_sweep_options,
)


def retrying_once(app: Any, countdown: float, name: str = "waits") -> Any:
    """The measured task: it retries once with ``countdown``, then returns."""

    @app.task(name=name, bind=True, max_retries=1, shared=False)
    def waits(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=countdown)
        return "done"

    return waits


def received(broker: Any, task_id: str) -> list[float]:
    """When the worker received each copy of the retry: its publish, then each restore."""
    [retry] = [m for m in broker.messages() if m.task_id == task_id and m.retries == 1]
    return [retry.t] + [t for t, restored, _ in broker.redeliveries if restored == task_id]


# -- 1. Redis: every copy a visibility sweep restores runs at the ETA -----------------------
@needs_sweep_options
@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
@pytest.mark.parametrize("case", REDIS.values(), ids=REDIS.keys())
def test_redis_runs_a_held_retry_once_per_copy(case: RedisCopies, acks_late: bool) -> None:
    _run_redis_case(case, acks_late)


def _run_redis_case(case: RedisCopies, acks_late: bool) -> None:
    """Run ``waits`` on a session of its own (what the fixtures do) with the case's options."""
    from pytest_celery_retry.session import RetrySession
    from pytest_celery_retry.worker import RetryWorker

    app = make_app(task_acks_late=acks_late, broker_transport_options=case.transport_options)
    retrying_once(app, case.countdown)
    session = RetrySession().start()
    worker = RetryWorker(session)
    try:
        broker = session.installation(app, flavor="redis").broker
        run = worker.apply(app.tasks["waits"])
    finally:
        worker.close()
        session.close()
    first, *retried = run.attempts
    assert received(broker, run.task_id) == list(case.received)
    assert [a.t for a in retried] == [case.countdown] * case.runs
    assert [a.retries for a in retried] == [1] * case.runs
    assert [a.redelivered for a in retried] == case.redelivered
    assert [a.duplicate_of for a in retried] == [None] + [first.number + 1] * (case.runs - 1)
    assert run.duplicates == retried[1:]
    assert run.state == "SUCCESS"
    assert [e.t for e in run.limit_events] == list(case.received[1:])
    assert broker.unacked == []


@needs_sweep_options
@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_redis_timeline_shows_the_sweeps_and_the_duplicates(
    celery_retry_flavor: str, retry_worker: Any, celery_retry_app: Any
) -> None:
    case = REDIS["countdown-5-vt-1.5"]
    celery_retry_app.conf.broker_transport_options = case.transport_options

    waits = retrying_once(celery_retry_app, case.countdown, "waits")

    timeline = retry_worker.apply(waits).timeline()

    assert "broker limits:" in timeline
    assert (
        "t=+2.000s  visibility sweep: restored to the queue: unacknowledged for 2 s >= "
        "visibility_timeout=1.5 s" in timeline
    )
    assert "duplicate: attempt 2 ran this retry already" in timeline
    assert "2 DUPLICATE run(s): attempt(s) 3, 4 ran a retry again" in timeline
    assert actions(retry_worker).count("visibility sweep") == 2


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
@pytest.mark.parametrize(
    ("countdown", "runs"),
    [(3600, [(3600, False)]), (7200, [(7200, False), (7200, True)])],
    ids=["one-hour-once", "two-hours-twice"],
)
def test_redis_defaults(
    countdown: float,
    runs: list[tuple[float, bool]],
    celery_retry_flavor: str,
    retry_worker: Any,
    celery_retry_app: Any,
) -> None:
    # visibility_timeout 3600 s, a sweep every 100 s: a two-hour countdown is restored at
    # 3600 s, once; the sweep at 7200 s comes after the ETA (the copies run first).
    run = retry_worker.apply(retrying_once(celery_retry_app, countdown))

    assert [(a.t, a.redelivered) for a in run.attempts[1:]] == runs
    assert len(run.duplicates) == len(run.limit_events) == len(runs) - 1
    assert len(VisibilityTimeout.for_app(celery_retry_app).copies(countdown)) == len(runs)


# -- 2. RabbitMQ: consumer_timeout closes the channel of the worker holding the retry --------
@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
@pytest.mark.parametrize("case", RABBITMQ.values(), ids=RABBITMQ.keys())
def test_rabbitmq_closes_the_channel_past_consumer_timeout(
    case: RabbitClose, celery_retry_flavor: str, flaky_broker: Any, retry_worker: Any
) -> None:
    app = flaky_broker.app
    app.conf.broker_channel_error_retry = case.channel_error_retry
    flaky_broker.consumer_timeout = case.consumer_timeout
    flaky_broker.channel_tick_interval = case.tick

    waits = retrying_once(app, case.countdown, "waits")

    if case.channel_error_retry:
        run = retry_worker.apply(waits)
    else:
        with pytest.raises(WorkerStoppedError) as stopped:
            retry_worker.apply(waits)
        [run] = retry_worker.runs.values()
        assert "Unrecoverable error: PreconditionFailed(406, 'PRECONDITION_FAILED - " in str(
            stopped.value
        )
        assert f"Timeout value used: {case.consumer_timeout * 1000:.0f} ms" in str(stopped.value)
        assert run.timeline() in str(stopped.value)
    lost = [e.t for e in retry_worker.events if e.action in ("connection lost", "worker stopped")]
    assert lost == list(case.closes)
    assert [e.t for e in run.limit_events] == list(case.closes)
    assert [e.action for e in run.limit_events] == ["consumer timeout"] * len(case.closes)
    retried = run.attempts[1:]
    assert len(retried) == case.retry_runs
    if retried:
        assert (retried[0].t, retried[0].retries, retried[0].redelivered) == (
            case.countdown,
            1,
            True,
        )
        assert run.duplicates == []
    assert flaky_broker.pending() == case.left_in_queue


@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
def test_rabbitmq_default_timeout_stops_the_worker_at_the_tick_after_30_minutes(
    celery_retry_flavor: str, flaky_broker: Any, retry_worker: Any, celery_retry_app: Any
) -> None:
    hourly = retrying_once(celery_retry_app, 3600, "hourly")

    with pytest.raises(WorkerStoppedError, match="Timeout value used: 1800000 ms"):
        retry_worker.apply(hourly)

    assert (flaky_broker.consumer_timeout, flaky_broker.channel_tick_interval) == (1800, 60)
    assert retry_worker.clock.elapsed == 1860
    # A worker started again finds the retry in the queue and holds it anew.
    flaky_broker.consumer_timeout = None
    run = retry_worker.run_until_idle()[next(iter(retry_worker.runs))]
    assert [(a.t, a.redelivered) for a in run.attempts] == [(0, False), (3600, True)]


@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
def test_rabbitmq_without_consumer_timeout_holds_as_long_as_it_takes(
    celery_retry_flavor: str, flaky_broker: Any, retry_worker: Any, celery_retry_app: Any
) -> None:
    flaky_broker.consumer_timeout = None

    daily = retrying_once(celery_retry_app, 86400, "daily")

    run = retry_worker.apply(daily)

    assert [a.t for a in run.attempts] == [0, 86400]


# -- the models the assertion uses agree with the simulation --------------------------------
@needs_sweep_options
@pytest.mark.parametrize("countdown", [1, 1.5, 2, 3, 4, 4.5, 7, 10])
def test_the_copies_model_is_what_the_simulation_does(countdown: float) -> None:
    # What assert_fits_broker_limits predicts, ties at the ETA included (a sweep at the ETA
    # comes after the copies that run then).
    limit = VisibilityTimeout(visibility_timeout=1.5, sweep_every=1)
    _run_redis_case(RedisCopies(countdown, 1.5, tuple(limit.copies(countdown))), acks_late=False)


@pytest.mark.parametrize(
    ("countdown", "reconnects", "closes"),
    [(3, False, []), (3.5, False, [3]), (6, True, [3]), (9, True, [3, 6]), (60, False, [3])],
)
def test_the_closes_model(countdown: float, reconnects: bool, closes: list[float]) -> None:
    assert ConsumerTimeout(timeout=2, tick=1).closes(countdown, reconnects) == closes


def test_consumer_timeout_closes_at_the_first_tick_past_the_timeout() -> None:
    limit = ConsumerTimeout(timeout=1800, tick=60)
    assert limit.closes_at(delivered_at=0, opened_at=0) == 1860
    assert limit.closes_at(delivered_at=30, opened_at=0) == 1860
    assert limit.closes_at(delivered_at=61, opened_at=0) == 1920
    assert ConsumerTimeout(timeout=2, tick=60).closes_at(0, 0) == 60


# -- settings and their errors -------------------------------------------------------------
@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_consumer_timeout_is_rabbitmqs(celery_retry_flavor: str, flaky_broker: Any) -> None:
    with pytest.raises(UsageError, match=r"redis flavour, which has no consumer_timeout"):
        flaky_broker.consumer_timeout = 60
    with pytest.raises(UsageError, match=r"visibility_timeout"):
        flaky_broker.channel_tick_interval = 1


@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "30m", True])
def test_consumer_timeout_refuses_what_is_no_duration(
    celery_retry_flavor: str, flaky_broker: Any, bad: Any
) -> None:
    with pytest.raises(UsageError, match=r"consumer_timeout=.*positive number of seconds"):
        flaky_broker.consumer_timeout = bad
    with pytest.raises(UsageError, match=r"channel_tick_interval=.*positive"):
        flaky_broker.channel_tick_interval = bad
    with pytest.raises(UsageError, match=r"channel_tick_interval=None"):
        flaky_broker.channel_tick_interval = None
    assert flaky_broker.consumer_timeout == 1800


def test_unacked_lists_what_a_worker_holds(retry_worker: Any, flaky_broker: Any) -> None:
    app = flaky_broker.app
    app.conf.task_acks_late = True

    @app.task(name="peek", shared=False)
    def peek() -> list[float]:
        return [entry.delivered_at for entry in flaky_broker.unacked]

    assert retry_worker.apply(peek).result == [0]
    assert flaky_broker.unacked == []


def test_a_stopped_worker_is_a_clear_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery

        app = Celery("shop", broker="amqp://localhost//", set_as_current=False)


        @app.task(bind=True, max_retries=1, shared=False)
        def sync_order(self):
            raise self.retry(countdown=3600)


        @pytest.fixture
        def celery_retry_app():
            return app


        def test_hourly_retry(retry_worker):
            retry_worker.apply(sync_order)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E *WorkerStoppedError: the worker stopped at t=1860s with Celery's 'Unrecoverable "
            "error: PreconditionFailed(406, 'PRECONDITION_FAILED - delivery acknowledgement on "
            "channel 1 timed out. Timeout value used: 1800000 ms.*",
            "E *retry timeline of *sync_order*",
            "E *1  +0.000s  0        retry    3600s*",
            "E *broker limits:",
            "E *t=+1860.000s  consumer timeout: unacknowledged for 1860 s > "
            "consumer_timeout=1800 s: RabbitMQ closed the worker's channel (PRECONDITION_FAILED) "
            "and requeued it",
        ]
    )


@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
@pytest.mark.parametrize("reconnect", [False, True], ids=["same-channel", "after-a-reconnect"])
def test_a_lowered_consumer_timeout_reaches_the_channels_opened_after_it(
    celery_retry_flavor: str, flaky_broker: Any, retry_worker: Any, reconnect: bool
) -> None:
    # RabbitMQ reads consumer_timeout when a channel opens and keeps it (measured on 3.10.8:
    # docs/broker-limits.md): the worker's channel keeps the 30 min it opened with, the
    # channel it opens after an outage gets the new 2 s.
    app = flaky_broker.app
    app.conf.broker_channel_error_retry = True
    waits = retrying_once(app, 8)

    @retry_worker.before_attempt(waits, n=1)
    def lower() -> None:
        flaky_broker.consumer_timeout = 2
        flaky_broker.channel_tick_interval = 1
        if reconnect:
            flaky_broker.outage(1, starting_in=1)

    run = retry_worker.apply(waits)

    # After the outage (1 to 2 s) the worker reconnects at 3 s and holds the retry again; the
    # new channel's ticks close it at 6 s; the next holds it until its ETA.
    closes = [(6.0, "consumer timeout")] if reconnect else []
    assert [(e.t, e.action) for e in run.limit_events] == closes
    assert [(a.t, a.redelivered) for a in run.attempts] == [(0, False), (8, reconnect)]
