"""The example project's retry behaviour, tested with pytest-celery-retry.

Nothing here waits: 13 s of countdowns or a 12 s broker outage take milliseconds.
"""

import pytest
from celery.exceptions import MaxRetriesExceededError
from kombu.exceptions import OperationalError
from proj.celery import app
from proj.tasks import (
    PUBLISH_RETRY_POLICY,
    TransientHTTPError,
    fetch_rate,
    foo_task,
    place_order,
    refresh_cache,
    send_receipt,
    sync_inventory,
)

from pytest_celery_retry import (
    assert_backoff,
    assert_not_retried,
    assert_publish_retries,
    assert_retried,
    assert_side_effect,
)


# -- task retries, on the retry worker --------------------------------------------------------
def test_foo_task_retries_three_times_then_gives_up(retry_worker):
    run = retry_worker.apply(foo_task)

    assert_retried(run, times=3)
    assert_backoff(run, [1, 3, 9])
    assert len(run.attempts) == 4
    assert run.state == "FAILURE"
    assert isinstance(run.exception, MaxRetriesExceededError)
    assert retry_worker.clock.elapsed == 13  # virtual seconds


def test_autoretry_backs_off_exponentially(retry_worker):
    run = retry_worker.apply(sync_inventory, args=("SKU-1",))

    assert_backoff(run, [1, 2, 4, 8, 16])
    assert isinstance(run.exception, ConnectionError)


def test_jittered_backoff_stays_under_the_caps(retry_worker):
    run = retry_worker.apply(refresh_cache, args=("home",))

    assert_backoff(run, jitter=[2, 4, 8, 16])


def test_unreliable_api_recovers_before_the_third_attempt(retry_worker, rates_api):
    rates_api.down = True
    calls = retry_worker.track(rates_api, "get_rate")

    @retry_worker.before_attempt(fetch_rate, 3)
    def the_api_recovers():
        rates_api.down = False

    run = retry_worker.apply(fetch_rate, args=("EUR",))

    assert run.result == 0.92
    assert_retried(run, times=2)
    assert_backoff(run, [10, 10])
    assert [type(a.exc) for a in run.attempts[:2]] == [TransientHTTPError] * 2
    assert_side_effect(calls, times=3)


def test_first_call_succeeds_without_retry(retry_worker):
    run = retry_worker.apply(fetch_rate, args=("GBP",))

    assert_not_retried(run)
    assert run.result == 0.79


def test_delayed_tasks_run_until_idle(retry_worker, flaky_broker, rates_api):
    rates_api.down = True
    retry_worker.before_attempt(fetch_rate, 3, lambda: setattr(rates_api, "down", False))
    first = foo_task.delay()
    second = fetch_rate.delay("EUR")

    runs = retry_worker.run_until_idle()

    assert runs[first.id].countdowns == [1, 3, 9]
    assert runs[second.id].result == 0.92


# -- publish retries, on the flaky broker ------------------------------------------------------
def test_send_task_survives_two_refused_connections(flaky_broker):
    flaky_broker.fail_next(2, on="connect")

    app.send_task("foo.task", retry=True, retry_policy=PUBLISH_RETRY_POLICY)

    assert_publish_retries(flaky_broker, attempts=3, intervals=[3, 4], delivered=True)
    assert [m.task_name for m in flaky_broker.messages()] == ["foo.task"]


def test_send_task_gives_up_when_the_connect_timeout_runs_out(flaky_broker):
    flaky_broker.fail_next(3, on="connect")

    with pytest.raises(OperationalError):
        app.send_task("foo.task", retry=True, retry_policy=PUBLISH_RETRY_POLICY)

    assert_publish_retries(flaky_broker, attempts=3, delivered=False)
    assert flaky_broker.messages() == []


@pytest.mark.broker_outage(fail_next=2)
def test_delay_uses_the_apps_publish_retry_policy(flaky_broker):
    sync_inventory.delay("SKU-2")

    assert_publish_retries(flaky_broker, attempts=3, intervals=[3, 4], delivered=True)


def test_task_publishing_a_task_rides_out_a_lost_connection(retry_worker, flaky_broker):
    retry_worker.apply(send_receipt, args=(0,))  # the worker is up and connected
    # Now the broker drops the connection and refuses the next two reconnects.
    flaky_broker.fail_next(1, on="publish")
    flaky_broker.fail_next(2, on="connect")

    run = retry_worker.apply(place_order, args=(42,))

    assert run.result == 42
    # kombu reconnects at once, then after 3 s and 4 s.
    assert_publish_retries(flaky_broker, intervals=[0, 3, 4], delivered=True)
    receipts = retry_worker.run_until_idle()
    assert [r.result for r in receipts.values()] == ["receipt for order 42"]
