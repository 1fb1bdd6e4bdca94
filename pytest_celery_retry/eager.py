"""The eager switch: an existing eager suite's tasks run on the retry worker instead.

With ``--celery-retry-eager`` (ini ``celery_retry_eager = true``) Celery's ``Task.apply``, which
``apply_async``/``delay`` call when ``task_always_eager`` is set, hands the task to a
:class:`RetryWorker` on its own session (virtual clock, in-memory broker) for the length of
the call, and returns Celery's own ``EagerResult`` built from what the worker saw. The
findings (what eager mode would have hidden) go into the test's report and the terminal
summary. Loaded only when the switch is on: it imports Celery.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import traceback
from collections import Counter
from datetime import datetime
from typing import Any, cast

import pytest
from celery.app.task import Task
from celery.result import EagerResult

from .errors import is_number
from .records import TaskRun
from .session import RetrySession, Settings, session_running

__all__ = ["REPORT_KEY", "EagerSwitch"]

# The user property a test's report carries the findings in (xdist sends it to the controller).
REPORT_KEY = "celery-retry-eager"
# Celery's eager mode runs each retry inside the previous one: Task.apply calls the retry's
# Signature.apply, which calls Task.apply. Two frames a retry (measured: RecursionError from
# 492 retries at the default limit of 1000, from a shallow stack).
_FRAMES_PER_EAGER_RETRY = 2


class EagerSwitch:
    """The pytest plugin object registered when the switch is on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._original_apply = Task.apply
        # What eager mode would have hidden, since the last report was made.
        self._pending: list[str] = []
        self._reported: dict[str, list[str]] = {}

    def install(self) -> None:
        switch = self

        # Celery's name, signature and docstring: a test may autospec-mock Task.apply.
        @functools.wraps(self._original_apply)
        def apply(task: Any, *args: Any, **kwargs: Any) -> Any:
            if session_running():
                # Inside a task the worker runs (its session is active), or in a test with
                # its own retry_worker or flaky_broker: Task.apply does what Celery does.
                return switch._original_apply(task, *args, **kwargs)
            return switch.apply(task, *args, **kwargs)

        Task.apply = apply

    def uninstall(self) -> None:
        Task.apply = self._original_apply

    def apply(
        self,
        task: Any,
        args: Any = None,
        kwargs: dict[str, Any] | None = None,
        link: Any = None,
        link_error: Any = None,
        task_id: str | None = None,
        retries: int | None = None,
        throw: bool | None = None,
        logfile: Any = None,
        loglevel: Any = None,
        headers: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """``Task.apply`` with Celery's parameters, run by the retry worker.

        ``logfile`` and ``loglevel`` fill eager mode's request; a worker's request has none.
        """
        from .worker import RetryWorker

        app = task._get_app()
        propagates = bool(app.conf.task_eager_propagates)
        if throw is None:
            throw = propagates
        given = {
            "link": link,
            "link_error": link_error,
            "task_id": task_id,
            "retries": retries,
            "headers": headers,
        }
        options.update({key: value for key, value in given.items() if value is not None})
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        session = RetrySession(settings=dataclasses.replace(self.settings)).start()
        _drop_passed_schedule(options, session.clock.now())
        worker = RetryWorker(session)
        # While the session runs, the app is no eager app (RetrySession.installation): a retry
        # or a nested delay() is published, as in production. Closing it restores the setting.
        try:
            run = worker.apply(task, args, kwargs, **options)
            # A task it sent (a nested delay()) runs now, as eager mode ran it before the call
            # returned; a real worker runs it after the sender, as here.
            others = worker.run_until_idle(app)
            self._note(run, others, args, kwargs, (throw, propagates))
        finally:
            try:
                worker.close()
            finally:
                session.close()
        return _eager_result(run, throw)

    def _note(
        self,
        run: TaskRun,
        others: dict[str, TaskRun],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        throws: tuple[bool, bool],
    ) -> None:
        findings = []
        first = run.attempts[0] if run.attempts else None
        if first is not None and (first.args, first.kwargs) != (args, kwargs):
            findings.append(
                f"{run.task_name}: the serializer delivered args={args!r} kwargs={kwargs!r} "
                f"as args={first.args!r} kwargs={first.kwargs!r} (Task.apply() passes them "
                "unserialized)"
            )
        # The clock started with the call: the first attempt's start is its countdown or eta.
        delay = round(first.t, 3) if first is not None else 0
        if delay:
            findings.append(
                f"{run.task_name}: ran {delay:g} s after it was sent (eager mode ignores "
                "countdown and eta and runs it at once)"
            )
        findings += _run_findings(run, throws, _stack_depth())
        for other in others.values():
            if other.task_id == run.task_id:
                continue
            findings.append(
                f"{other.task_name}: sent while {run.task_name} ran, executed after it "
                "returned (eager mode runs it inside the sender, before the sender returns)"
            )
            # Eager mode applies a nested task with throw left out: task_eager_propagates.
            findings += _run_findings(other, (throws[1], throws[1]), depth=0)
        self._pending += findings

    # -- hooks -------------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if self._pending:
            # The item's list, which every phase's report shares: the teardown's has them all.
            item.user_properties.append((REPORT_KEY, self._pending))
            self._pending = []
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        for key, findings in report.user_properties:
            if key == REPORT_KEY:
                self._reported.setdefault(report.nodeid, []).extend(cast(list[str], findings))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self._reported:
            return
        terminalreporter.section("celery-retry: what eager mode would have hidden")
        for nodeid, findings in self._reported.items():
            terminalreporter.write_line(nodeid)
            # A test that calls a task in a loop gets one line per finding, with its count.
            for finding, count in Counter(findings).items():
                terminalreporter.write_line(f"  {finding}" + (f" [x{count}]" if count > 1 else ""))

    def pytest_unconfigure(self) -> None:
        self.uninstall()


def _run_findings(run: TaskRun, throws: tuple[bool, bool], depth: int) -> list[str]:
    """What eager mode does differently with one run the worker made.

    ``throws``: whether eager mode would propagate the first attempt's exceptions (the
    call's ``throw``) and those of the retries, which Celery applies with ``throw`` left out,
    so ``task_eager_propagates`` decides.
    """
    findings = []
    if run.retries:
        countdowns = ", ".join(f"{countdown:g}" for countdown in run.countdowns)
        times = "time" if run.retries == 1 else "times"
        finding = f"{run.task_name}: retried {run.retries} {times} with countdowns {countdowns} s"
        first_throws, retries_throw = throws
        if first_throws or (retries_throw and run.retries > 1):
            which = "first" if first_throws else "second"
            finding += (
                f" (eager mode raises Retry at the {which} retry instead: "
                f"{'throw=True' if first_throws else 'task_eager_propagates'})"
            )
        else:
            nesting = run.retries * _FRAMES_PER_EAGER_RETRY
            finding += f" (eager mode ignores countdowns; recursion depth {run.retries}"
            if depth + nesting >= sys.getrecursionlimit():
                finding += f": RecursionError at Python's limit of {sys.getrecursionlimit()}"
            finding += ")"
        findings.append(finding)
    findings += [
        f"{run.task_name}: attempt {attempt.number}: {attempt.note} (a worker's doing; eager "
        "mode has no worker)"
        for attempt in run.attempts
        if attempt.note
    ]
    return findings


def _drop_passed_schedule(options: dict[str, Any], now: datetime) -> None:
    """A countdown or eta already passed: Celery runs the task at once, and so does the worker
    without them. (Its ``apply()`` refuses them, as a test's mistake; in an eager suite, where
    every countdown ran at once, they are no mistake.)"""
    countdown = options.get("countdown")
    if is_number(countdown) and cast(float, countdown) < 0:
        del options["countdown"]
    eta = options.get("eta")
    if isinstance(eta, datetime):
        if eta.tzinfo is None:  # as the worker reads it
            eta = eta.replace(tzinfo=now.tzinfo)
        if eta < now:
            del options["eta"]


def _stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    return depth


def _eager_result(run: TaskRun, throw: bool) -> Any:
    """Celery's ``EagerResult`` of the run, raising what eager mode raises with ``throw``."""
    last = run.last
    state = last.state if last is not None else run.state
    if state == "SUCCESS":
        return EagerResult(run.task_id, run.result, state, name=run.task_name)
    exc = last.raised if last is not None else None
    if throw and exc is not None:
        raise exc
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc else None
    return EagerResult(run.task_id, exc, state, traceback=trace, name=run.task_name)
