"""Bad input gets an error that names the problem and the fix; nothing is silently lost."""

from __future__ import annotations

from datetime import timedelta

import pytest
from kombu.exceptions import EncodeError

from pytest_celery_retry import UsageError


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
