"""assert_fits_broker_limits: does a retry schedule fit what the broker lets a worker hold?"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_retry import UsageError, assert_fits_broker_limits
from tests.conftest import make_app
from tests.limits_figures import FAST_SWEEP, needs_sweep_options

USER_TESTS = """
import pytest
from celery import Celery
from pytest_celery_retry import WorkerStoppedError, assert_fits_broker_limits

app = Celery("shop", broker="{url}", set_as_current=False)
app.conf.broker_transport_options = {options}


@app.task(bind=True, max_retries=2, shared=False)
def sync_order(self):
    raise self.retry(countdown=5 * 3 ** self.request.retries)


@pytest.fixture
def celery_retry_app():
    return app


def test_recorded(retry_worker, flaky_broker):
    {setup}
    try:
        run = retry_worker.apply(sync_order)
    except WorkerStoppedError:
        [run] = retry_worker.runs.values()
    assert_fits_broker_limits(run, flaky_broker)


def test_declared():
    assert_fits_broker_limits([5, 15], app)
"""


def run_user_tests(pytester: pytest.Pytester, url: str, options: Any, setup: str) -> Any:
    pytester.makepyfile(USER_TESTS.format(url=url, options=options, setup=setup or "pass"))
    return pytester.runpytest("-p", "no:randomly")


@needs_sweep_options
def test_redis_failure_names_the_retry_the_limit_and_the_duplicates(
    pytester: pytest.Pytester,
) -> None:
    options = {"visibility_timeout": 6, **FAST_SWEEP}
    result = run_user_tests(pytester, "redis://localhost:6379/0", options, "")

    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "E * the retry schedule does not fit the broker's visibility_timeout=6 s "
            "(redis flavour):",
            "E *   retry 2 (asked by attempt 2), countdown 15 s: longer than Redis's "
            "visibility_timeout=6 s (a sweep every 1 s): the sweeps put the held message back "
            "at +6 s, +12 s; the worker holds every copy and runs the retry 3 times at its "
            "ETA (celery#2481)",
            "E *To fix: raise broker_transport_options*visibility_timeout*above the longest "
            "countdown*",
            "E *broker limits:",
            "E *t=+11.000s  visibility sweep: restored to the queue: unacknowledged for 6 s >= "
            "visibility_timeout=6 s*",
            "E *DUPLICATE run(s)*",
        ]
    )
    # countdown 5 fits: only the second retry is named.
    assert "retry 1 (asked by attempt 1)" not in result.stdout.str()
    result.stdout.fnmatch_lines(["E *countdowns ?5, 15?"])


def test_rabbitmq_failure_says_the_worker_stops(pytester: pytest.Pytester) -> None:
    setup = "flaky_broker.consumer_timeout = 10; flaky_broker.channel_tick_interval = 1"
    result = run_user_tests(pytester, "amqp://localhost//", {}, setup)

    # The app alone: RabbitMQ's default consumer_timeout (30 min) lets 15 s through.
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "E * the retry schedule does not fit the broker's consumer_timeout=10 s "
            "(pyamqp flavour):",
            "E *   retry 2 (asked by attempt 2), countdown 15 s: longer than RabbitMQ's "
            "consumer_timeout=10 s (checked every 1 s): RabbitMQ closes the worker's channel "
            "with PRECONDITION_FAILED at +11 s and, with Celery's default "
            "broker_channel_error_retry=False, the worker stops ('Unrecoverable error'); the "
            "retry waits in the queue until a worker starts again (celery#6760)",
            "E *consumer timeout: unacknowledged for 11 s > consumer_timeout=10 s*",
        ]
    )


def test_schedules_within_the_limits_pass(pytester: pytest.Pytester) -> None:
    result = run_user_tests(pytester, "redis://localhost:6379/0", {}, "")

    # visibility_timeout 3600 s; RabbitMQ would be the same with 1800 s.
    result.assert_outcomes(passed=2)


def test_a_task_declares_its_schedule() -> None:
    app = make_app(broker_url="redis://localhost/0")

    @app.task(autoretry_for=(KeyError,), retry_backoff=600, max_retries=5, shared=False)
    def backs_off() -> None:
        raise KeyError

    @app.task(bind=True, max_retries=2, default_retry_delay=4000, shared=False)
    def waits_long(self: Any) -> None:
        raise self.retry()

    # 600, 1200, 2400 fit the hour; retry_backoff_max (600 by default) caps them all.
    assert_fits_broker_limits(backs_off, app)
    backs_off.retry_backoff_max = 7200
    with pytest.raises(AssertionError) as failed:
        assert_fits_broker_limits(backs_off, app)
    message = str(failed.value)
    assert "retry 4, countdown 4800 s: longer than Redis's visibility_timeout=3600 s" in message
    assert "runs the retry 2 times" in message
    assert "retry 5, countdown 7200 s" in message and "retry 3," not in message
    assert (
        ".backs_off (retry_backoff=600, "
        "retry_backoff_max=7200 at most, with retry_jitter): [600, 1200, 2400, 4800, 7200]"
    ) in message
    with pytest.raises(AssertionError, match=r"default_retry_delay=4000, max_retries=2\): "):
        assert_fits_broker_limits(waits_long, app)


def test_rabbitmq_with_channel_error_retry_reconnects() -> None:
    app = make_app(broker_url="amqp://localhost//", broker_channel_error_retry=True)

    with pytest.raises(AssertionError) as failed:
        assert_fits_broker_limits([4000], app)

    assert (
        "RabbitMQ closes the worker's channel with PRECONDITION_FAILED at +1860 s, +3720 s; "
        "with broker_channel_error_retry=True the worker reconnects each time"
    ) in str(failed.value)


@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp"], indirect=True)
def test_no_consumer_timeout_fits_anything(celery_retry_flavor: str, flaky_broker: Any) -> None:
    flaky_broker.consumer_timeout = None
    assert_fits_broker_limits([86400], flaky_broker)


def test_bad_input() -> None:
    app = make_app()

    @app.task(max_retries=None, shared=False)
    def forever() -> None: ...

    with pytest.raises(UsageError, match=r"max_retries=None retries for ever.*pass its countdowns"):
        assert_fits_broker_limits(forever, app)
    with pytest.raises(UsageError, match=r"schedule='soon'\): give a list of seconds"):
        assert_fits_broker_limits("soon", app)
    with pytest.raises(TypeError, match=r"pass flaky_broker .* or a Celery app"):
        assert_fits_broker_limits([1], "redis://")
