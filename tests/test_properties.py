"""Property tests: for any retry setting, the plugin records what Celery and kombu compute.

The oracles are the libraries' own helpers, called directly: Celery's
``get_exponential_backoff_interval`` with the arguments its autoretry wrapper passes, and
kombu's ``retry_over_time`` for the intervals of a publish retry policy. So the properties
hold for whichever Celery and kombu are installed.

Each example builds its own session, worker and app the way the plugin's fixtures do
(``pytest_celery_retry.plugin``): function-scoped fixtures would be shared by every example,
and the clock, the broker's faults and the recorded runs must start fresh each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery.utils.time import get_exponential_backoff_interval
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.exceptions import OperationalError
from kombu.utils.functional import retry_over_time

from pytest_celery_retry.session import RetrySession
from pytest_celery_retry.worker import RetryWorker
from tests.conftest import make_app

EXAMPLES = settings(max_examples=100, deadline=None)


@contextmanager
def fresh_session() -> Iterator[RetrySession]:
    session = RetrySession().start()
    try:
        yield session
    finally:
        session.close()


# -- worker: autoretry backoff -----------------------------------------------------------------
def autoretry_task(**options: Any) -> Any:
    app = make_app()

    @app.task(name="flaky", shared=False, autoretry_for=(ValueError,), **options)
    def flaky() -> None:
        raise ValueError("nope")

    return app.tasks["flaky"]


def celery_backoff(backoff: bool | int, maximum: int, retries: int, jitter: bool) -> int:
    # The arguments celery/app/autoretry.py passes for the task's options.
    return get_exponential_backoff_interval(
        factor=int(max(1.0, float(backoff))),
        retries=retries,
        maximum=int(maximum),
        full_jitter=jitter,
    )


@EXAMPLES
@given(
    backoff=st.one_of(st.just(True), st.integers(min_value=1, max_value=7)),
    backoff_max=st.integers(min_value=1, max_value=700),
    max_retries=st.integers(min_value=0, max_value=6),
    jitter=st.booleans(),
)
def test_autoretry_schedule_is_celerys_backoff(
    backoff: bool | int, backoff_max: int, max_retries: int, jitter: bool
) -> None:
    task = autoretry_task(
        retry_backoff=backoff,
        retry_backoff_max=backoff_max,
        retry_jitter=jitter,
        max_retries=max_retries,
    )
    with fresh_session() as session:
        worker = RetryWorker(session)
        try:
            run = worker.apply(task)
        finally:
            worker.close()
        elapsed = session.clock.elapsed

    assert len(run.attempts) == max_retries + 1
    assert run.state == "FAILURE"
    assert isinstance(run.exception, ValueError)
    caps = [celery_backoff(backoff, backoff_max, n, jitter=False) for n in range(max_retries)]
    if jitter:
        assert all(0 <= countdown <= cap for countdown, cap in zip(run.countdowns, caps))
        assert len(run.countdowns) == len(caps)
    else:
        assert run.countdowns == caps
    # The worker waits exactly the recorded countdowns, on virtual time.
    assert elapsed == sum(run.countdowns)


# -- broker: publish retry policy ---------------------------------------------------------------
def kombu_intervals(policy: dict[str, Any], count: int) -> list[float]:
    """The first ``count`` sleeps kombu's retry_over_time takes for ``policy``.

    The errback sees the interval iterator kombu built and would sleep on; it records the
    next value and returns 0, so the oracle itself never sleeps.
    """
    intervals: list[float] = []

    def errback(exc: BaseException, interval_range: Iterator[float], retries: int) -> float:
        intervals.append(next(interval_range))
        return 0

    def refuse() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ConnectionRefusedError):
        retry_over_time(
            refuse,
            ConnectionRefusedError,
            errback=errback,
            max_retries=count,
            interval_start=policy["interval_start"],
            interval_step=policy["interval_step"],
            interval_max=policy["interval_max"],
        )
    return intervals


HALVES = st.integers(min_value=0, max_value=12).map(lambda n: n / 2)


@EXAMPLES
@given(
    interval_start=HALVES,
    interval_step=HALVES,
    interval_max=HALVES,
    max_retries=st.one_of(st.none(), st.integers(min_value=0, max_value=5)),
    refused=st.integers(min_value=0, max_value=7),
)
def test_lost_connection_publish_retries_follow_kombus_policy(
    interval_start: float,
    interval_step: float,
    interval_max: float,
    max_retries: int | None,
    refused: int,
) -> None:
    policy = {
        "interval_start": interval_start,
        "interval_step": interval_step,
        "interval_max": interval_max,
        "max_retries": max_retries,
    }
    app = make_app()
    with fresh_session() as session:
        broker = session.installation(app).broker
        # An established connection, then lost: the publish fails and kombu's ensure()
        # reconnects under the policy, without a connect timeout.
        app.send_task("foo.task")
        broker.fail_next(1, on="publish")
        broker.fail_next(refused, on="connect")
        try:
            app.send_task("foo.task", retry=True, retry_policy=policy)
        except OperationalError:
            raised = True
        else:
            raised = False
        publish = broker.last_publish
        intervals = broker.publish_retry_intervals
        slept = session.clock.slept
    assert publish is not None

    if max_retries == 0:
        # ensure() gives up on the lost connection itself: no reconnect.
        assert raised
        assert intervals == []
        return
    # ensure() reconnects at once, then retry_over_time gets the remaining retries.
    allowed = refused if max_retries is None else min(refused, max_retries)
    expected = [0.0, *kombu_intervals(policy, allowed)]
    delivered = max_retries is None or refused <= max_retries
    assert intervals == expected
    assert publish.attempts == len(expected) + 1
    assert raised is not delivered
    assert publish.outcome == ("delivered" if delivered else "failed")
    assert slept == sum(expected)
    assert len(broker.messages()) == 1 + delivered
