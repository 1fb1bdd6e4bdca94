"""Redelivery (issue #14, item 1): ``retry_worker.redeliver`` loses deliveries the way a worker
loses them, and Celery and the broker decide what comes back, as they do in production."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_retry import UsageError, assert_side_effect
from tests.conftest import actions

pytest_plugins = ["pytester"]


class Ledger:
    """Stands in for a database table the tasks write rows to."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def insert(self, row: str) -> None:
        self.rows.append(row)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


def recording_task(app: Any, ledger: Ledger, seen: list[tuple[Any, ...]], **options: Any) -> Any:
    """A task that writes a row, noting what Celery told it about its delivery."""

    @app.task(name="write_row", bind=True, shared=False, max_retries=1, **options)
    def write_row(self: Any, order: int) -> str:
        request = self.request
        seen.append((request.id, request.retries, request.delivery_info.get("redelivered")))
        ledger.insert(f"order {order}")
        return "written"

    return write_row


class TestAfterRun:
    """The worker dies after the body ran, before its ack left."""

    def test_acks_late_runs_again_with_what_celery_sets(self, app, retry_worker, ledger):
        seen: list[tuple[Any, ...]] = []
        task = recording_task(app, ledger, seen, acks_late=True)
        effect = retry_worker.track(ledger, "insert")
        retry_worker.redeliver(task)

        run = retry_worker.apply(task, args=(7,))

        # The same message again: same task id, same retries, marked redelivered.
        assert seen == [(run.task_id, 0, False), (run.task_id, 0, True)]
        assert [a.redelivered for a in run.attempts] == [False, True]
        assert run.attempts[0].ack_failed
        assert "the worker died after the run" in run.attempts[0].note
        assert ledger.rows == ["order 7", "order 7"]
        assert [(c.attempt, c.delivery, c.redelivered) for c in effect.calls] == [
            (1, 1, False),
            (2, 2, True),
        ]
        with pytest.raises(AssertionError, match="called exactly 1 time"):
            assert_side_effect(effect, times=1)

    def test_early_ack_was_acked_before_the_run(self, app, retry_worker, ledger):
        seen: list[tuple[Any, ...]] = []
        task = recording_task(app, ledger, seen)
        retry_worker.redeliver(task)

        run = retry_worker.apply(task, args=(7,))

        assert seen == [(run.task_id, 0, False)]
        assert "acked when it was accepted: not redelivered" in run.attempts[0].note
        assert not run.attempts[0].ack_failed
        # The worker still died: its ack had gone out when it accepted the task.
        assert actions(retry_worker) == ["acked", "worker died"]

    @pytest.mark.parametrize("celery_retry_flavor", ["pyamqp", "redis"], indirect=True)
    def test_where_the_message_comes_back_from(
        self, app, flaky_broker, retry_worker, ledger, celery_retry_flavor
    ):
        seen: list[tuple[Any, ...]] = []
        task = recording_task(app, ledger, seen, acks_late=True)
        retry_worker.redeliver(task)

        run = retry_worker.apply(task, args=(1,))

        if celery_retry_flavor == "pyamqp":
            # RabbitMQ requeues what a closed connection held, at once.
            assert [a.t for a in run.attempts] == [0, 0]
            assert actions(retry_worker) == [
                "worker died",
                "ack lost",
                "worker restarted",
                "acked",
            ]
        else:
            # A killed worker's redis client gives nothing back: the message waits in the
            # unacked hash for the first sweep once it is visibility_timeout old (1 h; the
            # restarted worker sweeps every 100 s).
            assert [a.t for a in run.attempts] == [0, 3600]
            assert actions(retry_worker)[-2:] == ["visibility sweep", "acked"]
        assert [a.redelivered for a in run.attempts] == [False, True]

    def test_a_retrying_acks_late_task_leaves_a_duplicate(self, app, retry_worker, ledger):
        # Celery acks an acks_late message once its retry is published: the worker that dies
        # before that ack leaves both the message and its retry on the broker.
        @app.task(name="flaky_write", bind=True, shared=False, acks_late=True, max_retries=1)
        def flaky_write(self: Any) -> str:
            ledger.insert(f"try {self.request.retries}")
            if self.request.retries == 0:
                raise self.retry(countdown=5)
            return "written"

        retry_worker.redeliver(flaky_write, times=1)
        result = flaky_write.delay()
        run = retry_worker.run_until_idle()[result.id]

        assert [(a.retries, a.redelivered, a.outcome) for a in run.attempts] == [
            (0, False, "retry"),
            (0, True, "retry"),
            (1, False, "success"),
            (1, True, "success"),
            # The redelivered first message's own retry: the worker that died held it for its
            # ETA, unacknowledged, so the broker marks it redelivered too.
            (1, True, "success"),
        ]
        assert ledger.rows == ["try 0", "try 0", "try 1", "try 1", "try 1"]

    def test_times_and_every_task(self, app, retry_worker, ledger):
        seen: list[tuple[Any, ...]] = []
        task = recording_task(app, ledger, seen, acks_late=True)
        retry_worker.redeliver(times=2)  # every task, every message twice

        run = retry_worker.apply(task, args=(3,))

        assert [a.redelivered for a in run.attempts] == [False, True, True]
        assert ledger.rows == ["order 3"] * 3


class TestDuringRun:
    """The worker process dies as the task starts: Celery's WorkerLostError path."""

    @pytest.mark.parametrize(
        ("options", "runs", "outcomes"),
        [
            ({}, 0, ["worker-lost"]),
            ({"acks_late": True}, 0, ["worker-lost"]),
            ({"acks_late": True, "reject_on_worker_lost": True}, 1, ["worker-lost", "success"]),
        ],
    )
    def test_as_celery_decides(self, app, retry_worker, ledger, options, runs, outcomes):
        seen: list[tuple[Any, ...]] = []
        task = recording_task(app, ledger, seen, **options)
        retry_worker.redeliver(task, when="during_run")

        run = retry_worker.apply(task, args=(5,))

        assert [a.outcome for a in run.attempts] == outcomes
        assert len(ledger.rows) == runs
        assert "redeliver(when='during_run')" in str(run.attempts[0].exc)
        if runs:
            assert seen == [(run.task_id, 0, True)]


class TestBadInput:
    def test_arguments(self, app, retry_worker):
        with pytest.raises(UsageError, match=r"times=0"):
            retry_worker.redeliver(times=0)
        with pytest.raises(UsageError, match=r"when='later'.*'after_run' or 'during_run'"):
            retry_worker.redeliver(when="later")
        with pytest.raises(UsageError, match=r"no app of this test registers a task named 'nope'"):
            retry_worker.redeliver("nope")
        with pytest.raises(UsageError, match="pass a task"):
            retry_worker.redeliver(42)


def test_idempotency_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery
        from pytest_celery_retry import assert_side_effect

        app = Celery("shop", broker="amqp://localhost//", set_as_current=False)

        class Orders:
            def __init__(self):
                self.charged = set()

            def charge(self, order_id):
                self.charged.add(order_id)

        orders = Orders()

        @app.task(name="charge", acks_late=True)
        def charge(order_id):
            orders.charge(order_id)

        @app.task(name="charge_once", bind=True, acks_late=True)
        def charge_once(self, order_id):
            if order_id not in orders.charged:  # idempotent: a redelivery charges nothing
                orders.charge(order_id)

        @pytest.fixture
        def celery_retry_app():
            return app

        @pytest.mark.parametrize("task", [charge, charge_once])
        def test_charged_once_under_redelivery(retry_worker, task):
            orders.charged.clear()
            charges = retry_worker.track(orders, "charge")
            retry_worker.redeliver(task)
            run = retry_worker.apply(task, args=(42,))
            assert len(run.attempts) == 2
            assert_side_effect(charges, times=1)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "_* test_charged_once_under_redelivery?charge? _*",
            "E*expected <Orders object>.charge to be called exactly 1 time(s), it was called 2*",
            "E*2  0.000s  charge*2        0        2         yes          42*",
            "E*the worker died after the run*",
        ]
    )


def test_the_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery

        app = Celery("shop", broker="amqp://localhost//", set_as_current=False)
        app.conf.task_acks_late = True

        @app.task(name="ship")
        def ship(order_id):
            return order_id

        @app.task(name="bill")
        def bill(order_id):
            return order_id

        @pytest.fixture
        def celery_retry_app():
            return app

        pytestmark = pytest.mark.redeliver()

        def test_every_task_runs_twice(retry_worker):
            assert [a.redelivered for a in retry_worker.apply(ship, args=(1,)).attempts] == [
                False,
                True,
            ]
            assert len(retry_worker.apply(bill, args=(1,)).attempts) == 2

        @pytest.mark.redeliver("bill", times=2)
        def test_one_task_three_times(retry_worker):
            assert len(retry_worker.apply(ship, args=(1,)).attempts) == 1
            assert len(retry_worker.apply(bill, args=(1,)).attempts) == 3

        @pytest.mark.redeliver(when="soon")
        def test_bad_when(retry_worker):
            pass

        @pytest.mark.redeliver(task="bill", count=2)
        def test_bad_keyword(retry_worker):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*UsageError: @pytest.mark.redeliver: redeliver(when='soon'): choose*",
            "*UsageError: @pytest.mark.redeliver() {'task': 'bill', 'count': 2}: it takes task=*",
        ]
    )
