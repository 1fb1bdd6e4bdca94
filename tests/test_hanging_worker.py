"""The worker's side of a broker that hangs (issue #13, item 4), on the virtual clock.

A RabbitMQ worker's consumer waits for deliveries that a hung broker never sends. Celery's
event loop checks the connection's heartbeats every ``broker_heartbeat /
broker_heartbeat_checkrate`` seconds with py-amqp's own ``heartbeat_tick``, which raises
``ConnectionForced('Too many heartbeats missed')``; the consumer then reconnects with Celery's
own policy, each connect timing out at ``broker_connection_timeout``. At a held ETA the
consumer's ``basic_qos`` waits for the broker's answer without a timeout. The figures measured
on a real RabbitMQ behind ``broker_proxy("amqp").blackhole()`` are in docs/broker-limits.md
(``real_limits_cases.py::test_amqp_worker_notices_a_hang_by_its_heartbeat``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from pytest_celery_retry import BlocksForeverError

# The real test's hang began 0.5 s after RabbitMQ had the worker's consumer.
HANG_STARTS = 0.5


def record_task(app: Any) -> Any:
    @app.task(name="record", shared=False)
    def record() -> None:
        pass

    return record


def connected_worker(retry_worker: Any, app: Any, **config: Any) -> Any:
    """A worker whose consumer connected at 0, and a pooled producer connection."""
    app.conf.update(broker_connection_timeout=1, **config)
    record = record_task(app)
    record.delay()
    retry_worker.run_until_idle()
    return record


def test_a_worker_notices_a_hang_by_its_heartbeats(
    retry_worker: Any, flaky_broker: Any, app: Any, celery_retry_clock: Any
) -> None:
    record = connected_worker(retry_worker, app, broker_heartbeat=2)
    celery_retry_clock.advance(HANG_STARTS)
    flaky_broker.outage(seconds=9.5, how="hang")  # from 0.5 to 10 s, as measured
    result = record.delay()  # py-amqp without confirms: the frames wait in the socket buffer

    retry_worker.run_until_idle()

    lost = [e for e in retry_worker.events if e.action == "connection lost"]
    assert [e.detail for e in lost] == [
        "ConnectionForced(None, 'Too many heartbeats missed', None, '')"
    ]
    # Checks every 2 / 3 s (broker_heartbeat_checkrate=3): the last that heard the broker was
    # at 0.667 s, the first more than 4 s later at 5.333 s, and the loop raised its error at
    # its next turn. Measured: 4.8 s after the hang began (the phase of the checks decides).
    assert lost[0].t - HANG_STARTS == pytest.approx(5.5, abs=1e-3)
    # Celery's reconnects: at once, then 2 s after the 1 s timeout (measured: at 4.8 and 7.9 s
    # after the hang began, then 4 s later). The broker answers the second when the hang ends.
    connects = [(op.t, op.hung, op.ok) for op in flaky_broker.connection_attempts[2:]]
    assert connects == [
        (pytest.approx(6.0, abs=1e-3), 1.001, False),
        (pytest.approx(9.001, abs=1e-3), pytest.approx(0.999, abs=1e-3), True),
    ], flaky_broker.timeline()
    assert retry_worker.task_run(result.id).attempts[0].t == 10


@pytest.mark.parametrize(("hang_starts", "noticed_after"), [(0.5, 5.5), (1.2, 4.133)])
def test_when_the_worker_notices_depends_on_where_the_hang_falls_between_checks(
    hang_starts: float,
    noticed_after: float,
    retry_worker: Any,
    flaky_broker: Any,
    app: Any,
    celery_retry_clock: Any,
) -> None:
    record = connected_worker(retry_worker, app, broker_heartbeat=2)
    celery_retry_clock.advance(hang_starts)
    flaky_broker.outage(seconds=20, how="hang")
    record.delay()
    retry_worker.run_until_idle()
    (lost,) = [e for e in retry_worker.events if e.action == "connection lost"]
    assert lost.t - hang_starts == pytest.approx(noticed_after, abs=1e-3)


def test_without_heartbeats_a_worker_never_notices_and_consumes_once_it_ends(
    retry_worker: Any, flaky_broker: Any, app: Any, celery_retry_clock: Any
) -> None:
    record = connected_worker(retry_worker, app, broker_heartbeat=0)
    celery_retry_clock.advance(HANG_STARTS)
    flaky_broker.outage(seconds=9.5, how="hang")
    result = record.delay()

    retry_worker.run_until_idle()

    assert not [e for e in retry_worker.events if e.action == "connection lost"]
    assert len(flaky_broker.connection_attempts) == 2  # the producer's and the consumer's
    assert retry_worker.task_run(result.id).attempts[0].t == 10


def hold_a_retry_through_a_hang(retry_worker: Any, flaky_broker: Any, app: Any) -> Any:
    @app.task(name="waits", bind=True, max_retries=1, shared=False)
    def waits(self: Any) -> None:
        if self.request.retries == 0:
            raise self.retry(countdown=3)

    # The retry is held for its ETA (3 s) when the hang begins, at 0.5 s.
    flaky_broker.outage(seconds=9.5, starting_in=HANG_STARTS, how="hang")
    return retry_worker.apply(waits)


def test_a_held_retry_runs_at_its_eta_and_again_after_the_heartbeats_closed_the_connection(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    app.conf.update(broker_heartbeat=2, broker_connection_timeout=1)
    run = hold_a_retry_through_a_hang(retry_worker, flaky_broker, app)
    # The retry runs at its ETA (3 s) in the hang, and its ack waits in the socket buffer;
    # then basic_qos waits for the broker until the hang ends (10 s), before a heartbeat check
    # noticed. RabbitMQ closed the connection for the heartbeats it missed: the ack is lost, and
    # the reconnected worker runs the retry once more, redelivered. Measured: 3.2 s and
    # 10.36 s (redelivered).
    qos = [(op.t, op.hung) for op in flaky_broker.operations if op.kind == "qos"]
    assert qos == [(3, 7)], flaky_broker.timeline()
    assert [attempt.t for attempt in run.attempts] == [0, 3, 10]
    assert [attempt.redelivered for attempt in run.attempts] == [False, False, True]
    assert run.state == "SUCCESS"


def test_without_heartbeats_a_held_retry_runs_once_and_its_ack_arrives_after_the_hang(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    app.conf.update(broker_heartbeat=0, broker_connection_timeout=1)
    run = hold_a_retry_through_a_hang(retry_worker, flaky_broker, app)
    # Measured: once, at 3.1 s.
    assert [attempt.t for attempt in run.attempts] == [0, 3]
    assert not flaky_broker.unacked
    assert flaky_broker.pending() == 0


def test_a_held_message_in_a_hang_left_on_blocks_for_ever(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    @app.task(name="hangs", shared=False)
    def hangs() -> None:
        flaky_broker.hang()

    app.conf.update(broker_heartbeat=0)
    hangs.apply_async(countdown=HANG_STARTS)
    # It runs at its ETA; then the consumer's basic_qos waits for an answer that never comes.
    with pytest.raises(BlocksForeverError, match=re.escape("basic_qos")) as info:
        retry_worker.run_until_idle()
    assert "the worker's prefetch change would block for ever" in str(info.value)
    (run,) = retry_worker.runs.values()
    assert [attempt.t for attempt in run.attempts] == [HANG_STARTS]
    assert flaky_broker.clock.elapsed == HANG_STARTS


def redis_worker(app: Any, **transport_options: Any) -> None:
    app.conf.update(broker_connection_timeout=1, broker_transport_options=transport_options)


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_a_redis_workers_ack_waits_out_socket_timeout_and_the_retry_runs_in_the_hang(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    redis_worker(app, socket_timeout=1)
    run = hold_a_retry_through_a_hang(retry_worker, flaky_broker, app)
    # Celery acks before the body (early ack): kombu's QoS command waits out socket_timeout,
    # Celery logs "Couldn't ack" and runs the task. Measured without the worker's heartbeat
    # events: 4.05 s. The message stays in Redis's unacked hash: the visibility sweep gives it
    # back after visibility_timeout (1 h), and it runs again.
    acks = [(op.t, op.hung) for op in flaky_broker.operations if op.kind == "ack"]
    assert acks == [(pytest.approx(3), 1.001)], flaky_broker.timeline()
    assert [attempt.t for attempt in run.attempts] == [0, 4.001, 3600]
    failed = [e.t for e in retry_worker.events if e.action == "ack failed"]
    assert failed == [4.001]
    # A hang closes no socket: the consumer does not reconnect.
    assert not [e for e in retry_worker.events if e.action == "connection lost"]


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_without_socket_timeout_a_redis_workers_ack_waits_for_the_hangs_end(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    redis_worker(app)
    run = hold_a_retry_through_a_hang(retry_worker, flaky_broker, app)
    # Measured: 10.1 s (the event loop blocked in kombu's binding refresh until the hang
    # ended); here the ack waits, and the task runs once.
    assert [attempt.t for attempt in run.attempts] == [0, 10]
    assert not flaky_broker.unacked


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_without_socket_timeout_a_redis_worker_in_a_hang_left_on_blocks_for_ever(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    @app.task(name="hangs", shared=False, acks_late=True)
    def hangs() -> None:
        flaky_broker.hang()

    redis_worker(app)
    hangs.apply_async(countdown=HANG_STARTS)
    # It runs at its ETA; then its late ack waits for an answer that never comes.
    with pytest.raises(BlocksForeverError, match=re.escape("'socket_timeout': 5")) as info:
        retry_worker.run_until_idle()
    assert str(info.value).startswith("ack would block for ever in production")
    assert flaky_broker.clock.elapsed == HANG_STARTS


# What a user writes: their app on a broker URL of their own, and a retry held through a hang.
USER_TEST = """
import pytest
from celery import Celery

app = Celery("shop", broker="{broker}")


@app.task(name="shop.order", bind=True, max_retries=1)
def order(self):
    if self.request.retries == 0:
        raise self.retry(countdown=3)


@pytest.fixture
def celery_retry_app():
    return app


@pytest.mark.parametrize(("{setting}", "runs"), {cases})
def test_a_retry_held_through_a_hang(retry_worker, flaky_broker, {setting}, runs):
    app.conf.{setting} = {setting}
    flaky_broker.outage(seconds=9.5, starting_in=0.5, how="hang")
    run = retry_worker.apply(order)
    assert [attempt.t for attempt in run.attempts] == runs
"""


@pytest.mark.parametrize(
    ("broker", "setting", "cases"),
    [
        ("amqp://rabbit//", "broker_heartbeat", [(2, [0, 3, 10]), (0, [0, 3])]),
        (
            "redis://cache:6379/0",
            "broker_transport_options",
            [({"socket_timeout": 1}, [0, 4.001, 3600]), ({}, [0, 10])],
        ),
    ],
    ids=["rabbitmq", "redis"],
)
def test_what_a_user_writes(
    pytester: pytest.Pytester, broker: str, setting: str, cases: list[tuple[Any, list[float]]]
) -> None:
    pytester.makepyfile(USER_TEST.format(broker=broker, setting=setting, cases=repr(cases)))
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2)
