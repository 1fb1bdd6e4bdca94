"""The kombu transport of the in-memory broker: kombu's memory transport with broker hooks.

Every connection an app makes to an installed in-memory broker is one of these transports:
it establishes the connection, puts, gets, acknowledges and restores messages through the
:class:`Broker` protocol, where a fault raises what the real transport raises. Each flavour
gets a subclass that declares the real transport's errors, so kombu's and Celery's retry
code decides, as in production, what to retry.
"""

from __future__ import annotations

from queue import Queue
from typing import Any, Protocol

import kombu.transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES, memory, virtual

from .clock import VirtualClock
from .errors import UsageError
from .flavors import Flavor

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


class Broker(Protocol):
    """What the transport needs of the broker it connects to (:class:`InMemoryBroker`)."""

    clock: VirtualClock
    queues: dict[str, Queue[Any]]
    exchange_state: virtual.BrokerState

    def on_connect(self, client: Client) -> None:
        """Raise the connect's fault, if any; record the connect."""

    def on_publish(self, client: Client, queue: str, message: dict[str, Any]) -> None:
        """Raise the publish's fault, if any; record the publish and its delivery."""

    def on_consume(self, client: Client, queue: str) -> None:
        """Raise the poll's fault, if any."""

    def on_settle(self, client: Client) -> None:
        """Raise the ack's (or reject's) fault, if any."""

    def on_restore(self, message: Any, delivered_at: float | None) -> bool:
        """Whether an unacknowledged message goes back to its queue now (else it is parked)."""


class _QoS(virtual.QoS):
    """kombu's QoS, noting when each unacknowledged message was delivered (redis needs it)."""

    channel: _Channel

    def __init__(self, channel: _Channel, prefetch_count: int = 0) -> None:
        super().__init__(channel, prefetch_count)
        self.delivered_at: dict[Any, float] = {}

    def append(self, message: Any, delivery_tag: Any) -> None:
        super().append(message, delivery_tag)
        self.delivered_at[delivery_tag] = self.channel.connection.broker.clock.elapsed

    def ack(self, delivery_tag: Any) -> None:
        super().ack(delivery_tag)
        self.delivered_at.pop(delivery_tag, None)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        self.delivered_at.pop(delivery_tag, None)


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
        super().__init__(connection, **kwargs)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        self.connection.broker.on_settle(self.connection)
        super().basic_ack(delivery_tag, multiple)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self.connection.broker.on_settle(self.connection)
        super().basic_reject(delivery_tag, requeue=requeue)

    def _restore(self, message: Any) -> None:
        # Returning an unacknowledged message to its queue is the broker's own doing (the
        # consumer rejected it or its connection closed): not a publish that can fail, and
        # not a new delivery.
        delivered_at = self.qos.delivered_at.pop(message.delivery_tag, None)
        if not self.connection.broker.on_restore(message, delivered_at):
            return
        # What the worker's Request reads as delivery_info["redelivered"]: RabbitMQ's flag
        # on the delivery, kombu's redis transport's mark on the message it puts back.
        message.delivery_info["redelivered"] = True
        self._restoring = True
        try:
            super()._restore(message)
        finally:
            self._restoring = False

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if not self._restoring:
            self.connection.broker.on_publish(self.connection, queue, message)
        super()._put(queue, message, **kwargs)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        self.connection.broker.on_consume(self.connection, queue)
        message: dict[str, Any] = super()._get(queue, timeout)
        return message


class _Transport(memory.Transport):
    """kombu's memory transport bound to one broker (found by host name)."""

    Channel = _Channel
    driver_name = "pytest-celery-retry"
    opened_at: tuple[float, int] | None = None

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
    scheme = f"celery-retry-{flavor.name}"
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
    return type(f"Flaky{flavor.name.capitalize()}Transport", (_Transport,), declared)
