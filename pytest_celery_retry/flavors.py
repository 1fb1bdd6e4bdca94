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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

from .errors import ConfigurationError, UsageError
from .records import OperationKind, RecordedKind

__all__ = [
    "DEFAULT_FLAVOR",
    "FLAVORS",
    "INSTALLED_SCHEME_PREFIX",
    "ClientSettings",
    "ConsumerTimeout",
    "Flavor",
    "Heartbeats",
    "HeldLimit",
    "HungWait",
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
    # The client, not the broker, gives back what a closing connection left unacknowledged:
    # while the broker is down, or when the client's process died, the messages wait
    # (``unacked``) for a visibility sweep of :meth:`visibility`.
    parks_unacked_while_down: ClassVar[bool] = False
    # The client reconnects by itself for a command (a publish, an ack) on a connection an
    # outage cut; only a consumer's reading connection is seen to break.
    client_reconnects: ClassVar[bool] = False
    # The in-memory broker's settings of the real broker this flavour reads
    # (``flaky_broker.consumer_timeout = ...``); the others refuse to be set.
    broker_settings: ClassVar[frozenset[str]] = frozenset()
    # A message put back on its queue carries a ``redelivered`` header too (which Celery's
    # worker hands the task as ``request.redelivered``), not only the delivery's flag.
    marks_redelivered_header: ClassVar[bool] = False

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

    def held_limit(self, app: Any, broker: Any = None) -> HeldLimit | None:
        """What the broker does to a message a consumer holds unacknowledged for long.

        ``broker`` is the in-memory broker (its settings), or None for the real broker's
        defaults.
        """
        return None

    def hung_wait(self, kind: RecordedKind, client: ClientSettings) -> HungWait | None:
        """How the real client waits when the broker never answers ``kind`` (None: it does not
        wait for an answer)."""
        raise NotImplementedError

    def heartbeats(self, app: Any, opened_at: float) -> Heartbeats | None:
        """The heartbeats a worker's consumer connection opened at ``opened_at`` checks, if
        the transport has any (kombu's ``supports_heartbeats``) and they are on."""
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
# The URL scheme of an in-memory broker of flavour ``name`` is this prefix and the name.
INSTALLED_SCHEME_PREFIX = "celery-retry-"
# RabbitMQ's defaults: ``consumer_timeout`` (30 min), ``channel_tick_interval`` (60 s) and the
# ``heartbeat`` it proposes to clients (60 s).
CONSUMER_TIMEOUT = 1800.0
CHANNEL_TICK_INTERVAL = 60.0
RABBITMQ_HEARTBEAT = 60.0


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
    broker_settings = frozenset({"consumer_timeout", "channel_tick_interval"})

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

    def held_limit(self, app: Any, broker: Any = None) -> ConsumerTimeout | None:
        if broker is None:
            return ConsumerTimeout(CONSUMER_TIMEOUT, CHANNEL_TICK_INTERVAL)
        if broker.consumer_timeout is None:
            return None
        return ConsumerTimeout(broker.consumer_timeout, broker.channel_tick_interval)

    def hung_wait(self, kind: RecordedKind, client: ClientSettings) -> HungWait | None:
        # Measured through the fault proxy's blackhole (tests/real_limits_cases.py): py-amqp's
        # socket reads raise socket.timeout, which is TimeoutError('timed out').
        if kind == "connect":
            # The TCP connect succeeds; the AMQP handshake waits for Connection.Start.
            return HungWait(
                client.connect_timeout,
                _timed_out,
                "py-amqp waits for the broker's handshake without a timeout: set "
                "broker_connection_timeout",
            )
        if kind == "publish":
            if not client.transport_options.get("confirm_publish"):
                return None  # the frames sit in the socket's buffer: the publish returns
            return HungWait(
                client.confirm_timeout,
                _timed_out,
                "with confirm_publish, py-amqp waits for the broker's confirm without a "
                "timeout: pass confirm_timeout= to apply_async / send_task",
            )
        if kind == "close":
            return HungWait(
                None,
                _timed_out,
                "py-amqp closes a channel by waiting for the broker's Close-Ok, without a "
                "timeout. kombu closes the channel of a connection it hands back to the pool "
                "after a failed publish (a confirm_timeout with retry=False): publish with "
                "retry=True, which drops a failed connection without a word",
            )
        if kind == "consume":
            return None  # a consumer waits for deliveries: a hang sends none
        if kind == "ack":
            return None  # basic_ack expects no answer: the frames wait in the socket buffer
        if kind == "qos":
            # Measured (tests/real_limits_cases.py): after a held ETA's run, Celery's consumer
            # lowers its prefetch count, and basic_qos waits for Qos-Ok in the event loop,
            # which then checks no heartbeat.
            return HungWait(
                None,
                _timed_out,
                "the worker's consumer changes its prefetch count after a held ETA's run "
                "(basic_qos), and py-amqp waits for the broker's Qos-Ok without a timeout (no "
                "setting bounds it; its event loop checks no heartbeat meanwhile): end the hang "
                "(flaky_broker.up(), or outage(seconds=..., how='hang')) before the ETA",
            )
        raise NotImplementedError(kind)

    def heartbeats(self, app: Any, opened_at: float) -> Heartbeats | None:
        from .heartbeats import AmqpHeartbeats

        # Celery's consumer asks for broker_heartbeat; py-amqp's Connection._on_tune takes the
        # smaller of that and the broker's proposal, and none when the client asks for none.
        asked = float(app.conf.broker_heartbeat or 0)
        heartbeat = min(asked, RABBITMQ_HEARTBEAT) if asked > 0 else 0.0
        if not heartbeat:
            return None
        return AmqpHeartbeats(heartbeat, float(app.conf.broker_heartbeat_checkrate), opened_at)


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
    # kombu's redis transport marks the payload it restores (Channel._do_restore_message).
    marks_redelivered_header = True

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

    def held_limit(self, app: Any, broker: Any = None) -> VisibilityTimeout:
        return VisibilityTimeout.for_app(app)

    def hung_wait(self, kind: RecordedKind, client: ClientSettings) -> HungWait | None:
        # Measured through the fault proxy's blackhole (tests/real_limits_cases.py): every
        # Redis command waits for its reply up to socket_timeout (the connect's is the PING
        # of kombu's new channel). socket_connect_timeout bounds the TCP connect only, which a
        # hung broker's kernel completes, and broker_connection_timeout never reaches redis-py.
        if kind == "close":
            return None  # redis-py closes its socket without a word
        if kind == "consume":
            return None  # the event loop waits for BRPOP's reply to be readable: none comes
        if kind == "qos":
            return None  # kombu's virtual QoS changes the prefetch count locally
        # An ack is a command too (kombu's QoS removes the message from its unacked hash):
        # measured, Celery logs "Couldn't ack ... Timeout reading from socket" after
        # socket_timeout and runs the task; the message stays unacked for a visibility sweep.
        return HungWait(
            client.transport_options.get("socket_timeout"),
            _redis_timeout,
            "redis-py reads the broker's reply without a timeout (kombu's default "
            "socket_timeout is None; socket_connect_timeout covers the TCP connect only, and "
            "broker_connection_timeout does not reach redis-py's reads): set "
            "broker_transport_options={'socket_timeout': 5}",
        )


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
    """The flavour matching a broker URL's transport (pyamqp, Celery's default, otherwise).

    The URL of an installed in-memory broker names its flavour.
    """
    scheme = _scheme(url)
    if scheme.startswith(INSTALLED_SCHEME_PREFIX):
        return flavor_named(scheme[len(INSTALLED_SCHEME_PREFIX) :])
    scheme = scheme.split("+", 1)[-1]
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


class Holder(Protocol):
    """The worker's consumer, as a broker limit sees it (consumer.Consumer)."""

    broker: Any
    # When its channel opened (virtual seconds): the broker's timers count from there.
    registered_at: float
    # The last sweep or tick that acted on this channel.
    checked_at: float | None

    def unacked(self) -> list[Any]:
        """What it holds unacknowledged (``UnackedMessage``), not what it is about to run."""

    def limit_crossed(self, message: Any, action: str, detail: str) -> None:
        """Note, for the message's run, what the broker did to it."""

    def restore(self, messages: list[Any], action: str, detail: str) -> None:
        """Put copies of ``messages`` back on their queue, marked redelivered; log why."""


class Heartbeats(Protocol):
    """A worker connection's heartbeat checks (``heartbeats.AmqpHeartbeats``)."""

    @property
    def interval(self) -> float:
        """Seconds between the worker loop's checks."""

    def next_check(self, now: float) -> float:
        """When the worker's loop next checks."""

    def check(self, now: float, answering: Callable[[float], bool]) -> None:
        """Run the check due at ``now`` (``answering(t)``: the broker sends at ``t``); raises
        the client's error once it has missed too many heartbeats."""

    def broker_closed_after(self, hung: float) -> bool:
        """Whether the broker closed the connection while it hung ``hung`` seconds."""


class HeldLimit(Protocol):
    """What a broker does to a message a consumer holds unacknowledged for long."""

    @property
    def setting(self) -> str:
        """The broker setting's name, for messages ("visibility_timeout")."""

    @property
    def seconds(self) -> float:
        """The setting's value."""

    def enforce(self, holder: Holder) -> None:
        """Do what the broker has done up to now (a sweep, a channel closed: may raise)."""

    def next_action(self, holder: Holder) -> float | None:
        """When the broker next acts on what ``holder`` holds, if it will."""

    def verdict(self, countdown: float, app: Any) -> str | None:
        """What production does to a retry waiting ``countdown`` s; None when it fits."""

    def advice(self) -> str:
        """How to make a retry schedule fit."""


@dataclass(frozen=True)
class ClientSettings:
    """What bounds a client's waits for a broker: its connection's settings and the publish's."""

    transport_options: Mapping[str, Any]
    # kombu's Connection.connect_timeout: Celery's broker_connection_timeout.
    connect_timeout: float | None
    # The publish's confirm_timeout (apply_async / send_task), for a publish.
    confirm_timeout: float | None = None


@dataclass(frozen=True)
class HungWait:
    """How the real client waits for an answer that a hung broker never sends."""

    # Seconds, or None: it waits for ever.
    timeout: float | None
    # What it raises when the timeout passes.
    error: Callable[[], BaseException]
    # Why it waits for ever without a timeout, and what bounds the wait.
    unbounded: str


def _timed_out() -> BaseException:
    return TimeoutError("timed out")


def _redis_timeout() -> BaseException:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return RedisTimeoutError("Timeout reading from socket")


@dataclass(frozen=True)
class VisibilityTimeout:
    """When kombu's redis transport gives back messages nobody acknowledged in time.

    Redis keeps each delivered message in the ``unacked`` hash (and its delivery time in the
    ``unacked_index``) until it is acknowledged. A worker's redis transport sweeps the index
    when its consumer registers with the event loop and then on every
    ``unacked_restore_throttle``-th call of a timer that fires every
    ``unacked_restore_interval`` seconds (kombu < 5.7: every 10th call, every 10 s). A sweep
    puts back on the queue, marked redelivered, every message delivered at least
    ``visibility_timeout`` seconds before it: one a lost connection left, and one a worker
    still holds for its ETA, which the worker then receives and holds a second time
    (celery#2481). The figures come from the installed kombu and the app's transport options.
    """

    visibility_timeout: float
    sweep_every: float

    @property
    def setting(self) -> str:
        return "visibility_timeout"

    @property
    def seconds(self) -> float:
        return self.visibility_timeout

    @classmethod
    def for_app(cls, app: Any) -> VisibilityTimeout:
        from kombu.transport import redis

        options = (app.conf.broker_transport_options if app is not None else None) or {}
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

    def enforce(self, holder: Holder) -> None:
        swept_at = self.last_sweep(holder.registered_at, holder.broker.clock.elapsed)
        if swept_at == holder.checked_at:
            return
        holder.checked_at = swept_at
        delivered_by = swept_at - self.visibility_timeout
        visible = [entry for entry in holder.unacked() if entry.delivered_at <= delivered_by]
        # kombu walks the unacked index newest first (ZREVRANGEBYSCORE).
        visible.sort(key=lambda entry: entry.delivered_at, reverse=True)
        for entry in visible:
            held = round(swept_at - entry.delivered_at, 6)
            holder.limit_crossed(
                entry.message,
                "visibility sweep",
                f"restored to the queue: unacknowledged for {held:g} s >= visibility_timeout="
                f"{self.visibility_timeout:g} s (a worker holding it runs it once more)",
            )
        if visible:
            holder.restore(
                [entry.message for entry in visible],
                "visibility sweep",
                f"{len(visible)} unacknowledged message(s) back on the queue "
                f"(visibility_timeout={self.visibility_timeout:g})",
            )

    def next_action(self, holder: Holder) -> float | None:
        entries = holder.unacked()
        if not entries:
            return None
        now = holder.broker.clock.elapsed
        earliest = min(entry.delivered_at for entry in entries)
        due = self.next_restore(earliest, holder.registered_at, now)
        if holder.checked_at is not None and due <= holder.checked_at + _EPSILON:
            due = holder.checked_at + self.sweep_every  # that sweep ran already
        return due

    def copies(self, countdown: float) -> list[float]:
        """When a worker receives each copy of a message it holds for ``countdown`` seconds.

        The first at 0, on a sweep; each restored copy at the first sweep that finds the one
        before it. A sweep at the ETA itself comes after the ETA (the message runs first).
        """
        received = [0.0]
        while True:
            last = received[-1]
            restore = max(self.next_restore(last, 0.0, last), last + self.sweep_every)
            if restore >= countdown - _EPSILON:
                return received
            received.append(restore)

    def verdict(self, countdown: float, app: Any) -> str | None:
        copies = self.copies(countdown)
        if len(copies) == 1:
            return None
        times = ", ".join(f"+{t:g} s" for t in copies[1:])
        return (
            f"longer than Redis's visibility_timeout={self.visibility_timeout:g} s (a sweep "
            f"every {self.sweep_every:g} s): the sweeps put the held message back at {times}; "
            f"the worker holds every copy and runs the retry {len(copies)} times at its ETA "
            "(celery#2481)"
        )

    def advice(self) -> str:
        return (
            "raise broker_transport_options['visibility_timeout'] above the longest countdown "
            "(on every app and worker of that Redis), or keep countdowns below it"
        )


@dataclass(frozen=True)
class ConsumerTimeout:
    """RabbitMQ's ``consumer_timeout``: it closes a channel that holds a delivery too long.

    On each channel tick (``channel_tick_interval``, counted from the channel's opening)
    RabbitMQ closes the channel with ``PRECONDITION_FAILED`` if one of its deliveries has been
    unacknowledged for more than ``timeout`` seconds, and requeues what the channel held.
    Celery's consumer treats that channel error as fatal unless
    ``broker_channel_error_retry`` is on (celery#6760).
    """

    timeout: float
    tick: float

    @property
    def setting(self) -> str:
        return "consumer_timeout"

    @property
    def seconds(self) -> float:
        return self.timeout

    def closes_at(self, delivered_at: float, opened_at: float) -> float:
        """The tick that finds a message delivered at ``delivered_at`` too old."""
        ticks = math.floor((delivered_at + self.timeout - opened_at) / self.tick + _EPSILON) + 1
        return opened_at + max(ticks, 1) * self.tick

    def error(self) -> BaseException:
        """What py-amqp raises on the channel RabbitMQ closed (measured, RabbitMQ 3.10)."""
        from amqp.exceptions import PreconditionFailed

        error: BaseException = PreconditionFailed(
            "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout "
            f"value used: {round(self.timeout * 1000)} ms. This timeout value can be "
            "configured, see consumers doc guide to learn more",
            (0, 0),
            "",
            406,
        )
        return error

    def enforce(self, holder: Holder) -> None:
        now = holder.broker.clock.elapsed
        ticks = math.floor((now - holder.registered_at) / self.tick + _EPSILON)
        tick = holder.registered_at + ticks * self.tick
        if ticks < 1 or tick == holder.checked_at:
            return
        holder.checked_at = tick
        late = [
            entry
            for entry in holder.unacked()
            if entry.delivered_at + self.timeout < tick - _EPSILON
        ]
        for entry in late:
            held = round(tick - entry.delivered_at, 6)
            holder.limit_crossed(
                entry.message,
                "consumer timeout",
                f"unacknowledged for {held:g} s > consumer_timeout={self.timeout:g} s: RabbitMQ "
                "closed the worker's channel (PRECONDITION_FAILED) and requeued it",
            )
        if late:
            raise self.error()

    def next_action(self, holder: Holder) -> float | None:
        entries = holder.unacked()
        if not entries:
            return None
        return min(self.closes_at(entry.delivered_at, holder.registered_at) for entry in entries)

    def closes(self, countdown: float, reconnects: bool) -> list[float]:
        """When RabbitMQ closes the channel of a worker holding a message for ``countdown`` s.

        Without reconnects the first close ends the worker; with them each new channel
        receives the message again and holds it until the next close, or its ETA.
        """
        closes: list[float] = []
        opened = 0.0
        while True:
            close = self.closes_at(opened, opened)
            if close >= countdown - _EPSILON:
                return closes
            closes.append(close)
            if not reconnects:
                return closes
            opened = close

    def verdict(self, countdown: float, app: Any) -> str | None:
        reconnects = bool(app is not None and app.conf.broker_channel_error_retry)
        closes = self.closes(countdown, reconnects)
        if not closes:
            return None
        limit = (
            f"longer than RabbitMQ's consumer_timeout={self.timeout:g} s (checked every "
            f"{self.tick:g} s): RabbitMQ closes the worker's channel with PRECONDITION_FAILED"
        )
        if not reconnects:
            return (
                f"{limit} at +{closes[0]:g} s and, with Celery's default "
                "broker_channel_error_retry=False, the worker stops ('Unrecoverable error'); "
                "the retry waits in the queue until a worker starts again (celery#6760)"
            )
        times = ", ".join(f"+{t:g} s" for t in closes)
        return (
            f"{limit} at {times}; with broker_channel_error_retry=True the worker reconnects "
            "each time, RabbitMQ redelivers the message, and the retry runs once at its ETA "
            "(redelivered=True)"
        )

    def advice(self) -> str:
        return (
            "raise RabbitMQ's consumer_timeout (rabbitmq.conf) above the longest countdown, or "
            "keep countdowns below it; broker_channel_error_retry=True keeps the worker alive"
        )


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
