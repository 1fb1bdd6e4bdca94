"""The retry worker, driven directly: every retry feature as Celery implements it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import signals
from celery.exceptions import MaxRetriesExceededError, Retry
from kombu.exceptions import EncodeError

from pytest_celery_retry import EndlessRetryError, UsageError
from tests.conftest import make_app


def test_seed_task_retries_1_3_9_then_fails(app, retry_worker):
    run = retry_worker.apply(app.tasks["foo.task"])
    assert len(run.attempts) == 4
    assert [a.retries for a in run.attempts] == [0, 1, 2, 3]
    assert [a.outcome for a in run.attempts] == ["retry", "retry", "retry", "failure"]
    assert run.countdowns == [1, 3, 9]
    assert run.retries == 3
    assert run.state == "FAILURE"
    assert isinstance(run.exception, MaxRetriesExceededError)
    assert retry_worker.clock.elapsed == 13
    assert [a.t for a in run.attempts] == [0, 1, 4, 13]
    assert isinstance(run.attempts[0].exc, RuntimeError)
    assert run.attempts[1].started_at - run.attempts[0].started_at == timedelta(seconds=1)


def test_timeline_shows_every_attempt(app, retry_worker):
    text = retry_worker.apply(app.tasks["foo.task"]).timeline()
    assert "foo.task" in text
    assert "MaxRetriesExceededError" in text
    assert "FAILURE after 4 attempt(s), 3 retries, 13 s of virtual time" in text
    assert len([line for line in text.splitlines() if "RuntimeError('boom')" in line]) == 3


def autoretry_app(**task_options: Any) -> Any:
    app = make_app()

    @app.task(name="flaky", shared=False, autoretry_for=(ValueError,), **task_options)
    def flaky() -> None:
        raise ValueError("nope")

    return app


def test_autoretry_exponential_backoff(retry_worker):
    app = autoretry_app(retry_backoff=True, retry_jitter=False, max_retries=5)
    run = retry_worker.apply(app.tasks["flaky"])
    assert run.countdowns == [1, 2, 4, 8, 16]
    assert run.state == "FAILURE"
    assert isinstance(run.exception, ValueError)


def test_autoretry_backoff_max(retry_worker):
    app = autoretry_app(retry_backoff=True, retry_backoff_max=10, retry_jitter=False, max_retries=5)
    assert retry_worker.apply(app.tasks["flaky"]).countdowns == [1, 2, 4, 8, 10]


def test_jitter_is_in_range_and_reproducible_from_the_seed(retry_worker):
    app = autoretry_app(retry_backoff=True, max_retries=8)
    first = retry_worker.apply(app.tasks["flaky"]).countdowns
    second = retry_worker.apply(app.tasks["flaky"]).countdowns
    caps = [min(600, 2**n) for n in range(8)]
    assert all(0 <= c <= cap for c, cap in zip(first, caps))
    assert first == second
    retry_worker.settings.seed += 1
    assert retry_worker.apply(app.tasks["flaky"]).countdowns != first


def test_jitter_does_not_disturb_the_tests_own_random():
    import random

    random.seed(7)
    expected = random.random()
    random.seed(7)
    from pytest_celery_retry.session import RetrySession
    from pytest_celery_retry.worker import RetryWorker

    session = RetrySession().start()
    worker = RetryWorker(session)
    try:
        worker.apply(autoretry_app(retry_backoff=True, max_retries=2).tasks["flaky"])
    finally:
        worker.close()
        session.close()
    assert random.random() == expected


def test_retry_kwargs_and_dont_autoretry_for(retry_worker):
    app = make_app()

    @app.task(
        name="kw",
        shared=False,
        autoretry_for=(LookupError,),
        dont_autoretry_for=(KeyError,),
        retry_kwargs={"countdown": 5, "max_retries": 2},
    )
    def kw(key: bool) -> None:
        raise KeyError("k") if key else IndexError("i")

    assert retry_worker.apply(app.tasks["kw"], args=(False,)).countdowns == [5, 5]
    run = retry_worker.apply(app.tasks["kw"], args=(True,))
    assert run.retries == 0
    assert isinstance(run.exception, KeyError)


def test_eta_is_recorded_as_a_countdown(retry_worker):
    app = make_app()

    @app.task(name="eta", bind=True, shared=False, max_retries=1)
    def eta_task(self: Any) -> None:
        raise self.retry(eta=app.now() + timedelta(minutes=20))

    run = retry_worker.apply(app.tasks["eta"])
    assert run.countdowns == [1200]
    assert run.attempts[0].eta is not None
    assert run.attempts[1].started_at == run.attempts[0].eta


class PaymentDeclined(Exception):
    pass


def test_exc_is_reraised_when_retries_run_out(retry_worker):
    app = make_app()

    @app.task(name="pay", bind=True, shared=False, max_retries=2, default_retry_delay=30)
    def pay(self: Any) -> None:
        raise self.retry(exc=PaymentDeclined("card"))

    run = retry_worker.apply(app.tasks["pay"])
    assert run.countdowns == [30, 30]
    assert isinstance(run.exception, PaymentDeclined)
    assert all(isinstance(a.exc, PaymentDeclined) for a in run.attempts)


def test_default_retry_delay_is_celerys_three_minutes(retry_worker):
    app = make_app()

    @app.task(name="slow", bind=True, shared=False, max_retries=1)
    def slow(self: Any) -> None:
        raise self.retry()

    assert retry_worker.apply(app.tasks["slow"]).countdowns == [180]


def test_throw_false_schedules_the_retry_and_returns(retry_worker):
    app = make_app()

    @app.task(name="quiet", bind=True, shared=False, max_retries=2)
    def quiet(self: Any) -> str:
        if self.request.retries < 2:
            self.retry(countdown=2, throw=False)
            return "handed over"
        return "done"

    run = retry_worker.apply(app.tasks["quiet"])
    assert [a.outcome for a in run.attempts] == ["success", "success", "success"]
    assert [a.result for a in run.attempts] == ["handed over", "handed over", "done"]
    assert run.countdowns == [2, 2]
    assert run.state == "SUCCESS"
    assert run.result == "done"


def test_max_retries_override_in_retry_call(retry_worker):
    app = make_app()

    @app.task(name="short", bind=True, shared=False, max_retries=10)
    def short(self: Any) -> None:
        raise self.retry(countdown=1, max_retries=1)

    run = retry_worker.apply(app.tasks["short"])
    assert run.countdowns == [1]
    assert isinstance(run.exception, MaxRetriesExceededError)


def test_retry_raised_by_hand_is_not_rescheduled(retry_worker):
    app = make_app()

    @app.task(name="manual", shared=False)
    def manual() -> None:
        raise Retry("handled elsewhere", when=10)

    run = retry_worker.apply(app.tasks["manual"])
    assert len(run.attempts) == 1
    assert run.attempts[0].outcome == "retry"
    assert run.retries == 0
    assert run.state == "RETRY"


def test_retry_republished_by_hand_is_followed(retry_worker):
    app = make_app()

    @app.task(name="by_hand", bind=True, shared=False)
    def by_hand(self: Any) -> str:
        if self.request.retries == 0:
            self.apply_async(countdown=42, task_id=self.request.id, retries=1)
            raise Retry("republished by hand", when=42)
        return "second time"

    run = retry_worker.apply(app.tasks["by_hand"])
    assert run.countdowns == [42]
    assert run.result == "second time"


def test_handlers_and_task_retry_signal(retry_worker):
    app = make_app()
    seen: list[str] = []

    class Tracked(app.Task):  # type: ignore[name-defined,misc]
        def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            seen.append(f"on_retry:{type(exc).__name__}")

        def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            seen.append(f"on_failure:{type(exc).__name__}")

    @app.task(
        name="tracked",
        base=Tracked,
        shared=False,
        autoretry_for=(OSError,),
        max_retries=2,
        default_retry_delay=1,
    )
    def tracked() -> None:
        raise OSError("disk")

    def on_signal(sender: Any = None, reason: Any = None, **_: Any) -> None:
        seen.append(f"signal:{type(reason).__name__}")

    signals.task_retry.connect(on_signal, weak=False)
    try:
        retry_worker.apply(app.tasks["tracked"])
    finally:
        signals.task_retry.disconnect(on_signal)
    assert seen == [
        # The signal carries Celery's Retry as the reason; the handler gets the cause.
        "on_retry:OSError",
        "signal:Retry",
        "on_retry:OSError",
        "signal:Retry",
        "on_failure:OSError",
    ]


def test_success_without_retry(retry_worker):
    app = make_app()

    @app.task(name="add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    run = retry_worker.apply(app.tasks["add"], args=(2, 3))
    assert run.state == "SUCCESS"
    assert run.result == 5
    assert run.retries == 0
    assert run.attempts[0].args == (2, 3)


def test_signature_is_accepted(retry_worker):
    app = make_app()

    @app.task(name="mul", shared=False)
    def mul(x: int, y: int) -> int:
        return x * y

    assert retry_worker.apply(app.tasks["mul"].s(6, 7)).result == 42
    assert retry_worker.apply(app.signature("mul", args=(2, 2))).result == 4


def test_unregistered_task_name_is_a_usage_error(retry_worker, app):
    with pytest.raises(UsageError, match="unregistered task 'nope'"):
        retry_worker.apply(app.signature("nope"))
    with pytest.raises(UsageError, match="not its name"):
        retry_worker.apply("foo.task")


def test_arguments_go_through_the_apps_serializer(retry_worker):
    app = make_app()

    @app.task(name="kind", shared=False)
    def kind(value: Any) -> str:
        return type(value).__name__

    assert retry_worker.apply(app.tasks["kind"], args=((1, 2),)).result == "list"  # json
    with pytest.raises(EncodeError):
        retry_worker.apply(app.tasks["kind"], args=(object(),))
    # The opt-out pickles the arguments instead: what goes in comes out.
    assert retry_worker.apply(app.tasks["kind"], args=((1, 2),), serialize=False).result == "tuple"
    assert (
        retry_worker.apply(app.tasks["kind"], args=(object(),), serialize=False).result == "object"
    )


def test_unserializable_retry_arguments_lose_the_task_as_in_production(retry_worker):
    app = make_app()

    @app.task(name="leaky", bind=True, shared=False, max_retries=3)
    def leaky(self: Any) -> None:
        raise self.retry(kwargs={"handle": object()}, countdown=1)

    run = retry_worker.apply(app.tasks["leaky"])
    assert [a.outcome for a in run.attempts] == ["rejected"]
    assert run.lost
    assert run.state == "FAILURE"
    assert "LOST" in run.timeline()


def test_endless_retry_guard(retry_worker):
    app = make_app()

    @app.task(name="forever", bind=True, shared=False, max_retries=None)
    def forever(self: Any) -> None:
        raise self.retry(countdown=60)

    with pytest.raises(EndlessRetryError) as excinfo:
        retry_worker.apply(app.tasks["forever"], max_attempts=25)
    message = str(excinfo.value)
    assert "forever[" in message
    assert "after 25 attempts" in message
    assert "max_attempts=N" in message and "--celery-retry-max-attempts" in message
    assert "celery_retry_max_attempts" in message
    assert "| 25 |" not in message and "\n  25 " in message.replace("  ", "  ")


def test_ten_thousand_retries_do_not_recurse(retry_worker):
    app = make_app()

    @app.task(name="many", bind=True, shared=False, max_retries=None)
    def many(self: Any, limit: int) -> int:
        if self.request.retries < limit:
            raise self.retry(countdown=1)
        return int(self.request.retries)

    run = retry_worker.apply(app.tasks["many"], args=(10_000,), max_attempts=10_001)
    assert run.result == 10_000
    assert run.retries == 10_000
    assert retry_worker.clock.elapsed == 10_000


def test_first_message_countdown_delays_the_first_attempt(retry_worker, app):
    run = retry_worker.apply(app.tasks["foo.task"], countdown=100)
    assert run.attempts[0].t == 100
    assert run.countdowns == [1, 3, 9]
