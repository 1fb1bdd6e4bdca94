"""One test's worth of plugin state: the virtual clock, the seed, and the apps it changed.

The fixtures share a session so that the broker's sleeps and the worker's countdowns move
one clock, and so that everything installed on an app is undone in one place when the test
ends, whether it passed or failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .app_state import AppPatch, check_retry_policy
from .clock import VirtualClock

if TYPE_CHECKING:
    from .broker import InMemoryBroker

MEMORY_RESULT_BACKEND = "cache+memory://"


@dataclass
class Settings:
    """The knobs a test suite sets through options, ini values or fixture overrides."""

    seed: int = 1234
    max_attempts: int = 1000
    serialize: bool = True
    result_backend: str | None = MEMORY_RESULT_BACKEND


@dataclass
class AppInstallation:
    """What the plugin installed on one Celery app for the current test."""

    app: Any
    patch: AppPatch
    broker: InMemoryBroker


@dataclass
class RetrySession:
    settings: Settings = field(default_factory=Settings)
    clock: VirtualClock = field(default_factory=VirtualClock)
    installations: dict[int, AppInstallation] = field(default_factory=dict)
    _signal_connected: bool = False

    def start(self) -> RetrySession:
        self.clock.start()
        return self

    def installation(self, app: Any, flavor: str | None = None) -> AppInstallation:
        """Install the in-memory broker (and result backend) on ``app``, once per test."""
        installed = self.installations.get(id(app))
        if installed is not None:
            return installed
        from .broker import InMemoryBroker, announce_publish, flavor_for_url

        if not self._signal_connected:
            from celery.signals import before_task_publish

            before_task_publish.connect(announce_publish, weak=False, dispatch_uid=id(self))
            self._signal_connected = True
        check_retry_policy(app.conf.task_publish_retry_policy, "task_publish_retry_policy")
        patch = AppPatch(app)
        try:
            broker = InMemoryBroker(
                self.clock,
                flavor or flavor_for_url(app.conf.broker_url),
                self.settings.seed,
                replaces=app.conf.broker_url,
            )
            patch.install_broker(broker.url)
            # A worker republishing a retry must not run it eagerly: that is the recursion
            # Task.apply() does, and not what production does.
            patch.configure(task_always_eager=False)
            if self.settings.result_backend is not None:
                patch.install_result_backend(self.settings.result_backend)
        except BaseException:
            patch.restore()
            raise
        installed = AppInstallation(app, patch, broker)
        self.installations[id(app)] = installed
        return installed

    def close(self) -> None:
        """Undo everything, in reverse order; always stops the clock."""
        try:
            for installed in reversed(list(self.installations.values())):
                try:
                    installed.patch.restore()
                finally:
                    installed.broker.close()
            self.installations.clear()
            if self._signal_connected:
                from celery.signals import before_task_publish

                from .broker import announce_publish

                before_task_publish.disconnect(announce_publish, dispatch_uid=id(self))
                self._signal_connected = False
        finally:
            self.clock.stop()
