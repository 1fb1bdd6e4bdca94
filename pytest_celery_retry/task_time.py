"""A task body's time on the virtual clock: its sleeps, and the prefork pool's time limits.

Celery hands the pool each job's limits (``soft_timeout``, ``timeout``: the message's, else the
task's); the prefork pool falls back to the worker's ``task_soft_time_limit`` and
``task_time_limit`` and enforces them from the parent process, counting from the moment a
child accepted the job (billiard's ``TimeoutHandler``, Celery's ``AsynPool``). Measured on a
real prefork worker (Celery 5.7, billiard 4.3, soft limit 0.5 s, hard limit 1 s):

- soft limit: the pool calls ``Request.on_timeout(soft=True)`` (a warning in the log) and sends
  SIGUSR1 to the child, whose handler raises ``SoftTimeLimitExceeded()`` wherever the task is
  (here: inside its ``time.sleep``, 0.50 s after it started);
- hard limit, not before the soft one: the pool fails the job with ``TimeLimitExceeded(1)``
  through ``Request.on_failure``, then calls ``Request.on_timeout(soft=False)``, then
  terminates the child: billiard's SIGTERM handler raises ``SystemExit(-241)`` in the task,
  whose ``finally`` blocks run and whose tracer still sends ``task_postrun`` (state ``None``).

Here the child is the worker's own thread, and the limits ring from its virtual sleep, in
that order, through the same Celery callbacks. A task that never sleeps is never interrupted.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from .clock import Alarm, VirtualClock

__all__ = ["ChildTerminated", "TaskTime"]

# billiard's child handler for SIGTERM exits with -(256 - signum).
_TERMINATED_EXIT = -(256 - signal.SIGTERM)


class ChildTerminated(SystemExit):
    """What a child killed for its hard time limit raises in its task: ``SystemExit(-241)``."""


class TaskTime:
    """The pool's side: runs one job with its sleeps virtual and its time limits armed."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        # The worker's own limits, which the pool applies when the job has none.
        self.default_soft: float | None = None
        self.default_hard: float | None = None
        self._soft_exceeded: float | None = None
        self._hard_exceeded: TimeLimitExceeded | None = None

    def configure(self, conf: Any) -> None:
        """Take the worker-wide limits from the app's settings, as a worker does at start."""
        self.default_soft = conf.task_soft_time_limit
        self.default_hard = conf.task_time_limit

    def take(self) -> tuple[float | None, TimeLimitExceeded | None]:
        """The soft limit the last job exceeded and the hard limit it was killed for, if any."""
        taken = self._soft_exceeded, self._hard_exceeded
        self._soft_exceeded = self._hard_exceeded = None
        return taken

    @contextmanager
    def running(self, options: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Run a job: yields the options to give ``apply_target`` in place of ``options``."""
        soft = options.get("soft_timeout") or self.default_soft
        hard = options.get("timeout") or self.default_hard
        on_timeout: Callable[..., None] = options["timeout_callback"]
        started = self.clock.elapsed
        alarms = []
        if soft:

            def soft_limit() -> None:
                self._soft_exceeded = soft
                on_timeout(soft=True, timeout=soft)
                raise SoftTimeLimitExceeded()

            alarms.append(Alarm(started + soft, soft_limit))
        if hard:

            def hard_limit() -> None:
                self._hard_exceeded = exceeded = TimeLimitExceeded(hard)
                try:
                    raise exceeded
                except TimeLimitExceeded:
                    options["error_callback"](ExceptionInfo())
                on_timeout(soft=False, timeout=hard)
                raise ChildTerminated(_TERMINATED_EXIT)

            # The prefork pool starts the hard timer when the soft one fires.
            alarms.append(Alarm(started + max(hard, soft or 0), hard_limit))
        callback: Callable[[Any], None] = options["callback"]

        def on_result(result: Any) -> None:
            # A killed child's result never reaches the pool, even if its task swallowed
            # the SystemExit and returned.
            if self._hard_exceeded is None:
                callback(result)

        with self.clock.sleeping_here(alarms):
            try:
                yield {**options, "callback": on_result, "propagate": (ChildTerminated,)}
            except ChildTerminated:
                if self._hard_exceeded is None:
                    raise
