"""Messages whose ack never reached the broker, and messages a lost connection held.

RabbitMQ requeues what a dropped connection had not acknowledged at once. kombu's redis
transport puts it back with a Redis command when the channel closes; with Redis down, the
message stays in the ``unacked`` hash until a visibility sweep finds it older than
``visibility_timeout``. The real-broker counterparts are in tests/test_real_brokers.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_retry import UsageError
from pytest_celery_retry.flavors import VisibilityTimeout
from tests.conftest import actions, consumer_connects, make_app, make_poll_app
from tests.limits_figures import needs_sweep_options

# kombu 5.7 made the redis sweep timer configurable (unacked_restore_interval / _throttle);
# before, a sweep runs at registration and then every 10th call of a 10 s timer.
FAST_SWEEP = {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}


@pytest.fixture
def celery_retry_app(request: pytest.FixtureRequest) -> Any:
    """An acks_late app; the options given as the fixture's param are its transport options."""
    return make_app(task_acks_late=True, broker_transport_options=getattr(request, "param", {}))


@pytest.fixture
def record(celery_retry_app: Any, flaky_broker: Any, retry_worker: Any) -> Any:
    """A task that takes one virtual second; the broker goes down during its first run,
    for two seconds."""
    runs: list[float] = []

    @celery_retry_app.task(name="record", shared=False)
    def record() -> int:
        runs.append(retry_worker.clock.elapsed)
        if len(runs) == 1:
            flaky_broker.outage(2)
            retry_worker.clock.advance(1)
        return len(runs)

    return record


@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
def test_amqp_requeues_a_message_whose_ack_failed_at_once(record, flaky_broker, retry_worker):
    run = retry_worker.apply(record)

    # The ack at t=1 fails (down from 0 to 2); the consumer finds its connection dead,
    # RabbitMQ requeues the message, and the reconnect at t=3 gets it again: it runs twice.
    assert [a.t for a in run.attempts] == [0, 3]
    assert [a.outcome for a in run.attempts] == ["success", "success"]
    assert run.attempts[0].ack_failed
    assert "ack failed" in run.attempts[0].note
    assert run.result == 2
    assert consumer_connects(flaky_broker) == [(0, True), (1, False), (3, True)]
    assert actions(retry_worker) == ["ack failed", "connection lost", "reconnected", "acked"]
    assert [t for t, _, _ in flaky_broker.redeliveries] == [1]
    assert "ack" in flaky_broker.timeline()


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
@pytest.mark.parametrize("celery_retry_app", [{"visibility_timeout": 6}], indirect=True)
def test_redis_gives_a_message_whose_ack_failed_back_at_the_next_visibility_sweep(
    record, flaky_broker, retry_worker
):
    run = retry_worker.apply(record)

    # Redis is down when the lost connection closes (t=1): the message stays unacked. The
    # consumer registers at t=3; sweeps run then and every 100 s (10 calls of a 10 s timer).
    # The sweep at t=3 finds it younger than visibility_timeout=6; the one at t=103 not.
    # A real worker measured 103.04 s (tests/test_real_brokers.py has the scaled-down proof).
    assert [a.t for a in run.attempts] == [0, 103]
    assert run.attempts[0].ack_failed
    assert consumer_connects(flaky_broker) == [(0, True), (1, False), (3, True)]
    assert actions(retry_worker) == [
        "ack failed",
        "connection lost",
        "reconnected",
        "visibility sweep",
        "acked",
    ]
    assert flaky_broker.unacked == []
    assert [t for t, _, _ in flaky_broker.redeliveries] == [103]


@needs_sweep_options
@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
@pytest.mark.parametrize(
    "celery_retry_app", [{"visibility_timeout": 6, **FAST_SWEEP}], indirect=True
)
def test_redis_sweep_options_bring_the_redelivery_to_the_visibility_timeout(record, retry_worker):
    run = retry_worker.apply(record)

    assert [a.t for a in run.attempts] == [0, 6]


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_redis_restores_at_close_when_the_broker_is_up(
    celery_retry_app, flaky_broker, retry_worker
):
    # Only the ack fails (Redis itself is up): closing the channel puts the message back.
    @celery_retry_app.task(name="once", shared=False)
    def once() -> None:
        if not flaky_broker.redeliveries:
            flaky_broker.fail_next(1, on="ack")

    run = retry_worker.apply(once)

    assert [a.t for a in run.attempts] == [0, 0]
    assert actions(retry_worker) == ["ack failed", "connection lost", "reconnected", "acked"]


class TestHeldEtaMessageWhenTheConnectionDrops:
    """A retry waiting for its ETA in the worker when the broker goes down at t=2."""

    @pytest.fixture
    def celery_retry_app(self) -> Any:
        return make_poll_app()

    @pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
    def test_amqp_runs_it_at_its_eta(self, celery_retry_app, flaky_broker, retry_worker):
        result = celery_retry_app.tasks["poll"].delay()
        flaky_broker.outage(5, starting_in=2)

        run = retry_worker.run_until_idle()[result.id]

        assert [a.t for a in run.attempts] == [0, 10]
        assert consumer_connects(flaky_broker) == [(0, True), (2, False), (4, False), (8, True)]

    @pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
    def test_redis_runs_it_after_the_visibility_timeout(
        self, celery_retry_app, flaky_broker, retry_worker
    ):
        result = celery_retry_app.tasks["poll"].delay()
        flaky_broker.outage(5, starting_in=2)

        run = retry_worker.run_until_idle()[result.id]

        # Delivered at t=0, restored by the first sweep after 0 + 3600 s: the consumer
        # registered at t=8 and sweeps every 100 s, so at t=3608, not at its ETA (t=10).
        assert [a.t for a in run.attempts] == [0, 3608]
        assert run.state == "SUCCESS"


class TestVisibilityTimeout:
    def test_defaults_come_from_kombu(self):
        policy = VisibilityTimeout.for_app(make_app())

        assert policy.visibility_timeout == 3600
        assert policy.sweep_every == 100

    @needs_sweep_options
    def test_transport_options_set_it(self):
        app = make_app(broker_transport_options={"visibility_timeout": 30, **FAST_SWEEP})

        assert VisibilityTimeout.for_app(app) == VisibilityTimeout(30, 1)

    def test_sweep_arithmetic(self):
        policy = VisibilityTimeout(visibility_timeout=6, sweep_every=100)

        assert policy.last_sweep(registered_at=3, now=3) == 3
        assert policy.last_sweep(registered_at=3, now=102.9) == 3
        assert policy.last_sweep(registered_at=3, now=103) == 103
        assert policy.next_restore(delivered_at=0, registered_at=3, now=3) == 103
        assert policy.next_restore(delivered_at=-10, registered_at=3, now=3) == 3
        assert policy.next_restore(delivered_at=0, registered_at=3, now=150) == 203
        # Sums of float seconds land on a sweep, not just before it.
        assert VisibilityTimeout(0.3, 0.1).last_sweep(0.1 + 0.2, 0.1 + 0.2 + 0.1 * 3) > 0.5


def test_fail_next_accepts_ack(flaky_broker):
    flaky_broker.fail_next(1, on="ack")
    with pytest.raises(UsageError, match="'ack'"):
        flaky_broker.fail_next(1, on="acknowledge")


class TestBlipDuringTheTask:
    """The broker is away for half a second while an acks_late task runs, back before its ack."""

    @pytest.fixture
    def blip(self, celery_retry_app: Any, flaky_broker: Any, retry_worker: Any) -> Any:
        @celery_retry_app.task(name="blip", shared=False)
        def blip() -> None:
            if not retry_worker.runs["blip-1"].attempts[1:]:
                flaky_broker.outage(0.5)
                retry_worker.clock.advance(1)

        return blip

    @pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
    def test_amqp_acks_on_the_cut_connection_and_runs_it_again(
        self, blip, flaky_broker, retry_worker
    ):
        run = retry_worker.apply(blip, task_id="blip-1")

        # RabbitMQ dropped the connection at t=0; the ack at t=1 goes into the dead socket.
        # (tests/test_real_brokers.py shows the real double run.)
        assert [a.t for a in run.attempts] == [0, 1]
        assert [(a.retries, a.redelivered) for a in run.attempts] == [(0, False), (0, True)]
        assert run.attempts[0].ack_failed
        assert actions(retry_worker) == ["ack failed", "connection lost", "reconnected", "acked"]

    @pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
    def test_redis_acks_on_a_fresh_connection_and_runs_it_once(
        self, blip, flaky_broker, retry_worker
    ):
        run = retry_worker.apply(blip, task_id="blip-1")
        retry_worker.run_until_idle()  # the worker reads from its connection again

        # redis-py sends the ack on a new connection; the consumer's read then finds its own
        # connection gone and reconnects, with nothing left to redeliver. A real worker:
        # one run after a 0.5 s cut during a 1 s task.
        assert [a.t for a in run.attempts] == [0]
        assert actions(retry_worker) == ["acked", "connection lost", "reconnected"]
        assert consumer_connects(flaky_broker) == [(0, True), (1, True)]
