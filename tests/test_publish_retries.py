"""Publish retries through the flaky broker: the oracle's figures, by kombu's real code.

The figures were measured with real Celery/kombu in real time (../shared/reference/
publish_retry_realtime.py, scaled 10x down). Nothing here special-cases them: the broker
only refuses operations, and kombu decides when to try again.
"""

from __future__ import annotations

from typing import Any

import pytest
from kombu.exceptions import OperationalError

from pytest_celery_retry import assert_publish_retries
from tests.conftest import (
    POLICY_ON_FRESH_CONNECT,
    SEED_FRESH_INTERVALS,
    SEED_FRESH_TRIES,
    SEED_POLICY,
)

# The figures for a fresh connection with broker_connection_timeout=30 hold where the
# policy governs the fresh connect (kombu >= 5.5); older kombu follows its own defaults there.
needs_policy_on_fresh_connect = pytest.mark.skipif(
    not POLICY_ON_FRESH_CONNECT,
    reason="kombu < 5.5 retries a fresh connect with its defaults, not the retry policy",
)


def send_seed(app: Any) -> Any:
    return app.send_task("foo.task", retry=True, retry_policy=dict(SEED_POLICY))


def establish_connection(app: Any, broker: Any) -> None:
    send_seed(app)
    assert broker.publishes[-1].outcome == "delivered"


def delivered(broker: Any) -> list[Any]:
    return [m for m in broker.messages() if m.task_name == "foo.task"]


# -- fresh connection -----------------------------------------------------------------------
def test_fresh_two_refusals_delivered_on_attempt_three_at_t7(app, flaky_broker):
    flaky_broker.fail_next(2, on="connect")
    send_seed(app)
    publish = flaky_broker.last_publish
    assert publish.outcome == "delivered"
    assert publish.attempt_times == SEED_FRESH_TRIES  # kombu >= 5.5: [0, 3, 7]
    assert flaky_broker.publish_retry_intervals == SEED_FRESH_INTERVALS
    assert len(delivered(flaky_broker)) == 1
    assert_publish_retries(flaky_broker, attempts=3, intervals=SEED_FRESH_INTERVALS, delivered=True)


def test_fresh_three_refusals_connect_timeout_ends_it_at_t7(app, flaky_broker):
    flaky_broker.fail_next(3, on="connect")
    with pytest.raises(OperationalError):
        send_seed(app)
    publish = flaky_broker.last_publish
    assert publish.attempt_times == SEED_FRESH_TRIES
    assert publish.outcome == "failed"
    assert delivered(flaky_broker) == []


@needs_policy_on_fresh_connect
def test_fresh_connect_timeout_30_three_refusals_delivered_at_t12(app, flaky_broker):
    app.conf.broker_connection_timeout = 30
    flaky_broker.fail_next(3, on="connect")
    send_seed(app)
    assert_publish_retries(flaky_broker, attempts=4, intervals=[3, 4, 5], delivered=True)
    assert flaky_broker.last_publish.attempt_times == [0, 3, 7, 12]
    assert len(delivered(flaky_broker)) == 1


@needs_policy_on_fresh_connect
def test_fresh_connect_timeout_30_four_refusals_gives_up(app, flaky_broker):
    app.conf.broker_connection_timeout = 30
    flaky_broker.fail_next(4, on="connect")
    with pytest.raises(OperationalError):
        send_seed(app)
    assert_publish_retries(flaky_broker, attempts=4, intervals=[3, 4, 5], delivered=False)
    assert delivered(flaky_broker) == []


# -- lost connection ------------------------------------------------------------------------
# The oracle counts every refused operation: "lost 4" is the publish that finds the connection
# gone plus 3 refused reconnects. Both ways of saying it are shown.
def lose_connection(broker: Any, refused_reconnects: int) -> None:
    broker.fail_next(1, on="publish")
    broker.fail_next(refused_reconnects, on="connect")


@pytest.mark.parametrize("arm", ["separately", "as the oracle counts"])
def test_lost_connection_reconnects_at_once_then_after_3_4_5_delivered_at_t12(
    app, flaky_broker, arm
):
    establish_connection(app, flaky_broker)
    if arm == "separately":
        lose_connection(flaky_broker, 3)
    else:
        flaky_broker.fail_next(4, on=("publish", "connect"))
    send_seed(app)
    publish = flaky_broker.last_publish
    kinds = [(op.kind, op.t, op.ok) for op in publish.operations]
    assert kinds == [
        ("publish", 0, False),
        ("connect", 0, False),
        ("connect", 3, False),
        ("connect", 7, False),
        ("connect", 12, True),
        ("publish", 12, True),
    ]
    # kombu's ensure() reconnects at once, then after 3, 4, 5 s.
    assert publish.intervals == [0, 3, 4, 5]
    assert len(delivered(flaky_broker)) == 2  # the warm-up and this one, each once


def test_lost_connection_one_more_refusal_gives_up_at_t12(app, flaky_broker):
    establish_connection(app, flaky_broker)
    flaky_broker.fail_next(5, on=("publish", "connect"))
    with pytest.raises(OperationalError):
        send_seed(app)
    assert flaky_broker.last_publish.attempt_times == [0, 0, 3, 7, 12]
    assert flaky_broker.last_publish.outcome == "failed"
    assert len(delivered(flaky_broker)) == 1  # only the warm-up


# -- outages --------------------------------------------------------------------------------
def test_outage_10_on_fresh_app_fails_at_t7(app, flaky_broker):
    flaky_broker.outage(seconds=10)
    with pytest.raises(OperationalError):
        send_seed(app)
    assert flaky_broker.last_publish.ended_at == SEED_FRESH_TRIES[-1]
    assert delivered(flaky_broker) == []


def test_outage_10_after_connection_established_delivered_at_t12(app, flaky_broker):
    establish_connection(app, flaky_broker)
    flaky_broker.outage(seconds=10)
    send_seed(app)
    assert flaky_broker.last_publish.outcome == "delivered"
    assert flaky_broker.last_publish.ended_at == 12
    assert len(delivered(flaky_broker)) == 2


def test_outage_13_after_connection_established_gives_up(app, flaky_broker):
    establish_connection(app, flaky_broker)
    flaky_broker.outage(seconds=13)
    with pytest.raises(OperationalError):
        send_seed(app)
    assert flaky_broker.last_publish.ended_at == 12
    assert len(delivered(flaky_broker)) == 1


# -- the other ways to publish ----------------------------------------------------------------
def test_apply_async_with_retry_policy(app, flaky_broker):
    flaky_broker.fail_next(2, on="connect")
    app.tasks["foo.task"].apply_async(retry=True, retry_policy=dict(SEED_POLICY))
    assert_publish_retries(flaky_broker, attempts=3, intervals=SEED_FRESH_INTERVALS, delivered=True)


def test_delay_uses_task_publish_retry_policy(app, flaky_broker):
    app.conf.task_publish_retry_policy = dict(SEED_POLICY)
    flaky_broker.fail_next(2, on="connect")
    app.tasks["foo.task"].delay()
    assert_publish_retries(flaky_broker, attempts=3, intervals=SEED_FRESH_INTERVALS, delivered=True)


def test_retry_false_on_a_lost_connection_fails_at_once(app, flaky_broker):
    establish_connection(app, flaky_broker)
    flaky_broker.fail_next(1, on="publish")
    with pytest.raises(OperationalError):
        app.tasks["foo.task"].apply_async(retry=False)
    assert flaky_broker.last_publish.attempt_times == [0]
    assert len(delivered(flaky_broker)) == 1
    assert flaky_broker.clock.elapsed == 0


def test_retry_false_on_a_fresh_connection_still_retries_the_connect(app, flaky_broker):
    # Measured with real kombu in real time: without a retry policy, opening the connection
    # still goes through _ensure_connection with kombu's defaults (2 s, then 4 s more) until
    # broker_connection_timeout (4 s) has passed. "retry=False" does not mean "fail at once".
    flaky_broker.fail_next(2, on="connect")
    app.tasks["foo.task"].apply_async(retry=False)
    assert flaky_broker.last_publish.attempt_times == [0, 2, 6]
    assert len(delivered(flaky_broker)) == 1


def test_retry_false_on_a_fresh_connection_gives_up_after_the_connect_timeout(app, flaky_broker):
    flaky_broker.fail_next(3, on="connect")
    with pytest.raises(OperationalError):
        app.tasks["foo.task"].apply_async(retry=False)
    assert flaky_broker.last_publish.attempt_times == [0, 2, 6]
    assert delivered(flaky_broker) == []


def test_published_task_runs_on_the_retry_worker(app, flaky_broker, retry_worker):
    flaky_broker.fail_next(2, on="connect")
    result = app.tasks["foo.task"].apply_async(retry=True, retry_policy=dict(SEED_POLICY))
    runs = retry_worker.run_until_idle()
    run = runs[result.id]
    assert run.countdowns == [1, 3, 9]
    assert run.state == "FAILURE"
    assert retry_worker.clock.elapsed == SEED_FRESH_TRIES[-1] + 13


# -- a connection the broker dropped while it was away, back before the next publish --------
@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
def test_amqp_publish_after_a_blip_reconnects_at_once(app, flaky_broker, retry_worker):
    establish_connection(app, flaky_broker)
    flaky_broker.outage(0.5)
    retry_worker.clock.advance(1)

    send_seed(app)

    # py-amqp finds the old connection closed; kombu reconnects at once and publishes again.
    publish = flaky_broker.last_publish
    assert publish.outcome == "delivered"
    assert publish.attempt_times == [1, 1]
    assert str(publish.error) == "Server unexpectedly closed connection"


@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
def test_amqp_publish_after_a_blip_without_retry_fails(app, flaky_broker, retry_worker):
    establish_connection(app, flaky_broker)
    flaky_broker.outage(0.5)
    retry_worker.clock.advance(1)

    with pytest.raises(OperationalError, match="Server unexpectedly closed connection"):
        app.send_task("foo.task", retry=False)
    assert len(delivered(flaky_broker)) == 1


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_redis_publish_after_a_blip_goes_through(app, flaky_broker, retry_worker):
    establish_connection(app, flaky_broker)
    flaky_broker.outage(0.5)
    retry_worker.clock.advance(1)

    app.send_task("foo.task", retry=False)

    # redis-py reconnects by itself: kombu never sees the dropped connection.
    assert flaky_broker.last_publish.attempt_times == [1]
    assert len(delivered(flaky_broker)) == 2
