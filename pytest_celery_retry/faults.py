"""Fault schedules: broker and worker faults at given moments of virtual time, as records.

A schedule is what a property-based search draws (``pytest_celery_retry.strategies``) and
what it hands back when a property fails: so it reads as a sentence (``str``), prints as the
Python that builds it (``repr``, what Hypothesis shows as the falsifying example), and turns
into the calls a plain regression test makes on ``flaky_broker`` and ``retry_worker``
(:meth:`FaultSchedule.as_code`). Applying it calls exactly those methods: the faults are the
broker's and the worker's own, nothing here imitates them.

No Celery import: the records load with the plugin.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from .errors import UsageError, is_finite_number, is_whole_number

if TYPE_CHECKING:
    from .broker import InMemoryBroker
    from .worker import RetryWorker

__all__ = ["Fault", "FaultSchedule", "OperationFault", "OperationKind", "Outage", "WorkerCrash"]

OperationKind = Literal["connect", "publish", "consume", "ack"]

# What a failing operation of each kind does, as a person would say it.
_FAILS = {
    "connect": ("connect is refused", "connects are refused"),
    "publish": ("publish fails", "publishes fail"),
    "consume": ("consume fails", "consumes fail"),
    "ack": (
        "ack is lost (the broker delivers the message again)",
        "acks are lost (the broker delivers the messages again)",
    ),
}


def _check_time(fault: str, name: str, value: Any, positive: bool = False) -> None:
    if not is_finite_number(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise UsageError(f"{fault}({name}={value!r}): give virtual seconds, a number {bound}")


def _check_times(fault: str, times: Any) -> None:
    if not is_whole_number(times) or times < 1:
        raise UsageError(f"{fault}(times={times!r}): a whole number >= 1")


@dataclass(frozen=True)
class Outage:
    """The broker is down from ``start`` for ``seconds`` (virtual seconds since the clock began)."""

    start: float
    seconds: float

    def __post_init__(self) -> None:
        _check_time("Outage", "start", self.start)
        _check_time("Outage", "seconds", self.seconds, positive=True)

    def __str__(self) -> str:
        return f"broker down from t={self.start:g} s for {self.seconds:g} s"

    def code(self, broker: str, worker: str) -> str:
        """The call that schedules it in a test, at ``t=0``."""
        return f"{broker}.outage({self.seconds:g}, starting_in={self.start:g})"

    def apply(self, broker: InMemoryBroker, worker: RetryWorker | None) -> None:
        broker.outage(self.seconds, starting_in=max(0.0, self.start - broker.clock.elapsed))


@dataclass(frozen=True)
class OperationFault:
    """From ``start`` on, the next ``times`` broker operations of kind ``on`` fail."""

    on: OperationKind
    start: float
    times: int = 1

    def __post_init__(self) -> None:
        if self.on not in _FAILS:
            raise UsageError(
                f"OperationFault(on={self.on!r}): choose one of {', '.join(map(repr, _FAILS))}"
            )
        _check_time("OperationFault", "start", self.start)
        _check_times("OperationFault", self.times)

    def __str__(self) -> str:
        one, many = _FAILS[self.on]
        what = f"the next {one}" if self.times == 1 else f"the next {self.times} {many}"
        return f"from t={self.start:g} s, {what}"

    def code(self, broker: str, worker: str) -> str:
        return f"{broker}.fail_next({self.times}, on={self.on!r}, starting_in={self.start:g})"

    def apply(self, broker: InMemoryBroker, worker: RetryWorker | None) -> None:
        broker.fail_next(
            self.times, on=self.on, starting_in=max(0.0, self.start - broker.clock.elapsed)
        )


@dataclass(frozen=True)
class WorkerCrash:
    """The worker process dies during the next ``times`` executions of ``task`` from ``start``."""

    task: str
    start: float
    times: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise UsageError(f"WorkerCrash(task={self.task!r}): give the task's name")
        _check_time("WorkerCrash", "start", self.start)
        _check_times("WorkerCrash", self.times)

    def __str__(self) -> str:
        runs = "run" if self.times == 1 else f"{self.times} runs"
        return (
            f"from t={self.start:g} s, the worker process dies during the next "
            f"{runs} of {self.task}"
        )

    def code(self, broker: str, worker: str) -> str:
        return (
            f"{worker}.crash_during({self.task!r}, times={self.times}, starting_in={self.start:g})"
        )

    def apply(self, broker: InMemoryBroker, worker: RetryWorker | None) -> None:
        if worker is None:
            raise UsageError(
                f"{self}: a worker crash needs the retry worker; pass it to "
                "FaultSchedule.apply(broker, worker)"
            )
        worker.crash_during(
            self.task, self.times, starting_in=max(0.0, self.start - worker.clock.elapsed)
        )


Fault = Union[Outage, OperationFault, WorkerCrash]
_FAULT_TYPES = (Outage, OperationFault, WorkerCrash)


class FaultSchedule(Sequence[Fault]):
    """Faults at moments of virtual time, in the order they begin.

    ``str()`` reads as sentences, ``repr()`` is the Python that builds it, and
    :meth:`as_code` the ``flaky_broker`` / ``retry_worker`` calls of a plain regression test.
    """

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        faults = list(faults)
        for fault in faults:
            if not isinstance(fault, _FAULT_TYPES):
                raise UsageError(
                    f"FaultSchedule([... {fault!r} ...]): a schedule holds Outage, "
                    "OperationFault and WorkerCrash records"
                )
        # Sorted, so that two draws of the same faults read (and compare) alike.
        self._faults: tuple[Fault, ...] = tuple(sorted(faults, key=_order))

    def __getitem__(self, index: int) -> Fault:  # type: ignore[override]
        return self._faults[index]

    def __len__(self) -> int:
        return len(self._faults)

    def __iter__(self) -> Iterator[Fault]:
        return iter(self._faults)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FaultSchedule) and self._faults == other._faults

    def __hash__(self) -> int:
        return hash(self._faults)

    @property
    def needs_worker(self) -> bool:
        return any(isinstance(fault, WorkerCrash) for fault in self._faults)

    def apply(self, broker: InMemoryBroker, worker: RetryWorker | None = None) -> None:
        """Schedule every fault on ``broker`` (and ``worker``), from the clock's ``t=0``.

        A fault whose start has passed applies from now.
        """
        for fault in self._faults:
            fault.apply(broker, worker)
        broker.fault_schedule = self

    def as_code(self, broker: str = "flaky_broker", worker: str = "retry_worker") -> str:
        """The calls that schedule these faults in a test, one a line (at ``t=0``)."""
        if not self._faults:
            return "# no faults"
        return "\n".join(fault.code(broker, worker) for fault in self._faults)

    def __str__(self) -> str:
        if not self._faults:
            return "no faults"
        return "; ".join(str(fault) for fault in self._faults)

    def __repr__(self) -> str:
        return f"FaultSchedule([{', '.join(map(repr, self._faults))}])"

    def describe(self) -> str:
        """The schedule as a sentence and as the code of a regression test, for a report."""
        code = "\n".join(f"    {line}" for line in self.as_code().splitlines())
        return f"fault schedule: {self}\nas a regression test (at t=0):\n{code}"


def _order(fault: Fault) -> tuple[float, str, str]:
    return (fault.start, type(fault).__name__, repr(fault))
