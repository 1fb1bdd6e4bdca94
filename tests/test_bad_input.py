"""Bad input gets an error that names the problem and the fix; nothing is silently lost."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from kombu import Connection
from kombu.exceptions import EncodeError, OperationalError

from pytest_celery_retry import (
    BrokerDownError,
    ConfigurationError,
    UsageError,
    assert_backoff,
    assert_publish_retries,
    assert_retried,
)
from tests.conftest import consumer_connects, make_app


def test_unregistered_task_name(app, retry_worker):
    with pytest.raises(UsageError, match=r"unregistered task 'no\.such\.task'.*import the module"):
        retry_worker.apply(app.signature("no.such.task"))
    with pytest.raises(UsageError, match="pass the task object or a signature"):
        retry_worker.apply("foo.task")


def test_message_for_an_unknown_task_on_the_broker(app, flaky_broker, retry_worker):
    app.send_task("not.registered")
    with pytest.raises(UsageError, match=r"unregistered task 'not\.registered'.*Import the module"):
        retry_worker.run_until_idle()


@pytest.mark.parametrize(
    ("countdown", "message"),
    [(-1, r"countdown=-1 is negative.*Give 0 or more"), ("5", "countdown=.5.: give a number")],
)
def test_negative_or_non_numeric_countdown(app, retry_worker, countdown, message):
    with pytest.raises(UsageError, match=message):
        retry_worker.apply(app.tasks["foo.task"], countdown=countdown)


def test_eta_in_the_past(app, retry_worker):
    past = retry_worker.clock.now() - timedelta(seconds=30)
    with pytest.raises(UsageError, match=r"30 s before the virtual clock's now.*clock\.now\(\)"):
        retry_worker.apply(app.tasks["foo.task"], eta=past)


def test_unknown_retry_policy_key(app, retry_worker):
    with pytest.raises(UsageError, match=r"unknown key.*'interval_strat'.*interval_start"):
        retry_worker.apply(app.tasks["foo.task"], retry=True, retry_policy={"interval_strat": 1})


def test_unknown_key_in_the_apps_publish_retry_policy(app, request):
    app.conf.task_publish_retry_policy = {"max_retry": 3}
    with pytest.raises(UsageError, match=r"task_publish_retry_policy.*'max_retry'.*max_retries"):
        request.getfixturevalue("flaky_broker")


def test_message_protocol_1_is_refused(app, request):
    app.conf.task_protocol = 1
    with pytest.raises(ConfigurationError, match=r"task_protocol=1 .*not supported.*protocol=2"):
        request.getfixturevalue("flaky_broker")


def test_message_protocol_1_set_during_the_test_is_refused(app, retry_worker):
    app.conf.task_protocol = 1
    with pytest.raises(ConfigurationError, match=r"app 'test-app-\d+': task_protocol=1"):
        retry_worker.apply(app.tasks["foo.task"])
    app.conf.task_protocol = 2
    assert retry_worker.apply(app.tasks["foo.task"]).retries == 3


def test_non_serializable_argument(app, retry_worker):
    @app.task(name="echo", shared=False)
    def echo(value: object) -> object:
        return value

    with pytest.raises(EncodeError, match=r"cannot be serialized with 'json'.*serialize=False"):
        retry_worker.apply(echo, args=(object(),))
    # The plugin's error is both kombu's EncodeError and its own UsageError.
    with pytest.raises(UsageError):
        retry_worker.apply(echo, args=(object(),))


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_fail_next_needs_a_whole_number(flaky_broker, n):
    with pytest.raises(UsageError, match=r"fail_next\(n=.*whole number >= 0"):
        flaky_broker.fail_next(n)


def test_unknown_fault_kind(flaky_broker):
    with pytest.raises(UsageError, match="conect"):
        flaky_broker.fail_next(1, on="conect")


def test_max_attempts_must_be_a_whole_number(app, retry_worker):
    with pytest.raises(UsageError, match="max_attempts=0"):
        retry_worker.apply(app.tasks["foo.task"], max_attempts=0)


# -- numbers: NaN, infinity, a string or a bool where seconds or a count go ------------------
NOT_SECONDS = [math.nan, math.inf, "3", True]


@pytest.mark.parametrize("countdown", [math.nan, math.inf, -math.inf])
def test_countdown_must_be_finite(app, retry_worker, countdown):
    with pytest.raises(UsageError, match=r"countdown=.*give a number of seconds.*not NaN"):
        retry_worker.apply(app.tasks["foo.task"], countdown=countdown)


@pytest.mark.parametrize("option", ["countdown", "expires"])
def test_seconds_past_the_end_of_datetime(app, retry_worker, option):
    with pytest.raises(
        UsageError, match=rf"{option}=1000000000000.0 s lands after 9999-01-01.*at most"
    ):
        retry_worker.apply(app.tasks["foo.task"], **{option: 1e12})
    assert retry_worker.runs == {}  # refused before anything was published


@pytest.mark.parametrize("expires", ["soon", math.nan, True, [30]])
def test_expires_takes_seconds_or_a_datetime(app, retry_worker, expires):
    with pytest.raises(UsageError, match=r"expires=.*seconds from now .* or a datetime|not NaN"):
        retry_worker.apply(app.tasks["foo.task"], expires=expires)


def test_expires_as_celery_takes_it(app, retry_worker):
    task = app.tasks["foo.task"]
    # In seconds: the first retry (countdown 1) runs at t=1, after the 0.5 s: revoked.
    run = retry_worker.apply(task, expires=0.5)
    assert [a.outcome for a in run.attempts] == ["retry", "failure"]
    assert "revoked" in run.attempts[-1].note
    # As a datetime, far enough ahead for every retry.
    run = retry_worker.apply(task, expires=retry_worker.clock.now() + timedelta(hours=1))
    assert run.retries == 3


@pytest.mark.parametrize("seconds", [*NOT_SECONDS, -math.inf])
def test_clock_advance_takes_finite_seconds(retry_worker, seconds):
    with pytest.raises(UsageError, match=r"advance\(.*\): give a finite number of virtual seconds"):
        retry_worker.clock.advance(seconds)
    assert retry_worker.clock.elapsed == 0


def test_clock_cannot_pass_the_end_of_datetime(retry_worker):
    with pytest.raises(
        UsageError, match=r"advance\(1000000000000.0\): the virtual clock stops at 9999"
    ):
        retry_worker.clock.advance(1e12)


@pytest.mark.parametrize("on", [None, 3, [["connect"]], []])
def test_fault_kind_that_is_not_a_kind(flaky_broker, on):
    with pytest.raises(UsageError, match=r"on=.*a fault applies to 'connect', 'publish'"):
        flaky_broker.fail_next(1, on=on)


@pytest.mark.parametrize("rate", [True, math.nan, "0.5", 1.5])
def test_fail_randomly_rate_is_a_probability(flaky_broker, rate):
    with pytest.raises(UsageError, match=r"fail_randomly\(rate=.*a probability from 0 to 1"):
        flaky_broker.fail_randomly(rate=rate)


@pytest.mark.parametrize("seed", [[1], "7", 1.5, True])
def test_fail_randomly_seed_is_a_whole_number(flaky_broker, seed):
    with pytest.raises(UsageError, match=r"fail_randomly\(seed=.*whole number"):
        flaky_broker.fail_randomly(seed=seed)


@pytest.mark.parametrize("seconds", [math.nan, math.inf, "10", True])
def test_outage_lasts_finite_seconds(flaky_broker, seconds):
    with pytest.raises(UsageError, match=r"outage\(seconds=.*positive, finite.*down\(\)"):
        flaky_broker.outage(seconds=seconds)
    assert not flaky_broker.is_down


def test_outage_start_is_finite(flaky_broker):
    with pytest.raises(UsageError, match=r"outage\(starting_in=nan\)"):
        flaky_broker.outage(seconds=5, starting_in=math.nan)


# -- the broker_outage marker: refused at set-up, the marker named ----------------------------
def test_broker_outage_marker_values(pytester):
    pytester.makeconftest(CONFTEST_APP)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.broker_outage(seconds=0)
        def test_zero_seconds():
            pass

        @pytest.mark.broker_outage(down="yes")
        def test_down_yes():
            pass

        @pytest.mark.broker_outage(flavor="kafka")
        def test_unknown_flavor():
            pass

        @pytest.mark.broker_outage(fail_next=0, seconds=10)
        def test_two_faults():
            pass

        @pytest.mark.broker_outage(fail_next=2, on=None)
        def test_no_kind():
            pass

        @pytest.mark.broker_outage(fail_next=1, how="hang")
        def test_how_without_an_outage():
            pass

        @pytest.mark.broker_outage(seconds=3, how="slow")
        def test_unknown_how():
            pass

        @pytest.mark.broker_outage(down=False)
        def test_not_down(flaky_broker):
            assert not flaky_broker.is_down
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=7)
    result.stdout.fnmatch_lines_random(
        [
            "*UsageError: @pytest.mark.broker_outage: outage(seconds=0): an outage lasts a*",
            "*UsageError: @pytest.mark.broker_outage(down='yes'): down takes True*",
            "*UsageError: @pytest.mark.broker_outage(flavor='kafka'): choose one of 'pyamqp'*",
            "*UsageError: @pytest.mark.broker_outage: give one of fail_next=, seconds= or "
            "down=True, not fail_next and seconds",
            "*UsageError: @pytest.mark.broker_outage: on=None: a fault applies to*",
            "*UsageError: @pytest.mark.broker_outage: how= goes with seconds= or down=True*",
            "*UsageError: @pytest.mark.broker_outage: outage(how='slow'): choose 'refuse'*",
        ]
    )


CONFTEST_APP = """
import pytest
from celery import Celery

@pytest.fixture
def celery_retry_app():
    return Celery("proj", broker="memory://", set_as_current=False)
"""


# -- assertions: misuse is a UsageError or TypeError, a mismatch stays an AssertionError -------
@pytest.fixture
def run(app, retry_worker):
    return retry_worker.apply(app.tasks["foo.task"])


@pytest.mark.parametrize("times", ["3", 3.0, True, -1, None])
def test_assert_retried_times_is_a_count(run, times):
    with pytest.raises(UsageError, match=r"assert_retried\(run, times=.*whole number >= 0"):
        assert_retried(run, times)


def test_assert_retried_mismatch_is_an_assertion_with_the_timeline(run):
    with pytest.raises(AssertionError, match=r"(?s)to retry 2 time\(s\), it retried 3.*timeline"):
        assert_retried(run, 2)


@pytest.mark.parametrize("tolerance", [math.nan, math.inf, -1, "0.5"])
def test_assert_backoff_tolerance(run, tolerance):
    with pytest.raises(UsageError, match=r"assert_backoff\(tolerance=.*seconds >= 0"):
        assert_backoff(run, [1, 3, 9], tolerance=tolerance)


@pytest.mark.parametrize("expected", [9, "1, 3, 9", [1, "3", 9], [1, 3, math.nan]])
def test_assert_backoff_expected_is_a_list_of_seconds(run, expected):
    with pytest.raises(UsageError, match=r"assert_backoff\(expected=.*e\.g\. \[1, 3, 9\]"):
        assert_backoff(run, expected)
    with pytest.raises(UsageError, match=r"assert_backoff\(jitter="):
        assert_backoff(run, jitter=expected)


def test_assert_backoff_accepts_any_iterable(run):
    assert_backoff(run, (c for c in (1, 3, 9)))


@pytest.mark.parametrize("not_a_broker", ["run", None])
def test_assert_publish_retries_needs_the_broker(run, not_a_broker):
    with pytest.raises(TypeError, match=r"pass flaky_broker \(or a BrokerProxy\).*assert_retried"):
        assert_publish_retries(run if not_a_broker == "run" else None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": "2"}, r"attempts='2'\): the number of tries"),
        ({"attempts": 0}, r"attempts=0\): the number of tries"),
        ({"intervals": 3}, r"intervals=3\): give a list of seconds"),
        ({"delivered": "yes"}, r"delivered='yes'\): True or False"),
        ({"tolerance": math.nan}, r"tolerance=nan\): a tolerance"),
        ({"publish": "0"}, r"publish='0'\): the index of the publish"),
        ({"publish": 4}, r"publish=4\): the broker saw 4 publish\(es\), so publish= goes from -4"),
        ({"publish": -5}, r"publish=-5\)"),
    ],
)
def test_assert_publish_retries_arguments(flaky_broker, run, options, message):
    with pytest.raises(UsageError, match=message):
        assert_publish_retries(flaky_broker, **options)


def test_assert_publish_retries_mismatch_stays_an_assertion(flaky_broker, run):
    assert_publish_retries(flaky_broker, 1, publish=3)
    with pytest.raises(AssertionError, match=r"(?s)expected 2 attempt\(s\), recorded 1.*timeline"):
        assert_publish_retries(flaky_broker, 2, publish=0)


# -- broker_proxy: one broker per proxy ------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "amqp://a//,amqp://b//",
        "amqp://guest:guest@a:5672//;amqp://guest:guest@b:5672//",
        "redis://a:6379/0,redis://b:6379/0",
        ["amqp://a//", "amqp://b//"],
    ],
)
def test_broker_proxy_refuses_a_failover_list(url):
    from pytest_celery_retry import BrokerProxy

    # Refused before the proxy looks for a broker: no real broker needed.
    with pytest.raises(UsageError, match=r"lists several brokers.*one BrokerProxy in front of"):
        BrokerProxy(url)


# -- a broker left down ----------------------------------------------------------------------
def test_broker_left_down_raises_broker_down_error(app, flaky_broker, retry_worker, caplog):
    app.tasks["foo.task"].delay()
    flaky_broker.down()

    with pytest.raises(BrokerDownError) as raised:
        retry_worker.run_until_idle()

    message = str(raised.value)
    assert "the simulated broker is still down: flaky_broker.down() at t=0s" in message
    assert "flaky_broker.up()" in message and "flaky_broker.outage(seconds=...)" in message
    assert "broker timeline (pyamqp flavour" in message
    # Still what a real worker's consumer ends with, and after one try, not 100 logged ones.
    assert isinstance(raised.value, OperationalError)
    assert consumer_connects(flaky_broker) == [(0, False)]
    assert not [r for r in caplog.records if "Cannot connect" in r.getMessage()]


@pytest.mark.broker_outage(down=True)
def test_broker_down_from_the_marker_while_a_task_runs(app, flaky_broker, retry_worker):
    # apply() publishes the first message with faults suspended; then the worker connects.
    with pytest.raises(BrokerDownError, match=r"down\(\) at t=0s was never followed by up"):
        retry_worker.apply(app.tasks["foo.task"])


def test_broker_goes_down_for_good_while_the_worker_holds_a_message(
    app, flaky_broker, retry_worker
):
    @app.task(name="pull.the.plug", shared=False)
    def pull_the_plug() -> None:
        flaky_broker.down()

    app.tasks["foo.task"].apply_async(countdown=10)
    pull_the_plug.delay()

    # The worker holds foo.task (due at t=10); its next read fails on the cut connection, so
    # it gives the message back, tries to reconnect, and cannot.
    with pytest.raises(BrokerDownError, match=r"(?s)at t=0s.*consume +consumer +FAILED.*refused"):
        retry_worker.run_until_idle()
    assert [e.action for e in retry_worker.events] == ["acked", "connection lost"]
    assert flaky_broker.pending() == 1  # foo.task is back on the queue, as on a real broker


# -- the redis flavour: without redis-py, and the address it names ---------------------------
def test_redis_flavour_without_redis_py_names_the_extra(pytester):
    pytester.makeconftest(
        """
        import sys

        import pytest
        from celery import Celery

        sys.modules["redis"] = None  # as if redis-py were not installed: import fails

        @pytest.fixture
        def celery_retry_app():
            return Celery("proj", broker="redis://cache:6379/0", set_as_current=False)
        """
    )
    pytester.makepyfile(
        """
        def test_flaky(flaky_broker):
            pass

        def test_pyamqp_still_works(celery_retry_app, request):
            celery_retry_app.conf.broker_url = "amqp://rabbit//"
            request.getfixturevalue("flaky_broker")
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ['*ConfigurationError: the redis flavour*pip install "pytest-celery-retry[[]redis]"*']
    )
    assert "NoneType" not in result.stdout.str()


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://cache.internal:6380/0", "cache.internal:6380"),
        ("redis://:secret@cache.internal/2", "cache.internal:6379"),
        ("redis://cache-a:7000/0;redis://cache-b:7000/0", "cache-a:7000"),
        ("memory://", "localhost:6379"),
    ],
)
def test_simulated_redis_errors_name_the_apps_broker(celery_retry_session, url, address):
    app = make_app(broker_url=url)
    broker = celery_retry_session.installation(app, flavor="redis").broker
    broker.down()

    from redis.exceptions import ConnectionError as RedisConnectionError

    refused = rf"^Error 111 connecting to {address}\."
    with Connection(broker.url) as connection, pytest.raises(RedisConnectionError, match=refused):
        connection.connect()
