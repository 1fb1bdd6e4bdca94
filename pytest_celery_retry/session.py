"""One test's worth of plugin state: the virtual clock, the seed, and the apps it changed.

The fixtures share a session so that the broker's sleeps and the worker's countdowns move
one clock, and so that everything installed on an app is undone in one place when the test
ends, whether it passed or failed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .app_state import (
    AppPatch,
    check_message_protocol,
    check_retry_policy,
    hook_celery,
    real_broker_apps,
)
from .clock import VirtualClock

if TYPE_CHECKING:
    from .broker import InMemoryBroker, PublishAnnouncements

__all__ = [
    "MEMORY_RESULT_BACKEND",
    "AppInstallation",
    "RetrySession",
    "Settings",
    "session_running",
]

MEMORY_RESULT_BACKEND = "cache+memory://"


@dataclass
class Settings:
    """The knobs a test suite sets through options, ini values or fixture overrides."""

    seed: int = 1234
    max_attempts: int = 1000
    serialize: bool = True
    result_backend: str | None = MEMORY_RESULT_BACKEND
    # Task.apply (what task_always_eager runs) goes to the retry worker (eager.py).
    eager: bool = False


@dataclass
class AppInstallation:
    """What the plugin installed on one Celery app for the current test."""

    app: Any
    patch: AppPatch
    broker: InMemoryBroker


@dataclass
class RetrySession:
    """One test's plugin state. While it runs, no Celery app in the process leaves it: an app
    that connects to its broker or uses its result backend gets the in-memory ones first
    (apps a test pointed at a real broker through ``broker_proxy`` excepted).
    """

    settings: Settings = field(default_factory=Settings)
    clock: VirtualClock = field(default_factory=VirtualClock)
    installations: dict[int, AppInstallation] = field(default_factory=dict)
    # Every app's settings as the test found them, restored at close where they changed.
    _patches: dict[int, AppPatch] = field(default_factory=dict)
    # Which task the brokers' producer operations are for, from Celery's before_task_publish
    # (connected with the first installation).
    _announcements: PublishAnnouncements | None = None

    def start(self) -> RetrySession:
        try:
            self.clock.start()
            from celery import _state

            for app in list(_state._apps):
                self._patches[id(app)] = AppPatch(app)
            _activate(self)
        except BaseException:
            self.close()
            raise
        return self

    def installation(self, app: Any, flavor: str | None = None) -> AppInstallation:
        """Install the in-memory broker (and result backend) on ``app``, once per test.

        The app's publish retry policy and message protocol are checked on every call: the
        test may set them at any time, and kombu would only trip over a bad policy when a
        publish fails.
        """
        check_retry_policy(app.conf.task_publish_retry_policy, "task_publish_retry_policy")
        check_message_protocol(app)
        installed = self.installations.get(id(app))
        if installed is not None:
            return installed
        from .broker import InMemoryBroker, PublishAnnouncements
        from .flavors import flavor_for_url, flavor_named, refuse_native_delayed_delivery

        flavor = flavor or flavor_for_url(app.conf.broker_url).name
        refuse_native_delayed_delivery(app, flavor_named(flavor))

        if self._announcements is None:
            from celery.signals import before_task_publish

            self._announcements = PublishAnnouncements()
            before_task_publish.connect(
                self._announcements.announce, weak=False, dispatch_uid=id(self)
            )
        if id(app) not in self._patches:  # an app made (or first seen) during the test
            self._patches[id(app)] = AppPatch(app)
        # This install alone, undone at once if it fails (the test's own changes stay).
        patch = AppPatch(app)
        broker = InMemoryBroker(
            self.clock,
            flavor,
            self.settings.seed,
            replaces=app.conf.broker_url,
            announcements=self._announcements,
        )
        try:
            patch.install_broker(broker.url)
            # A worker republishing a retry must not run it eagerly: that is the recursion
            # Task.apply() does, and not what production does.
            patch.configure(task_always_eager=False)
            if self.settings.result_backend is not None:
                patch.install_result_backend(self.settings.result_backend)
        except BaseException:
            try:
                patch.restore()
            finally:
                broker.close()
            raise
        broker.app = app
        installed = AppInstallation(app, patch, broker)
        self.installations[id(app)] = installed
        return installed

    def close(self) -> None:
        """Undo everything, in reverse order, each step even when an earlier one fails."""
        with ExitStack() as undo:
            undo.callback(self.clock.stop)
            if self._announcements is not None:
                undo.callback(self._disconnect_signal)
            for installed in self.installations.values():
                undo.callback(installed.broker.close)
            # Dropping the app's connections closes their channels: on a broker the test left
            # hanging, that would wait for its answer.
            for installed in self.installations.values():
                undo.enter_context(installed.broker.suspend_faults())
            for patch in self._patches.values():
                undo.callback(patch.restore)
            for installed in self.installations.values():
                undo.callback(installed.patch.restore)
            # First of all: restoring an app must not route it back to a broker.
            undo.callback(_deactivate, self)
        self.installations.clear()
        self._patches.clear()

    def _disconnect_signal(self) -> None:
        from celery.signals import before_task_publish

        if self._announcements is not None:
            before_task_publish.disconnect(self._announcements.announce, dispatch_uid=id(self))
            self._announcements = None


# The running sessions, the latest in charge; Celery is hooked while there is one.
_active: list[RetrySession] = []
_unhook: list[Callable[[], None]] = []


def _route(app: Any, publishing: bool) -> str | None:
    """Where ``app``'s next connection goes: the in-memory broker of the current session."""
    # A WeakSet's membership test makes a weak reference: asked only when there is one.
    if not _active or (real_broker_apps and app in real_broker_apps):
        return None
    session = _active[-1]
    installed = session.installations.get(id(app))
    # Celery reaches for the backend and pools several times per task: the full call, which
    # also checks the publish retry policy, only where it is needed.
    if installed is None or publishing:
        installed = session.installation(app)
    return installed.broker.url


def session_running() -> bool:
    """Whether a session runs: a test's fixtures, or the eager switch's call."""
    return bool(_active)


def _activate(session: RetrySession) -> None:
    if not _active:
        _unhook.append(hook_celery(_route))
    _active.append(session)


def _deactivate(session: RetrySession) -> None:
    remaining = [active for active in _active if active is not session]
    if len(remaining) == len(_active):
        return
    _active[:] = remaining
    if not _active:
        _unhook.pop()()
