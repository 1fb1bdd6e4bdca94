"""The retry worker: Celery's real worker code path, in the test process, on virtual time.

Each message is turned into Celery's own worker ``Request`` and executed through an inline
pool with the real tracer (``is_eager`` false), so ``Task.retry`` republishes its retry
message through the in-memory broker exactly as in production, ETA and all. The worker
holds messages whose ETA lies ahead (unacknowledged, as a real worker does), and messages
its task's ``rate_limit`` holds back (Celery's own token buckets and scheduling); when
nothing is due, it moves the virtual clock to the next of those moments instead of waiting.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import billiard
import pytest
from billiard.common import human_status
from billiard.einfo import ExceptionInfo
from celery import _state, signals
from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import Retry, TaskRevokedError, WorkerLostError
from kombu.exceptions import EncodeError
from kombu.utils.uuid import uuid

from .app_state import check_retry_policy
from .attempt_hooks import AttemptHooks, Hook
from .broker import InMemoryBroker
from .canvas import CanvasRun, stored_exception, task_names, unlock_hint
from .clock import LATEST, VirtualClock
from .consumer import Consumer
from .einfo import remembered_tracebacks
from .errors import (
    EndlessRetryError,
    UsageError,
    WorkerStoppedError,
    is_finite_number,
    is_number,
    is_whole_number,
)
from .records import (
    Attempt,
    AttemptOutcome,
    MessageEvent,
    SideEffect,
    TaskRun,
    describe_exception,
    parse_eta,
)
from .redelivery import WHEN, RedeliveryPlan, When
from .session import AppInstallation, RetrySession, Settings
from .side_effects import CallContext, Tracked
from .task_time import TaskTime

__all__ = ["ArgumentEncodeError", "MessageEvent", "RetryWorker"]

_OUTCOME_OF_STATE: dict[str, AttemptOutcome] = {
    "SUCCESS": "success",
    "FAILURE": "failure",
    "RETRY": "retry",
    "REJECTED": "rejected",
    "IGNORED": "ignored",
}
_TIMELINE_TAIL = 8
# Raised into a task body by the test run itself (Ctrl-C, pytest.fail, pytest-timeout):
# they end the test, not the task, as they do everywhere in pytest.
_TEST_RUN_EXCEPTIONS = (KeyboardInterrupt, pytest.fail.Exception, pytest.skip.Exception)
# billiard 4.3 reports a job's BaseException as the job's result (then ends the child on
# SystemExit); before, the exception ended the child and the pool reported WorkerLostError.
_BILLIARD_REPORTS_BASE_EXCEPTIONS = tuple(billiard.VERSION[:2]) >= (4, 3)


class ArgumentEncodeError(UsageError, EncodeError):
    """Task arguments the app's serializer cannot encode (still a kombu ``EncodeError``)."""


class _InlinePool(BasePool):
    """Celery's solo pool without its ``worker_process_init`` signal: no worker process starts.

    It can also lose its "worker process" the way the prefork pool reports a killed child:
    the job was accepted, then the error callback gets ``WorkerLostError``. Celery's
    ``Request.on_failure`` then decides (ack, reject, requeue) as in production.

    A task that raises a BaseException which is no Exception (``SystemExit``, a custom one)
    is reported as the prefork pool reports it; the solo pool would hand it to the success
    callback, and the worker would die of the ``TypeError``.
    """

    body_can_be_buffer = True

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(limit=1)
        self.on_apply = self._apply
        # The error the next job's "worker process" dies with, if it is to die.
        self.crash_next: WorkerLostError | None = None
        # The BaseException the last job raised, if it raised one that is no Exception.
        self.raised: BaseException | None = None
        # A job's sleeps move the virtual clock, and its time limits apply as prefork's do.
        self.task_time = TaskTime(clock)

    def _apply(self, target: Any, *args: Any, **kwargs: Any) -> None:
        lost, self.crash_next = self.crash_next, None
        self.raised = None
        if lost is not None:
            kwargs["accept_callback"](os.getpid(), time.monotonic())
            _report_failure(kwargs, lost)
            return
        try:
            # The time limits' own unwinding ends inside ``running``; every other exception
            # comes back here, where the prefork child's loop would see it.
            with self.task_time.running(kwargs) as options:
                apply_target(target, *args, **{**options, "propagate": (BaseException,)})
        except (Exception, *_TEST_RUN_EXCEPTIONS):
            raise
        except BaseException as exc:
            self.raised = exc
            if _BILLIARD_REPORTS_BASE_EXCEPTIONS:
                _report_failure(kwargs, exc)
            else:
                status = human_status(_exit_code(exc))
                _report_failure(kwargs, WorkerLostError(f"Worker exited prematurely: {status}."))


def _report_failure(job: dict[str, Any], exc: BaseException) -> None:
    """Hand ``exc`` to the job's error callback, with its traceback, as billiard does."""
    try:
        raise exc
    except BaseException:
        job["error_callback"](ExceptionInfo())


def _exit_code(exc: BaseException) -> int:
    """The exit status of a Python process that ``exc`` ended."""
    if not isinstance(exc, SystemExit):
        return 1
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


class RetryWorker:
    """Runs tasks the way a Celery worker does, recording every attempt and retry.

    Use it through the ``retry_worker`` fixture.
    """

    def __init__(self, session: RetrySession) -> None:
        self._session = session
        self.runs: dict[str, TaskRun] = {}
        self.events: list[MessageEvent] = []
        self._consumers: dict[int, Consumer] = {}
        self._pool = _InlinePool(session.clock)
        # What Celery and the consumer report while an attempt runs, for _execute to record.
        self._reports: _Reports | None = None
        self._receiver_connected = False
        # Crashes to come, per task name.
        self._crashes: dict[str, list[_Crash]] = {}
        self._attempt_order = itertools.count(1)
        self._tracked: list[Tracked] = []
        self._redeliveries = RedeliveryPlan()
        # How often each message has been executed, by task id, then retries (no key tuple
        # per retry: it would be a tenth of what a retry keeps alive).
        self._deliveries: dict[str, dict[int, int]] = {}
        self._hooks = AttemptHooks()

    @property
    def clock(self) -> VirtualClock:
        return self._session.clock

    @property
    def settings(self) -> Settings:
        return self._session.settings

    @property
    def brokers(self) -> list[InMemoryBroker]:
        """The in-memory brokers of this worker's test (one per app), in installation order."""
        return [installed.broker for installed in self._session.installations.values()]

    # -- public API ------------------------------------------------------------------------
    def apply(
        self,
        task: Any,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        max_attempts: int | None = None,
        serialize: bool | None = None,
        **options: Any,
    ) -> TaskRun:
        """Execute ``task`` (a task or a signature) until it succeeds or finally fails.

        The first message is published with the broker's faults suspended; every retry goes
        through the broker as it is, faults included. Options go to ``apply_async``. Other
        messages run as they become due meanwhile; what is left afterwards (what the task's
        last attempt sent, for instance) waits for ``run_until_idle()``. For a chain, the
        run of its last task; for a chord, its callback's. A task that never ran because an
        earlier member failed for good is a run without attempts holding the exception
        Celery stored for it (see :meth:`canvas` for every member).
        """
        self._check_schedule(options)
        check_retry_policy(options.get("retry_policy"), "retry_policy")
        signature = self._signature(task, args, kwargs, options)
        app = signature._app or signature.type._get_app()
        installed = self._session.installation(app)
        task_obj = app.tasks[signature.task]
        task_id = signature.options.get("task_id") or uuid()
        with self._serialization(app, task_obj, serialize), self._running(app):
            with installed.broker.suspend_faults():
                try:
                    signature.apply_async(task_id=task_id)
                except EncodeError as exc:
                    raise ArgumentEncodeError(
                        f"{signature.task}: the arguments cannot be serialized with "
                        f"{task_obj.serializer or app.conf.task_serializer!r} ({exc}). Celery "
                        "fails the same way in production. Pass arguments the serializer "
                        "can encode, or pickle them in the test with apply(..., "
                        "serialize=False) or the ini option celery_retry_serialize = false"
                    ) from exc
            self._work(installed, until=task_id, max_attempts=max_attempts, caller="apply")
        run = self.runs.get(task_id)
        return run if run is not None else self._never_ran(app, signature, task_id)

    def run_until_idle(
        self, app: Any = None, *, max_attempts: int | None = None
    ) -> dict[str, TaskRun]:
        """Consume and execute every message on the broker until none is left or due.

        Returns the runs this call touched, by task id (all runs stay in ``.runs``).
        """
        if app is None:
            if not self._session.installations:
                raise UsageError(
                    "run_until_idle() has no broker to consume from: request the flaky_broker "
                    "fixture, publish something first, or pass app="
                )
            app = next(iter(self._session.installations.values())).app
        installed = self._session.installation(app)
        before = {task_id: len(run.attempts) for task_id, run in self.runs.items()}
        with self._running(app):
            self._work(installed, until=None, max_attempts=max_attempts, caller="run_until_idle")
        return {
            task_id: run
            for task_id, run in self.runs.items()
            if len(run.attempts) != before.get(task_id, 0)
        }

    def crash_during(self, task: Any, times: int = 1, starting_in: float = 0) -> None:
        """Lose the worker process during the next ``times`` executions of ``task``
        (those that start ``starting_in`` virtual seconds from now or later).

        The pool reports ``WorkerLostError`` after accepting the job, as the prefork pool does
        for a killed child, before the task body runs (so it has no side effects). Celery
        decides what happens to the message: with the task's ``acks_late`` and
        ``reject_on_worker_lost`` it is requeued and redelivered; without ``acks_late``
        it was acknowledged when accepted and the task fails with ``WorkerLostError``.
        """
        name = _task_name("crash_during", task)
        if not is_whole_number(times) or times < 1:
            raise UsageError(f"crash_during(times={times!r}): a whole number of crashes >= 1")
        if not is_finite_number(starting_in) or starting_in < 0:
            raise UsageError(
                f"crash_during(starting_in={starting_in!r}): give the virtual seconds from now, "
                ">= 0"
            )
        self._crashes.setdefault(name, []).append(_Crash(self.clock.elapsed + starting_in, times))

    def redeliver(self, task: Any = None, times: int = 1, when: When = "after_run") -> None:
        """Make the broker deliver each message of ``task`` (every task with None) again.

        The first ``times`` deliveries of each message (the first, and each retry's) are lost
        as ``when`` says, and Celery and the broker decide what comes back, as they do:

        - ``"after_run"``: the worker dies after the task body ran, before its ack left (a
          restart, SIGKILL, a lost host). An ``acks_late`` task's message is delivered again
          (RabbitMQ at once; Redis at a visibility sweep after ``visibility_timeout``); a
          task acked early was acked when the worker accepted it, and is not.
        - ``"during_run"``: the worker process running it dies as the task starts, as
          :meth:`crash_during`: delivered again with ``acks_late`` and
          ``reject_on_worker_lost`` only.
        """
        name = None if task is None else self._known_task("redeliver", task)
        if not is_whole_number(times) or times < 1:
            raise UsageError(
                f"redeliver(times={times!r}): how many times each message is delivered again, "
                "a whole number >= 1"
            )
        if when not in WHEN:
            raise UsageError(f"redeliver(when={when!r}): choose {' or '.join(map(repr, WHEN))}")
        self._redeliveries.add(name, times, when)

    def before_attempt(self, task: Any, n: int | None = None, fn: Hook | None = None) -> Any:
        """Run ``fn`` before attempt ``n`` of ``task`` (before every attempt with None).

        ``n`` counts as ``Attempt.number``: every execution of the task id, a redelivered
        message's included (``request.retries + 1`` while nothing is redelivered). ``fn``
        runs on the virtual clock after the attempt's message was fetched and before its
        body; it takes no arguments, or the attempt's number when ``n`` is None. Without
        ``fn``, a decorator. What ``fn`` raises fails the test (``AttemptHookError``).
        """
        name = self._known_task("before_attempt", task)
        if n is not None and (not is_whole_number(n) or n < 1):
            raise UsageError(
                f"before_attempt({name!r}, n={n!r}): the attempt's number, a whole number >= 1 "
                "(1 is the first execution), or None for every attempt"
            )
        if fn is not None:
            self._hooks.add(name, n, fn)
            return fn

        def register(function: Hook) -> Hook:
            self._hooks.add(name, n, function)
            return function

        return register

    def track(self, target: Any, attribute: str, name: str | None = None) -> SideEffect:
        """Record every call of ``target.attribute`` (a function the tasks call) until teardown.

        The function is replaced by a wrapper that calls through to it and notes the virtual
        time, the calling task's id, attempt, ``retries`` and delivery, the arguments, and
        what it returned or raised. Track it where the task looks it up, as with
        ``mock.patch``. Returns the :class:`SideEffect` the calls accumulate in.
        """
        tracked = Tracked(target, attribute, name, self.clock, self._call_context, self.runs)
        self._tracked.append(tracked)
        return tracked.effect

    def task_run(self, task_id: str) -> TaskRun:
        """The run of ``task_id`` (as ``runs[task_id]``, with an error that lists the known ids)."""
        try:
            return self.runs[task_id]
        except KeyError:
            raise UsageError(
                f"no task with id {task_id!r} has run on this worker; known ids: "
                f"{', '.join(self.runs) or 'none'}"
            ) from None

    def canvas(self, result: Any) -> CanvasRun:
        """The runs of the canvas (chain, group, chord) whose result ``result`` is.

        ``result`` is what ``.delay()``/``apply_async()`` returned for it, an ``AsyncResult``
        or a ``GroupResult``: its tree names the canvas's tasks. Read it after the worker ran
        them (``run_until_idle()``).
        """
        if not isinstance(getattr(result, "id", None), str):
            raise UsageError(
                f"canvas({result!r}): pass the AsyncResult or GroupResult that .delay() or "
                "apply_async() returned for the canvas"
            )
        return CanvasRun.from_result(result, self.runs, self.settings.seed)

    def run(self, task_id: str) -> TaskRun:
        """Deprecated: :meth:`task_run` (``run`` reads as running a task, as in run_until_idle)."""
        warnings.warn(
            "RetryWorker.run(task_id) is deprecated: use RetryWorker.task_run(task_id)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.task_run(task_id)

    def close(self) -> None:
        with ExitStack() as undo:
            for tracked in self._tracked:
                undo.callback(tracked.restore)
            self._tracked.clear()
            undo.callback(self._disconnect_receivers)
            for consumer in self._consumers.values():
                undo.callback(_close_whatever_the_broker_does, consumer)
            self._consumers.clear()

    # -- the loop --------------------------------------------------------------------------
    def _work(
        self,
        installed: AppInstallation,
        until: str | None,
        max_attempts: int | None,
        caller: str,
    ) -> None:
        for limit in (max_attempts, self.settings.max_attempts):
            if limit is not None and (not is_whole_number(limit) or limit < 1):
                raise UsageError(f"max_attempts={limit!r}: give a whole number of attempts >= 1")
        consumer = self._consumer(installed)
        while True:
            if until is not None and self._finished(until) and not consumer.holds(until):
                return
            try:
                consumer.fetch()
            except WorkerStoppedError as stopped:
                # A worker started again is a new consumer, as a restarted process is.
                del self._consumers[id(installed.app)]
                raise WorkerStoppedError(f"{stopped}\n\n{self._limit_timelines()}") from (
                    stopped.__cause__
                )
            request = consumer.next_request()
            if request is None:
                if consumer.wait_for_work():
                    continue
                return
            run = self._run_for(request)
            limit, why = self._attempt_limit(request, max_attempts, caller)
            if len(run.attempts) >= limit:
                consumer.ready.appendleft(request)
                raise EndlessRetryError(self._endless_message(run, why))
            try:
                self._hooks.run(run.task_name, run.task_id, len(run.attempts) + 1)
            except BaseException:
                consumer.ready.appendleft(request)
                raise
            self._execute(request, run, consumer)

    def _limit_timelines(self) -> str:
        """The timelines of the runs whose messages crossed a broker limit."""
        return "\n\n".join(run.timeline() for run in self.runs.values() if run.limit_events)

    def _finished(self, task_id: str) -> bool:
        """A task is over once an attempt ended without scheduling another one."""
        run = self.runs.get(task_id)
        last = run.last if run is not None else None
        return (
            last is not None
            and last.outcome is not None
            and not last.retry_published
            and not last.requeued
            and not last.ack_failed
        )

    def _execute(self, request: Any, run: TaskRun, consumer: Consumer) -> None:
        """Run one attempt and record it: the one place that writes an Attempt."""
        broker = consumer.broker
        headers = request.request_dict
        attempt = Attempt(
            number=len(run.attempts) + 1,
            task_id=run.task_id,
            task_name=run.task_name,
            retries=int(headers.get("retries") or 0),
            started_at=self.clock.now(),
            t=self.clock.elapsed,
            redelivered=bool((request.delivery_info or {}).get("redelivered")),
            order=next(self._attempt_order),
        )
        if attempt.redelivered:  # a copy that runs again was taken back and delivered again
            attempt.duplicate_of = next(
                (
                    earlier.number
                    for earlier in run.attempts
                    if earlier.retries == attempt.retries
                    and earlier.outcome != "worker-lost"
                    and not earlier.requeued
                ),
                None,
            )
        if run.attempts:
            _drop_tracebacks(run.attempts[-1])
        run.attempts.append(attempt)
        deliveries_before = broker.delivery_count
        events_before = len(self.events)
        # Which delivery of its message this is: the broker's copies of one message share
        # the task id and retries.
        copies = self._deliveries.setdefault(run.task_id, {})
        delivery = copies[attempt.retries] = copies.get(attempt.retries, 0) + 1
        lose = self._redeliveries.lose(run.task_name, delivery)
        crash = self._pool.crash_next = self._crash_for(run.task_name, lose)
        reports = self._reports = _Reports(run.task_id, attempt, delivery)
        if lose == "after_run":
            reports.dies_after_run = consumer
        revoked: TaskRevokedError | None = None
        try:
            with remembered_tracebacks():
                request.execute_using_pool(self._pool)
        except TaskRevokedError as exc:
            revoked = exc
        finally:
            self._reports = None
        self._record_reports(attempt, reports)
        if reports.died:
            self._record_death(attempt, reports)
        if revoked is not None:
            attempt.outcome, attempt.exc, attempt.raised = "failure", revoked, revoked
            attempt.note = "revoked (expired or revoked before it ran)"
        cause, self._pool.raised = crash or self._pool.raised, None
        if cause is not None:
            self._record_pool_failure(
                attempt, cause, crash is not None, request, self.events[events_before:]
            )
        self._record_time_limits(attempt, *self._pool.task_time.take())
        if attempt.outcome is None:  # the tracer never ran: Celery's internal error path
            attempt.outcome = "failure"
        for message in broker.messages(queue=None, since=deliveries_before):
            if message.task_id == run.task_id:
                attempt.retry_published = True
                # What the task asked for: its ETA from the start of this attempt, however long
                # the publish took (the message's own countdown counts from its delivery).
                attempt.eta = parse_eta(message.eta) if message.eta is not None else None
                attempt.countdown = (
                    round((attempt.eta - attempt.started_at).total_seconds(), 6)
                    if attempt.eta is not None
                    else 0.0
                )
                break
        if attempt.outcome == "rejected" and not attempt.retry_published:
            if attempt.ack_failed:
                # The broker never heard of the rejection: the message comes back.
                attempt.note = f"retry not published: Celery rejected the message; {attempt.note}"
            else:
                run.lost = True
                attempt.note = "retry not published: Celery rejected the message, the task is lost"
        self._record_rate_limit(attempt, request, consumer)
        if attempt.duplicate_of is not None:
            note = f"duplicate: attempt {attempt.duplicate_of} ran this retry already"
            attempt.note = f"{attempt.note}; {note}" if attempt.note else note

    def _crash_for(self, task_name: str, lose: When | None) -> WorkerLostError | None:
        """The error the attempt's worker process is to die with, if it is to die."""
        if lose == "during_run":
            by = "retry_worker.redeliver(when='during_run')"
        elif self._take_crash(task_name):
            by = "crash_during"
        else:
            return None
        return WorkerLostError(f"Worker exited prematurely: signal 9 (SIGKILL) (simulated by {by})")

    @staticmethod
    def _record_death(attempt: Attempt, reports: _Reports) -> None:
        """The worker died after the attempt's body ran (``redeliver(when="after_run")``)."""
        died = "the worker died after the run (retry_worker.redeliver)"
        if reports.failed_settlement is not None:
            attempt.ack_failed = True
            attempt.note = (
                f"{died} before its {reports.failed_settlement} left: the broker still holds "
                "the message"
            )
        else:
            attempt.note = f"{died}; the message was acked when it was accepted: not redelivered"

    def _take_crash(self, task_name: str) -> bool:
        """Whether this execution of ``task_name`` loses its process (crash_during)."""
        for crash in self._crashes.get(task_name, ()):
            if crash.remaining > 0 and crash.active_from <= self.clock.elapsed:
                crash.remaining -= 1
                return True
        return False

    @staticmethod
    def _record_reports(attempt: Attempt, reports: _Reports) -> None:
        """Record what Celery's signals and the consumer reported while the attempt ran."""
        attempt.args, attempt.kwargs = reports.args, reports.kwargs
        if reports.state is not None:
            attempt.outcome = _OUTCOME_OF_STATE.get(reports.state, "failure")
            if isinstance(reports.returned, BaseException):
                attempt.exc = _cause_of(reports.returned)
            else:
                attempt.result = reports.returned
        attempt.raised = reports.raised
        attempt.requeued = reports.requeued
        if reports.failed_settlement is not None and not reports.died:
            attempt.ack_failed = True
            attempt.note = (
                f"{reports.failed_settlement} failed: the broker was unreachable and still "
                "holds the message"
            )

    @staticmethod
    def _record_rate_limit(attempt: Attempt, request: Any, consumer: Consumer) -> None:
        held = consumer.rate_limit_hold(request)
        if not held:
            return
        attempt.rate_limit_hold = held
        note = f"held {round(held, 3):g} s by rate_limit={request.task.rate_limit!r}"
        attempt.note = f"{note}; {attempt.note}" if attempt.note else note

    @staticmethod
    def _record_pool_failure(
        attempt: Attempt,
        cause: BaseException,
        crashed: bool,
        request: Any,
        events: list[MessageEvent],
    ) -> None:
        """Record what Celery's ``Request.on_failure`` made of a job the pool reported failed.

        ``cause`` is the simulated crash, or the BaseException the task body raised; the
        task_failure signal told the attempt what Celery failed the task with, if it did.
        """
        reported = attempt.raised
        actions = {event.action for event in events if event.task_id == attempt.task_id}
        attempt.exc = cause
        lost_process = crashed or isinstance(reported, WorkerLostError) or "requeued" in actions
        if not lost_process:
            # The process lived on and Celery failed the task with the exception itself.
            attempt.outcome, attempt.raised = "failure", cause
            return
        attempt.outcome = "worker-lost"
        if reported is None:
            attempt.raised = cause
        if crashed:
            lost, ran = "worker lost", "before it ran"
        else:
            lost = f"worker lost: {describe_exception(cause)} ends a prefork worker process"
            ran = "when it was accepted"
        if "requeued" in actions:
            attempt.note = f"{lost}; message requeued (acks_late, reject_on_worker_lost)"
        elif not request.task.acks_late:
            attempt.note = f"{lost}; the message was acked {ran}: task not redelivered"
        else:
            attempt.note = f"{lost}; acks_late acked it as failed: task not redelivered"

    @staticmethod
    def _record_time_limits(attempt: Attempt, soft: float | None, hard: Exception | None) -> None:
        if hard is not None:
            attempt.outcome, attempt.exc, attempt.raised = "failure", hard, hard
            attempt.note = (
                f"hard time limit ({hard.args[0]:g} s) exceeded: the pool killed the worker process"
            )
            if attempt.requeued:
                attempt.note += "; message requeued (acks_late, not acked on timeout)"
        elif soft is not None and not attempt.note:
            attempt.note = f"soft time limit ({soft:g} s) exceeded"

    # -- Celery plumbing -------------------------------------------------------------------
    def _run_for(self, request: Any) -> TaskRun:
        run = self.runs.get(request.id)
        if run is None:
            run = self.runs[request.id] = TaskRun(
                request.id,
                request.name,
                seed=self.settings.seed,
                parent_id=request.parent_id,
                link_error=task_names(request.errbacks),
            )
        return run

    def _consumer(self, installed: AppInstallation) -> Consumer:
        consumer = self._consumers.get(id(installed.app))
        if consumer is None:
            consumer = self._consumers[id(installed.app)] = Consumer(
                installed, self.events, self._on_settled, self._on_limit
            )
        return consumer

    # -- what Celery and the consumer report while an attempt runs --------------------------
    def _reporting(self, task_id: str | None) -> _Reports | None:
        reports = self._reports
        return reports if reports is not None and task_id == reports.task_id else None

    def _known_task(self, call: str, task: Any) -> str:
        """The name of ``task``; a name must be registered on an app the worker serves."""
        name = _task_name(call, task)
        apps = [installed.app for installed in self._session.installations.values()]
        if isinstance(task, str) and not any(name in app.tasks for app in apps):
            known = sorted({n for app in apps for n in app.tasks if not n.startswith("celery.")})
            raise UsageError(
                f"{call}({task!r}): no app of this test registers a task named {task!r}; "
                f"pass the task object, or one of: {', '.join(known) or 'none'}"
            )
        return name

    def _call_context(self) -> CallContext:
        """Which attempt a tracked function is called in: the one running, if any."""
        reports = self._reports
        if reports is None:
            return CallContext()
        attempt = reports.attempt
        return CallContext(
            attempt.task_id,
            attempt.task_name,
            attempt.number,
            attempt.retries,
            delivery=reports.delivery,
            redelivered=attempt.redelivered,
        )

    def _on_settled(self, task_id: str, action: str) -> None:
        """The consumer's callback: what became of the message of the running attempt."""
        reports = self._reports
        if reports is None:
            return
        if action == "requeued":
            reports.requeued = True
        elif action.endswith((" failed", " lost")):
            reports.failed_settlement = action.rsplit(" ", 1)[0]

    def _on_limit(self, event: MessageEvent) -> None:
        """The consumer's callback: the broker acted on a message held past its limit."""
        run = self.runs.get(event.task_id)
        if run is not None:
            run.limit_events.append(event)

    def _on_postrun(
        self, task_id: str | None = None, retval: Any = None, state: str | None = None, **_: Any
    ) -> None:
        reports = self._reporting(task_id)
        if reports is None:
            return
        if reports.dies_after_run is not None:
            # The body ran and the tracer stored its outcome: what the worker sends after it
            # (an acks_late ack, a reject) is lost with it.
            reports.dies_after_run.die(f"after running {task_id} (retry_worker.redeliver)")
            reports.died = True
        reports.state, reports.returned = state or "", retval
        if isinstance(retval, BaseException):
            reports.raised = retval

    def _on_prerun(
        self, task_id: str | None = None, args: Any = None, kwargs: Any = None, **_: Any
    ) -> None:
        reports = self._reporting(task_id)
        if reports is not None:
            reports.args, reports.kwargs = tuple(args or ()), dict(kwargs or {})
            # The body starts now: after an early ack, which may have waited for a hung broker.
            reports.attempt.started_at, reports.attempt.t = self.clock.now(), self.clock.elapsed

    def _on_failure(
        self, task_id: str | None = None, exception: BaseException | None = None, **_: Any
    ) -> None:
        # Also sent by Request.on_failure, after the tracer: what the task failed with when
        # its pool reported it (WorkerLostError for a lost process).
        reports = self._reporting(task_id)
        if reports is not None:
            reports.raised = exception

    def _receivers(self) -> list[tuple[Any, Any]]:
        return [
            (signals.task_prerun, self._on_prerun),
            (signals.task_postrun, self._on_postrun),
            (signals.task_failure, self._on_failure),
        ]

    def _connect_receivers(self) -> None:
        if not self._receiver_connected:
            for signal, receiver in self._receivers():
                signal.connect(receiver, weak=False, dispatch_uid=id(self))
            self._receiver_connected = True

    def _disconnect_receivers(self) -> None:
        if self._receiver_connected:
            for signal, receiver in self._receivers():
                signal.disconnect(receiver, dispatch_uid=id(self))
            self._receiver_connected = False

    @contextmanager
    def _running(self, app: Any) -> Iterator[None]:
        """Make ``app`` current (a worker runs as its app) and seed ``random`` for jitter."""
        self._connect_receivers()
        previous_app = getattr(_state._tls, "current_app", None)
        random_state = random.getstate()
        random.seed(self.settings.seed)
        app.set_current()
        self._pool.task_time.configure(app.conf)
        try:
            yield
        finally:
            _state._set_current_app(previous_app)
            random.setstate(random_state)

    @contextmanager
    def _serialization(self, app: Any, task: Any, serialize: bool | None) -> Iterator[None]:
        """With ``serialize=False`` the run's messages are pickled instead (the opt-out)."""
        if serialize is None:
            serialize = self.settings.serialize
        if serialize:
            yield
            return
        accept = list(app.conf.accept_content or ())
        if "pickle" not in accept and "application/x-python-serialize" not in accept:
            app.conf.accept_content = [*accept, "pickle"]
        had_own = "serializer" in vars(task)
        previous = vars(task).get("serializer")
        task.serializer = "pickle"
        task._exec_options = None  # Task caches its publish options, serializer included
        try:
            yield
        finally:
            if had_own:
                task.serializer = previous
            else:
                del task.serializer
            task._exec_options = None

    def _never_ran(self, app: Any, signature: Any, task_id: str) -> TaskRun:
        """The run of a canvas's task that never ran: what the result backend holds for it.

        Celery fails a chain's later tasks, or a chord's callback, in the result backend when
        a member fails for good; anything else (a lost member, no backend) is refused.
        """
        name = _final_signature(signature).task
        exc = stored_exception(app.AsyncResult(task_id))
        if exc is None:
            raise UsageError(
                f"apply({signature!r}): no task ran under the id it returns ({name}[{task_id}]) "
                "and the result backend holds no outcome for it. Publish the canvas with "
                ".delay() instead, run it with retry_worker.run_until_idle(), and read "
                "retry_worker.canvas(result) for every member's run"
            )
        return TaskRun(task_id, name, seed=self.settings.seed, stored_exception=exc)

    def _signature(
        self, task: Any, args: Any, kwargs: dict[str, Any] | None, options: dict[str, Any]
    ) -> Any:
        from celery.canvas import Signature, group

        if isinstance(task, Signature) and isinstance(_final_signature(task), group):
            what = "a group" if isinstance(task, group) else "a canvas that ends with a group"
            raise UsageError(
                f"apply({task!r}): {what} has no single run to return. Publish it with "
                ".delay() (request the flaky_broker fixture first), run its tasks with "
                "retry_worker.run_until_idle(), and read retry_worker.canvas(result)"
            )
        if isinstance(task, str):
            raise UsageError(
                f"apply({task!r}): pass the task object or a signature, "
                f"e.g. app.signature({task!r}), not its name"
            )
        if isinstance(task, Signature):
            signature = task.clone(args=tuple(args or ()), kwargs=kwargs or {}, **options)
            app = signature._app or signature.app
            if signature.task not in app.tasks:
                raise UsageError(
                    f"unregistered task {signature.task!r}: app {app.main!r} does not know it; "
                    "import the module that defines it or fix the name"
                )
            return signature
        if not hasattr(task, "signature") or not hasattr(task, "name"):
            raise UsageError(f"apply({task!r}): expected a Celery task or a signature")
        return task.signature(tuple(args or ()), kwargs or {}, **options)

    def _check_schedule(self, options: dict[str, Any]) -> None:
        """A first message scheduled in the past would run at once in Celery: say so instead."""
        countdown = options.get("countdown")
        if countdown is not None:
            self._check_seconds_ahead("countdown", countdown)
        if countdown is not None and countdown < 0:
            raise UsageError(
                f"countdown={countdown!r} is negative: Celery would run the task at once. "
                "Give 0 or more seconds"
            )
        expires = options.get("expires")
        if expires is not None and not isinstance(expires, datetime):
            if not is_number(expires):
                raise UsageError(
                    f"expires={expires!r}: give seconds from now (a number) or a datetime, "
                    "as Celery's apply_async takes"
                )
            self._check_seconds_ahead("expires", expires)
        eta = options.get("eta")
        if eta is None:
            return
        if not isinstance(eta, datetime):
            raise UsageError(f"eta={eta!r}: give a datetime, e.g. clock.now() + timedelta(...)")
        now = self.clock.now()
        when = eta if eta.tzinfo is not None else eta.replace(tzinfo=now.tzinfo)
        if when < now:
            raise UsageError(
                f"eta={eta.isoformat()} is {(now - when).total_seconds():g} s before the "
                f"virtual clock's now ({now.isoformat()}): Celery would run the task at once. "
                "Build etas from retry_worker.clock.now(), or use countdown="
            )

    def _check_seconds_ahead(self, option: str, seconds: Any) -> None:
        """Seconds from now that Celery turns into a datetime: finite, and within datetime."""
        if not is_finite_number(seconds):
            raise UsageError(
                f"{option}={seconds!r}: give a number of seconds, e.g. 10 (not NaN or infinity)"
            )
        left = self.clock.seconds_left()
        if seconds > left:
            raise UsageError(
                f"{option}={seconds!r} s lands after {LATEST:%Y-%m-%d}, the end of virtual time "
                f"(a datetime ends with the year 9999): give at most {left:.0f} s"
            )

    def _attempt_limit(
        self, request: Any, max_attempts: int | None, caller: str
    ) -> tuple[int, str]:
        """How many attempts of ``request``'s task id the worker runs, and which limit that is.

        A limit the caller passed applies to every task. Otherwise the endless-retry guard
        bounds only what Celery does not: every attempt of a task with ``max_retries=None``,
        and for a finite ``max_retries`` the deliveries past the attempts it allows (the
        message's ``retries`` shows what a per-call ``retry(max_retries=...)`` allowed).
        """
        max_retries = request.task.max_retries
        if max_attempts is not None:
            return max_attempts, (
                f"the limit max_attempts={max_attempts} passed to {caller}() (the task has "
                f"max_retries={max_retries!r})"
            )
        guard = self.settings.max_attempts
        if max_retries is None:
            return guard, (
                f"max_retries=None retries forever, and the endless-retry guard stops a task "
                f"after {guard} attempts"
            )
        retries = int(request.request_dict.get("retries") or 0)
        allowed = max(max_retries, retries) + 1
        return allowed + guard, (
            f"max_retries={max_retries} allows {allowed} attempt(s), the others were its "
            "message delivered again (requeued after a lost worker process, or an ack that "
            f"failed), and the endless-retry guard stops a task after {guard} attempts past "
            "those its max_retries allows"
        )

    def _endless_message(self, run: TaskRun, why: str) -> str:
        lines = run.timeline().splitlines()
        tail = (
            "\n".join([*lines[:2], "  ...", *lines[-_TIMELINE_TAIL:]])
            if len(lines) > _TIMELINE_TAIL + 3
            else "\n".join(lines)
        )
        last = run.last
        doing = "retrying" if last is not None and last.retry_published else "delivered again"
        return (
            f"{run.task_name}[{run.task_id}] was still {doing} after {len(run.attempts)} "
            f"attempts: {why}.{unlock_hint(run)}. If more attempts are intended, raise the limit: "
            "retry_worker.apply(..., max_attempts=N), --celery-retry-max-attempts=N or the ini "
            f"option celery_retry_max_attempts.\n{tail}"
        )


def _final_signature(signature: Any) -> Any:
    """The part of a canvas whose result ``apply_async`` returns: a chain's last task, a
    chord's callback (a group stays a group)."""
    from celery.canvas import _chain, chord

    while True:
        if isinstance(signature, _chain) and signature.tasks:
            signature = signature.tasks[-1]
        elif isinstance(signature, chord):
            signature = signature.body
        else:
            return signature


@dataclass
class _Crash:
    """Executions of a task that lose their process (crash_during), from a virtual time on."""

    active_from: float
    remaining: int


@dataclass
class _Reports:
    """What Celery's signals and the consumer reported while one attempt ran.

    Each report overwrites the last of its kind, in the order they came.
    """

    task_id: str
    # The attempt running, and which delivery of its message it is (1, 2, ...).
    attempt: Attempt
    delivery: int
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The tracer's final state (task_postrun), and what it returned or raised.
    state: str | None = None
    returned: Any = None
    # The last exception reported (task_postrun's, or task_failure's).
    raised: BaseException | None = None
    # From the consumer: the message was requeued, or its ack (reject, requeue) failed.
    requeued: bool = False
    failed_settlement: str | None = None
    # The consumer whose worker dies once the body ran (redeliver), and whether it did.
    dies_after_run: Consumer | None = None
    died: bool = False


def _task_name(call: str, task: Any) -> str:
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if not isinstance(name, str):
        raise UsageError(f"{call}({task!r}): pass a task, a signature or a task name")
    return name


def _close_whatever_the_broker_does(consumer: Consumer) -> None:
    # The worker stops whatever the broker does (a hang would make its close wait).
    with consumer.broker.suspend_faults():
        consumer.close()


def _drop_tracebacks(attempt: Attempt) -> None:
    """Free the frames an earlier attempt's exceptions hold: 10,000 retries stay flat in memory.

    Only the last attempt keeps its traceback, which is the one worth reading.
    """
    seen: set[int] = set()
    pending = [attempt.raised, attempt.exc]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        pending += [exc.__context__, exc.__cause__]


def _cause_of(exc: BaseException) -> BaseException:
    """For a Retry, the exception that made the task retry; otherwise the exception itself."""
    if isinstance(exc, Retry):
        if isinstance(exc.exc, BaseException):
            return exc.exc
        context: BaseException | None = exc.__context__
        if context is not None:
            return context
    return exc
