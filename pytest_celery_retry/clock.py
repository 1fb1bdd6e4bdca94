"""The virtual clock: freezegun's frozen time, moved forward instead of waited for.

Celery computes ETAs with ``app.now()`` and kombu measures its connect timeout with
``time.time()``; freezegun answers both. kombu waits between publish retries with
``time.sleep``, which freezegun leaves alone, so the clock also stands in for the
``sleep`` that kombu and Celery imported at module level. While the retry worker runs a task
body, ``time.sleep`` in the worker's thread moves the clock too (see ``sleeping_here``).
"""

from __future__ import annotations

import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import UsageError, is_finite_number

__all__ = ["LATEST", "Alarm", "VirtualClock", "local_utc_offset"]

_REAL_SLEEP = time.sleep
# Only the libraries whose retry loops we drive: patching every module's ``sleep`` would also
# make user code and other plugins stop waiting, which is not ours to decide.
_SLEEP_PATCH_PREFIXES = ("kombu.", "celery.")
# The end of virtual time. datetime stops at the end of 9999, and Celery converts ETAs between
# time zones, which must not overflow either: a year's margin is plenty and easy to name.
LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)
# Everyone else's ``time.sleep`` (and ``from time import sleep``) goes through a stand-in that
# sleeps for real unless its thread is running a task body; pytest's own modules are left alone,
# as freezegun leaves them their real time.
_SLEEP_IGNORE_PREFIXES = ("_pytest.", "pytest.")


@dataclass
class Alarm:
    """Something that happens at a virtual moment (``elapsed`` seconds) while a task sleeps.

    ``ring`` runs in the sleeping thread, the way a signal handler does, and may raise into it.
    """

    at: float
    ring: Callable[[], None]


@dataclass
class _SleepingThread:
    ident: int
    alarms: list[Alarm]


def local_utc_offset(when: datetime) -> timedelta:
    """The process's own UTC offset (``TZ``, DST included) at the moment ``when``."""
    # With an explicit timestamp, freezegun's localtime() answers with the real one.
    return timedelta(seconds=time.localtime(when.timestamp()).tm_gmtoff)


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
        self._naive_start = start.replace(tzinfo=None)
        self._patched_sleeps: list[tuple[Any, str, Any]] = []
        self._modules_at_start: frozenset[str] = frozenset()
        self._restore_now: Callable[[], None] | None = None
        self._local_offset = timedelta(0)
        self._offset_slot = 0
        self._sleeper: _SleepingThread | None = None
        self.slept: float = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> VirtualClock:
        if self._freezer is not None:
            return self
        from freezegun import api, config

        # freezegun's start() would look at every loaded module for time functions to patch;
        # _patch_modules does that from a cheaper cache, so freezegun's own pass looks at none
        # (every name starts with "").
        self._freezer = api.freeze_time(self.started_at, tick=False, ignore=[""])
        self._frozen = self._freezer.start()
        self._naive_start = self.started_at.astimezone(timezone.utc).replace(tzinfo=None)
        # pytest times its own phases: its modules keep their real time functions, or
        # --durations reports nonsense. freezegun's stop() skips these among the modules
        # imported while the clock ran, and restores the time functions of the others.
        skip = ("_pytest.", *config.settings.default_ignore_list)
        self._freezer.ignore = skip
        api.ignore_lists[-1] = _real_time_callers(skip)
        self._offset_slot = len(api.tz_offsets) - 1  # this freeze's entry in freezegun's stack
        self._follow_local_offset()
        # A freezer of the test's own that was running already has patched the modules.
        self._patch_modules(skip if len(api.freeze_factories) == 1 else None)
        return self

    def stop(self) -> None:
        self._unpatch_sleeps()
        self._sleeper = None
        if self._restore_now is not None:
            restore, self._restore_now = self._restore_now, None
            restore()
        self._local_offset = timedelta(0)
        if self._freezer is not None:
            freezer, self._freezer, self._frozen = self._freezer, None, None
            freezer.stop()

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
        # freezegun keeps naive UTC: subtracting a naive start spares an aware copy per read.
        current: datetime = self._frozen()
        return (current - self._naive_start).total_seconds()

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
        self._follow_local_offset()

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

    def _follow_local_offset(self) -> None:
        """Keep naive local time local: the process's UTC offset at the virtual moment.

        A naive ``datetime.now()`` is local time in production, and Celery reads a naive ETA
        as UTC: the tests must see the same. A DST change on the way moves it, as it would.
        """
        offset = local_utc_offset(self.now())
        if offset == self._local_offset:
            return
        from freezegun.api import tz_offsets

        tz_offsets[self._offset_slot] = self._local_offset = offset
        if self._restore_now is None:
            self._restore_now = _fix_aware_now()

    def sleep(self, seconds: float) -> None:
        """Stand-in for ``time.sleep`` inside kombu and Celery: time passes, nobody waits.

        In the thread of :meth:`sleeping_here`, an alarm that falls within the sleep stops the
        clock at its moment and rings there, as a signal interrupts a real ``sleep``.
        """
        seconds = float(seconds)
        sleeper = self._sleeper
        if sleeper is not None and sleeper.ident == threading.get_ident():
            wake_at = self.elapsed + max(seconds, 0.0)
            while sleeper.alarms and sleeper.alarms[0].at <= wake_at:
                alarm = sleeper.alarms.pop(0)
                self._pass(alarm.at - self.elapsed)
                alarm.ring()
            seconds = wake_at - self.elapsed
        self._pass(seconds)

    def _pass(self, seconds: float) -> None:
        if seconds > 0:
            self.slept += seconds
            self.advance(seconds)

    @contextmanager
    def sleeping_here(self, alarms: Sequence[Alarm] = ()) -> Iterator[None]:
        """While the block runs, ``time.sleep`` in this thread moves the clock instead of waiting.

        Other threads keep sleeping for real. ``alarms`` ring when a sleep reaches them.
        """
        self._require_running()
        outer = self._sleeper
        self._sleeper = _SleepingThread(
            threading.get_ident(), sorted(alarms, key=lambda alarm: alarm.at)
        )
        try:
            yield
        finally:
            self._sleeper = outer

    def _thread_sleep(self, seconds: float) -> None:
        """``time.sleep`` while the clock runs: virtual only in the thread of ``sleeping_here``,
        and in the kombu and Celery modules imported since the clock started."""
        sleeper = self._sleeper
        if sleeper is not None and sleeper.ident == threading.get_ident():
            if seconds < 0:
                raise ValueError("sleep length must be non-negative")  # as time.sleep's own
            self.sleep(seconds)
        elif self._imported_meanwhile(sys._getframe(1).f_globals):
            self.sleep(seconds)
        else:
            _REAL_SLEEP(seconds)

    def _imported_meanwhile(self, caller: dict[str, Any]) -> bool:
        """Whether the caller is a kombu or Celery module that took this stand-in as its own
        ``sleep`` (``from time import sleep`` while the clock ran): the same module loaded
        before the clock started has the virtual ``sleep`` (``_patch_modules``), and the first
        test of a process, which imports them lazily, must wait no more than the others."""
        own = caller.get("sleep")
        return getattr(own, "__self__", None) is self and str(
            caller.get("__name__", "")
        ).startswith(_SLEEP_PATCH_PREFIXES)

    def _require_running(self) -> None:
        if self._frozen is None:
            raise UsageError("the virtual clock is not running: use it inside the fixture's test")

    def _patch_modules(self, skip: tuple[str, ...] | None) -> None:
        """freezegun's pass over the loaded modules and the sleeps' pass, in one.

        Each module's real time functions (``from time import time``) become freezegun's
        fakes, as its start() would make them (modules starting with ``skip`` excepted; none
        without ``skip``), and go on its list of changes, which its stop() undoes. Each
        module's ``sleep`` becomes a stand-in; a module imported later with ``from time import
        sleep`` takes the patched time.sleep, and gets the real one back at stop().
        """
        from freezegun import api

        freezer = self._freezer
        fakes: dict[int, Any] = {}
        if skip is not None:
            # freezegun's own pairs: its start() maps each fake to the real object it replaces.
            for fake in (getattr(api, name) for name in freezer.fake_names):
                fakes[id(freezer.reals[id(fake)])] = fake
        seen = _seen_modules.get(skip)
        if seen is None:  # freezegun's ignore list changed: look at every module again
            _seen_modules.clear()
            _last_pass.clear()
            seen = _seen_modules[skip] = {}
        last = _last_pass.get(skip)
        found = last.repeat(skip, seen, freezer.reals) if last is not None else None
        if found is None:
            found = _look_over(skip, seen, freezer.reals)
            _last_pass[skip] = _Pass.after(seen)
        time_functions, sleepers, self._modules_at_start = found
        undo = freezer.undo_changes
        for module, attribute, value in time_functions:
            fake = fakes.get(id(value))
            if fake is not None:
                setattr(module, attribute, fake)
                undo.append((module, attribute, value))
        sleeps: list[tuple[Any, Any]] = [(time, self._thread_sleep)]
        for module, virtual in sleepers:
            if _own_attribute(module, "sleep") is _REAL_SLEEP:
                sleeps.append((module, self.sleep if virtual else self._thread_sleep))
        for module, stand_in in sleeps:
            self._patched_sleeps.append((module, "sleep", _REAL_SLEEP))
            module.sleep = stand_in

    def _unpatch_sleeps(self) -> None:
        for module, name, original in reversed(self._patched_sleeps):
            setattr(module, name, original)
        if not self._patched_sleeps:
            return
        self._patched_sleeps.clear()
        # Modules imported while the clock ran took the stand-in from time.sleep (as freezegun,
        # only those are looked at: the others were patched, and restored, above).
        for name in set(sys.modules) - self._modules_at_start:
            module = sys.modules.get(name)
            if getattr(_own_attribute(module, "sleep"), "__self__", None) is self:
                setattr(module, "sleep", _REAL_SLEEP)  # noqa: B010 (a module, typed as one)
        self._modules_at_start = frozenset()


# What a pass over the loaded modules found: each module's real time functions (module,
# attribute, value), the modules with a ``sleep`` of their own for a stand-in (True: kombu's
# and Celery's, which always move the clock), and the names of the modules it went over.
_Found = tuple[list[tuple[Any, str, Any]], list[tuple[Any, bool]], frozenset[str]]


def _look_over(
    skip: tuple[str, ...] | None, seen: dict[int, _SeenModule], reals: dict[int, Any]
) -> _Found:
    """A pass over every loaded module, each looked at again unless its namespace kept its
    shape since the last look."""
    time_functions: list[tuple[Any, str, Any]] = []
    sleepers: list[tuple[Any, bool]] = []
    for name, module in _every_module():
        namespace: Any = getattr(module, "__dict__", None)
        known = seen.get(id(module))
        if known is None or not known.holds_for(module, namespace):
            known = _look_at(name, module, namespace, skip, seen, reals)
        time_functions += [(module, attribute, value) for attribute, value in known.time_functions]
        if known.sleeps is not None:
            sleepers.append((module, known.sleeps))
    return time_functions, sleepers, frozenset(sys.modules)


def _shapes(namespaces: list[dict[str, Any]]) -> tuple[list[int], list[Any]]:
    """Each namespace's size and last name, in C (no loop of Python's). An empty namespace
    ends the list of names early: a shape that never matches."""
    return list(map(len, namespaces)), list(map(next, map(reversed, namespaces)))


class _Pass:
    """The outcome of the last :func:`_look_over`, repeated without looking at each module
    while every loaded module is the same object under the same name, in the same order, and
    each namespace has the same size and last name: what ``_look_over`` checks module by
    module, checked here for all of them at once. What stands in ``sys.modules`` without
    being a module (``typing.io`` is a class) is looked at every time.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.name_set: frozenset[str] = frozenset()
        self.ids: list[int] = []
        # The modules' namespaces (a module's ``__dict__`` cannot be replaced), held only
        # while every module lives: they are dropped as soon as one is freed.
        self.namespaces: list[dict[str, Any]] = []
        self.sizes: list[int] = []
        self.lasts: list[Any] = []
        # By position in sys.modules.
        self.time_functions: list[tuple[int, str, Any]] = []
        self.sleepers: list[tuple[int, bool]] = []
        self.looked_at_every_time: list[int] = []
        self._refs: list[weakref.ref[Any]] = []

    @classmethod
    def after(cls, seen: dict[int, _SeenModule]) -> _Pass | None:
        """The pass ``_look_over`` just made, if every module's entry in ``seen`` still holds
        (a lazy import during the pass may have added a name to a package looked at before)."""
        done = cls()
        done.names = list(sys.modules)
        modules = list(sys.modules.values())
        done.name_set = frozenset(done.names)
        done.ids = list(map(id, modules))
        for position, module in enumerate(modules):
            if not isinstance(module, types.ModuleType):
                done.looked_at_every_time.append(position)
                continue
            namespace = module.__dict__
            known = seen.get(id(module))
            if known is None or not known.holds_for(module, namespace):
                return None
            done.namespaces.append(namespace)
            done.time_functions += [(position, *pair) for pair in known.time_functions]
            if known.sleeps is not None:
                done.sleepers.append((position, known.sleeps))
        done.sizes, done.lasts = _shapes(done.namespaces)
        if len(done.lasts) != len(done.namespaces):
            return None
        try:
            done._refs = [
                weakref.ref(module, done._invalidate) for module in modules if module is not None
            ]
        except TypeError:  # an object that cannot be watched: looked over every time
            return None
        return done

    def _invalidate(self, _: object) -> None:
        # A freed module could leave its id to another, and its namespace is not ours to keep.
        self.ids, self.namespaces = [], []

    def repeat(
        self, skip: tuple[str, ...] | None, seen: dict[int, _SeenModule], reals: dict[int, Any]
    ) -> _Found | None:
        """The same outcome, if nothing changed since (None: look over every module)."""
        modules = list(sys.modules.values())
        if list(map(id, modules)) != self.ids or list(sys.modules) != self.names:
            return None
        time_functions = [
            (modules[position], attribute, value)
            for position, attribute, value in self.time_functions
        ]
        sleepers = [(modules[position], virtual) for position, virtual in self.sleepers]
        for position in self.looked_at_every_time:
            module = modules[position]
            known = _look_at(
                self.names[position], module, getattr(module, "__dict__", None), skip, seen, reals
            )
            time_functions += [(module, *pair) for pair in known.time_functions]
            if known.sleeps is not None:
                sleepers.append((module, known.sleeps))
        # Looking may import (a lazy attribute): then the modules are not the same any more.
        if len(sys.modules) != len(self.names) or _shapes(self.namespaces) != (
            self.sizes,
            self.lasts,
        ):
            return None
        return time_functions, sleepers, self.name_set


def _every_module() -> Iterator[tuple[str, Any]]:
    """Every loaded module, those imported while the pass looks at the others included:
    reading a lazy module's attributes (``kombu``'s, freezegun's scan does) imports more,
    ``kombu.utils.functional`` among them, whose ``from time import sleep`` then took the real
    one, and the first test of a process slept for real in kombu's retry loop."""
    seen: set[str] = set()
    while True:
        new = [(name, module) for name, module in list(sys.modules.items()) if name not in seen]
        if not new:
            return
        seen.update(name for name, _ in new)
        yield from new


def _own_attribute(module: Any, name: str) -> Any:
    """``module.name`` if the module itself holds it (None otherwise).

    Reading the namespace spares the AttributeError that ``getattr`` raises and catches for
    each of the hundreds of modules without one, and never runs a lazy module's ``__getattr__``.
    """
    namespace = getattr(module, "__dict__", None)
    if isinstance(namespace, dict):
        return namespace.get(name)
    return getattr(module, name, None)


@dataclass(frozen=True)
class _SeenModule:
    """What the clock found in a module, and the namespace's shape when it looked."""

    module: Callable[[], Any]  # a weak reference
    size: int
    last: Any
    # freezegun's list of its attributes that are time functions (empty where freezegun
    # leaves the module alone).
    time_functions: list[tuple[str, Any]]
    # Whether it has a ``sleep`` of its own for a stand-in: None if not (or left alone), True
    # for kombu's and Celery's (which always move the clock), False for the others.
    sleeps: bool | None

    def holds_for(self, module: Any, namespace: Any) -> bool:
        """Whether this is still what the module holds: the same module, its namespace
        neither grown nor shrunk and still ending with the same name, so the same names as
        when it was looked at (import and assignment add names at the end)."""
        return (
            self.module() is module
            and self.size == len(namespace)
            and self.last == next(reversed(namespace), None)
        )


# By freezegun's ignore list, then by module identity (freezegun's own cache goes by
# ``__name__``, which ``io`` and ``_io``, ``collections.abc`` and ``_collections_abc`` share).
_seen_modules: dict[tuple[str, ...] | None, dict[int, _SeenModule]] = {}
# The last pass over the modules, by freezegun's ignore list (cleared with _seen_modules).
_last_pass: dict[tuple[str, ...] | None, _Pass | None] = {}


def _look_at(
    name: str,
    module: Any,
    namespace: Any,
    skip: tuple[str, ...] | None,
    seen: dict[int, _SeenModule],
    reals: dict[int, Any],
) -> _SeenModule:
    """Look at a module the clock has not seen with this namespace, and remember it.

    The time functions are freezegun's answer, asked the way its start() asks (and with its
    checks of which modules to leave alone); freezegun checks its own cache of the answer with
    ``dir()`` of the module and a hash of all its names, about 3 ms per test for the 500
    modules loaded with Celery, so it is asked only here. That also keeps its cache up to date
    for a ``freeze_time`` of the test's own.
    """
    from freezegun import api

    time_functions: list[tuple[str, Any]] = []
    if (
        module is not None
        and skip is not None
        and not name.startswith(skip)
        and not name.endswith(".six.moves")
        and name != api.__name__
        and getattr(module, "__name__", None) not in (None, "datetime", "time")
    ):
        with warnings.catch_warnings():  # as freezegun lists them: some attributes warn
            warnings.simplefilter("ignore")
            time_functions = api._get_cached_module_attributes(module)
        # A module imported while the clock ran (``from time import monotonic`` in a lazy
        # import) holds freezegun's fakes, which its stop() turns back into the real functions
        # without changing the namespace's shape: remembered as the real ones, the module is
        # patched at the next start, as it would be had it been imported before.
        if isinstance(namespace, dict):
            time_functions = time_functions + [
                (attribute, reals[id(value)])
                for attribute, value in list(namespace.items())
                if id(value) in reals
            ]
    sleeps = None
    if not (
        module is None
        or module is time
        or name.startswith(_SLEEP_IGNORE_PREFIXES)
        or _own_attribute(module, "sleep") is None
    ):
        sleeps = name.startswith(_SLEEP_PATCH_PREFIXES)
    if not isinstance(namespace, dict):  # no namespace to compare: looked at every time
        return _SeenModule(lambda: None, -1, None, time_functions, sleeps)
    known = _SeenModule(
        weakref.ref(module), len(namespace), next(reversed(namespace), None), time_functions, sleeps
    )
    seen[id(module)] = known
    return known


# pytest's modules that call the test's own code: test functions, fixtures and their
# finalizers, unittest methods.
_CALLERS_OF_TEST_CODE = frozenset(
    ("_pytest.python", "_pytest.fixtures", "_pytest.runner", "_pytest.unittest")
)
_callers_cache: dict[tuple[tuple[str, ...], int], tuple[str, ...]] = {}


def _real_time_callers(skip: tuple[str, ...]) -> tuple[str, ...]:
    """The modules whose calls freezegun answers with real time: pytest's own, not the test's.

    freezegun gives real time to any call made within five frames of an ignored module, and
    pytest's frames sit right under the test function: with ``_pytest.`` there, ``time.time()``
    in a test or a fixture would be real. So every loaded pytest module is named except those
    that call the test's code, beside freezegun's other defaults (``threading``, ``queue``,
    ...). Remembered while the number of loaded modules stays the same.
    """
    key = (skip, len(sys.modules))
    callers = _callers_cache.get(key)
    if callers is None:
        _callers_cache.clear()
        callers = _callers_cache[key] = tuple(
            prefix for prefix in skip if not prefix.startswith("_pytest.")
        ) + tuple(
            name
            for name in sys.modules
            if name.startswith("_pytest.") and name not in _CALLERS_OF_TEST_CODE
        )
    return callers


def _fix_aware_now() -> Callable[[], None]:
    """Make freezegun's aware ``datetime.now(tz)`` ignore ``tz_offset``; returns the undo.

    freezegun adds ``tz_offset`` to aware times too (spulec/freezegun#348), which would move
    Celery's ``app.now()`` (``datetime.now(timezone.utc)``) by the local offset. Only the naive
    ``now()`` is local time.
    """
    from freezegun.api import FakeDatetime, datetime_to_fakedatetime

    original = FakeDatetime.__dict__["now"]
    naive_now = original.__func__

    def now(cls: Any, tz: Any = None) -> Any:
        if tz is None:
            return naive_now(cls)
        utc = cls.utcnow()
        return datetime_to_fakedatetime(tz.fromutc(utc.replace(tzinfo=tz)))

    FakeDatetime.now = classmethod(now)  # type: ignore[assignment,method-assign]

    def restore() -> None:
        FakeDatetime.now = original  # type: ignore[method-assign]

    return restore
