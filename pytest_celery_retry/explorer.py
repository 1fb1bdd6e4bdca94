"""The fault explorer: a fresh, isolated worker and broker for each example of a property.

Hypothesis runs a ``@given`` test's body many times within one pytest test, so the
function-scoped fixtures (``retry_worker``, ``flaky_broker``) would carry one example's clock,
faults and records into the next. ``fault_explorer.example(schedule)`` instead starts a
session of its own for each example, exactly as the fixtures do for a test (the same
``RetrySession``: virtual clock, in-memory broker, every app's settings snapshotted and
restored), applies the schedule, and undoes it all when the example ends, however it ends.

Hypothesis is not imported here: when a Hypothesis test is running, each example's schedule
is noted (``hypothesis.note``) so that the falsifying example's report shows it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from .app_state import app_from_spec
from .errors import UsageError
from .faults import FaultSchedule
from .session import RetrySession, Settings

if TYPE_CHECKING:
    from .broker import InMemoryBroker
    from .worker import RetryWorker

__all__ = ["Example", "FaultExplorer"]


class Example(NamedTuple):
    """One example's worker and broker: ``with explorer.example(s) as (worker, broker):``."""

    worker: RetryWorker
    broker: InMemoryBroker


class FaultExplorer:
    """Gives each example of a property a fresh session (the ``fault_explorer`` fixture)."""

    def __init__(self, settings: Settings, app_spec: str = "") -> None:
        self.settings = settings
        self._app_spec = app_spec
        # How many examples ran, for a benchmark or a test of the search itself.
        self.examples = 0

    def app(self) -> Any:
        """The app examples install on by default: ini ``celery_retry_app``, else Celery's
        current app."""
        if self._app_spec:
            return app_from_spec(self._app_spec)
        from celery import current_app

        return current_app._get_current_object()

    @contextmanager
    def example(
        self,
        schedule: FaultSchedule | None = None,
        *,
        app: Any = None,
        flavor: str | None = None,
    ) -> Iterator[Example]:
        """A fresh worker and in-memory broker on ``app``, with ``schedule``'s faults from
        ``t=0``; everything is undone when the block ends."""
        from .worker import RetryWorker

        if schedule is not None and not isinstance(schedule, FaultSchedule):
            raise UsageError(
                f"example({schedule!r}): pass a FaultSchedule, e.g. one drawn from "
                "pytest_celery_retry.strategies.fault_schedules()"
            )
        # A copy, as for a test: an example may change its own settings.
        session = RetrySession(settings=dataclasses.replace(self.settings)).start()
        worker: RetryWorker | None = None
        try:
            installed = session.installation(self.app() if app is None else app, flavor=flavor)
            worker = RetryWorker(session)
            if schedule is not None:
                schedule.apply(installed.broker, worker)
            _tell_hypothesis(schedule, session.settings.seed)
            self.examples += 1
            yield Example(worker, installed.broker)
        finally:
            try:
                if worker is not None:
                    worker.close()
            finally:
                session.close()


def _tell_hypothesis(schedule: FaultSchedule | None, seed: int) -> None:
    """Note the schedule for the report of a failing example, if Hypothesis is running one."""
    if "hypothesis" not in sys.modules:  # never imported for a test that does not use it
        return
    from hypothesis import event, note
    from hypothesis.errors import InvalidArgument

    schedule = schedule if schedule is not None else FaultSchedule()
    try:
        note(f"{schedule.describe()}\n(celery-retry seed {seed}: --celery-retry-seed={seed})")
    except InvalidArgument:  # not inside a Hypothesis test (the explorer also works outside)
        return
    for kind in sorted({type(fault).__name__ for fault in schedule}) or ["no faults"]:
        event(f"schedule with {kind}")
