"""Change a Celery app for one test and put every bit of it back afterwards.

Celery caches what it builds from the configuration (connection and producer pools, the
result backend, each task's tracer), so restoring the settings alone would leave a test's
broker or backend wired into the next test. This module owns all of that bookkeeping.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from typing import Any

from .errors import ConfigurationError, UsageError

__all__ = [
    "AppPatch",
    "app_from_spec",
    "check_retry_policy",
    "forget_tracers",
    "hook_celery",
    "real_broker_apps",
    "reset_connections",
]

_URL_ENVIRONMENT = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")


# Apps a test pointed at a real broker on purpose (``broker_proxy``): they may go out.
real_broker_apps: weakref.WeakSet[Any] = weakref.WeakSet()


class AppPatch:
    """Configuration changes on one app, undone by :meth:`restore` (idempotent).

    Made before the test changes anything: it keeps the app's own settings as they are then,
    also those of an app whose configuration Celery has not loaded yet (without loading it).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._saved_changes = dict(_own_settings(app))
        self._saved_backend_cache = app._backend_cache
        self._saved_local_backend = getattr(app._local, "backend", None)
        self._touched = False

    def configure(self, **settings: Any) -> None:
        self._touched = True
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
        if not self._touched and _own_settings(self.app) == self._saved_changes:
            return  # the test left the app alone: its pools and backend are not ours to drop
        self._touched = False
        reset_connections(self.app)
        changes = _own_settings(self.app)
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


def _own_settings(app: Any) -> Any:
    """The settings the app was given (not Celery's defaults), without loading its configuration.

    Before Celery loads it, what a test sets on ``app.conf`` lands in ``app._preconf``.
    """
    return app.conf.changes if app.configured else app._preconf


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
    for task in list(app._tasks.values()):  # app.tasks would finalize the app
        if getattr(task, "__trace__", None) is not None:
            task.__trace__ = None


def app_from_spec(spec: str) -> Any:
    """The app an ini value ``module:attribute`` names (``celery_retry_app``)."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise UsageError(
            f"celery_retry_app = {spec!r}: write it as module:attribute, e.g. proj.celery:app"
        )
    return getattr(importlib.import_module(module_name), attribute)


def check_retry_policy(policy: Any, source: str) -> None:
    """Refuse a publish retry policy with keys kombu's ``Connection.ensure`` does not take.

    kombu only looks at the policy once a publish fails with ``retry=True``, and then raises
    ``TypeError``; a misspelt key would otherwise go unnoticed in every passing test.
    """
    if not policy:
        return
    accepted = _retry_policy_keys()
    unknown = sorted(set(policy) - accepted)
    if unknown:
        raise UsageError(
            f"{source} has unknown key(s) {', '.join(map(repr, unknown))}: kombu's retry policy "
            f"takes {', '.join(sorted(accepted))}"
        )


def check_message_protocol(app: Any) -> None:
    """Refuse ``task_protocol=1``: the retry worker reads each message's task, id and retries
    from the headers of Celery's protocol 2 (its default since Celery 4), where protocol 1
    (Celery 3's) keeps them in the body; such a message would reach the worker as a task
    named None."""
    protocol = app.conf.task_protocol
    if protocol == 1:
        raise ConfigurationError(
            f"app {app.main!r}: task_protocol=1 (Celery 3's message format, the task's name, "
            "id and retries in the body) is not supported: the retry worker runs messages of "
            "protocol 2, Celery's default since 4.0. Set task_protocol=2 for the test (or "
            "remove the setting)"
        )


@functools.cache
def _retry_policy_keys() -> frozenset[str]:
    # Checked on every publish while a session runs: read kombu's signature once.
    import inspect

    from kombu.connection import Connection

    return frozenset(inspect.signature(Connection.ensure).parameters) - {"self", "obj", "fun"}


# Besides the connections every app opens through ``Celery._connection``, an app may hold a
# connection pool, a producer pool or a result backend built before the test: these reach
# them. Each is marked with whether using it means publishing (send_task takes a producer).
_GUARDED_PROPERTIES = {"pool": False, "producer_pool": True, "backend": False}


def hook_celery(route: Callable[[Any, bool], str | None]) -> Callable[[], None]:
    """Hand every Celery app to ``route(app, publishing)`` before it reaches its broker or
    result backend.

    ``route`` may install things on the app first; a connection goes to the broker URL it
    returns (``None``: the URL the app asked for). Returns the function that unhooks Celery.
    """
    from celery import Celery

    originals = {name: vars(Celery)[name] for name in ("_connection", *_GUARDED_PROPERTIES)}
    connect = originals["_connection"]

    def _connection(app: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        return connect(app, route(app, False) or url, *args, **kwargs)

    def routed(prop: property, publishing: bool) -> property:
        def get(app: Any) -> Any:
            route(app, publishing)
            return prop.__get__(app)

        return property(get, prop.fset, prop.fdel, prop.__doc__)

    Celery._connection = _connection
    for name, publishing in _GUARDED_PROPERTIES.items():
        setattr(Celery, name, routed(originals[name], publishing))

    def unhook() -> None:
        for name, original in originals.items():
            setattr(Celery, name, original)

    return unhook
