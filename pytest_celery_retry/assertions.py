"""Assertions on what the worker and the broker recorded.

Each failure message shows what was expected, what was recorded, and the whole timeline,
because a retry bug is rarely visible in one number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .records import PublishRecord, TaskRun

__tracebackhide__ = True


def _fail(headline: str, timeline: str) -> None:
    __tracebackhide__ = True
    raise AssertionError(f"{headline}\n\n{timeline}")


def _check_run(run: Any) -> TaskRun:
    if not isinstance(run, TaskRun):
        raise TypeError(
            f"expected the TaskRun returned by retry_worker.apply(), got {type(run).__name__}"
        )
    return run


def assert_retried(run: TaskRun, times: int) -> None:
    """The task scheduled exactly ``times`` retries."""
    __tracebackhide__ = True
    run = _check_run(run)
    if run.retries != times:
        _fail(
            f"expected {run.task_name} to retry {times} time(s), it retried {run.retries} "
            f"time(s) (countdowns {_fmt(run.countdowns)})",
            run.timeline(),
        )


def assert_not_retried(run: TaskRun) -> None:
    """The task never scheduled a retry."""
    __tracebackhide__ = True
    run = _check_run(run)
    if run.retries:
        _fail(
            f"expected {run.task_name} not to retry, it retried {run.retries} time(s) "
            f"(countdowns {_fmt(run.countdowns)})",
            run.timeline(),
        )


def assert_backoff(
    run: TaskRun,
    expected: Sequence[float] | None = None,
    *,
    tolerance: float = 0.0,
    jitter: Sequence[float] | None = None,
) -> None:
    """The retry countdowns equal ``expected`` (within ``tolerance`` seconds).

    With ``jitter=[caps...]`` instead, each countdown must lie in ``[0, cap]``: what
    ``retry_jitter=True`` guarantees (Celery draws uniformly from 0 to the backoff).
    """
    __tracebackhide__ = True
    run = _check_run(run)
    if (expected is None) == (jitter is None):
        raise TypeError("assert_backoff() takes the expected countdowns or jitter=[caps], not both")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r}: a tolerance is a number of seconds >= 0")
    actual = run.countdowns
    if jitter is not None:
        caps = [float(c) for c in jitter]
        bad = [
            i
            for i, (value, cap) in enumerate(zip(actual, caps))
            if not 0 <= value <= cap + tolerance
        ]
        if len(actual) != len(caps) or bad:
            where = f"; out of range at retry {', '.join(str(i + 1) for i in bad)}" if bad else ""
            _fail(
                f"expected {len(caps)} jittered countdowns within [0, cap] for caps {caps}, "
                f"recorded {actual}{where}",
                run.timeline(),
            )
        return
    wanted = [float(x) for x in expected or ()]
    same = len(actual) == len(wanted) and all(
        abs(a - w) <= tolerance for a, w in zip(actual, wanted)
    )
    if not same:
        tol = f" (tolerance {tolerance:g} s)" if tolerance else ""
        _fail(
            f"expected retry countdowns {_fmt(wanted)}{tol}\n"
            f"recorded retry countdowns {_fmt(actual)}",
            run.timeline(),
        )


class PublishRecorder(Protocol):
    """What ``assert_publish_retries`` reads: the in-memory broker and the ``BrokerProxy``."""

    @property
    def publishes(self) -> Sequence[PublishRecord]: ...

    def timeline(self) -> str: ...


def assert_publish_retries(
    broker: PublishRecorder,
    attempts: int | None = None,
    intervals: Sequence[float] | None = None,
    *,
    delivered: bool | None = None,
    tolerance: float = 0.0,
    publish: int = -1,
) -> None:
    """The publish (default: the most recent one) took ``attempts`` tries ``intervals`` apart."""
    __tracebackhide__ = True
    publishes: list[PublishRecord] = list(broker.publishes)
    if not publishes:
        _fail("expected a publish, the broker saw none", broker.timeline())
    try:
        record = publishes[publish]
    except IndexError:
        raise IndexError(
            f"publish={publish}: the broker saw {len(publishes)} publish(es)"
        ) from None
    problems = []
    if attempts is not None and record.attempts != attempts:
        problems.append(f"expected {attempts} attempt(s), recorded {record.attempts}")
    if intervals is not None:
        wanted = [float(x) for x in intervals]
        got = record.intervals
        if len(got) != len(wanted) or any(abs(a - w) > tolerance for a, w in zip(got, wanted)):
            problems.append(f"expected intervals {_fmt(wanted)}, recorded {_fmt(got)}")
    if delivered is not None and (record.outcome == "delivered") != delivered:
        problems.append(
            f"expected the message to be {'delivered' if delivered else 'not delivered'}, "
            f"it was {record.outcome}"
        )
    if problems:
        _fail(
            f"publish of {record.task_name or 'a message'}: " + "; ".join(problems),
            broker.timeline(),
        )


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
