"""Assertions on what the worker and the broker recorded.

Each failure message shows what was expected, what was recorded, and the whole timeline,
because a retry bug is rarely visible in one number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from .errors import UsageError, is_finite_number, is_whole_number
from .flavors import HeldLimit, flavor_for_url
from .records import PublishRecord, SideEffect, TaskRun

__all__ = [
    "PublishRecorder",
    "assert_backoff",
    "assert_fits_broker_limits",
    "assert_not_retried",
    "assert_publish_retries",
    "assert_retried",
    "assert_side_effect",
]

__tracebackhide__ = True


def _fail(headline: str, timeline: str) -> None:
    __tracebackhide__ = True
    raise AssertionError(f"{headline}\n\n{timeline}")


def _check_run(run: Any) -> TaskRun:
    if not isinstance(run, TaskRun):
        raise TypeError(
            "expected the TaskRun returned by retry_worker.apply() or retry_worker.run(task_id), "
            f"got {type(run).__name__}"
        )
    return run


def _check_tolerance(call: str, tolerance: Any) -> float:
    if not is_finite_number(tolerance) or tolerance < 0:
        raise UsageError(
            f"{call}(tolerance={tolerance!r}): a tolerance is a number of seconds >= 0"
        )
    return float(tolerance)


def _seconds(call: str, name: str, values: Any, example: str) -> list[float]:
    """A list of finite numbers of seconds, or a UsageError that shows one."""
    if isinstance(values, Iterable) and not isinstance(values, (str, bytes)):
        values = list(values)
        if all(is_finite_number(value) for value in values):
            return [float(value) for value in values]
    raise UsageError(f"{call}({name}={values!r}): give a list of seconds, e.g. {example}")


def assert_retried(run: TaskRun, times: int) -> None:
    """The task scheduled exactly ``times`` retries."""
    __tracebackhide__ = True
    run = _check_run(run)
    if not is_whole_number(times) or times < 0:
        raise UsageError(
            f"assert_retried(run, times={times!r}): times is how many retries, a whole number "
            ">= 0, e.g. assert_retried(run, 3)"
        )
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
    tolerance = _check_tolerance("assert_backoff", tolerance)
    actual = run.countdowns
    if jitter is not None:
        caps = _seconds("assert_backoff", "jitter", jitter, "jitter=[1, 2, 4]")
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
    wanted = _seconds("assert_backoff", "expected", expected, "[1, 3, 9]")
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
    if not hasattr(broker, "publishes"):
        raise TypeError(
            "assert_publish_retries() checks the broker's publishes: pass flaky_broker (or a "
            f"BrokerProxy), got {type(broker).__name__}. For a task's retries use "
            "assert_retried(run, n) or assert_backoff(run, [...])"
        )
    if attempts is not None and (not is_whole_number(attempts) or attempts < 1):
        raise UsageError(
            f"assert_publish_retries(attempts={attempts!r}): the number of tries, a whole "
            "number >= 1"
        )
    wanted = None
    if intervals is not None:
        wanted = _seconds("assert_publish_retries", "intervals", intervals, "intervals=[3, 4]")
    if delivered is not None and not isinstance(delivered, bool):
        raise UsageError(f"assert_publish_retries(delivered={delivered!r}): True or False")
    tolerance = _check_tolerance("assert_publish_retries", tolerance)
    if not is_whole_number(publish):
        raise UsageError(
            f"assert_publish_retries(publish={publish!r}): the index of the publish, e.g. 0 "
            "for the first, -1 (the default) for the most recent"
        )
    publishes: list[PublishRecord] = list(broker.publishes)
    if not publishes:
        _fail("expected a publish, the broker saw none", broker.timeline())
    if not -len(publishes) <= publish < len(publishes):
        raise UsageError(
            f"assert_publish_retries(publish={publish}): the broker saw {len(publishes)} "
            f"publish(es), so publish= goes from {-len(publishes)} to {len(publishes) - 1}"
        )
    record = publishes[publish]
    problems = []
    if attempts is not None and record.attempts != attempts:
        problems.append(f"expected {attempts} attempt(s), recorded {record.attempts}")
    if wanted is not None:
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


def assert_side_effect(
    effect: SideEffect, times: int | None = None, *, at_most: int | None = None
) -> None:
    """The tracked function was called exactly ``times`` times (or at most ``at_most``)."""
    __tracebackhide__ = True
    if not isinstance(effect, SideEffect):
        raise TypeError(
            "assert_side_effect() checks what retry_worker.track(target, 'attribute') returned, "
            f"got {type(effect).__name__}"
        )
    if (times is None) == (at_most is None):
        raise UsageError(
            "assert_side_effect(effect, times=N) or assert_side_effect(effect, at_most=N): "
            "give one of them"
        )
    bound = times if times is not None else at_most
    if bound is None or not is_whole_number(bound) or bound < 0:
        keyword = "times" if times is not None else "at_most"
        raise UsageError(
            f"assert_side_effect({keyword}={bound!r}): how many calls, a whole number >= 0"
        )
    count = effect.count
    if count == times or (at_most is not None and count <= at_most):
        return
    tasks = len(effect.task_ids)
    from_tasks = f" from {tasks} task id(s)" if tasks else ""
    expected = f"exactly {times}" if times is not None else f"at most {at_most}"
    _fail(
        f"expected {effect.name} to be called {expected} time(s), it was called {count} "
        f"time(s){from_tasks}",
        effect.timeline(),
    )


def assert_fits_broker_limits(schedule: Any, broker: Any) -> None:
    """Every retry of ``schedule`` waits within what the broker lets a worker hold.

    ``schedule``: a ``TaskRun`` (its recorded countdowns), a list of countdowns, or a task
    (the schedule it declares: ``autoretry_for`` with ``retry_backoff``, else
    ``default_retry_delay``, for ``max_retries`` retries; with ``retry_jitter``, the
    longest countdown each retry may draw). ``broker``: the in-memory broker
    (``flaky_broker``: its flavour, its ``consumer_timeout``, its app's transport options),
    or a Celery app (its ``broker_url``'s flavour, its transport options, and RabbitMQ's
    default ``consumer_timeout``). Fails naming each retry that waits too long, the limit,
    and what production does to it.
    """
    __tracebackhide__ = True
    retries, timeline = _schedule_of(schedule)
    limit, app, name = _held_limit_of(broker)
    if limit is None:
        return
    problems = [
        f"  {label}, countdown {countdown:g} s: {verdict}"
        for label, countdown in retries
        for verdict in [limit.verdict(countdown, app)]
        if verdict is not None
    ]
    if problems:
        _fail(
            f"the retry schedule does not fit the broker's {limit.setting}={limit.seconds:g} s "
            f"({name} flavour):\n" + "\n".join(problems) + f"\nTo fix: {limit.advice()}.",
            timeline,
        )


def _schedule_of(schedule: Any) -> tuple[list[tuple[str, float]], str]:
    """Each retry's label and countdown, and the timeline a failure shows."""
    if isinstance(schedule, TaskRun):
        retried = [a for a in schedule.attempts if a.retry_published and a.countdown is not None]
        labels = [
            (f"retry {i} (asked by attempt {a.number})", a.countdown or 0.0)
            for i, a in enumerate(retried, 1)
        ]
        return labels, schedule.timeline()
    if hasattr(schedule, "max_retries") and hasattr(schedule, "name"):
        countdowns, how = _declared_countdowns(schedule)
        timeline = f"declared schedule of {schedule.name} ({how}): {_fmt(countdowns)}"
        return [(f"retry {i}", c) for i, c in enumerate(countdowns, 1)], timeline
    countdowns = _seconds(
        "assert_fits_broker_limits", "schedule", schedule, "[60, 600, 3600] (or a TaskRun, a task)"
    )
    return [
        (f"retry {i}", c) for i, c in enumerate(countdowns, 1)
    ], f"countdowns {_fmt(countdowns)}"


def _declared_countdowns(task: Any) -> tuple[list[float], str]:
    """The countdowns a task's own options give its retries, as Celery's autoretry computes."""
    options = dict(getattr(task, "retry_kwargs", None) or {})
    max_retries = options.get("max_retries", task.max_retries)
    if max_retries is None:
        raise UsageError(
            f"assert_fits_broker_limits({task.name}): max_retries=None retries for ever, so "
            "the task declares no finite schedule: pass its countdowns, e.g. [60, 600, 3600], "
            "or a TaskRun"
        )
    backoff = float(getattr(task, "retry_backoff", False) or 0)
    if backoff and getattr(task, "autoretry_for", None):
        from celery.utils.time import get_exponential_backoff_interval

        cap = int(getattr(task, "retry_backoff_max", 600))
        countdowns = [
            float(get_exponential_backoff_interval(int(max(1.0, backoff)), n, cap, False))
            for n in range(max_retries)
        ]
        jitter = " at most, with retry_jitter" if getattr(task, "retry_jitter", True) else ""
        return countdowns, f"retry_backoff={backoff:g}, retry_backoff_max={cap}{jitter}"
    delay = float(options.get("countdown", task.default_retry_delay))
    return [delay] * max_retries, f"default_retry_delay={delay:g}, max_retries={max_retries}"


def _held_limit_of(broker: Any) -> tuple[HeldLimit | None, Any, str]:
    """The broker's limit on a held message, the app whose settings apply, and its name."""
    rules = getattr(broker, "rules", None)
    if rules is not None and hasattr(broker, "publishes"):  # the in-memory broker
        return rules.held_limit(broker.app, broker), broker.app, rules.name
    if hasattr(broker, "conf"):  # a Celery app
        flavor = flavor_for_url(broker.conf.broker_url)
        return flavor.held_limit(broker, None), broker, flavor.name
    raise TypeError(
        "assert_fits_broker_limits(schedule, broker): pass flaky_broker (its flavour and "
        f"settings) or a Celery app (its broker_url), got {type(broker).__name__}"
    )


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
