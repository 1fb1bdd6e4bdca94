"""A broker that hangs instead of refusing, on the virtual clock (issue #13, item 4).

``flaky_broker.hang()`` accepts connections and never answers, as the fault proxy's
``blackhole()`` does in front of a real broker. Each operation waits, in virtual time, for
the timeout the real client would wait, then fails as it would, and kombu's and Celery's
retry code decides what happens next. ``hang_cases.py`` holds the cases, measured on the real
brokers by ``real_limits_cases.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hang_cases import CASES, POLICY, HangCase, configure, publish
from kombu.exceptions import OperationalError

from pytest_celery_retry import BlocksForeverError, BrokerDownError, UsageError
from pytest_celery_retry.flavors import flavor_for_broker
from pytest_celery_retry.session import RetrySession


def install(session: RetrySession, app: Any, broker: str) -> Any:
    flavor = flavor_for_broker(broker)
    assert flavor is not None
    return session.installation(app, flavor=flavor.name).broker


@pytest.mark.parametrize("case", CASES)
def test_publish_into_a_hang(case: HangCase, celery_retry_session: RetrySession, app: Any) -> None:
    configure(app, case)
    broker = install(celery_retry_session, app, case.broker)
    clock = celery_retry_session.clock
    if case.pooled:
        publish(app, case)
    broker.hang()
    started, before = clock.elapsed, len(broker.operations)

    if case.blocks_for_ever:
        with pytest.raises(BlocksForeverError, match=re.escape(case.blocks_for_ever)) as info:
            publish(app, case)
        assert "would block for ever in production" in str(info.value)
        return
    if case.error is None:
        publish(app, case)
    else:
        with pytest.raises(OperationalError) as raised:
            publish(app, case)
        assert str(raised.value) == case.error

    assert clock.elapsed - started == pytest.approx(case.seconds), broker.timeline()
    during = broker.operations[before:]
    assert len([op for op in during if op.kind == "connect"]) == case.connects, broker.timeline()
    assert all(op.hung for op in during if not op.ok), broker.timeline()


def hung_redis(session: RetrySession, app: Any, **transport_options: Any) -> Any:
    app.conf.broker_transport_options = transport_options
    broker = install(session, app, "redis")
    app.send_task("foo.task")  # a pooled connection
    return broker


def test_the_timeline_shows_how_long_each_operation_hung(
    celery_retry_session: RetrySession, app: Any
) -> None:
    broker = hung_redis(celery_retry_session, app, socket_timeout=1)
    broker.hang()
    with pytest.raises(OperationalError):
        app.send_task("foo.task", retry=True, retry_policy=POLICY)
    timeline = broker.timeline()
    assert "publish    producer  hung 1.001s, FAILED" in timeline, timeline
    assert "3.203s  connect    producer  hung 1.001s, FAILED" in timeline, timeline
    failed = broker.last_publish
    assert failed is not None and failed.outcome == "failed"
    assert failed.attempt_times == pytest.approx([0, 1.001, 2.002, 3.203])
    assert failed.ended_at == pytest.approx(4.204)


def test_a_hang_that_ends_before_the_timeout_delays_the_publish(
    celery_retry_session: RetrySession, app: Any
) -> None:
    broker = hung_redis(celery_retry_session, app, socket_timeout=5)
    broker.outage(seconds=2, how="hang")
    app.send_task("foo.task", retry=False)
    # The broker answers when it wakes: the publish went through, 2 s late.
    assert celery_retry_session.clock.elapsed == 2
    assert [m.t for m in broker.messages()] == [0, 2]
    assert broker.publish_attempts[-1].hung == 2


def test_without_a_timeout_a_hang_that_ends_only_delays_the_publish(
    celery_retry_session: RetrySession, app: Any
) -> None:
    # As measured behind the proxy: blocked until the broker is back, then through at once.
    broker = hung_redis(celery_retry_session, app)
    broker.outage(seconds=30, starting_in=1, how="hang")
    celery_retry_session.clock.advance(1)
    app.send_task("foo.task", retry=False)
    assert celery_retry_session.clock.elapsed == 31
    assert len(broker.messages()) == 2


def test_a_hang_still_refuses_nothing_after_it_ends(
    celery_retry_session: RetrySession, app: Any
) -> None:
    broker = hung_redis(celery_retry_session, app, socket_timeout=1)
    broker.outage(seconds=3, how="hang")
    celery_retry_session.clock.advance(3)
    assert not broker.is_down
    app.send_task("foo.task", retry=False)
    assert len(broker.messages()) == 2


def test_blocks_for_ever_names_the_setting_and_its_fix(
    celery_retry_session: RetrySession, app: Any
) -> None:
    broker = hung_redis(celery_retry_session, app)
    broker.hang()
    with pytest.raises(BlocksForeverError) as info:
        app.send_task("foo.task", retry=True, retry_policy=POLICY)
    message = str(info.value)
    assert "publishing would block for ever in production" in message
    assert "broker_transport_options={'socket_timeout': 5}" in message
    assert "flaky_broker.hang() at t=0s" in message
    # Not a connection error: no retry policy retried it, and no time passed.
    assert not isinstance(info.value, OperationalError)
    assert celery_retry_session.clock.elapsed == 0


def amqp_pooled(session: RetrySession, app: Any) -> Any:
    broker = install(session, app, "amqp")
    app.send_task("foo.task")
    return broker


def test_amqp_publish_without_confirms_is_delivered_when_the_hang_ends(
    celery_retry_session: RetrySession, app: Any
) -> None:
    broker = amqp_pooled(celery_retry_session, app)
    broker.hang()
    app.send_task("foo.task", retry=False)  # returns at once: the frames wait in the buffer
    assert broker.last_publish is not None and broker.last_publish.outcome == "pending"
    assert len(broker.messages()) == 1
    celery_retry_session.clock.advance(5)
    broker.up()
    assert [m.t for m in broker.messages()] == [0, 5]
    assert broker.last_publish.outcome == "delivered"


def test_amqp_publish_without_confirms_after_a_bounded_hang(
    celery_retry_session: RetrySession, app: Any
) -> None:
    broker = amqp_pooled(celery_retry_session, app)
    broker.outage(seconds=4, how="hang")
    app.send_task("foo.task", retry=False)
    celery_retry_session.clock.advance(10)
    # Delivered when the hang ended, whenever the broker is next looked at.
    assert [m.t for m in broker.messages()] == [0, 4]


def test_amqp_publish_without_confirms_is_lost_when_a_cut_follows_the_hang(
    celery_retry_session: RetrySession, app: Any
) -> None:
    broker = amqp_pooled(celery_retry_session, app)
    broker.hang()
    app.send_task("foo.task", retry=False)
    broker.down()  # the connection, and the frames in its buffer, are dropped
    broker.up()
    assert len(broker.messages()) == 1
    assert broker.pending() == 1


def test_a_hang_does_not_cut_the_open_connections(
    celery_retry_session: RetrySession, app: Any
) -> None:
    # Unlike down() and outage(), after which py-amqp fails on the old connection: a broker
    # that stalls and wakes up still has the client's connection.
    app.conf.broker_transport_options = {"confirm_publish": True}
    broker = amqp_pooled(celery_retry_session, app)
    broker.outage(seconds=2, how="hang")
    celery_retry_session.clock.advance(2)
    connects = len(broker.connection_attempts)
    app.send_task("foo.task", retry=False)
    assert len(broker.connection_attempts) == connects
    assert len(broker.messages()) == 2


def test_suspend_faults_suspends_a_hang(celery_retry_session: RetrySession, app: Any) -> None:
    broker = hung_redis(celery_retry_session, app)
    broker.hang()
    with broker.suspend_faults():
        app.send_task("foo.task", retry=False)
    assert len(broker.messages()) == 2


def test_teardown_closes_connections_to_a_hung_amqp_broker(
    celery_retry_session: RetrySession, app: Any
) -> None:
    # Closing a channel on a hung connection blocks in production; the plugin's own teardown
    # must not (the session closes after this test with the hang still on).
    app.conf.broker_transport_options = {"confirm_publish": True}
    amqp_pooled(celery_retry_session, app).hang()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda broker: broker.down(how="slow"), "down(how='slow'): choose 'refuse'"),
        (lambda broker: broker.outage(1, how=None), "outage(how=None): choose 'refuse'"),
    ],
)
def test_how_is_refuse_or_hang(call: Any, message: str, flaky_broker: Any) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        call(flaky_broker)


def test_a_worker_that_connects_into_a_hang_left_on(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    app.send_task("foo.task")
    flaky_broker.hang()
    # Its connect times out at broker_connection_timeout (Celery's 4 s), and nothing ends the
    # hang while the worker runs.
    with pytest.raises(BrokerDownError, match=re.escape("flaky_broker.hang() at t=0s")):
        retry_worker.run_until_idle()
    assert "hung 4.001s, FAILED" in flaky_broker.timeline()


def test_what_a_user_writes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery
        from kombu.exceptions import OperationalError

        from pytest_celery_retry import BlocksForeverError

        app = Celery("shop", broker="redis://cache:6379/0")
        POLICY = dict(max_retries=2, interval_start=0, interval_step=0.2, interval_max=0.2)


        @pytest.fixture
        def celery_retry_app():
            return app


        def test_delay_fails_within_a_bound(flaky_broker, celery_retry_clock):
            app.conf.broker_transport_options = {"socket_timeout": 1}
            app.send_task("shop.order")
            flaky_broker.hang()
            with pytest.raises(OperationalError, match="Timeout reading from socket"):
                app.send_task("shop.order", retry=True, retry_policy=POLICY)
            assert celery_retry_clock.elapsed < 5


        @pytest.mark.broker_outage(down=True, how="hang")
        def test_marker(flaky_broker):
            with pytest.raises(BlocksForeverError, match="socket_timeout"):
                app.send_task("shop.order")
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_a_retry_republished_into_a_short_hang_arrives_late(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    app.conf.broker_transport_options = {"socket_timeout": 1}

    @app.task(name="hangs.once", bind=True, max_retries=1, shared=False)
    def hangs_once(self: Any) -> None:
        if self.request.retries == 0:
            flaky_broker.outage(seconds=2, how="hang")
            raise self.retry(countdown=3)

    run = retry_worker.apply(hangs_once)
    # Task.retry's publish (Celery's default policy) timed out at 1.001 s; kombu reconnected
    # at once, and the broker answered that connect when the hang ended, at 2 s.
    retry = flaky_broker.messages()[-1]
    assert (retry.t, retry.retries) == (2, 1)
    hung = [(op.kind, op.t, op.hung, op.ok) for op in flaky_broker.operations if op.hung]
    assert hung == [("publish", 0, 1.001, False), ("connect", 1.001, pytest.approx(0.999), True)]
    # The ETA was set before the publish: the retry runs at 3 s, as it would have.
    assert run.countdowns == [3]
    assert [attempt.t for attempt in run.attempts] == [0, 3]
    assert run.state == "SUCCESS"


def test_a_worker_that_starts_in_a_hang_connects_once_it_ends(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    app.conf.broker_connection_timeout = 1
    result = app.send_task("foo.task")
    flaky_broker.outage(seconds=10, how="hang")

    retry_worker.run_until_idle()

    # Celery's consumer retries its connect 2 s, then 4 s, then 6 s after each timeout (the
    # real worker that lost a hung RabbitMQ: timed out after 1 s, reconnects 2 s, then 4 s
    # later; docs/broker-limits.md).
    connects = [(op.t, op.hung, op.ok) for op in flaky_broker.connection_attempts[1:]]
    assert connects == [
        (0, 1.001, False),
        (3.001, 1.001, False),
        (8.002, 1.001, False),
        (pytest.approx(15.003), None, True),
    ], flaky_broker.timeline()
    assert retry_worker.task_run(result.id).attempts[0].t == pytest.approx(15.003)
