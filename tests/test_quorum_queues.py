"""Quorum queues: the in-memory broker refuses what only RabbitMQ's native delayed delivery
does (celery#9912, #10111). tests/real_limits_cases.py measures the real thing."""

from __future__ import annotations

from typing import Any

import pytest
from kombu import Exchange, Queue

from pytest_celery_retry import ConfigurationError, assert_backoff
from pytest_celery_retry.flavors import flavor_named, refuse_native_delayed_delivery
from tests.conftest import make_app

pytest.importorskip("celery.utils.quorum_queues", reason="native delayed delivery: Celery 5.5+")

QUORUM = {"x-queue-type": "quorum"}


def quorum_app(exchange_type: str) -> Any:
    return make_app(
        task_queues=[Queue("jobs", Exchange("jobs", type=exchange_type), queue_arguments=QUORUM)],
        task_default_queue="jobs",
        task_default_exchange="jobs",
        task_default_exchange_type=exchange_type,
    )


@pytest.mark.parametrize("exchange_type", ["topic", "fanout"])
def test_quorum_queue_behind_a_non_direct_exchange_is_refused(exchange_type: str) -> None:
    app = quorum_app(exchange_type)
    with pytest.raises(ConfigurationError) as excinfo:
        refuse_native_delayed_delivery(app, flavor_named("pyamqp"))
    message = str(excinfo.value)
    assert "the quorum queue 'jobs'" in message
    assert "celery_delayed_*" in message
    assert "broker_proxy('amqp')" in message
    assert "exchange-to-exchange bindings, message TTL or dead-lettering" in message


def test_a_classic_queue_behind_a_topic_exchange_is_refused_too() -> None:
    # Celery decides per message by the exchange: one quorum queue anywhere is enough.
    app = make_app(
        task_queues=[
            Queue("quorum-jobs", queue_arguments=QUORUM),
            Queue("classic-jobs", Exchange("classic-jobs", type="topic")),
        ]
    )
    with pytest.raises(ConfigurationError, match=r"routed to classic-jobs through"):
        refuse_native_delayed_delivery(app, flavor_named("pyamqp"))


@pytest.mark.parametrize("celery_retry_flavor", ["redis"], indirect=True)
def test_redis_has_no_quorum_queues_the_worker_holds_the_eta(
    retry_worker: Any, celery_retry_app: Any, celery_retry_flavor: str
) -> None:
    topic = Exchange("celery", type="topic")
    celery_retry_app.conf.task_queues = [Queue("celery", topic, queue_arguments=QUORUM)]
    run = retry_worker.apply(celery_retry_app.tasks["foo.task"])
    assert_backoff(run, [1, 3, 9])


def test_retry_worker_refuses_the_app_before_running_anything(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery
        from kombu import Exchange, Queue

        app = Celery("shop", broker="amqp://", set_as_current=False)
        quorum = {"x-queue-type": "quorum"}
        topic = Exchange("jobs", type="topic")
        app.conf.task_queues = [Queue("jobs", topic, queue_arguments=quorum)]
        app.conf.task_default_queue = "jobs"


        @app.task(bind=True, max_retries=1)
        def charge(self):
            raise self.retry(countdown=5)


        @pytest.fixture
        def celery_retry_app():
            return app


        def test_charge_retries(retry_worker):
            retry_worker.apply(charge)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ConfigurationError: app 'shop': the quorum queue 'jobs'*"])


def test_direct_exchanges_hold_the_eta_in_the_worker_as_simulated(
    retry_worker: Any, celery_retry_app: Any
) -> None:
    # Celery warns that native delayed delivery needs a topic or fanout exchange, and the
    # worker holds the ETA: what the in-memory broker does.
    celery_retry_app.conf.task_queues = [Queue("celery", queue_arguments=QUORUM)]
    run = retry_worker.apply(celery_retry_app.tasks["foo.task"])
    assert_backoff(run, [1, 3, 9])
