"""The kombu transport of the in-memory broker: kombu's memory transport with broker hooks.

Every connection an app makes to an installed in-memory broker is one of these transports:
it establishes the connection, puts, gets, acknowledges and restores messages through the
:class:`Broker` protocol, where a fault raises what the real transport raises. Each flavour
gets a subclass that declares the real transport's errors, so kombu's and Celery's retry
code decides, as in production, what to retry.
"""

from __future__ import annotations

from collections.abc import Callable
from queue import Empty, Queue
from typing import Any, Protocol

import kombu.transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES, memory, virtual

from .clock import VirtualClock
from .errors import UsageError
from .flavors import INSTALLED_SCHEME_PREFIX, ClientSettings, Flavor

__all__ = ["CONSUMER_ROLE_OPTION", "Broker", "Client", "attach", "detach"]

# A transport option the worker's consumer sets: its operations are recorded as the consumer's.
CONSUMER_ROLE_OPTION = "celery_retry_role"


class Client(Protocol):
    """One connection to the broker, as the broker sees it."""

    # "consumer" for the worker's consuming connection, "producer" for every other one.
    role: str
    # When the last successful connect happened, as (virtual time, broker event number):
    # an outage that began since then has cut the connection.
    opened_at: tuple[float, int] | None
    # A call on it would have blocked for ever (BlocksForeverError): nothing after it happens.
    blocked_forever: bool

    def settings(self, confirm_timeout: float | None = None) -> ClientSettings:
        """What bounds the client's waits for an answer (``confirm_timeout``: the publish's)."""


class Broker(Protocol):
    """What the transport needs of the broker it connects to (:class:`InMemoryBroker`)."""

    clock: VirtualClock
    queues: dict[str, Queue[Any]]
    exchange_state: virtual.BrokerState
    rules: Flavor

    def on_connect(self, client: Client) -> None:
        """Raise the connect's fault, if any; record the connect."""

    def on_publish(
        self,
        client: Client,
        queue: str,
        message: dict[str, Any],
        confirm_timeout: float | None = None,
    ) -> bool:
        """Raise the publish's fault, if any; record the publish and its delivery.

        Returns whether the message reaches its queue now (else the broker delivers it later).
        """

    def on_consume(self, client: Client, queue: str) -> bool:
        """Raise the poll's fault, if any; whether the broker answers it (a hung one does not)."""

    def on_settle(self, client: Client) -> bool:
        """Raise the ack's (or reject's) fault, if any; whether it reaches the broker now (a
        hung one gets it when the hang ends, if the connection lasts)."""

    def on_deliver(self, message: Any) -> None:
        """A consumer received ``message``: it is unacknowledged from now on."""

    def on_acked(self, delivery_tag: Any) -> None:
        """The consumer acknowledged (or rejected) the message ``delivery_tag``."""

    def on_close(self, client: Client) -> None:
        """Wait for the broker's answer to a channel close, if the client would."""

    def on_restore(self, message: Any) -> bool:
        """Whether an unacknowledged message goes back to its queue now (else it is parked)."""


class _QoS(virtual.QoS):
    """kombu's QoS, telling the broker what is delivered and not yet acknowledged."""

    channel: _Channel

    def append(self, message: Any, delivery_tag: Any) -> None:
        super().append(message, delivery_tag)
        self.channel.connection.broker.on_deliver(message)

    def ack(self, delivery_tag: Any) -> None:
        super().ack(delivery_tag)
        self.channel.connection.broker.on_acked(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        self.channel.connection.broker.on_acked(delivery_tag)


class _Channel(memory.Channel):
    """kombu's memory channel, with the broker's queues instead of process-wide ones."""

    QoS = _QoS
    connection: _Transport
    _restoring = False
    # A broker takes back what a closed connection had not acknowledged (AMQP requeues at
    # once); kombu's memory transport skips that, having no other consumer to hand it to.
    do_restore = True

    def __init__(self, connection: _Transport, **kwargs: Any) -> None:
        # memory.Channel keeps its queues on the class: every test would share them.
        self.queues = connection.broker.queues
        # Acks and rejects sent into a hung broker's socket buffer, by delivery tag.
        self.stalled: dict[Any, Callable[[], None]] = {}
        super().__init__(connection, **kwargs)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        if self.connection.broker.on_settle(self.connection):
            super().basic_ack(delivery_tag, multiple)
        else:
            self.stalled[delivery_tag] = lambda: super(_Channel, self).basic_ack(
                delivery_tag, multiple
            )

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self.connection.broker.on_settle(self.connection):
            super().basic_reject(delivery_tag, requeue=requeue)
        else:
            self.stalled[delivery_tag] = lambda: super(_Channel, self).basic_reject(
                delivery_tag, requeue=requeue
            )

    def settle_stalled(self) -> None:
        """The broker gets the acks and rejects that waited in the socket buffer of a hang.

        Until then the channel holds their messages unacknowledged: a connection that closes
        first gives them back to the queue, to be delivered again.
        """
        stalled, self.stalled = self.stalled, {}
        for settle in stalled.values():
            settle()

    def settles_later(self, task_id: str) -> bool:
        """Whether an ack or reject of a message of ``task_id`` waits in the socket buffer."""
        messages = (self.qos.get(tag) for tag in self.stalled)
        return any((message.headers or {}).get("id") == task_id for message in messages)

    def _restore(self, message: Any) -> None:
        # Returning an unacknowledged message to its queue is the broker's own doing (the
        # consumer rejected it or its connection closed): not a publish that can fail, and
        # not a new delivery.
        if not self.connection.broker.on_restore(message):
            return
        self._restoring = True
        try:
            super()._restore(message)
        finally:
            self._restoring = False

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if self._restoring:
            # Both real brokers deliver a message they took back with delivery_info's
            # ``redelivered`` set (kombu's memory transport marks only the payload); kombu's
            # redis transport marks its headers too, which Celery's worker hands the task as
            # ``request.redelivered``. A copy: the properties and headers are those of the
            # message a worker may still hold.
            properties = message["properties"]
            delivery_info = {**properties.get("delivery_info", {}), "redelivered": True}
            message = {**message, "properties": {**properties, "delivery_info": delivery_info}}
            if self.connection.broker.rules.marks_redelivered_header:
                message["headers"] = {**message.get("headers", {}), "redelivered": True}
        elif not self.connection.broker.on_publish(
            self.connection, queue, message, kwargs.get("confirm_timeout")
        ):
            return  # a publish into a hung broker without confirms: it never arrives
        super()._put(queue, message, **kwargs)

    def close(self) -> None:
        if not self.closed and not self.connection.collecting:
            self.connection.broker.on_close(self.connection)
        super().close()

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        if not self.connection.broker.on_consume(self.connection, queue):
            raise Empty()
        message: dict[str, Any] = super()._get(queue, timeout)
        return message


class _Transport(memory.Transport):
    """kombu's memory transport bound to one broker (found by host name)."""

    Channel = _Channel
    driver_name = "pytest-celery-retry"
    opened_at: tuple[float, int] | None = None
    blocked_forever = False
    # Inside kombu's Connection.collect: the connection is dropped without a word.
    collecting = False

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        try:
            self.broker = _brokers[client.hostname]
        except KeyError:
            raise UsageError(
                f"no in-memory broker named {client.hostname!r} is installed: a connection to "
                f"{client.as_uri()} outlived the test that created it"
            ) from None
        self.state = self.broker.exchange_state
        self.role = (client.transport_options or {}).get(CONSUMER_ROLE_OPTION, "producer")

    def establish_connection(self) -> Any:
        self.broker.on_connect(self)
        return super().establish_connection()

    def settings(self, confirm_timeout: float | None = None) -> ClientSettings:
        client = self.client  # kombu's Connection; None once kombu let go of the transport
        return ClientSettings(
            getattr(client, "transport_options", None) or {},
            getattr(client, "connect_timeout", None),
            confirm_timeout,
        )

    def _collect_quietly(self, connection: Any) -> None:
        """kombu's ``collect()`` for a transport that drops a connection without a word (the
        real transport's ``_collect``): its channels close, and the broker takes back what they
        had not acknowledged, but nothing waits for the broker's answer."""
        self.collecting = True
        try:
            self.close_connection(connection)
        finally:
            self.collecting = False

    def driver_version(self) -> str:
        return "N/A"


# The installed brokers by name: the host name of their URL.
_brokers: dict[str, Broker] = {}
_transports: dict[str, type[_Transport]] = {}


def attach(broker: Broker, name: str, flavor: Flavor) -> str:
    """Make ``broker`` reachable through kombu as ``name``; returns its URL."""
    scheme = _scheme(flavor)
    _brokers[name] = broker
    return f"{scheme}://{name}/"


def detach(name: str) -> None:
    """Connections to the broker ``name`` fail from now on (with a UsageError that says why)."""
    _brokers.pop(name, None)


def _scheme(flavor: Flavor) -> str:
    """The URL scheme of the flavour's transport, registered with kombu on first use."""
    scheme = f"{INSTALLED_SCHEME_PREFIX}{flavor.name}"
    if flavor.name not in _transports:
        transport = _transports[flavor.name] = _flavored_transport(flavor)
        globals()[f"_{flavor.name}_transport"] = transport
        TRANSPORT_ALIASES[scheme] = f"{__name__}:_{flavor.name}_transport"
        # kombu caches resolved transports: if this module is ever imported afresh (pytester
        # does that), the cache must point at the new class and its broker registry.
        kombu_transport._transport_cache[scheme] = transport
    return scheme


def _flavored_transport(flavor: Flavor) -> type[_Transport]:
    real = flavor.real_transport()
    # Copy only what the real transport declares: kombu treats a transport without
    # ``recoverable_connection_errors`` differently (redis), and that must stay so.
    declared = {
        name: getattr(real, name)
        for name in (
            "connection_errors",
            "channel_errors",
            "recoverable_connection_errors",
            "recoverable_channel_errors",
        )
        if name in vars(real) or hasattr(real, name)
    }
    # kombu's collect() goes another way for a transport with _collect (py-amqp's).
    if hasattr(real, "_collect"):
        declared["_collect"] = _Transport._collect_quietly
    return type(f"Flaky{flavor.name.capitalize()}Transport", (_Transport,), declared)
