"""Canvases on the retry worker (issue 14): chains, groups, chords and errbacks whose tasks
retry, ``retry_worker.canvas(result)``, and what ``apply()`` makes of a canvas.

``tests/test_fidelity_canvas.py`` runs the same shapes on a real worker and compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import chain, chord, group
from celery.exceptions import ChordError

from pytest_celery_retry import CanvasRun, EndlessRetryError, UsageError
from tests.conftest import NATIVE_JOIN_WAIT
from tests.test_fidelity_canvas import (
    CELERY_FAILS_A_CHORD_STEP_OF_A_CHAIN,
    define_tasks,
    nested_chain_chord,
)

pytest_plugins = ["pytester"]


@pytest.fixture
def tasks(app: Any) -> dict[str, Any]:
    return define_tasks(app)


@pytest.fixture
def polled(tmp_path: Path) -> str:
    return f"file://{tmp_path}"


def outcomes(run: Any) -> list[str | None]:
    return [a.outcome for a in run.attempts]


class TestChains:
    def test_a_retrying_link_holds_the_next_one_back(self, tasks, retry_worker):
        result = chain(tasks["flaky"].s(1, countdown=5), tasks["add"].s(10)).delay()
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert canvas.kind == "chain" and canvas.state == "SUCCESS" and canvas.result == 11
        flaky, add = canvas.members
        assert outcomes(flaky) == ["retry", "retry", "success"] and flaky.countdowns == [5, 5]
        assert add.attempts[0].t == 10 and add.parent_id == flaky.task_id
        assert canvas.retries == 2

    def test_apply_returns_what_the_backend_holds_for_a_link_that_never_ran(
        self, app, tasks, retry_worker
    ):
        run = retry_worker.apply(
            chain(tasks["add"].s(1, 1), tasks["broken"].s(), tasks["add"].s(10))
        )

        # A real worker stores the failed link's exception for every later link.
        assert run.task_name == "canvas.add" and run.attempts == []
        assert run.state == "FAILURE" and isinstance(run.exception, ValueError)
        assert "FAILURE without running" in run.timeline()
        assert "ValueError('broken for good')" in run.timeline()

    def test_the_canvas_shows_every_link_that_never_ran(self, tasks, retry_worker):
        result = chain(
            tasks["add"].s(1, 1), tasks["broken"].s(), tasks["add"].s(10), tasks["add"].s(100)
        ).delay()
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert [run.state for run in canvas.members] == ["SUCCESS", "FAILURE"] + ["FAILURE"] * 2
        assert [len(run.attempts) for run in canvas.members] == [1, 2, 0, 0]
        assert all(isinstance(run.exception, ValueError) for run in canvas.members[1:])
        assert canvas.timeline().count("never ran") == 2

    def test_a_chain_that_ends_with_a_group_is_refused(self, tasks, retry_worker):
        canvas = chain(tasks["add"].s(1, 1), group(tasks["add"].s(1), tasks["add"].s(2)))
        with pytest.raises(UsageError, match=r"ends with a group.*\.delay\(\).*canvas\(result\)"):
            retry_worker.apply(canvas)

    @pytest.mark.parametrize("celery_retry_result_backend", [None])
    def test_without_a_result_backend_a_link_that_never_ran_is_refused(self, tasks, retry_worker):
        # None keeps the app's own backend, and the test app has none: nothing is stored.
        with pytest.raises(UsageError, match=r"holds no outcome.*run_until_idle\(\)"):
            retry_worker.apply(chain(tasks["broken"].s(), tasks["add"].s(10)))


class TestGroups:
    def test_apply_refuses_a_group(self, tasks, retry_worker):
        with pytest.raises(UsageError, match=r"a group has no single run.*run_until_idle"):
            retry_worker.apply(group(tasks["add"].s(1), tasks["add"].s(2)))

    def test_members_retry_on_one_clock(self, tasks, retry_worker):
        result = group(
            tasks["flaky"].s(1, countdown=3), tasks["flaky"].s(2, times=1), tasks["add"].s(3)
        ).delay()
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert canvas.kind == "group" and canvas.result == [1, 2, 3]
        assert [run.countdowns for run in canvas.members] == [[3, 3], [0.2], []]
        assert [run.attempts[-1].t for run in canvas.members] == [6, 0.2, 0]
        assert retry_worker.clock.elapsed == 6


class TestChords:
    def test_the_callback_runs_when_the_retrying_header_task_is_done(self, tasks, retry_worker):
        result = chord(
            [tasks["flaky"].s(1, times=3, countdown=10), tasks["add"].s(2)], tasks["collect"].s()
        ).delay()
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert canvas.kind == "chord" and canvas.result == [1, 2]
        assert [run.task_name for run in canvas.header] == ["canvas.flaky", "canvas.add"]
        assert canvas.callback is not None
        assert canvas.callback.attempts[0].t == 30 + NATIVE_JOIN_WAIT
        assert canvas.unlocks == []  # the in-memory backend joins natively

    def test_apply_returns_the_callback_run(self, tasks, retry_worker):
        run = retry_worker.apply(
            chord([tasks["flaky"].s(1, countdown=7), tasks["add"].s(2)], tasks["collect"].s())
        )

        assert run.task_name == "canvas.collect" and run.result == [1, 2]
        assert run.attempts[0].t == 14 + NATIVE_JOIN_WAIT

    def test_a_failed_header_task_fails_the_callback_once_and_calls_its_errback_once(
        self, tasks, retry_worker
    ):
        callback = tasks["collect"].s().on_error(tasks["errback"].s())
        result = chord([tasks["broken"].s(), tasks["add"].s(2)], callback).delay()
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert canvas.state == "FAILURE"
        assert canvas.callback is not None and canvas.callback.attempts == []
        assert isinstance(canvas.callback.exception, ChordError)
        assert [run.parent_id for run in canvas.errbacks] == [canvas.callback.task_id]
        assert canvas.errback_times == [0.2]

    def test_apply_returns_the_chord_error_the_backend_holds(self, tasks, retry_worker):
        run = retry_worker.apply(
            chord([tasks["broken"].s(), tasks["add"].s(2)], tasks["collect"].s())
        )

        assert run.attempts == [] and isinstance(run.exception, ChordError)
        assert "broken for good" in str(run.exception)


class TestChordUnlock:
    """A result backend without a native join: Celery's celery.chord_unlock polls the header."""

    @pytest.fixture
    def celery_retry_result_backend(self, polled: str) -> str:
        return polled

    def test_the_backend_cannot_join_natively(self, app, retry_worker):
        assert app.backend.supports_native_join is False

    def test_unlock_retries_until_the_header_is_done(self, tasks, retry_worker):
        result = chord(
            [tasks["flaky"].s(1, times=2, countdown=1.2), tasks["add"].s(2)], tasks["collect"].s()
        ).delay()
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        (unlock,) = canvas.unlocks
        assert [a.t for a in unlock.attempts] == [1, 2, 3]  # countdown=1, then every 1 s
        assert outcomes(unlock) == ["retry", "retry", "success"]
        assert canvas.callback is not None and canvas.callback.attempts[0].t == 3
        timeline = canvas.timeline()
        assert "3 chord-unlock poll(s)" in timeline
        # The callback the last poll sent comes after that poll, at the same virtual time.
        assert timeline.index("chord unlock  2") < timeline.index("callback")

    def test_a_failed_header_task_ends_the_polls_with_a_chord_error(self, tasks, retry_worker):
        run = retry_worker.apply(
            chord([tasks["broken"].s(countdown=1.2), tasks["add"].s(2)], tasks["collect"].s())
        )

        assert isinstance(run.exception, ChordError)
        (unlock,) = [r for r in retry_worker.runs.values() if r.task_name == "celery.chord_unlock"]
        assert outcomes(unlock) == ["retry", "success"]

    def test_celery_9674_a_nested_chain_that_fails(self, tasks, retry_worker):
        retry_worker.settings.max_attempts = 20
        result = nested_chain_chord(tasks)
        if not CELERY_FAILS_A_CHORD_STEP_OF_A_CHAIN:
            # Measured on a real worker with Celery 5.3.6: the unlock polls for ever.
            with pytest.raises(EndlessRetryError, match=r"celery\.chord_unlock.*celery#9674"):
                retry_worker.run_until_idle()
            return
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert canvas.callback is not None and isinstance(canvas.callback.exception, ChordError)
        (unlock,) = canvas.unlocks
        assert outcomes(unlock) == ["retry", "success"]

    def test_a_header_task_that_stores_no_result_meets_the_guard(self, tasks, retry_worker):
        retry_worker.settings.max_attempts = 30
        chord([tasks["quiet"].s(1), tasks["add"].s(2)], tasks["collect"].s()).delay()

        with pytest.raises(EndlessRetryError) as error:
            retry_worker.run_until_idle()

        message = str(error.value)
        assert "celery.chord_unlock" in message and "after 30 attempts" in message
        assert "ignore_result=True" in message and "celery#9674" in message
        # Polls at 1, 2, ... 30 s; the guard stopped the 31st, due at 31 s.
        assert retry_worker.clock.elapsed == 31


class TestErrbacks:
    def test_a_retrying_task_calls_its_errback_once(self, tasks, retry_worker):
        # celery#2330: once, at the end, not after every retry.
        result = tasks["broken"].apply_async((1,), link_error=tasks["errback"].s())
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert canvas.kind == "task" and outcomes(canvas.members[0]) == ["retry", "failure"]
        (errback,) = canvas.errbacks
        assert errback.result == f"cleaned up after {result.id}"
        assert canvas.errback_times == [0.2]
        assert "errbacks called 1 time(s)" in canvas.timeline()

    def test_an_immutable_errback_counts_and_a_task_the_body_sent_does_not(
        self, app, tasks, retry_worker
    ):
        @app.task(name="canvas.alerting", bind=True, max_retries=1, shared=False)
        def alerting(self: Any) -> None:
            tasks["add"].delay(1)  # its own work, published before it fails
            raise self.retry(exc=ValueError("down"), countdown=3)

        result = alerting.apply_async(link_error=tasks["errback"].si("order 7"))
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert [run.result for run in canvas.errbacks] == ["cleaned up after order 7"]
        assert [run.result for run in canvas.children] == [1, 1]  # one per attempt
        assert canvas.errback_times == [3]

    def test_link_callbacks_are_children(self, tasks, retry_worker):
        result = tasks["flaky"].apply_async((5,), link=tasks["add"].s(1))
        retry_worker.run_until_idle()

        canvas = retry_worker.canvas(result)

        assert canvas.errbacks == [] and [run.result for run in canvas.children] == [6]


def test_canvas_refuses_what_is_not_a_result(retry_worker):
    with pytest.raises(UsageError, match="AsyncResult or GroupResult"):
        retry_worker.canvas("some-id")


def test_a_canvas_run_is_plain_data() -> None:
    from pytest_celery_retry.records import TaskRun

    canvas = CanvasRun("task", members=[TaskRun("id-1", "t")], final=[TaskRun("id-1", "t")])
    assert canvas.state == "PENDING" and canvas.result is None
    assert "final: PENDING" in canvas.timeline()


def test_what_a_user_writes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        proj="""
        from celery import Celery

        app = Celery("proj", broker="memory://", set_as_current=False)

        @app.task(name="charge", bind=True, max_retries=2)
        def charge(self, order_id):
            raise self.retry(exc=ValueError(f"card declined for {order_id}"), countdown=30)

        @app.task(name="ship")
        def ship(order_id):
            return f"shipped {order_id}"

        @app.task(name="refund")
        def refund(task_id):
            return f"refunded {task_id}"

        @app.task(name="price", bind=True, max_retries=3)
        def price(self, item):
            if self.request.retries < 1:
                raise self.retry(countdown=4.5)
            return 10

        @app.task(name="total")
        def total(prices):
            return sum(prices)
        """
    )
    pytester.makeini("[pytest]\ncelery_retry_app = proj:app\n")
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import pytest
        from celery import chain, chord
        from proj import charge, price, refund, ship, total


        def test_order(retry_worker):
            result = chain(charge.s(7), ship.s()).apply_async(link_error=refund.s())
            retry_worker.run_until_idle()

            canvas = retry_worker.canvas(result)

            charged, shipped = canvas.members
            assert charged.countdowns == [30, 30] and shipped.attempts == []
            assert shipped.state == "FAILURE"
            assert canvas.errback_times == [60]


        def test_apply_chain(retry_worker):
            run = retry_worker.apply(chain(charge.s(7), ship.s()))
            assert run.task_name == "ship" and run.state == "FAILURE"
            assert str(run.exception) == "card declined for 7"


        @pytest.fixture
        def celery_retry_result_backend(tmp_path):
            return f"file://{tmp_path}"


        def test_chord_polled(retry_worker):
            run = retry_worker.apply(chord([price.s("a"), price.s("b")], total.s()))
            # chord_unlock polls at 1, 2, 3, 4 and 5 s; the prices are there at 4.5 s.
            assert run.result == 20 and run.attempts[0].t == 5
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_a_chain_through_a_group_into_a_callback(tasks, retry_worker):
    # Celery turns the group and the task after it into a chord inside the chain.
    result = chain(
        tasks["flaky"].s(1, times=1, countdown=4),
        group(tasks["add"].s(1), tasks["add"].s(2)),
        tasks["collect"].s(),
    ).delay()
    retry_worker.run_until_idle()

    canvas = retry_worker.canvas(result)

    assert canvas.kind == "chain" and canvas.result == [2, 3]
    assert [run.task_name for run in canvas.members] == [
        "canvas.flaky",
        "canvas.add",
        "canvas.add",
        "canvas.collect",
    ]
    assert [run.task_name for run in canvas.header] == ["canvas.add", "canvas.add"]
    assert canvas.callback is canvas.members[-1]
    assert canvas.callback.attempts[0].t == 4 + NATIVE_JOIN_WAIT


def test_a_chain_that_ends_with_a_group(tasks, retry_worker):
    result = chain(
        tasks["flaky"].s(1, times=1, countdown=4), group(tasks["add"].s(1), tasks["add"].s(2))
    ).delay()
    retry_worker.run_until_idle()

    canvas = retry_worker.canvas(result)

    assert canvas.kind == "chain" and canvas.result == [2, 3] and canvas.state == "SUCCESS"
    assert canvas.callback is None and [run.attempts[0].t for run in canvas.final] == [4, 4]
