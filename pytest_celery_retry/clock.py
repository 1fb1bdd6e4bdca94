"""The virtual clock: freezegun's frozen time, moved forward instead of waited for.

Celery computes ETAs with ``app.now()`` and kombu measures its connect timeout with
``time.time()``; freezegun answers both. kombu waits between publish retries with
``time.sleep``, which freezegun leaves alone, so the clock also stands in for the
``sleep`` that kombu and Celery imported at module level.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import UsageError, is_finite_number

_REAL_SLEEP = time.sleep
# Only the libraries whose retry loops we drive: patching every module's ``sleep`` would also
# make user code and other plugins stop waiting, which is not ours to decide.
_SLEEP_PATCH_PREFIXES = ("kombu.", "celery.")
# The end of virtual time. datetime stops at the end of 9999, and Celery converts ETAs between
# time zones, which must not overflow either: a year's margin is plenty and easy to name.
LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)


class VirtualClock:
    """A frozen clock that only moves when the plugin (or the test) says so.

    ``elapsed`` is the number of virtual seconds since the clock started: every time the
    plugin records is expressed in it, so a timeline reads ``t=0, 3, 7`` whatever the date.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime.now(timezone.utc).replace(microsecond=0)
        elif start.tzinfo is None:
            start = start.replace(tzinfo=timezone.utc)
        self.started_at: datetime = start
        self._freezer: Any = None
        self._frozen: Any = None
        self._patched_sleeps: list[tuple[Any, str, Any]] = []
        self.slept: float = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> VirtualClock:
        if self._freezer is not None:
            return self
        from freezegun import freeze_time

        # pytest times its own phases: give it real time, or --durations reports nonsense.
        self._freezer = freeze_time(self.started_at, tick=False, ignore=["_pytest."])
        self._frozen = self._freezer.start()
        self._patch_library_sleeps()
        return self

    def stop(self) -> None:
        for module, name, original in reversed(self._patched_sleeps):
            setattr(module, name, original)
        self._patched_sleeps.clear()
        if self._freezer is not None:
            freezer, self._freezer, self._frozen = self._freezer, None, None
            freezer.stop()

    @property
    def running(self) -> bool:
        return self._freezer is not None

    def __enter__(self) -> VirtualClock:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- reading ---------------------------------------------------------------------------
    def now(self) -> datetime:
        """The current virtual time, timezone-aware (UTC)."""
        return self.started_at + timedelta(seconds=self.elapsed)

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock started."""
        if self._frozen is None:
            return 0.0
        current: datetime = self._frozen()
        return (current.replace(tzinfo=timezone.utc) - self.started_at).total_seconds()

    # -- moving ----------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds`` (instantly)."""
        if not is_finite_number(seconds):
            raise UsageError(
                f"advance({seconds!r}): give a finite number of virtual seconds, e.g. advance(10)"
            )
        if seconds < 0:
            raise UsageError(
                f"cannot move the virtual clock backwards by {seconds!r} s: "
                "virtual time only moves forward (pass a positive number of seconds)"
            )
        self._require_running()
        if not seconds:
            return
        left = self.seconds_left()
        if seconds > left:
            raise UsageError(
                f"advance({seconds!r}): the virtual clock stops at {LATEST:%Y-%m-%d}, "
                f"{left:.0f} s from now (a datetime ends with the year 9999)"
            )
        self._frozen.tick(timedelta(seconds=seconds))

    def seconds_left(self) -> float:
        """How far the clock can still move: up to :data:`LATEST`."""
        return (LATEST - self.now()).total_seconds()

    def advance_to(self, when: datetime) -> None:
        """Move virtual time forward to ``when``; a moment already past is a no-op."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        delta = (when - self.now()).total_seconds()
        if delta > 0:
            self.advance(delta)

    def sleep(self, seconds: float) -> None:
        """Stand-in for ``time.sleep`` inside kombu and Celery: time passes, nobody waits."""
        seconds = float(seconds)
        if seconds > 0:
            self.slept += seconds
            self.advance(seconds)

    def _require_running(self) -> None:
        if self._frozen is None:
            raise UsageError("the virtual clock is not running: use it inside the fixture's test")

    def _patch_library_sleeps(self) -> None:
        for name, module in list(sys.modules.items()):
            if module is None or not name.startswith(_SLEEP_PATCH_PREFIXES):
                continue
            if getattr(module, "sleep", None) is _REAL_SLEEP:
                self._patched_sleeps.append((module, "sleep", _REAL_SLEEP))
                module.sleep = self.sleep  # type: ignore[attr-defined]


@contextmanager
def running_clock(clock: VirtualClock) -> Iterator[VirtualClock]:
    """Start ``clock`` for the duration of the block, and stop it even when the block fails."""
    clock.start()
    try:
        yield clock
    finally:
        clock.stop()
