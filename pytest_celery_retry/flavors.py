"""Broker flavours: everything that differs between the real brokers the plugin imitates.

One class per flavour. The in-memory broker, its transport, the worker's consumer, the fault
proxy and the plugin's options ask the flavour and never compare flavour names, so a new
broker is one new subclass of :class:`Flavor` here (see docs/architecture.md).

Importing this module imports neither Celery nor kombu: the plugin reads the URL table at
start-up.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from .errors import ConfigurationError, UsageError
from .records import OperationKind

__all__ = [
    "DEFAULT_FLAVOR",
    "FLAVORS",
    "Flavor",
    "PyAmqp",
    "Redis",
    "VisibilityTimeout",
    "flavor_for_broker",
    "flavor_for_proxy",
    "flavor_for_url",
    "flavor_named",
]


class Flavor:
    """One real broker and the kombu transport that talks to it.

    A subclass sets the class attributes and overrides what its transport does differently;
    defining it registers it (:data:`FLAVORS`).
    """

    # What ``celery_retry_flavor`` and ``broker_outage(flavor=...)`` take: the name of the
    # kombu transport the flavour mirrors.
    name: ClassVar[str]
    # What ``broker_proxy(...)`` takes, and names the real broker in its options and messages.
    broker: ClassVar[str]
    # URL schemes that choose this flavour, each with the port the real client then uses
    # when the URL gives none.
    schemes: ClassVar[dict[str, int]]
    # Those of the schemes the fault proxy forwards (a plain TCP connection to one host).
    proxy_schemes: ClassVar[tuple[str, ...]]
    # The environment variable that gives ``broker_proxy`` a real broker, and an example URL.
    url_variable: ClassVar[str]
    example_url: ClassVar[str]
    # The broker cannot take back what a lost connection left unacknowledged while it is
    # down: the messages wait (``unacked``) for a visibility sweep of :meth:`visibility`.
    parks_unacked_while_down: ClassVar[bool] = False
    # The client reconnects by itself for a command (a publish, an ack) on a connection an
    # outage cut; only a consumer's reading connection is seen to break.
    client_reconnects: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        FLAVORS[cls.name] = cls()

    @property
    def default_port(self) -> int:
        """The port of the flavour's first scheme: the one a URL of another broker gets."""
        return next(iter(self.schemes.values()))

    def real_transport(self) -> type:
        """The kombu transport class whose errors the flaky one declares."""
        raise NotImplementedError

    def error(self, kind: OperationKind, address: str) -> BaseException:
        """What the real transport raises when the broker at ``address`` fails ``kind``."""
        raise NotImplementedError

    def closed_by_broker_error(self, address: str) -> BaseException:
        """What the real transport raises on a connection the broker closed while it was away."""
        return self.error("consume", address)

    def visibility(self, app: Any) -> VisibilityTimeout | None:
        """When a consumer sweeps parked messages back (only where the broker parks them)."""
        return None

    def address(self, url: str | None) -> str:
        """``host:port`` of the (first) broker in ``url``, with this flavour's default port."""
        parts = urlsplit((url or "").split(";", 1)[0])
        try:
            port = parts.port
        except ValueError:  # not a port number: the real client would fail on it, not us
            port = None
        default = self.schemes.get(_scheme(url), self.default_port)
        return f"{parts.hostname or 'localhost'}:{port or default}"

    def __repr__(self) -> str:
        return f"<flavor {self.name}>"


# Every flavour by name, the default first.
FLAVORS: dict[str, Flavor] = {}


class PyAmqp(Flavor):
    """RabbitMQ through py-amqp, Celery's default transport."""

    name = "pyamqp"
    broker = "amqp"
    schemes: ClassVar[dict[str, int]] = {
        "amqp": 5672,
        "amqps": 5671,
        "pyamqp": 5672,
        "librabbitmq": 5672,
    }
    proxy_schemes = ("amqp", "amqps", "pyamqp")
    url_variable = "CELERY_RETRY_AMQP_URL"
    example_url = "amqp://guest:guest@127.0.0.1:5672//"

    def real_transport(self) -> type:
        from kombu.transport import pyamqp

        return pyamqp.Transport

    def error(self, kind: OperationKind, address: str) -> BaseException:
        # py-amqp raises the bare socket error, without the address (measured:
        # ``ConnectionRefusedError(111, 'Connection refused')``).
        if kind == "connect":
            return ConnectionRefusedError(111, "Connection refused")
        return ConnectionResetError(104, "Connection reset by peer")

    def closed_by_broker_error(self, address: str) -> BaseException:
        # Measured through the fault proxy after a 0.5 s cut (tests/test_real_brokers.py).
        return OSError("Server unexpectedly closed connection")


class Redis(Flavor):
    """Redis through kombu's redis transport and redis-py."""

    name = "redis"
    broker = "redis"
    schemes: ClassVar[dict[str, int]] = {"redis": 6379, "rediss": 6379, "sentinel": 6379}
    proxy_schemes = ("redis", "rediss")
    url_variable = "CELERY_RETRY_REDIS_URL"
    example_url = "redis://127.0.0.1:6379/0"
    # kombu's redis QoS restores with Redis commands, which fail while Redis is down.
    parks_unacked_while_down = True
    client_reconnects = True

    def real_transport(self) -> type:
        # kombu's redis transport imports without redis-py and then fails defining its client
        # classes (AttributeError); its error classes are redis-py's, so there is no stand-in.
        try:
            import redis  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(
                "the redis flavour of the in-memory broker (a redis:// broker URL, or "
                "celery_retry_flavor='redis') raises and declares redis-py's errors, as kombu's "
                'redis transport does, but redis-py is not installed: pip install "pytest-celery-'
                'retry[redis]" (or choose the pyamqp flavour with celery_retry_flavor)'
            ) from exc
        from kombu.transport import redis as redis_transport

        return redis_transport.Transport

    def error(self, kind: OperationKind, address: str) -> BaseException:
        # redis-py names the address it could not reach.
        from redis.exceptions import ConnectionError as RedisConnectionError

        if kind == "connect":
            return RedisConnectionError(f"Error 111 connecting to {address}. Connection refused.")
        return RedisConnectionError("Connection closed by server.")

    def visibility(self, app: Any) -> VisibilityTimeout:
        return VisibilityTimeout.for_app(app)


# Celery's default transport: the flavour of a URL of no other flavour.
DEFAULT_FLAVOR: Flavor = FLAVORS[PyAmqp.name]


def flavor_named(name: str) -> Flavor:
    """The flavour called ``name``."""
    try:
        return FLAVORS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise UsageError(
            f"unknown broker flavor {name!r}: choose one of {', '.join(FLAVORS)}"
        ) from None


def flavor_for_url(url: str | None) -> Flavor:
    """The flavour matching a broker URL's transport (pyamqp, Celery's default, otherwise)."""
    scheme = _scheme(url).split("+", 1)[-1]
    for flavor in FLAVORS.values():
        if scheme in flavor.schemes:
            return flavor
    return DEFAULT_FLAVOR


def flavor_for_broker(broker: str) -> Flavor | None:
    """The flavour whose real broker ``broker_proxy`` calls ``broker`` ("redis", "amqp")."""
    return next((flavor for flavor in FLAVORS.values() if flavor.broker == broker), None)


def flavor_for_proxy(url: str) -> Flavor:
    """The flavour of a URL the fault proxy forwards."""
    scheme = _scheme(url)
    for flavor in FLAVORS.values():
        if "://" in url and scheme in flavor.proxy_schemes:
            return flavor
    schemes = [f"{s}://" for flavor in FLAVORS.values() for s in flavor.proxy_schemes]
    raise UsageError(
        f"broker URL {url!r}: the proxy forwards {', '.join(schemes[:-1])} and {schemes[-1]} URLs"
    )


def _scheme(url: str | None) -> str:
    return (url or "").split("://", 1)[0].lower()


@dataclass(frozen=True)
class VisibilityTimeout:
    """When kombu's redis transport gives back messages a lost consumer never acknowledged.

    A worker's redis transport sweeps the ``unacked`` index when its consumer registers with
    the event loop and then on every ``unacked_restore_throttle``-th call of a timer that
    fires every ``unacked_restore_interval`` seconds (kombu < 5.7: every 10th call, every
    10 s). A sweep restores the messages delivered at least ``visibility_timeout`` seconds
    before it. The figures come from the installed kombu and the app's transport options.
    """

    visibility_timeout: float
    sweep_every: float

    @classmethod
    def for_app(cls, app: Any) -> VisibilityTimeout:
        from kombu.transport import redis

        options = app.conf.broker_transport_options or {}
        channel = redis.Channel
        timeout = options.get("visibility_timeout", channel.visibility_timeout)
        # kombu < 5.7 hard-codes the timer (10 s) and takes restore_visible's default throttle.
        interval = _SWEEP_TIMER_BEFORE_KOMBU_5_7
        throttle = inspect.signature(redis.QoS.restore_visible).parameters["interval"].default
        if hasattr(channel, "unacked_restore_interval"):
            interval = options.get("unacked_restore_interval", channel.unacked_restore_interval)
            if interval <= 0:
                interval = channel.unacked_restore_interval
            throttle = options.get("unacked_restore_throttle", channel.unacked_restore_throttle)
        return cls(float(timeout), float(interval * (throttle or 1)))

    def last_sweep(self, registered_at: float, now: float) -> float:
        """The latest sweep at or before ``now`` of a consumer registered at ``registered_at``."""
        sweeps = math.floor((now - registered_at) / self.sweep_every + _EPSILON)
        return registered_at + max(sweeps, 0) * self.sweep_every

    def next_restore(self, delivered_at: float, registered_at: float, now: float) -> float:
        """The first sweep from ``now`` on that finds a message delivered at ``delivered_at``."""
        due = max(delivered_at + self.visibility_timeout, now, registered_at)
        sweeps = math.ceil((due - registered_at) / self.sweep_every - _EPSILON)
        return registered_at + sweeps * self.sweep_every


_SWEEP_TIMER_BEFORE_KOMBU_5_7 = 10
# Sweep times are sums of float seconds: a sweep "at" a time must not miss it by rounding.
_EPSILON = 1e-9


def refuse_native_delayed_delivery(app: Any, flavor: Flavor) -> None:
    """Refuse an app whose countdowns the real broker would hold instead of the worker.

    With a quorum queue among its queues on RabbitMQ, Celery 5.5+ publishes every countdown
    and ETA bound for a non-direct exchange to the ``celery_delayed_*`` queues, which hold
    it by message TTL and dead-letter it back (whole seconds; under 1 s Celery drops the
    task). kombu's memory transport has no exchange-to-exchange bindings, TTL or
    dead-lettering, so the in-memory broker would hold the ETA in the worker instead: not
    what production does.
    """
    try:
        from celery.utils.quorum_queues import detect_quorum_queues
    except ImportError:
        return  # Celery < 5.5: the worker holds every countdown, as simulated
    transport: Any = flavor.real_transport()
    quorum, queue = detect_quorum_queues(app, transport.driver_type)
    if not quorum:
        return
    delayed = sorted(name for name, q in app.amqp.queues.items() if q.exchange.type != "direct")
    if app.conf.task_default_exchange_type != "direct":
        delayed.append(f"the default exchange ({app.conf.task_default_exchange_type})")
    if not delayed:
        return  # Celery warns and the worker holds the ETA: the in-memory broker does that
    raise ConfigurationError(
        f"app {app.main!r}: the quorum queue {queue!r} makes Celery send the countdowns and "
        f"ETAs of tasks routed to {', '.join(delayed)} through RabbitMQ's native delayed "
        "delivery (the celery_delayed_* queues hold them, in whole seconds, and a countdown "
        "under 1 s drops the task), which the in-memory broker cannot run (kombu's memory "
        "transport has no exchange-to-exchange bindings, message TTL or dead-lettering): it "
        "would hold them in the worker as for a classic queue. Test these retries against a "
        "real RabbitMQ with broker_proxy('amqp'), or give this test classic queues or direct "
        "exchanges (task_queues, task_default_exchange_type)"
    )
