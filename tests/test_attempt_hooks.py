"""Hooks (issue #14, item 3): ``retry_worker.before_attempt`` runs the test's own code before an
attempt of a task, on the virtual clock, so a test changes the world between attempts without
counters in the task's code."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_retry import AttemptHookError, UsageError, assert_retried

pytest_plugins = ["pytester"]


class RatesAPI:
    """A dependency that is down until the test brings it back."""

    def __init__(self) -> None:
        self.up = False

    def get(self) -> float:
        if not self.up:
            raise ConnectionError("503 Service Unavailable")
        return 0.92


@pytest.fixture
def rates() -> RatesAPI:
    return RatesAPI()


def fetch_task(app: Any, rates: RatesAPI) -> Any:
    @app.task(name="fetch", bind=True, shared=False, max_retries=5, default_retry_delay=10)
    def fetch(self: Any) -> float:
        try:
            return rates.get()
        except ConnectionError as exc:
            raise self.retry(exc=exc) from exc

    return fetch


def test_the_dependency_recovers_before_the_third_attempt(app, retry_worker, rates):
    fetch = fetch_task(app, rates)
    when: list[float] = []

    @retry_worker.before_attempt(fetch, 3)
    def recover() -> None:
        when.append(retry_worker.clock.elapsed)
        rates.up = True

    run = retry_worker.apply(fetch)

    assert run.result == 0.92
    assert_retried(run, times=2)
    assert when == [20]  # on the virtual clock, when attempt 3 is due
    assert callable(recover)  # the decorator gives the function back


def test_every_attempt_gets_its_number(app, retry_worker, rates):
    fetch = fetch_task(app, rates)
    numbers: list[int] = []
    retry_worker.before_attempt(fetch, fn=numbers.append)
    retry_worker.before_attempt(fetch, 4, lambda: setattr(rates, "up", True))

    run = retry_worker.apply(fetch)

    assert numbers == [1, 2, 3, 4]
    assert [a.number for a in run.attempts] == numbers
    assert run.state == "SUCCESS"


def test_hooks_run_in_the_order_they_were_added(app, retry_worker, rates):
    fetch = fetch_task(app, rates)
    order: list[str] = []
    retry_worker.before_attempt(fetch, 1, lambda: order.append("first"))
    retry_worker.before_attempt(fetch, fn=lambda n: order.append(f"every {n}"))
    retry_worker.before_attempt(fetch, 1, lambda: order.append("third"))
    rates.up = True

    retry_worker.apply(fetch)

    assert order == ["first", "every 1", "third"]


def test_a_hook_moves_the_clock_before_the_body(app, retry_worker, rates):
    fetch = fetch_task(app, rates)
    retry_worker.before_attempt(fetch, 2, lambda: retry_worker.clock.advance(30))
    retry_worker.before_attempt(fetch, 3, lambda: setattr(rates, "up", True))

    run = retry_worker.apply(fetch)

    assert [a.t for a in run.attempts] == [0, 40, 50]
    assert run.countdowns == [10, 10]


def test_a_hook_takes_the_broker_down(app, flaky_broker, retry_worker, rates):
    fetch = fetch_task(app, rates)
    # Attempt 2 meets a broker that is down for a minute: kombu's publish retry (the app's
    # default policy, 0.6 s) gives up on the retry message and Celery rejects the task's
    # message, but that reject cannot reach the broker either. The broker still holds the
    # message and delivers it again once the worker has reconnected (2, 4, ... 16 s apart).
    retry_worker.before_attempt(fetch, 2, lambda: flaky_broker.outage(seconds=60))
    retry_worker.before_attempt(fetch, 3, lambda: setattr(rates, "up", True))

    run = retry_worker.apply(fetch)

    assert [(a.outcome, a.retries, a.redelivered) for a in run.attempts] == [
        ("retry", 0, False),
        ("rejected", 1, False),
        ("success", 1, True),
    ]
    assert [a.t for a in run.attempts] == pytest.approx([0, 10, 82.6])
    assert not run.lost
    assert run.attempts[1].note == (
        "retry not published: Celery rejected the message; ack failed: the broker was "
        "unreachable and still holds the message"
    )
    assert run.result == 0.92


def test_a_redelivery_is_an_attempt(app, retry_worker, rates):
    @app.task(name="store", bind=True, shared=False, acks_late=True)
    def store(self: Any) -> bool:
        return bool(self.request.delivery_info.get("redelivered"))

    seen: list[int] = []
    retry_worker.redeliver(store)
    retry_worker.before_attempt(store, 2, lambda: seen.append(2))

    run = retry_worker.apply(store)

    assert seen == [2]
    assert [(a.number, a.retries, a.redelivered) for a in run.attempts] == [
        (1, 0, False),
        (2, 0, True),
    ]


def test_an_error_in_the_hook_fails_the_test(app, retry_worker, rates):
    fetch = fetch_task(app, rates)

    def recover() -> None:
        raise KeyError("no such fake")

    retry_worker.before_attempt(fetch, 2, recover)
    with pytest.raises(AttemptHookError) as failure:
        retry_worker.apply(fetch)

    message = str(failure.value)
    assert "the before_attempt hook " in message
    assert "recover() raised KeyError: 'no such fake'" in message
    assert "(before attempt 2 of fetch[" in message
    assert isinstance(failure.value.__cause__, KeyError)
    # The attempt did not run: the task body never saw the hook's failure.
    (run,) = retry_worker.runs.values()
    assert len(run.attempts) == 1


def test_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery

        app = Celery("proj", broker="memory://", set_as_current=False)
        state = {"up": False}

        @app.task(name="fetch", bind=True, max_retries=3)
        def fetch(self):
            if not state["up"]:
                raise self.retry(countdown=5)
            return "ok"

        @pytest.fixture
        def celery_retry_app():
            state["up"] = False
            return app

        def test_recovers(retry_worker):
            @retry_worker.before_attempt(fetch, 2)
            def recover():
                state["up"] = True

            assert retry_worker.apply(fetch).result == "ok"

        def test_hook_fails(retry_worker):
            @retry_worker.before_attempt("fetch", 2)
            def recover():
                pytest.fail("the fake could not be reset")

            retry_worker.apply(fetch)

        def test_hook_raises(retry_worker):
            retry_worker.before_attempt(fetch, 1, lambda: 1 / 0)
            retry_worker.apply(fetch)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*Failed: the fake could not be reset",
            "*ZeroDivisionError: division by zero",
            "*AttemptHookError: the before_attempt hook *<lambda>() raised ZeroDivisionError*",
        ]
    )


class TestBadInput:
    def test_arguments(self, app, retry_worker, rates):
        fetch = fetch_task(app, rates)
        with pytest.raises(UsageError, match="no app of this test registers a task named 'fecth'"):
            retry_worker.before_attempt("fecth", 2, lambda: None)
        with pytest.raises(UsageError, match=r"n=0\): the attempt's number"):
            retry_worker.before_attempt(fetch, 0, lambda: None)
        with pytest.raises(UsageError, match=r"n='2'"):
            retry_worker.before_attempt(fetch, "2", lambda: None)
        with pytest.raises(UsageError, match="pass a function"):
            retry_worker.before_attempt(fetch, 2, "recover")
        with pytest.raises(UsageError, match="pass a task"):
            retry_worker.before_attempt(None, 2, lambda: None)

    def test_the_hook_signature(self, app, retry_worker, rates):
        fetch = fetch_task(app, rates)
        with pytest.raises(UsageError, match=r"called with no arguments; give it no parameters"):
            retry_worker.before_attempt(fetch, 2, lambda number: None)
        with pytest.raises(UsageError, match=r"called with the attempt number; give it one"):
            retry_worker.before_attempt(fetch, fn=lambda: None)
        # A name registered on the app is a task too.
        retry_worker.before_attempt("fetch", 2, lambda: None)
