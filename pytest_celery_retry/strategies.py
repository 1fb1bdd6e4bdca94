"""Hypothesis strategies for fault schedules (``pip install pytest-celery-retry[hypothesis]``).

``fault_schedules()`` draws a :class:`~pytest_celery_retry.faults.FaultSchedule` within the
bounds a test gives: how many faults, over how many virtual seconds, of which kinds. Times and
lengths are whole multiples of ``resolution`` seconds, so a failing example shrinks to a
schedule a person can read: fewer faults, earlier, shorter.

Only this module imports Hypothesis; loading the plugin does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from hypothesis import strategies as st
except ImportError as missing:  # pragma: no cover - the extra is installed in development
    raise ImportError(
        "pytest_celery_retry.strategies needs Hypothesis: pip install "
        "'pytest-celery-retry[hypothesis]'"
    ) from missing

from .errors import UsageError, is_finite_number, is_whole_number
from .faults import Fault, FaultSchedule, OperationFault, Outage, WorkerCrash

__all__ = ["FAULT_KINDS", "fault_schedules", "faults"]

# "ack" is a lost acknowledgement: the broker delivers the message again (a redelivery).
FAULT_KINDS = ("outage", "connect", "publish", "consume", "ack", "crash")
DEFAULT_KINDS = ("outage", "connect", "publish", "consume", "ack")


def _whole(name: str, value: Any, least: int) -> int:
    if not is_whole_number(value) or value < least:
        raise UsageError(f"fault_schedules({name}={value!r}): a whole number >= {least}")
    return int(value)


def _seconds(name: str, value: Any) -> float:
    if not is_finite_number(value) or value <= 0:
        raise UsageError(f"fault_schedules({name}={value!r}): virtual seconds, a number > 0")
    return float(value)


def faults(
    *,
    horizon: float = 60,
    kinds: Sequence[str] = DEFAULT_KINDS,
    max_outage: float | None = None,
    max_times: int = 3,
    tasks: Sequence[str] = (),
    resolution: float = 1,
) -> st.SearchStrategy[Fault]:
    """One fault that begins within ``horizon`` virtual seconds (see :func:`fault_schedules`)."""
    horizon = _seconds("horizon", horizon)
    resolution = _seconds("resolution", resolution)
    max_times = _whole("max_times", max_times, 1)
    longest = _seconds("max_outage", horizon if max_outage is None else max_outage)
    if isinstance(kinds, str) or not kinds:
        raise UsageError(
            f"fault_schedules(kinds={kinds!r}): a list of kinds from {', '.join(FAULT_KINDS)}"
        )
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise UsageError(
            f"fault_schedules(kinds=...): unknown kind(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(FAULT_KINDS)}"
        )
    if "crash" in kinds and (isinstance(tasks, str) or not tasks):
        raise UsageError(
            "fault_schedules(kinds=[..., 'crash']): name the tasks whose worker process may "
            "die, e.g. tasks=['foo.task']"
        )
    steps = int(horizon // resolution)
    start = st.integers(0, steps).map(lambda n: n * resolution)
    length = st.integers(1, max(1, int(longest // resolution))).map(lambda n: n * resolution)
    times = st.integers(1, max_times)
    choices: list[st.SearchStrategy[Fault]] = []
    # The order matters to shrinking: Hypothesis prefers the earlier kinds.
    for kind in kinds:
        if kind == "outage":
            choices.append(st.builds(Outage, start=start, seconds=length))
        elif kind == "crash":
            choices.append(
                st.builds(WorkerCrash, task=st.sampled_from(list(tasks)), start=start, times=times)
            )
        else:
            choices.append(st.builds(OperationFault, on=st.just(kind), start=start, times=times))
    return st.one_of(choices)


def fault_schedules(
    *,
    max_faults: int = 3,
    horizon: float = 60,
    kinds: Sequence[str] = DEFAULT_KINDS,
    max_outage: float | None = None,
    max_times: int = 3,
    tasks: Sequence[str] = (),
    resolution: float = 1,
) -> st.SearchStrategy[FaultSchedule]:
    """Schedules of up to ``max_faults`` faults, each beginning within ``horizon`` virtual
    seconds of ``t=0``.

    ``kinds`` are from ``"outage"`` (the broker down from a moment for up to ``max_outage``
    seconds), ``"connect"``, ``"publish"``, ``"consume"``, ``"ack"`` (the next 1 to
    ``max_times`` operations of that kind fail from a moment; a lost ack makes the broker
    deliver the message again) and ``"crash"`` (the worker process dies running one of
    ``tasks``). Times are whole multiples of ``resolution`` seconds.
    """
    max_faults = _whole("max_faults", max_faults, 1)
    one = faults(
        horizon=horizon,
        kinds=kinds,
        max_outage=max_outage,
        max_times=max_times,
        tasks=tasks,
        resolution=resolution,
    )
    return st.lists(one, max_size=max_faults).map(FaultSchedule)
