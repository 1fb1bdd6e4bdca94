"""Invariants: what must hold whatever the broker does, as assertions for fault exploration.

Each one checks a guarantee over everything a worker and its broker recorded (rather than
one number of one run) and, when it fails, shows the fault schedule that broke it, as a
sentence and as the code of a regression test, with the seed and the timelines. They work
in a plain test too (``retry_worker``, ``flaky_broker``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UsageError, is_finite_number
from .records import DeliveredMessage, TaskRun, describe_exception, format_seconds

if TYPE_CHECKING:
    from .broker import InMemoryBroker
    from .worker import RetryWorker

__all__ = [
    "PublishOutcome",
    "assert_finishes_within",
    "assert_no_task_lost",
    "assert_publish_succeeds_or_raises",
]

__tracebackhide__ = True


def _check_worker(call: str, worker: Any) -> RetryWorker:
    if not hasattr(worker, "runs") or not hasattr(worker, "brokers"):
        raise UsageError(
            f"{call}: pass the retry worker (retry_worker, or the worker of "
            f"fault_explorer.example()), got {type(worker).__name__}"
        )
    return worker  # type: ignore[no-any-return]


def _check_broker(call: str, broker: Any) -> InMemoryBroker:
    if not hasattr(broker, "delivery_count") or not hasattr(broker, "fault_schedule"):
        raise UsageError(
            f"{call}: pass the in-memory broker (flaky_broker, or the broker of "
            f"fault_explorer.example()), got {type(broker).__name__}"
        )
    return broker  # type: ignore[no-any-return]


def _report(
    headline: str, brokers: list[InMemoryBroker], seed: int | None, runs: list[TaskRun]
) -> str:
    """The failure message: what broke, under which faults, and the timelines."""
    parts = [headline]
    for broker in brokers:
        if broker.fault_schedule is not None:
            parts.append(broker.fault_schedule.describe())
    if seed is not None:
        parts.append(f"celery-retry seed {seed} (reproduce with --celery-retry-seed={seed})")
    parts += [run.timeline() for run in runs]
    parts += [broker.timeline() for broker in brokers]
    return "\n\n".join(parts)


def _fail(message: str) -> None:
    __tracebackhide__ = True
    raise AssertionError(message)


def _why_lost(run: TaskRun | None, task_id: str, brokers: list[InMemoryBroker]) -> str | None:
    """Why ``task_id`` did not end in SUCCESS or FAILURE, or None if it did."""
    if run is None:
        waiting = [
            m for broker in brokers for m in broker.messages(queue=None) if m.task_id == task_id
        ]
        name = waiting[0].task_name if waiting else "?"
        when = format_seconds(waiting[0].t) if waiting else "?"
        return (
            f"{name}[{task_id}] was published at t={when} and never ran "
            "(did the test call run_until_idle()?)"
        )
    last = run.last
    if run.lost and last is not None:
        failed = [
            p
            for broker in brokers
            for p in broker.publishes
            if p.task_id == task_id and not p.delivered
        ]
        asked = failed[-1].attempt_times[0] if failed and failed[-1].operations else last.t
        return (
            f"the retry of {run.task_name}[{task_id}] published at t={asked:g} s never "
            "reached the broker: Celery rejected its message, the task is lost"
        )
    if run.state not in ("SUCCESS", "FAILURE"):
        return f"{run.task_name}[{task_id}] is still {run.state} (its last message never ran)"
    return None


def assert_no_task_lost(worker: RetryWorker) -> None:
    """Every task the broker accepted ran to SUCCESS or FAILURE: none was silently dropped.

    Call it after ``run_until_idle()`` (or ``apply()``). A task counts as lost when its retry
    never reached the broker (Celery rejected it), when its message never ran, or when its
    run is still retrying.
    """
    __tracebackhide__ = True
    worker = _check_worker("assert_no_task_lost(worker)", worker)
    brokers = worker.brokers
    task_ids = dict.fromkeys(worker.runs)
    for broker in brokers:
        task_ids.update(dict.fromkeys(m.task_id for m in broker.messages(queue=None)))
    lost: list[tuple[str, TaskRun | None]] = []
    for task_id in task_ids:
        run = worker.runs.get(task_id)
        why = _why_lost(run, task_id, brokers)
        if why is not None:
            lost.append((why, run))
    if lost:
        whys = "\n".join(f"  - {why}" for why, _ in lost)
        runs = [run for _, run in lost if run is not None]
        _fail(
            _report(
                f"{len(lost)} of {len(task_ids)} task(s) lost:\n{whys}",
                brokers,
                worker.settings.seed,
                runs,
            )
        )


def assert_finishes_within(worker: RetryWorker, seconds: float) -> None:
    """Every task the worker ran ended (SUCCESS or FAILURE) with an attempt that started
    within ``seconds`` of virtual time from ``t=0``."""
    __tracebackhide__ = True
    worker = _check_worker("assert_finishes_within(worker, seconds)", worker)
    if not is_finite_number(seconds) or seconds < 0:
        raise UsageError(
            f"assert_finishes_within(worker, seconds={seconds!r}): give virtual seconds, a "
            "number >= 0"
        )
    late: list[tuple[str, TaskRun]] = []
    for run in worker.runs.values():
        last = run.last
        if run.lost or run.state not in ("SUCCESS", "FAILURE") or last is None:
            late.append((f"{run.task_name}[{run.task_id}] never finished ({run.state})", run))
        elif last.t > seconds:
            late.append(
                (
                    f"{run.task_name}[{run.task_id}] finished at t={format_seconds(last.t)} "
                    f"({run.state})",
                    run,
                )
            )
    if late:
        whys = "\n".join(f"  - {why}" for why, _ in late)
        _fail(
            _report(
                f"expected every task to finish within {seconds:g} virtual seconds:\n{whys}",
                worker.brokers,
                worker.settings.seed,
                [run for _, run in late],
            )
        )


@dataclass
class PublishOutcome:
    """What a publish under faults gave its caller, and what reached the broker."""

    value: Any = None
    error: BaseException | None = None
    delivered: list[DeliveredMessage] = field(default_factory=list)


def assert_publish_succeeds_or_raises(
    broker: InMemoryBroker, publish: Callable[[], Any]
) -> PublishOutcome:
    """Call ``publish()``: it must either get its message to the broker, or raise to its caller.

    Fails when it returns though nothing (or not the message of the ``AsyncResult`` it
    returned) reached the broker: the publish was lost without the caller knowing; or when
    it raises although its message reached the broker (a caller that publishes again sends
    it twice). Returns what happened; the error it raised is caught.
    """
    __tracebackhide__ = True
    broker = _check_broker("assert_publish_succeeds_or_raises(broker, publish)", broker)
    if not callable(publish):
        raise UsageError(
            f"assert_publish_succeeds_or_raises(broker, publish={publish!r}): pass a function "
            "that publishes, e.g. lambda: app.send_task('foo.task', retry=True)"
        )
    before = broker.delivery_count
    outcome = PublishOutcome()
    try:
        outcome.value = publish()
    except Exception as exc:
        outcome.error = exc
    outcome.delivered = broker.messages(queue=None, since=before)
    task_id = getattr(outcome.value, "id", None)
    ids = [message.task_id for message in outcome.delivered]
    problem = None
    if outcome.error is None and not outcome.delivered:
        problem = "returned without an error, but no message reached the broker: lost silently"
    elif outcome.error is None and isinstance(task_id, str) and task_id not in ids:
        problem = (
            f"returned the result of {task_id}, whose message never reached the broker "
            f"(it accepted {', '.join(ids)}): lost silently"
        )
    elif outcome.error is not None and outcome.delivered:
        problem = (
            f"raised {describe_exception(outcome.error)} although {len(outcome.delivered)} "
            "message(s) reached the broker: a caller that publishes again sends it twice"
        )
    if problem is not None:
        _fail(_report(f"the publish {problem}", [broker], broker.seed, []))
    return outcome
