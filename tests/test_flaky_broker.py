"""The flaky broker's own surface: faults, flavours and records."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from tests.conftest import SEED_FRESH_INTERVALS, SEED_FRESH_TRIES, SEED_POLICY


def send(app: Any, **options: Any) -> Any:
    return app.send_task("foo.task", retry=True, retry_policy=dict(SEED_POLICY), **options)


def test_down_refuses_everything_until_up(app, flaky_broker):
    flaky_broker.down()
    assert flaky_broker.is_down
    with pytest.raises(OperationalError):
        send(app)
    flaky_broker.up()
    send(app)
    assert flaky_broker.last_publish.outcome == "delivered"
    assert [p.outcome for p in flaky_broker.publishes] == ["failed", "delivered"]


def fail_randomly_schedule(app: Any, broker: Any, seed: int) -> list[tuple[str, float, bool]]:
    broker.fail_randomly(rate=0.5, seed=seed)
    app.conf.broker_connection_timeout = 60
    start = broker.clock.elapsed
    for _ in range(5):
        with contextlib.suppress(OperationalError):  # a policy that ran out is part of it
            send(app)
    return [(op.kind, op.t - start, op.ok) for op in broker.operations]


def test_fail_randomly_is_reproducible_from_its_seed(app, flaky_broker, request):
    first = fail_randomly_schedule(app, flaky_broker, seed=7)
    assert not all(ok for _, _, ok in first)  # some faults fired
    assert any(p.outcome == "delivered" for p in flaky_broker.publishes)

    from tests.conftest import make_app

    other = make_app()
    broker = request.getfixturevalue("celery_retry_session").installation(other).broker
    assert fail_randomly_schedule(other, broker, seed=7) == first


def test_fail_randomly_rate_is_checked(flaky_broker):
    from pytest_celery_retry import UsageError

    with pytest.raises(UsageError, match="rate is a probability"):
        flaky_broker.fail_randomly(rate=1.5)


def test_custom_exception_instance_and_class(app, flaky_broker):
    refused = ConnectionRefusedError(111, "custom refusal")
    flaky_broker.fail_next(1, on="connect", exc=refused)
    flaky_broker.fail_next(1, on="connect", exc=ConnectionResetError)
    send(app)
    errors = [op.error for op in flaky_broker.connection_attempts if not op.ok]
    assert errors[0] is refused
    assert isinstance(errors[1], ConnectionResetError)
    assert "simulated connect failure" in str(errors[1])


def test_an_error_kombu_does_not_retry_is_not_retried(app, flaky_broker):
    # Only the transport's declared connection errors are recoverable: a ValueError is raised
    # at once, whatever the retry policy says, as with a real transport.
    flaky_broker.fail_next(1, on="connect", exc=ValueError("not a connection problem"))
    with pytest.raises(ValueError, match="not a connection problem"):
        send(app)
    assert len(flaky_broker.connection_attempts) == 1


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://h/1", "sentinel://h"])
def test_redis_urls_get_the_redis_flavour(app, request, url):
    from redis.exceptions import ConnectionError as RedisConnectionError

    app.conf.broker_url = url
    broker = request.getfixturevalue("flaky_broker")
    assert broker.flavor == "redis"
    broker.fail_next(2, on="connect")
    send(app)
    assert_errors = [op.error for op in broker.connection_attempts if not op.ok]
    assert all(isinstance(e, RedisConnectionError) for e in assert_errors)
    assert broker.last_publish.attempt_times == SEED_FRESH_TRIES


@pytest.mark.parametrize("celery_retry_flavor", ["redis"])
def test_flavour_chosen_by_fixture(flaky_broker, celery_retry_flavor):
    assert flaky_broker.flavor == "redis"
    assert flaky_broker.url.startswith("celery-retry-redis://")


def test_messages_record_what_was_delivered(app, flaky_broker):
    result = app.send_task("foo.task", args=(1, "a"), kwargs={"k": [1]}, countdown=30)
    app.send_task("foo.task", queue="other")

    (message,) = flaky_broker.messages()
    assert message.task_name == "foo.task"
    assert message.task_id == result.id
    assert message.args == [1, "a"]
    assert message.kwargs == {"k": [1]}
    assert message.retries == 0
    assert message.countdown == 30
    assert message.eta is not None and message.headers["eta"] == message.eta
    assert [m.queue for m in flaky_broker.messages(queue=None)] == ["celery", "other"]
    assert flaky_broker.pending("celery") == 1
    assert flaky_broker.delivery_count == 2


def test_records_and_timeline(app, flaky_broker):
    flaky_broker.fail_next(1, on="connect")
    send(app)
    assert [op.ok for op in flaky_broker.connection_attempts] == [False, True]
    assert [op.ok for op in flaky_broker.publish_attempts] == [True]
    second = SEED_FRESH_INTERVALS[0]
    assert flaky_broker.publish_retry_intervals == [second]
    timeline = flaky_broker.timeline()
    assert "0.000s  connect    producer  FAILED" in timeline
    assert f"publish 1: foo.task -> delivered after 2 attempt(s) at t=0s, {second}s" in timeline
