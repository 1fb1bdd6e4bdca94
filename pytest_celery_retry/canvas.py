"""A canvas's runs: the tasks of a chain, group or chord, their errbacks and chord-unlock polls.

Derived from the worker's ``TaskRun`` records and the canvas's own result tree (each
``AsyncResult.parent``, each ``GroupResult.results``), so it keeps no bookkeeping of its own.
Celery is imported only to read a result: the results are read through their attributes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .records import Attempt, RunState, TaskRun, describe_exception, format_seconds, format_table

__all__ = [
    "UNLOCK_TASK",
    "CanvasKind",
    "CanvasRun",
    "stored_exception",
    "task_names",
    "unlock_hint",
]

CanvasKind = Literal["task", "chain", "group", "chord"]
# The task result backends without a native chord join poll a chord's header with.
UNLOCK_TASK = "celery.chord_unlock"
# Celery's states in which a result holds the exception that ended the task.
_FAILED_STATES = ("FAILURE", "REVOKED")


def stored_exception(result: Any) -> BaseException | None:
    """The exception the result backend holds for ``result``'s task, if it holds one.

    Celery stores one for a task that never ran when an earlier member of its canvas failed
    for good: a chain's later tasks, a chord's callback (``ChordError``).
    """
    from celery.backends.base import DisabledBackend

    if isinstance(result.backend, DisabledBackend):  # no result backend: nothing stored
        return None
    state, value = result.state, result.result
    return value if state in _FAILED_STATES and isinstance(value, BaseException) else None


def task_names(signatures: Any) -> tuple[str, ...]:
    """The task names of the signatures a message carries (``callbacks``, ``errbacks``)."""
    return tuple(str(sig.get("task")) for sig in signatures or () if isinstance(sig, dict))


def unlock_hint(run: TaskRun) -> str:
    """Why a chord-unlock task may poll for ever, for the endless-retry guard's message."""
    if run.task_name != UNLOCK_TASK:
        return ""
    return (
        f" {UNLOCK_TASK} polls a chord's header (countdown=1, then every "
        "result_chord_retry_interval, max_retries=None) until every header task has a result "
        "in the backend: a header task that stores none (ignore_result=True, a lost task) or "
        "a failure Celery does not propagate to the chord (celery#9674) keeps it polling"
    )


@dataclass
class CanvasRun:
    """Every run of one canvas, from the result its ``.delay()``/``apply_async()`` returned.

    ``members`` are the canvas's own tasks in canvas order (a chain's links, a group's tasks,
    a chord's header tasks then its callback); a member that never ran has no attempts (and
    ``stored_exception`` when Celery failed it in the result backend).
    """

    kind: CanvasKind
    members: list[TaskRun]
    # A chord's header tasks and callback (the last chord in a chain).
    header: list[TaskRun] = field(default_factory=list)
    callback: TaskRun | None = None
    # The celery.chord_unlock runs polling the header (none with a native-join backend).
    unlocks: list[TaskRun] = field(default_factory=list)
    # Errback tasks (link_error) Celery called for a member: each call is a run of its own.
    errbacks: list[TaskRun] = field(default_factory=list)
    # Other tasks a member started: its link callbacks, the tasks its body published.
    children: list[TaskRun] = field(default_factory=list)
    # The runs whose outcome is the canvas's: its last task, or its last group's tasks.
    final: list[TaskRun] = field(default_factory=list)
    ends_with_group: bool = False
    seed: int | None = None

    @classmethod
    def from_result(
        cls, result: Any, runs: Mapping[str, TaskRun], seed: int | None = None
    ) -> CanvasRun:
        nodes = list(_nodes(result))
        groups = [node for node in nodes if _is_group(node)]
        members = [_run_of(node, runs, seed) for node in nodes if not _is_group(node)]
        by_id = {run.task_id: run for run in members}
        kind = _kind(result)
        header: list[TaskRun] = []
        callback = None
        if kind == "chord" or (kind == "chain" and _is_group(getattr(result, "parent", None))):
            header = [by_id[r.id] for r in result.parent.results if r.id in by_id]
            callback = by_id[result.id]
        group_ids = {group.id for group in groups}
        unlocks = [
            run
            for run in runs.values()
            if run.task_name == UNLOCK_TASK and run.attempts and _first_arg(run) in group_ids
        ]
        taken = set(by_id) | {run.task_id for run in unlocks}
        spawned = [
            run
            for run in runs.values()
            if run.task_id not in taken and run.parent_id is not None and run.parent_id in by_id
        ]
        errbacks = [run for run in spawned if _is_errback(run, by_id[run.parent_id or ""])]
        errback_ids = {run.task_id for run in errbacks}
        final = (
            [by_id[r.id] for r in result.results if r.id in by_id]
            if _is_group(result)
            else [by_id[result.id]]
        )
        return cls(
            kind=kind,
            members=members,
            header=header,
            callback=callback,
            unlocks=unlocks,
            errbacks=errbacks,
            children=[run for run in spawned if run.task_id not in errback_ids],
            final=final,
            ends_with_group=_is_group(result),
            seed=seed,
        )

    @property
    def state(self) -> RunState:
        """FAILURE once a final task failed; SUCCESS once all succeeded; else RETRY or PENDING."""
        states = {run.state for run in self.final}
        for state in ("FAILURE", "RETRY", "PENDING"):
            if state in states:
                return state
        return "SUCCESS"

    @property
    def result(self) -> Any:
        """The last task's return value; a list of them when the canvas ends with a group."""
        if self.ends_with_group:
            return [run.result for run in self.final]
        return self.final[0].result

    @property
    def retries(self) -> int:
        """Retries of the canvas's own tasks (chord-unlock polls and errbacks not counted)."""
        return sum(run.retries for run in self.members)

    @property
    def errback_times(self) -> list[float]:
        """When each errback call ran, in virtual seconds since the test's clock started."""
        return [run.attempts[0].t for run in self.errbacks if run.attempts]

    def timeline(self) -> str:
        """Every attempt of the canvas's runs in the order they started, one table."""
        roles = self._roles()
        ran = sorted(
            ((attempt, run, role) for run, role in roles for attempt in run.attempts),
            key=lambda ran: ran[0].order,
        )
        start = ran[0][0].t if ran else 0.0
        table_rows = [
            [f"{attempt.t - start:+.3f}s", *_row(run, role, attempt)] for attempt, run, role in ran
        ]
        never_ran = [
            ["-", _label(run), role, "-", "never ran", "-", describe_exception(run.exception)]
            for run, role in roles
            if not run.attempts
        ]
        headers = ["t", "task", "role", "retries", "outcome", "countdown", "exception"]
        table = format_table(headers, table_rows + never_ran)
        title = f"canvas timeline of a {self.kind}"
        if self.seed is not None:
            title += f" (seed {self.seed})"
        summary = (
            f"final: {self.state}; {len(self.members)} task(s), {self.retries} "
            f"retr{'y' if self.retries == 1 else 'ies'}, errbacks called {len(self.errbacks)} "
            f"time(s), {sum(len(run.attempts) for run in self.unlocks)} chord-unlock poll(s)"
        )
        indented = "\n".join("  " + line for line in table.splitlines())
        return f"{title}\n{indented}\n{summary}"

    def _roles(self) -> list[tuple[TaskRun, str]]:
        roles: list[tuple[TaskRun, str]] = []
        header = {run.task_id for run in self.header}
        for number, run in enumerate(self.members, 1):
            if run is self.callback:
                role = "callback"
            elif run.task_id in header:
                role = "header"
            else:
                role = f"{'task' if self.kind == 'group' else 'link'} {number}"
            roles.append((run, role))
        roles += [(run, "chord unlock") for run in self.unlocks]
        roles += [(run, f"errback of {_short(run.parent_id)}") for run in self.errbacks]
        roles += [(run, f"child of {_short(run.parent_id)}") for run in self.children]
        return roles

    def __repr__(self) -> str:
        return (
            f"<CanvasRun {self.kind} state={self.state} tasks={len(self.members)} "
            f"retries={self.retries} errbacks={len(self.errbacks)} "
            f"unlock_polls={sum(len(run.attempts) for run in self.unlocks)}>"
        )


def _row(run: TaskRun, role: str, attempt: Attempt) -> list[str]:
    return [
        _label(run),
        role,
        str(attempt.retries),
        attempt.outcome or "running",
        format_seconds(attempt.countdown) if attempt.retry_published else "-",
        describe_exception(attempt.exc),
    ]


def _label(run: TaskRun) -> str:
    return f"{run.task_name}[{_short(run.task_id)}]"


def _short(task_id: str | None) -> str:
    return (task_id or "-")[:8]


def _is_errback(run: TaskRun, parent: TaskRun) -> bool:
    """Celery calls a task's errbacks once it failed for good. A task that never ran (a
    chord's callback failed by its header) starts nothing else; one that ran may also have
    published tasks of its own, so only those its ``link_error`` names count."""
    if parent.state != "FAILURE":
        return False
    return not parent.attempts or run.task_name in parent.link_error


def _first_arg(run: TaskRun) -> Any:
    args = run.attempts[0].args if run.attempts else ()
    return args[0] if args else None


def _is_group(node: Any) -> bool:
    # A GroupResult holds its tasks' results; an AsyncResult has no ``results``.
    return node is not None and hasattr(node, "results")


def _kind(result: Any) -> CanvasKind:
    parent = getattr(result, "parent", None)
    if _is_group(result):
        return "group" if parent is None else "chain"
    if parent is None:
        return "task"
    if _is_group(parent) and getattr(parent, "parent", None) is None:
        return "chord"
    return "chain"


def _nodes(result: Any) -> Iterator[Any]:
    """The result tree in canvas order: each node after its parents, a group before its tasks
    (and each task after the chain that leads to it inside the group)."""
    seen: set[str] = set()

    def walk(node: Any) -> Iterator[Any]:
        if node is None or node.id in seen:
            return
        seen.add(node.id)
        yield from walk(getattr(node, "parent", None))
        yield node
        for member in getattr(node, "results", None) or ():
            yield from walk(member)

    yield from walk(result)


def _run_of(result: Any, runs: Mapping[str, TaskRun], seed: int | None) -> TaskRun:
    run = runs.get(result.id)
    if run is not None:
        return run
    name = getattr(result, "name", None) or "unknown"
    return TaskRun(result.id, name, seed=seed, stored_exception=stored_exception(result))
