"""Change a Celery app for one test and put every bit of it back afterwards.

Celery caches what it builds from the configuration (connection and producer pools, the
result backend, each task's tracer), so restoring the settings alone would leave a test's
broker or backend wired into the next test. This module owns all of that bookkeeping.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigurationError, UsageError

_URL_ENVIRONMENT = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")


class AppPatch:
    """Configuration changes on one app, undone by :meth:`restore` (idempotent)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._saved_changes = dict(app.conf.changes)
        self._saved_backend_cache = app._backend_cache
        self._saved_local_backend = getattr(app._local, "backend", None)
        self._restored = False

    def configure(self, **settings: Any) -> None:
        self.app.conf.update(settings)

    def install_broker(self, url: str) -> None:
        """Point every broker connection of the app at ``url``, dropping pooled connections."""
        overridden = [name for name in _URL_ENVIRONMENT if os.environ.get(name)]
        if overridden:
            raise ConfigurationError(
                f"the environment variable(s) {', '.join(overridden)} override the app's broker "
                "URL, so the in-memory broker cannot be installed: unset them for the test run "
                "(for example with monkeypatch.delenv)"
            )
        self.configure(broker_url=url, broker_read_url=url, broker_write_url=url)
        reset_connections(self.app)

    def install_result_backend(self, url: str) -> None:
        self.configure(result_backend=url)
        self._forget_backend()
        forget_tracers(self.app)

    def restore(self) -> None:
        if self._restored:
            return
        self._restored = True
        reset_connections(self.app)
        changes = self.app.conf.changes
        changes.clear()
        changes.update(self._saved_changes)
        self._forget_backend()
        self.app._backend_cache = self._saved_backend_cache
        if self._saved_local_backend is not None:
            self.app._local.backend = self._saved_local_backend
        forget_tracers(self.app)

    def _forget_backend(self) -> None:
        self.app._backend_cache = None
        if hasattr(self.app._local, "backend"):
            del self.app._local.backend


def reset_connections(app: Any) -> None:
    """Close and forget the app's broker connection and producer pools."""
    amqp = app.__dict__.get("amqp")  # a cached_property: do not create it just to reset it
    producer_pool = amqp._producer_pool if amqp is not None else None
    pool = app._pool
    for closing in (producer_pool, pool):
        if closing is not None:
            closing.force_close_all()
    app._pool = None
    if amqp is not None:
        amqp._producer_pool = None
    if pool is not None:
        _unregister(pool)


def _unregister(pool: Any) -> None:
    # kombu registers pools globally, keyed by connection URL: a closed pool left there would be
    # handed to the next app that connects to an equal URL ("Acquire on closed pool").
    from kombu import pools

    for group in (pools.connections, pools.producers):
        for key, registered in list(group.items()):
            if registered is pool or getattr(registered, "connections", None) is pool:
                dict.__delitem__(group, key)  # the keys are already eqhashes


def forget_tracers(app: Any) -> None:
    """Drop each task's cached tracer: it holds the result backend it was built with."""
    for task in list(app.tasks.values()):
        if getattr(task, "__trace__", None) is not None:
            task.__trace__ = None


def check_retry_policy(policy: Any, source: str) -> None:
    """Refuse a publish retry policy with keys kombu's ``Connection.ensure`` does not take.

    kombu only looks at the policy once a publish fails with ``retry=True``, and then raises
    ``TypeError``; a misspelt key would otherwise go unnoticed in every passing test.
    """
    if not policy:
        return
    import inspect

    from kombu.connection import Connection

    accepted = set(inspect.signature(Connection.ensure).parameters) - {"self", "obj", "fun"}
    unknown = sorted(set(policy) - accepted)
    if unknown:
        raise UsageError(
            f"{source} has unknown key(s) {', '.join(map(repr, unknown))}: kombu's retry policy "
            f"takes {', '.join(sorted(accepted))}"
        )
