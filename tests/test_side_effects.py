"""Side effects: ``retry_worker.track`` records each call beside the attempt that made it, and
``assert_side_effect`` checks how many there were, showing every call and delivery."""

from __future__ import annotations

import types
from typing import Any

import pytest

from pytest_celery_retry import (
    SideEffect,
    UsageError,
    assert_side_effect,
)
from tests.conftest import actions

pytest_plugins = ["pytester"]


class Mailer:
    """Stands in for an e-mail client: what the tasks call."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, to: str, subject: str = "") -> str:
        self.sent.append(to)
        return f"sent to {to}"

    @staticmethod
    def render(name: str) -> str:
        return f"Hello {name}"

    @classmethod
    def create(cls, name: str) -> str:
        return f"{cls.__name__} for {name}"


class Outbox(Mailer):
    pass


@pytest.fixture
def mailer() -> Mailer:
    return Mailer()


def welcome_task(app: Any, mailer: Mailer, **options: Any) -> Any:
    @app.task(name="welcome", bind=True, shared=False, **options)
    def welcome(self: Any, to: str) -> str:
        return mailer.send(to, subject="Welcome")

    return welcome


class TestCalls:
    def test_each_call_is_recorded_with_its_attempt(self, app, retry_worker, mailer):
        @app.task(name="notify", bind=True, shared=False, max_retries=2)
        def notify(self: Any, to: str) -> None:
            mailer.send(to)
            if self.request.retries < 1:
                raise self.retry(countdown=5)

        effect = retry_worker.track(mailer, "send")
        run = retry_worker.apply(notify, args=("a@example.com",))

        assert mailer.sent == ["a@example.com", "a@example.com"]  # called through
        assert [(c.number, c.t, c.attempt, c.retries, c.delivery) for c in effect.calls] == [
            (1, 0, 1, 0, 1),
            (2, 5, 2, 1, 1),
        ]
        assert {c.task_id for c in effect.calls} == {run.task_id}
        assert {c.task_name for c in effect.calls} == {"notify"}
        assert [c.args for c in effect.calls] == [("a@example.com",)] * 2
        assert [c.result for c in effect.calls] == ["sent to a@example.com"] * 2
        assert not any(c.redelivered for c in effect.calls)
        assert effect.name == "<Mailer object>.send"
        assert_side_effect(effect, times=2)

    def test_a_redelivered_message_calls_it_again(self, app, flaky_broker, retry_worker, mailer):
        welcome = welcome_task(app, mailer, acks_late=True)
        effect = retry_worker.track(mailer, "send", name="welcome e-mail")
        flaky_broker.fail_next(1, on="ack")

        run = retry_worker.apply(welcome, args=("b@example.com",))

        assert [(c.attempt, c.retries, c.delivery, c.redelivered) for c in effect.calls] == [
            (1, 0, 1, False),
            (2, 0, 2, True),
        ]
        assert [a.redelivered for a in run.attempts] == [False, True]
        assert effect.calls[0].kwargs == {"subject": "Welcome"}
        with pytest.raises(AssertionError) as failure:
            assert_side_effect(effect, times=1)
        message = str(failure.value)
        assert message.startswith(
            "expected welcome e-mail to be called exactly 1 time(s), it was called 2 time(s) "
            "from 1 task id(s)"
        )
        # Every call, then the task's timeline with its redelivery.
        assert "calls of welcome e-mail (2)" in message
        assert "redelivered" in message
        assert "'b@example.com', subject='Welcome'" in message
        assert f"retry timeline of welcome[{run.task_id}]" in message
        assert "ack failed" in message
        assert_side_effect(effect, at_most=2)

    def test_what_it_raised_is_recorded_and_raised(self, app, retry_worker, mailer):
        @app.task(name="bounce", shared=False)
        def bounce() -> None:
            mailer.send("nobody")

        def refuse(to: str, subject: str = "") -> str:
            raise ConnectionRefusedError(f"SMTP refused {to}")

        mailer.send = refuse  # type: ignore[method-assign]
        effect = retry_worker.track(mailer, "send")
        run = retry_worker.apply(bounce)

        assert isinstance(run.exception, ConnectionRefusedError)
        assert effect.calls[0].raised is run.exception
        with pytest.raises(AssertionError, match="ConnectionRefusedError"):
            assert_side_effect(effect, times=0)

    def test_a_call_outside_a_task_has_no_task(self, retry_worker, mailer):
        effect = retry_worker.track(mailer, "send")
        mailer.send("test@example.com")
        (call,) = effect.calls
        assert (call.task_id, call.task_name, call.attempt, call.delivery) == (
            None,
            None,
            None,
            None,
        )
        with pytest.raises(AssertionError, match=r"\(outside a task\)"):
            assert_side_effect(effect, times=2)

    def test_never_called(self, app, retry_worker, mailer):
        welcome_task(app, mailer)
        effect = retry_worker.track(Mailer, "render")
        run = retry_worker.apply(app.tasks["welcome"], args=("c@example.com",))
        assert_side_effect(effect, times=0)
        with pytest.raises(AssertionError) as failure:
            assert_side_effect(effect, times=1)
        # No call names a task: every run is shown.
        assert "(no calls)" in str(failure.value)
        assert run.task_id in str(failure.value)


class TestRestore:
    """What track() replaced is put back at teardown, whatever kind of attribute it was."""

    def test_every_kind_of_attribute(self, celery_retry_session, mailer):
        from pytest_celery_retry.worker import RetryWorker

        module = types.ModuleType("smtp")
        module.send = lambda to: f"module sent to {to}"  # type: ignore[attr-defined]
        originals = {
            "function": Mailer.__dict__["send"],
            "static": Mailer.__dict__["render"],
            "class": Mailer.__dict__["create"],
            "module": module.send,  # type: ignore[attr-defined]
        }
        worker = RetryWorker(celery_retry_session)
        effects = [
            worker.track(Mailer, "send"),
            worker.track(Mailer, "render"),
            worker.track(Mailer, "create"),
            worker.track(module, "send"),
            worker.track(mailer, "send"),  # the instance's bound method, over the class's
            worker.track(Outbox, "render"),  # inherited: deleted again at teardown
        ]

        # Methods stay methods: the call records leave self and cls out.
        assert Mailer().send("x") == "sent to x"
        assert Mailer.render("Ann") == Outbox.render("Ann") == "Hello Ann"
        assert Outbox.create("Bo") == "Outbox for Bo"
        assert module.send("y") == "module sent to y"  # type: ignore[attr-defined]
        assert mailer.send("z") == "sent to z"
        assert [e.calls[0].args for e in effects[:3]] == [("x",), ("Ann",), ("Bo",)]
        # The instance's call goes through its wrapper and the class's.
        assert [len(e.calls) for e in effects] == [2, 2, 1, 1, 1, 1]

        worker.close()

        assert Mailer.__dict__["send"] is originals["function"]
        assert Mailer.__dict__["render"] is originals["static"]
        assert Mailer.__dict__["create"] is originals["class"]
        assert module.send is originals["module"]  # type: ignore[attr-defined]
        assert "send" not in vars(mailer)
        assert "render" not in vars(Outbox)

    def test_restored_after_a_failing_test(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            import pytest
            from celery import Celery

            app = Celery("proj", broker="memory://", set_as_current=False)

            class Mailer:
                def send(self, to):
                    return to

            ORIGINAL = Mailer.__dict__["send"]

            @pytest.fixture
            def celery_retry_app():
                return app

            def test_fails_while_tracking(retry_worker):
                retry_worker.track(Mailer, "send")
                assert Mailer.__dict__["send"] is not ORIGINAL
                raise RuntimeError("the test fails")

            def test_then_restored():
                assert Mailer.__dict__["send"] is ORIGINAL
            """
        )
        result = pytester.runpytest("-p", "no:randomly")
        result.assert_outcomes(passed=1, failed=1)


class TestBadInput:
    def test_track(self, retry_worker, mailer):
        with pytest.raises(UsageError, match="has no attribute 'sned'"):
            retry_worker.track(mailer, "sned")
        with pytest.raises(UsageError, match="'sent' is not callable"):
            retry_worker.track(mailer, "sent")
        with pytest.raises(UsageError, match="name the attribute as a string"):
            retry_worker.track(mailer, mailer.send)

    def test_assert_side_effect(self, retry_worker, mailer):
        effect = retry_worker.track(mailer, "send")
        with pytest.raises(UsageError, match="give one of them"):
            assert_side_effect(effect)
        with pytest.raises(UsageError, match="give one of them"):
            assert_side_effect(effect, times=1, at_most=2)
        with pytest.raises(UsageError, match=r"times=-1"):
            assert_side_effect(effect, times=-1)
        with pytest.raises(UsageError, match=r"at_most=True"):
            assert_side_effect(effect, at_most=True)
        with pytest.raises(TypeError, match="got list"):
            assert_side_effect(effect.calls, times=1)  # type: ignore[arg-type]


def test_through_pytest_with_the_timeline_in_the_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery
        from pytest_celery_retry import assert_side_effect

        app = Celery("proj", broker="amqp://localhost//", set_as_current=False)

        class Mailer:
            def send(self, to):
                return to

        mailer = Mailer()

        @app.task(name="welcome", acks_late=True)
        def welcome(to):
            mailer.send(to)

        @pytest.fixture
        def celery_retry_app():
            return app

        def test_sent_once(retry_worker, flaky_broker):
            sent = retry_worker.track(mailer, "send", name="welcome e-mail")
            flaky_broker.fail_next(1, on="ack")
            retry_worker.apply(welcome, args=("ann@example.com",))
            assert_side_effect(sent, times=1)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*expected welcome e-mail to be called exactly 1 time(s), it was called 2 time(s)*",
            "E*calls of welcome e-mail (2)",
            "E*#  t*task*attempt  retries  delivery  redelivered  arguments*outcome",
            "E*1  0.000s  welcome*1        0        1         no           'ann@example.com'*",
            "E*2  0.000s  welcome*2        0        2         yes          'ann@example.com'*",
            "E*retry timeline of welcome*",
            "E*#  t        retries  redelivered  outcome*",
        ]
    )


def test_the_records_are_exported() -> None:
    import pytest_celery_retry

    assert pytest_celery_retry.SideEffect is SideEffect
    assert "SideEffectCall" in pytest_celery_retry.__all__


def test_tracking_does_not_change_what_the_worker_does(app, flaky_broker, retry_worker, mailer):
    welcome = welcome_task(app, mailer, acks_late=True)
    retry_worker.track(mailer, "send")
    flaky_broker.fail_next(1, on="ack")
    retry_worker.apply(welcome, args=("d@example.com",))
    assert actions(retry_worker) == ["ack failed", "connection lost", "reconnected", "acked"]
