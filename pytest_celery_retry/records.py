"""What the plugin saw: task attempts and broker operations, and how to print them.

Plain dataclasses without Celery imports, so that assertions and reports stay cheap and
readable. Every time is in virtual seconds since the test's clock started (``t``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

AttemptOutcome = Literal["retry", "success", "failure", "rejected", "ignored", "worker-lost"]
RunState = Literal["SUCCESS", "FAILURE", "RETRY", "PENDING"]
OperationKind = Literal["connect", "publish", "consume", "ack"]
# What the broker records: the operations faults apply to, and a channel close on a broker
# that hangs (py-amqp waits for its answer).
RecordedKind = Literal["connect", "publish", "consume", "ack", "close", "qos"]
# What the fault proxy did with a TCP connection a client opened.
ConnectionOutcome = Literal["accepted", "refused", "blackholed"]

__all__ = [
    "Attempt",
    "AttemptOutcome",
    "BrokerOperation",
    "ConnectionAttempt",
    "ConnectionOutcome",
    "DeliveredMessage",
    "MessageEvent",
    "OperationKind",
    "ProxyEvent",
    "PublishRecord",
    "RecordedKind",
    "Redelivery",
    "RunState",
    "SideEffect",
    "SideEffectCall",
    "TaskRun",
    "UnackedMessage",
    "describe_exception",
    "format_seconds",
    "format_table",
    "parse_eta",
]

_EXC_WIDTH = 70


def describe_exception(exc: BaseException | None) -> str:
    """``Type('message')`` shortened to fit a table cell."""
    if exc is None:
        return "-"
    return _shorten(f"{type(exc).__name__}({str(exc)!r})")


def _shorten(text: str) -> str:
    """``text`` cut to fit a table cell."""
    return text if len(text) <= _EXC_WIDTH else text[: _EXC_WIDTH - 3] + "..."


def parse_eta(eta: str) -> datetime:
    """A message's ``eta`` header as an aware datetime (Celery sends naive ones in UTC)."""
    when = datetime.fromisoformat(eta)
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}s"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned text table: the one layout every timeline in the plugin uses."""
    # A row may leave its trailing cells out (an attempt without a note).
    rows = [[*row, *[""] * (len(headers) - len(row))] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


@dataclass
class Attempt:
    """One execution of a task by the worker."""

    number: int
    task_id: str
    task_name: str
    retries: int
    started_at: datetime
    t: float
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    outcome: AttemptOutcome | None = None
    exc: BaseException | None = None
    raised: BaseException | None = None
    result: Any = None
    countdown: float | None = None
    eta: datetime | None = None
    retry_published: bool = False
    requeued: bool = False
    # Its message's ack (or reject) failed: the broker will deliver the message again.
    ack_failed: bool = False
    # The broker delivered its message again (Celery's ``request.delivery_info["redelivered"]``).
    redelivered: bool = False
    # Virtual seconds the worker held its message back for the task's rate_limit.
    rate_limit_hold: float = 0.0
    # The number of an earlier attempt that already ran the same retry: this run is a
    # duplicate (a copy a visibility sweep restored, or a message whose ack was lost).
    duplicate_of: int | None = None
    note: str = ""
    # Its place among all the attempts the worker ran (1, 2, ...): orders attempts that
    # started at the same virtual time (a chord's callback after the unlock that sent it).
    order: int = 0

    @property
    def state(self) -> str:
        return {
            "retry": "RETRY",
            "success": "SUCCESS",
            "failure": "FAILURE",
            "rejected": "REJECTED",
            "ignored": "IGNORED",
            "worker-lost": "FAILURE",
            None: "STARTED",
        }[self.outcome]


@dataclass
class TaskRun:
    """Every attempt of one task id, from the first execution to the final outcome."""

    task_id: str
    task_name: str
    seed: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    lost: bool = False
    # What the broker did to its messages held past a limit (a visibility sweep restoring
    # one, RabbitMQ closing the channel for consumer_timeout), in the order it happened.
    limit_events: list[MessageEvent] = field(default_factory=list)
    # The task that published it (Celery's ``parent_id``): a canvas's links and errbacks.
    parent_id: str | None = None
    # The names of the tasks its ``link_error`` calls when it fails for good.
    link_error: tuple[str, ...] = ()
    # A task that never ran, failed in the result backend by Celery when an earlier member of
    # its canvas failed for good (a chain's later tasks, a chord's callback): that exception.
    stored_exception: BaseException | None = None

    @property
    def countdowns(self) -> list[float]:
        """Each retry's ETA minus the start of the attempt that asked for it (``eta=`` included)."""
        return [a.countdown for a in self.attempts if a.countdown is not None]

    @property
    def retries(self) -> int:
        """How many retries were scheduled (retry messages published)."""
        return sum(1 for a in self.attempts if a.retry_published)

    @property
    def duplicates(self) -> list[Attempt]:
        """The attempts that ran a retry an earlier attempt had already run."""
        return [a for a in self.attempts if a.duplicate_of is not None]

    @property
    def last(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def state(self) -> RunState:
        last = self.last
        if last is None and self.stored_exception is not None:
            return "FAILURE"
        if last is None or last.outcome is None:
            return "PENDING"
        if last.outcome == "success" and not last.retry_published:
            return "SUCCESS"
        if last.outcome in ("retry", "success"):
            return "RETRY"
        return "FAILURE"

    @property
    def result(self) -> Any:
        """The return value of the successful attempt (None otherwise)."""
        last = self.last
        return last.result if last is not None and self.state == "SUCCESS" else None

    @property
    def exception(self) -> BaseException | None:
        """The exception that ended the task (None unless the run failed)."""
        last = self.last
        if last is None:
            return self.stored_exception
        return last.raised if self.state == "FAILURE" else None

    @property
    def elapsed(self) -> float:
        """Virtual seconds from the first attempt's start to the last attempt's start."""
        if not self.attempts:
            return 0.0
        return self.attempts[-1].t - self.attempts[0].t

    def timeline(self) -> str:
        """The whole retry history as a readable table."""
        title = f"retry timeline of {self.task_name}[{self.task_id}]"
        if self.seed is not None:
            title += f" (seed {self.seed})"
        # Only a run whose message came back again shows which deliveries were redeliveries.
        redeliveries = any(a.redelivered for a in self.attempts)
        rows = [
            [
                str(a.number),
                f"{a.t - self.attempts[0].t:+.3f}s",
                str(a.retries),
                *(["yes" if a.redelivered else "no"] if redeliveries else []),
                a.outcome or "running",
                format_seconds(a.countdown) if a.retry_published else "-",
                describe_exception(a.exc),
            ]
            + ([a.note] if a.note else [])
            for a in self.attempts
        ]
        headers = ["#", "t", "retries", *(["redelivered"] if redeliveries else [])]
        headers += ["outcome", "countdown", "exception"]
        if any(a.note for a in self.attempts):
            headers.append("note")
        table = format_table(headers, rows)
        start = self.attempts[0].t if self.attempts else 0.0
        limits = [f"  t={e.t - start:+.3f}s  {e.action}: {e.detail}" for e in self.limit_events]
        if limits:
            table += "\nbroker limits:\n" + "\n".join(limits)
        summary = (
            f"final: {self.state} after {len(self.attempts)} attempt(s), {self.retries} "
            f"retr{'y' if self.retries == 1 else 'ies'}, {self.elapsed:g} s of virtual time"
        )
        if self.duplicates:
            summary += (
                f" -- {len(self.duplicates)} DUPLICATE run(s): attempt(s) "
                f"{', '.join(str(a.number) for a in self.duplicates)} ran a retry again"
            )
        if self.lost:
            summary += " -- the task is LOST: its retry message never reached the broker"
        if not self.attempts and self.stored_exception is not None:
            summary = (
                "final: FAILURE without running: the result backend holds "
                f"{describe_exception(self.stored_exception)}, stored when an earlier member "
                "of its canvas failed"
            )
        return f"{title}\n{_indent(table)}\n{summary}"

    def __repr__(self) -> str:
        return (
            f"<TaskRun {self.task_name}[{self.task_id}] state={self.state} "
            f"attempts={len(self.attempts)} countdowns={self.countdowns}>"
        )


@dataclass
class SideEffectCall:
    """One call of a side effect a test tracks (``retry_worker.track``).

    The task fields are ``None`` for a call made outside a task (by the test itself).
    """

    number: int
    t: float
    task_id: str | None
    task_name: str | None
    # The calling attempt's ``Attempt.number``: every execution of the task id counts,
    # redeliveries included.
    attempt: int | None
    # ``request.retries`` of the calling attempt.
    retries: int | None
    # Which delivery of the attempt's message: 1, then 2 for its first redelivery, ...
    delivery: int | None
    redelivered: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    raised: BaseException | None = None
    result: Any = None


@dataclass
class SideEffect:
    """Every call of one tracked function, in order, beside the runs of the tasks that made it."""

    name: str
    calls: list[SideEffectCall] = field(default_factory=list)
    # The worker's runs, by task id: the timelines a failed assertion shows.
    runs: Mapping[str, TaskRun] = field(default_factory=dict, repr=False, compare=False)

    @property
    def count(self) -> int:
        return len(self.calls)

    @property
    def task_ids(self) -> list[str]:
        """The task ids that called it, in the order of their first call."""
        return list(dict.fromkeys(c.task_id for c in self.calls if c.task_id is not None))

    def timeline(self) -> str:
        """Every call, then the timeline of every run that made one (of every run if none did)."""
        rows = [
            [
                str(c.number),
                f"{c.t:.3f}s",
                f"{c.task_name}[{c.task_id}]" if c.task_id else "(outside a task)",
                _or_dash(c.attempt),
                _or_dash(c.retries),
                _or_dash(c.delivery),
                "yes" if c.redelivered else "no",
                _call_arguments(c.args, c.kwargs),
                describe_exception(c.raised) if c.raised is not None else "returned",
            ]
            for c in self.calls
        ]
        headers = ["#", "t", "task", "attempt", "retries", "delivery", "redelivered", "arguments"]
        table = format_table([*headers, "outcome"], rows) if rows else "  (no calls)"
        ids = self.task_ids or list(self.runs)
        runs = "\n\n".join(self.runs[task_id].timeline() for task_id in ids if task_id in self.runs)
        head = f"calls of {self.name} ({len(self.calls)})"
        return f"{head}\n{_indent(table) if rows else table}\n\n{runs}".rstrip()


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return _shorten(", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]))


@dataclass
class BrokerOperation:
    """One connect, publish or consume the in-memory broker was asked to do.

    ``t`` is when it began; ``hung`` how many virtual seconds the client then waited for a
    broker that did not answer (``None`` when it answered at once).
    """

    kind: RecordedKind
    t: float
    ok: bool
    error: BaseException | None = None
    role: Literal["producer", "consumer"] = "producer"
    task_id: str | None = None
    task_name: str | None = None
    queue: str | None = None
    hung: float | None = None

    @property
    def ended_at(self) -> float:
        return self.t + (self.hung or 0.0)

    @property
    def result(self) -> str:
        """``ok`` or ``FAILED``, after how long a hang (for timelines)."""
        result = "ok" if self.ok else "FAILED"
        if self.hung is None:
            return result
        return f"hung {format_seconds(self.hung)}, {result}"


@dataclass
class PublishRecord:
    """One logical publish (one ``apply_async``/``send_task``) and every try kombu made for it.

    A try starts with each connection attempt, or with a publish on an open connection; a
    successful connect and the publish right after it are the same try. kombu sleeps in
    one-second slices between tries: those slices are not tries.
    """

    task_id: str | None
    task_name: str | None
    operations: list[BrokerOperation] = field(default_factory=list)
    delivered: bool = False

    @property
    def outcome(self) -> Literal["delivered", "failed", "pending"]:
        """``failed`` once the last try failed: kombu raised, or is sleeping before the next."""
        if self.delivered:
            return "delivered"
        if self.operations and not self.operations[-1].ok:
            return "failed"
        return "pending"

    @property
    def error(self) -> BaseException | None:
        """The error of the last failed try (what kombu re-raised when it gave up)."""
        failures = [op.error for op in self.operations if op.error is not None]
        return failures[-1] if failures else None

    @property
    def tries(self) -> list[list[BrokerOperation]]:
        tries: list[list[BrokerOperation]] = []
        for op in self.operations:
            continues_try = (
                op.kind == "publish"
                and tries
                and tries[-1][-1].kind == "connect"
                and tries[-1][-1].ok
            )
            if continues_try:
                tries[-1].append(op)
            else:
                tries.append([op])
        return tries

    @property
    def attempt_times(self) -> list[float]:
        return [try_[0].t for try_ in self.tries]

    @property
    def attempts(self) -> int:
        return len(self.tries)

    @property
    def intervals(self) -> list[float]:
        times = self.attempt_times
        return [round(b - a, 6) for a, b in zip(times, times[1:])]

    @property
    def ended_at(self) -> float | None:
        return self.operations[-1].ended_at if self.operations else None


@dataclass
class DeliveredMessage:
    """A task message the broker accepted, decoded."""

    queue: str
    t: float
    task_name: str
    task_id: str
    args: Any
    kwargs: Any
    headers: dict[str, Any]
    eta: str | None
    retries: int
    # The ETA minus ``t``: negative when the publish was retried past the ETA.
    countdown: float | None = None


@dataclass
class MessageEvent:
    """What the worker did with a message (acked, rejected, requeued, "ack failed") or what
    happened to its connection ("connection lost", "reconnected", "visibility sweep"); a
    connection event has an empty ``task_id`` and ``task_name``."""

    t: float
    task_id: str
    task_name: str
    action: str
    detail: str = ""


class Redelivery(NamedTuple):
    """An unacknowledged message the broker took back onto its queue (``redeliveries``).

    A named tuple: ``t, task_id, task_name = redelivery`` still unpacks.
    """

    t: float
    task_id: str
    task_name: str


class UnackedMessage(NamedTuple):
    """A message the redis flavour holds in its ``unacked`` hash until a visibility sweep.

    A lost connection had not acknowledged it while Redis was down. A named tuple:
    ``delivered_at, message = entry`` still unpacks.
    """

    delivered_at: float
    # kombu's message, as a visibility sweep hands it back to the queue.
    message: Any


@dataclass(frozen=True)
class ConnectionAttempt:
    """One TCP connection a client opened to the fault proxy (or tried to, during a reset cut)."""

    number: int
    t: float
    outcome: ConnectionOutcome
    peer: str
    note: str = ""


@dataclass(frozen=True)
class ProxyEvent:
    """A fault the test switched on or off at the fault proxy, for its timeline."""

    t: float
    what: str


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
