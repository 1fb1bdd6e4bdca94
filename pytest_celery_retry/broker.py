"""The flaky in-memory broker: a real kombu transport that fails on command.

Its transport (transport.py) is kombu's own memory transport calling the broker's hooks
(``on_connect``, ``on_publish``, ``on_consume``, ``on_settle``, ``on_restore``) for what a
real broker connection does: establish the connection, put a message, get a message,
acknowledge one, take one back. A fault raises there what the real transport of that
flavour raises, and the transport declares its errors as the real one does, so kombu's
``Connection.ensure`` / ``retry_over_time`` and Celery's publish retry run unchanged and
decide, as in production, what to retry.

Where the two brokers differ is what becomes of the messages a lost connection had not
acknowledged: RabbitMQ requeues them at once; kombu's redis transport puts them back with a
Redis command when the channel closes, and if Redis is down then, they wait in its
``unacked`` hash for ``visibility_timeout`` and a consumer's periodic sweep
(:class:`VisibilityTimeout`).
"""

from __future__ import annotations

import base64
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Queue
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from kombu import serialization
from kombu.exceptions import OperationalError
from kombu.transport import virtual

from . import flavors, transport
from .clock import VirtualClock
from .errors import (
    BlocksForeverError,
    CeleryRetryError,
    UsageError,
    is_finite_number,
    is_whole_number,
    moved_names,
)
from .records import (
    BrokerOperation,
    DeliveredMessage,
    OperationKind,
    PublishRecord,
    RecordedKind,
    Redelivery,
    UnackedMessage,
    describe_exception,
    format_seconds,
    format_table,
    parse_eta,
)

if TYPE_CHECKING:
    from .faults import FaultSchedule

__all__ = ["OPERATIONS", "BrokerDownError", "InMemoryBroker", "OutageMode", "PublishAnnouncements"]

OPERATIONS: tuple[OperationKind, ...] = ("connect", "publish", "consume", "ack")
# How a broker that is away fails: it refuses (a stopped broker, a closed port), or it hangs
# (accepts connections and never answers, as the fault proxy's blackhole()).
OutageMode = Literal["refuse", "hang"]
_OUTAGE_MODES: tuple[OutageMode, ...] = ("refuse", "hang")
# A client's timeout fires a moment after the timeout itself: it sent its request first. So
# kombu's deadline check (``time() > end``) finds a deadline equal to a timeout passed, as it
# always does in production (measured: 1.003 to 1.006 s for a 1 s timeout).
_REQUEST_SENT = 0.001

ExceptionFactory = Callable[[OperationKind], BaseException]

_broker_ids = itertools.count(1)


class BrokerDownError(CeleryRetryError, OperationalError):
    """The worker needs the simulated broker, which is down with nothing to bring it back.

    It is also kombu's ``OperationalError``, which a real worker's consumer ends with once
    ``broker_connection_max_retries`` reconnects have failed.
    """


@dataclass
class _Fault:
    on: frozenset[str]
    remaining: int | None
    skip: int
    error: ExceptionFactory | None
    rate: float = 1.0
    rng: random.Random | None = None
    # The virtual time from which the fault applies (fail_next(starting_in=...)).
    active_from: float = 0.0

    def fires(self, kind: str, now: float) -> bool:
        if kind not in self.on or self.remaining == 0 or now < self.active_from:
            return False
        if self.skip:
            self.skip -= 1
            return False
        if self.rng is not None and self.rng.random() >= self.rate:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


@dataclass
class _Stalled:
    """A publish a hung broker left in the socket's buffer: delivered when the hang ends,
    unless a cut drops the connection first."""

    moment: tuple[float, int]
    queue: str
    message: dict[str, Any]
    record: PublishRecord | None


class InMemoryBroker:
    """An in-memory broker that can refuse connections, drop publishes and go down.

    Installed on a Celery app by the ``flaky_broker`` fixture (and by ``retry_worker``);
    every connection the app makes, producer or worker, goes through it.
    """

    def __init__(
        self,
        clock: VirtualClock,
        flavor: str | None = None,
        seed: int = 0,
        *,
        replaces: str | None = None,
        announcements: PublishAnnouncements | None = None,
    ) -> None:
        # What the real broker of this flavour does differently (Celery's default transport's
        # without a flavour).
        self.rules = flavors.DEFAULT_FLAVOR if flavor is None else flavors.flavor_named(flavor)
        self.clock = clock
        self.flavor = self.rules.name
        self.seed = seed
        # The broker the app was configured with: simulated errors name it as the client would.
        self.address = self.rules.address(replaces)
        self.name = f"broker-{next(_broker_ids)}"
        self.queues: dict[str, Queue[Any]] = {}
        self.exchange_state = virtual.BrokerState()
        self.operations: list[BrokerOperation] = []
        self.publishes: list[PublishRecord] = []
        self._deliveries: list[_Delivery] = []
        # The last delivery of each set of header names (see _Delivery.of).
        self._last_delivery: dict[tuple[str, ...], _Delivery] = {}
        # Each unacknowledged message the broker took back.
        self.redeliveries: list[Redelivery] = []
        # Each message delivered and not yet acknowledged, by delivery tag (a copy the broker
        # restored and delivered again has its tag): held by a consumer, or, on Redis, left in
        # its ``unacked`` hash by a connection lost while Redis was down.
        self._unacked: dict[Any, UnackedMessage] = {}
        # RabbitMQ closes a channel that holds a delivery longer than this (seconds, None:
        # never), checking on each channel tick.
        self._consumer_timeout: float | None = flavors.CONSUMER_TIMEOUT
        self._channel_tick_interval = flavors.CHANNEL_TICK_INTERVAL
        # The app the broker is installed on (its transport options), once installed.
        self.app: Any = None
        self._faults: list[_Fault] = []
        # The FaultSchedule applied to it, if any: invariants print it when they fail.
        self.fault_schedule: FaultSchedule | None = None
        self._down = False
        self._down_how: OutageMode = "refuse"
        self._down_since = 0.0  # when down() began, for BrokerDownError
        # Each scheduled outage(): from, until (virtual seconds), and how the broker is away.
        self._outages: list[tuple[float, float, OutageMode]] = []
        # Publishes a hung RabbitMQ left in the socket's buffer.
        self._stalled: list[_Stalled] = []
        # When each down() or outage() began (or begins): it cuts the connections open then.
        # Moments are (virtual time, event number): things at one virtual instant stay ordered.
        self._outage_starts: list[tuple[float, int]] = []
        self._events = itertools.count()
        self._suspended = 0
        # A client is closing whose process died: it gives nothing back itself.
        self._client_died = False
        self._publish_seq = -1
        # Which task the producer's next operations are for (the session's, shared by its brokers).
        self._announced = announcements or PublishAnnouncements()
        self.url = transport.attach(self, self.name, self.rules)

    def close(self) -> None:
        transport.detach(self.name)

    # -- faults ----------------------------------------------------------------------------
    def fail_next(
        self,
        n: int = 1,
        on: str | Iterable[str] = "connect",
        exc: BaseException | type[BaseException] | None = None,
        after: int = 0,
        starting_in: float = 0,
    ) -> None:
        """Make the next ``n`` operations of kind ``on`` fail (after letting ``after`` pass).

        With ``starting_in``, only operations from that many virtual seconds on count.
        """
        if not is_whole_number(n) or n < 0:
            raise UsageError(
                f"fail_next(n={n!r}): n is how many operations fail, a whole number >= 0 "
                "(use down() for a broker that stays down)"
            )
        if not is_whole_number(after) or after < 0:
            raise UsageError(f"fail_next(after={after!r}): after must be a whole number >= 0")
        start = self._start("fail_next", starting_in)
        self._faults.append(_Fault(_kinds(on), n, after, _error_factory(exc), active_from=start))

    def fail_randomly(
        self,
        rate: float = 0.3,
        seed: int | None = None,
        on: str | Iterable[str] = ("connect", "publish"),
        exc: BaseException | type[BaseException] | None = None,
    ) -> None:
        """Fail each operation of kind ``on`` with probability ``rate``, reproducibly."""
        if not is_finite_number(rate) or not 0 <= rate <= 1:
            raise UsageError(f"fail_randomly(rate={rate!r}): rate is a probability from 0 to 1")
        if seed is not None and not is_whole_number(seed):
            raise UsageError(
                f"fail_randomly(seed={seed!r}): the seed is a whole number (or None for the "
                "run's --celery-retry-seed)"
            )
        rng = random.Random(self.seed if seed is None else seed)
        self._faults.append(_Fault(_kinds(on), None, 0, _error_factory(exc), rate, rng))

    def down(self, how: OutageMode = "refuse") -> None:
        """Be away until :meth:`up`: refuse every operation and cut the open connections, or
        with ``how="hang"`` answer nothing (see :meth:`hang`)."""
        _check_how(how, "down")
        self._deliver_stalled()
        if not self._down:
            self._down_since = self.clock.elapsed
        self._down = True
        self._down_how = how
        if how == "refuse":
            self._outage_starts.append(self._moment())

    def hang(self) -> None:
        """Accept connections and never answer until :meth:`up`, as a broker behind the fault
        proxy's ``blackhole()``: each operation waits, in virtual time, for the timeout the
        real client would wait, and fails as it would (``BlocksForeverError`` without one)."""
        self.down(how="hang")

    def up(self) -> None:
        """End :meth:`down`, :meth:`hang`, every outage, and every pending fault."""
        self._deliver_stalled(ended=True)
        self._down = False
        self._outages.clear()
        self._faults.clear()

    def outage(self, seconds: float, starting_in: float = 0, how: OutageMode = "refuse") -> None:
        """Be down for ``seconds`` of virtual time, from now or ``starting_in`` seconds from now
        (``how="hang"``: hang for that long)."""
        if not is_finite_number(seconds) or seconds <= 0:
            raise UsageError(
                f"outage(seconds={seconds!r}): an outage lasts a positive, finite number of "
                "virtual seconds (down() is a broker that stays down)"
            )
        start = self._start("outage", starting_in)
        _check_how(how, "outage")
        self._deliver_stalled()
        self._outages.append((start, start + seconds, how))
        if how == "refuse":
            self._outage_starts.append((start, next(self._events)))

    def _start(self, method: str, starting_in: float) -> float:
        if not is_finite_number(starting_in) or starting_in < 0:
            raise UsageError(
                f"{method}(starting_in={starting_in!r}): give the virtual seconds from now, >= 0"
            )
        return self.clock.elapsed + starting_in

    def _current_outage(self) -> tuple[float, float, OutageMode] | None:
        if not self._outages:  # asked on every operation: the clock only for an outage
            return None
        now = self.clock.elapsed
        return next((o for o in self._outages if o[0] <= now < o[1]), None)

    @property
    def is_down(self) -> bool:
        """Whether the broker is away now: refusing or hanging."""
        return self._away() is not None

    def _away(self) -> OutageMode | None:
        if self._down:
            return self._down_how
        outage = self._current_outage()
        return outage[2] if outage is not None else None

    def _hangs_until(self) -> float | None:
        """When the current hang ends (``inf``: at :meth:`up`); None when there is none."""
        if self._suspended or self._away() != "hang":
            return None
        outage = self._current_outage()
        return math.inf if self._down or outage is None else outage[1]

    # -- limits on held messages ------------------------------------------------------------
    @property
    def consumer_timeout(self) -> float | None:
        """RabbitMQ's ``consumer_timeout`` in seconds (30 min by default; None: no limit)."""
        return self._consumer_timeout

    @consumer_timeout.setter
    def consumer_timeout(self, seconds: float | None) -> None:
        self._check_rabbitmq_setting("consumer_timeout", seconds, "1800 (RabbitMQ's 30 min)")
        if seconds is not None and (not is_finite_number(seconds) or seconds <= 0):
            raise UsageError(
                f"consumer_timeout={seconds!r}: RabbitMQ's consumer_timeout is a positive number "
                "of seconds (1800 by default), or None for a broker without the limit"
            )
        self._consumer_timeout = None if seconds is None else float(seconds)

    @property
    def channel_tick_interval(self) -> float:
        """How often RabbitMQ checks ``consumer_timeout`` (seconds; 60 by default)."""
        return self._channel_tick_interval

    @channel_tick_interval.setter
    def channel_tick_interval(self, seconds: float) -> None:
        self._check_rabbitmq_setting("channel_tick_interval", seconds, "60")
        if not is_finite_number(seconds) or seconds <= 0:
            raise UsageError(
                f"channel_tick_interval={seconds!r}: RabbitMQ's channel tick is a positive "
                "number of seconds (60 by default)"
            )
        self._channel_tick_interval = float(seconds)

    def _check_rabbitmq_setting(self, name: str, value: object, example: str) -> None:
        if name not in self.rules.broker_settings:
            raise UsageError(
                f"{name}={value!r} is a RabbitMQ setting, and this broker is of the "
                f"{self.flavor} flavour, which has no {name} (Redis's limit on a held message is "
                "the app's broker_transport_options['visibility_timeout']). Choose "
                f"celery_retry_flavor='pyamqp' for RabbitMQ, e.g. with {name}={example}"
            )

    @property
    def unacked(self) -> list[UnackedMessage]:
        """Every message delivered and not yet acknowledged, oldest delivery first.

        Those a worker holds (waiting for their ETA, or running), and on Redis those a
        connection lost while Redis was down left in its ``unacked`` hash until a visibility
        sweep.
        """
        return sorted(self._unacked.values(), key=lambda entry: entry.delivered_at)

    def suspend_faults(self) -> _Suspended:
        """Context manager: operations inside succeed and are not counted against faults."""
        return _Suspended(self)

    @contextmanager
    def client_died(self, died: bool = True) -> Iterator[None]:
        """Connections closed inside belong to a worker that died (with ``died``)."""
        self._client_died = died
        try:
            yield
        finally:
            self._client_died = False

    # -- records ---------------------------------------------------------------------------
    @property
    def connection_attempts(self) -> list[BrokerOperation]:
        return [op for op in self.operations if op.kind == "connect"]

    @property
    def publish_attempts(self) -> list[BrokerOperation]:
        return [op for op in self.operations if op.kind == "publish"]

    @property
    def last_publish(self) -> PublishRecord | None:
        return self.publishes[-1] if self.publishes else None

    @property
    def publish_retry_intervals(self) -> list[float]:
        """Virtual seconds between the tries of the most recent publish."""
        last = self.last_publish
        return last.intervals if last is not None else []

    def messages(self, queue: str | None = "celery", since: int = 0) -> list[DeliveredMessage]:
        """Every task message the broker accepted on ``queue`` (all queues with ``None``).

        ``since`` skips the first deliveries (see :attr:`delivery_count`).
        """
        self._deliver_stalled()
        return [
            _decode(delivery, self.clock)
            for delivery in self._deliveries[since:]
            if queue is None or delivery.queue == queue
        ]

    @property
    def delivery_count(self) -> int:
        """How many messages the broker has accepted so far, on all queues."""
        self._deliver_stalled()
        return len(self._deliveries)

    def pending(self, queue: str = "celery") -> int:
        """Messages waiting in ``queue`` (delivered, not yet consumed)."""
        self._deliver_stalled()
        q = self.queues.get(queue)
        return q.qsize() if q is not None else 0

    def timeline(self) -> str:
        rows = [
            [
                f"{op.t:.3f}s",
                op.kind,
                op.role,
                op.result,
                op.task_name or op.queue or "-",
                describe_exception(op.error) if op.error else "",
            ]
            for op in self.operations
        ]
        table = format_table(["t", "operation", "by", "result", "task/queue", "error"], rows)
        publishes = "\n".join(
            f"  publish {i + 1}: {p.task_name or '?'} -> {p.outcome} after {p.attempts} "
            f"attempt(s) at t={', '.join(format_seconds(x) for x in p.attempt_times)}"
            for i, p in enumerate(self.publishes)
        )
        head = f"broker timeline ({self.flavor} flavour, {len(self.operations)} operations)"
        return f"{head}\n{table}\n{publishes}".rstrip()

    # -- the transport's hooks (transport.Broker) ------------------------------------------
    def on_connect(self, client: transport.Client) -> None:
        hung = self._wait_if_hung("connect", client)
        self._operate("connect", client, hung=hung)
        client.opened_at = self._moment()

    def on_publish(
        self,
        client: transport.Client,
        queue: str,
        message: dict[str, Any],
        confirm_timeout: float | None = None,
    ) -> bool:
        stalls = self._publish_stalls(client, confirm_timeout)
        hung = None if stalls else self._wait_if_hung("publish", client, queue, confirm_timeout)
        self._operate("publish", client, queue=queue, hung=hung)
        if stalls:
            record = self.publishes[-1] if self.publishes else None
            self._stalled.append(_Stalled(self._moment(), queue, message, record))
            self._announced.delivered()  # the publish returned: the next one is another
            return False
        self._record_delivery(queue, message)
        return True

    def on_consume(self, client: transport.Client, queue: str) -> bool:
        # Polling an empty queue is not worth a record; a failure is.
        self._deliver_stalled()
        if self._hangs_until() is not None:
            self._rules_hung_wait("consume", client)
            return False  # a hung broker delivers nothing
        self._fail_if_faulty("consume", client, queue)
        return True

    def on_settle(self, client: transport.Client) -> bool:
        # An acknowledgement or rejection: as frequent as consumes, recorded when it fails.
        if self._hangs_until() is not None:
            if self._rules_hung_wait("ack", client) is None:
                return False  # no answer expected: it waits in the socket buffer
            hung = self._wait_if_hung("ack", client)
            if hung is not None:
                self._record("ack", client.role, None, None, hung=hung)
        self._fail_if_faulty("ack", client, None)
        return True

    def on_qos(self, client: transport.Client) -> float | None:
        """The worker's consumer changes its prefetch count: how long it waited for a hung
        broker's answer, if it did (``BlocksForeverError`` when it would wait for ever)."""
        hung = self._wait_if_hung("qos", client)
        if hung is not None:
            self._record("qos", client.role, None, None, hung=hung)
        return hung

    def on_deliver(self, message: Any) -> None:
        self._unacked[message.delivery_tag] = UnackedMessage(self.clock.elapsed, message)

    def on_acked(self, delivery_tag: Any) -> None:
        self._unacked.pop(delivery_tag, None)

    def on_close(self, client: transport.Client) -> None:
        # Closing a channel is recorded only when the client waits for a hung broker's answer.
        hung = self._wait_if_hung("close", client)
        if hung is not None:
            self._record("close", client.role, None, None, hung=hung)

    def on_restore(self, message: Any) -> bool:
        if self.rules.parks_unacked_while_down and (self.is_down or self._client_died):
            # The message stays in the ``unacked`` hash until a visibility sweep finds it.
            self._unacked.setdefault(
                message.delivery_tag, UnackedMessage(self.clock.elapsed, message)
            )
            return False
        self._unacked.pop(message.delivery_tag, None)
        self._record_redelivery(message)
        return True

    # -- a broker that hangs -----------------------------------------------------------------
    def _wait_if_hung(
        self,
        kind: RecordedKind,
        client: transport.Client,
        queue: str | None = None,
        confirm_timeout: float | None = None,
    ) -> float | None:
        """Wait, in virtual time, as the real client waits for a hung broker's answer.

        Returns how long it waited when the hang ended first (the broker answers then), None
        when there is no hang or the request needs no answer. Raises what the client raises
        when its timeout passes first, and ``BlocksForeverError`` when no timeout ever would.
        """
        self._deliver_stalled()
        until = self._hangs_until()
        if until is None or client.blocked_forever:
            # The client that blocked for ever never got to close what the error unwinds.
            return None
        wait = self._rules_hung_wait(kind, client, confirm_timeout)
        if wait is None:
            return None
        now = self.clock.elapsed
        if wait.timeout is None or now + wait.timeout + _REQUEST_SENT >= until:
            if until == math.inf:
                forever = BlocksForeverError(self._blocks_forever(kind, wait.unbounded))
                self._record(kind, client.role, forever, queue)
                client.blocked_forever = True
                raise forever
            self.clock.sleep(until - now)
            return until - now
        waited = wait.timeout + _REQUEST_SENT
        self.clock.sleep(waited)
        error = wait.error()
        self._record(kind, client.role, error, queue, hung=waited)
        if kind == "connect" and client.role == "consumer" and self._down:
            raise BrokerDownError(self._down_for_good()) from error
        raise error

    def _publish_stalls(self, client: transport.Client, confirm_timeout: float | None) -> bool:
        """Whether a publish returns at once into a hung broker's socket buffer (py-amqp
        without publisher confirms)."""
        if self._hangs_until() is None:
            return False
        return self.rules.hung_wait("publish", client.settings(confirm_timeout)) is None

    def _deliver_stalled(self, ended: bool = False) -> None:
        """Deliver what a hang stalled, once it is over (``ended``: it ends now)."""
        if not self._stalled or (not ended and self._away() == "hang"):
            return
        ended_at = self.clock.elapsed
        begun = [end for start, end, _ in self._outages if start <= ended_at]
        if not ended and not self._down and begun:
            ended_at = min(ended_at, max(begun))
        stalled, self._stalled = self._stalled, []
        for frames in stalled:
            cut = (frames.moment < start <= (ended_at, math.inf) for start in self._outage_starts)
            if any(cut):
                continue  # a cut dropped the connection and the frames in its buffer
            self._deliveries.append(
                _Delivery.of(frames.queue, ended_at, frames.message, self._last_delivery)
            )
            self.queues.setdefault(frames.queue, Queue()).put(frames.message)
            if frames.record is not None:
                frames.record.delivered = True

    def _blocks_forever(self, kind: RecordedKind, why: str) -> str:
        what = {
            "connect": "connecting",
            "publish": "publishing",
            "close": "closing a channel",
            "qos": "the worker's prefetch change",
        }
        return (
            f"{what.get(kind, kind)} would block for ever in production: the broker hangs "
            f"(flaky_broker.hang() at t={format_seconds(self._down_since)}, no up() since) and "
            f"{why}.\n\n{self.timeline()}"
        )

    def _rules_hung_wait(
        self, kind: RecordedKind, client: transport.Client, confirm_timeout: float | None = None
    ) -> flavors.HungWait | None:
        return self.rules.hung_wait(kind, client.settings(confirm_timeout))

    def hanging_at(self, t: float) -> bool:
        """Whether the broker hangs at virtual time ``t`` (now or later, as scheduled)."""
        if self._suspended:
            return False
        if self._down and self._down_how == "hang" and t >= self._down_since:
            return True
        return any(start <= t < end and how == "hang" for start, end, how in self._outages)

    @property
    def hang_ends_at(self) -> float | None:
        """When the current hang ends (``inf``: at :meth:`up`); None when there is none."""
        return self._hangs_until()

    @property
    def holds_undelivered(self) -> bool:
        """Whether messages wait for a consumer: queued, or stalled in a hung connection."""
        return bool(self._stalled) or any(q.qsize() for q in self.queues.values())

    def _operate(
        self,
        kind: OperationKind,
        client: transport.Client,
        queue: str | None = None,
        hung: float | None = None,
    ) -> None:
        error = self._error_for(kind, client)
        self._record(kind, client.role, error, queue, hung=hung)
        if error is None:
            return
        if kind == "connect" and client.role == "consumer" and self._down:
            # Celery's consumer would retry broker_connection_max_retries times (100 log lines,
            # or forever with None) while the test, waiting in the worker, cannot call up().
            raise BrokerDownError(self._down_for_good()) from error
        raise error

    def _down_for_good(self) -> str:
        return (
            f"the simulated broker is still down: flaky_broker.{self._down_how_called()} at "
            f"t={format_seconds(self._down_since)} was never followed by up(), so the worker "
            "cannot connect, and nothing brings the broker back while the worker runs (a real "
            "worker's consumer would retry broker_connection_max_retries times, then fail with "
            "OperationalError). Call flaky_broker.up() before running the worker, or use "
            "flaky_broker.outage(seconds=...) for a broker that comes back by itself.\n\n"
            f"{self.timeline()}"
        )

    def _down_how_called(self) -> str:
        return "hang()" if self._down_how == "hang" else "down()"

    def _fail_if_faulty(
        self, kind: OperationKind, client: transport.Client, queue: str | None
    ) -> None:
        error = self._error_for(kind, client)
        if error is not None:
            self._record(kind, client.role, error, queue)
            raise error

    def _error_for(self, kind: OperationKind, client: transport.Client) -> BaseException | None:
        """What an operation of ``kind`` on ``client``'s connection raises now, if anything."""
        return self._fault_for(kind) or self._cut_since_opened(kind, client)

    def _moment(self) -> tuple[float, int]:
        return (self.clock.elapsed, next(self._events))

    def _cut_since_opened(
        self, kind: OperationKind, client: transport.Client
    ) -> BaseException | None:
        """The error of an operation on a connection that an outage cut after it opened.

        A broker that goes away drops its open connections, also when it is back before the
        client's next operation. py-amqp then fails on the dead socket, publish and ack
        included, until kombu reconnects. redis-py reconnects by itself for a command (a
        publish, an ack); only the worker's consuming connection is seen to break.
        """
        opened_at = client.opened_at
        if kind == "connect" or self._suspended or opened_at is None or not self._outage_starts:
            return None
        now = self._moment()
        if not any(opened_at < start <= now for start in self._outage_starts):
            return None
        if self.rules.client_reconnects and kind != "consume":
            if client.role != "consumer":
                client.opened_at = now  # the producer's client reconnected
            # A worker's ack goes over its own pooled connection; its reading one stays cut.
            return None
        return self.rules.closed_by_broker_error(self.address)

    @property
    def next_outage_start(self) -> float | None:
        """When the next scheduled :meth:`outage` begins, if one lies ahead (virtual seconds)."""
        now = self.clock.elapsed
        return min((start for start, _, _ in self._outages if start > now), default=None)

    def _fault_for(self, kind: OperationKind) -> BaseException | None:
        if self._suspended:
            return None
        if self._away() == "refuse":
            return self.rules.error(kind, self.address)
        if not self._faults:
            return None
        now = self.clock.elapsed
        for fault in self._faults:
            if fault.fires(kind, now):
                if fault.error is not None:
                    return fault.error(kind)
                return self.rules.error(kind, self.address)
        return None

    def _record(
        self,
        kind: RecordedKind,
        role: str,
        error: BaseException | None,
        queue: str | None,
        hung: float | None = None,
    ) -> None:
        op = BrokerOperation(
            kind=kind,
            # When it began: a hung operation is recorded once the client stopped waiting.
            t=self.clock.elapsed - (hung or 0.0),
            ok=error is None,
            error=error,
            role="consumer" if role == "consumer" else "producer",
            task_id=self._announced.task_id,
            task_name=self._announced.task_name,
            queue=queue,
            hung=hung,
        )
        if op.role == "consumer":
            op.task_id = op.task_name = None
        self.operations.append(op)
        if op.role == "producer" and kind in ("connect", "publish", "ack"):
            self._publish_record_for(op).operations.append(op)

    def _publish_record_for(self, op: BrokerOperation) -> PublishRecord:
        current = self.publishes[-1] if self.publishes else None
        if current is None or self._publish_seq != self._announced.seq:
            self._publish_seq = self._announced.seq
            current = PublishRecord(op.task_id, op.task_name)
            self.publishes.append(current)
        return current

    def _record_delivery(self, queue: str, message: dict[str, Any]) -> None:
        self._deliveries.append(
            _Delivery.of(queue, self.clock.elapsed, message, self._last_delivery)
        )
        if self.publishes:
            self.publishes[-1].delivered = True
        self._announced.delivered()

    def _record_redelivery(self, message: Any) -> None:
        headers = message.headers or {}
        self.redeliveries.append(
            Redelivery(self.clock.elapsed, headers.get("id", ""), headers.get("task", ""))
        )

    def __repr__(self) -> str:
        return f"<InMemoryBroker {self.url} flavor={self.flavor} down={self.is_down}>"


class _Suspended:
    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker

    def __enter__(self) -> InMemoryBroker:
        self.broker._suspended += 1
        return self.broker

    def __exit__(self, *exc_info: object) -> None:
        self.broker._suspended -= 1


class PublishAnnouncements:
    """Which logical publish the producer's next operations belong to.

    Celery's ``before_task_publish`` signal announces each (:meth:`announce` is the
    receiver); a delivery ends it. The test's session owns one for all its brokers.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.task_id: str | None = None
        self.task_name: str | None = None

    def announce(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        headers = headers or {}
        self.seq += 1
        self.task_id = headers.get("id")
        self.task_name = headers.get("task")

    def delivered(self) -> None:
        # The next publish is a new one even when Celery's signal did not announce it
        # (plain kombu producers).
        self.seq += 1
        self.task_id = self.task_name = None


def _check_how(how: object, method: str) -> None:
    if how not in _OUTAGE_MODES:
        raise UsageError(
            f"{method}(how={how!r}): choose 'refuse' (the broker refuses, as a stopped one) or "
            "'hang' (it accepts connections and never answers)"
        )


def _kinds(on: str | Iterable[str]) -> frozenset[str]:
    try:
        kinds = frozenset([on] if isinstance(on, str) else on)
    except TypeError:  # not iterable (None), or a list of lists: not kinds either way
        kinds = frozenset()
    unknown = kinds - set(OPERATIONS)
    if unknown or not kinds:
        raise UsageError(
            f"on={on!r}: a fault applies to {', '.join(repr(k) for k in OPERATIONS)} "
            "(or a list of them)"
        )
    return kinds


def _error_factory(exc: BaseException | type[BaseException] | None) -> ExceptionFactory | None:
    if exc is None:
        return None
    if isinstance(exc, BaseException):
        return lambda kind: exc
    if isinstance(exc, type) and issubclass(exc, BaseException):
        return lambda kind: exc(f"simulated {kind} failure")
    raise UsageError(f"exc={exc!r}: pass an exception instance or class")


class _Delivery(NamedTuple):
    """A message the broker accepted, as kombu handed it over, less what no record shows.

    kombu's ``properties`` (delivery info and tag, priority, reply-to, ...) are a third of a
    message's memory, and only their ``body_encoding`` is needed, to decode the body. The
    headers are kept as their names and values (a dict of them is made on each read, as a
    copy was before), and what equals the same header, or the body, of the last message with
    the same header names (a task's retries) is that message's own string: every retry's
    message decodes its own copy of each string, most of them the same.
    """

    queue: str
    t: float
    header_names: tuple[str, ...]
    header_values: tuple[Any, ...]
    body: Any
    content_type: str
    content_encoding: str
    base64: bool

    @classmethod
    def of(
        cls,
        queue: str,
        t: float,
        message: dict[str, Any],
        last_by_names: dict[tuple[str, ...], _Delivery],
    ) -> _Delivery:
        """The delivery of ``message``; ``last_by_names`` is the last delivery of each set of
        header names, which this one shares its equal strings with (and then replaces)."""
        properties = message.get("properties") or {}
        headers = message.get("headers") or {}
        names = tuple(headers)
        values = tuple(headers.values())
        body = message["body"]
        last = last_by_names.get(names)
        if last is not None:
            names = last.header_names
            values = tuple(map(_same_string, values, last.header_values))
            body = _same_string(body, last.body)
        delivery = cls(
            queue,
            t,
            names,
            values,
            body,
            message["content-type"],
            message["content-encoding"],
            properties.get("body_encoding") == "base64",
        )
        last_by_names[names] = delivery
        return delivery


def _same_string(value: Any, earlier: Any) -> Any:
    """``earlier`` where it is a string (or bytes) equal to ``value``: immutable, so nothing
    read from either can tell them apart. Anything else stays itself (a list or dict a test
    could change through one message must not change another)."""
    kind = type(value)
    if (kind is str or kind is bytes) and type(earlier) is kind and earlier == value:
        return earlier
    return value


def _decode(delivery: _Delivery, clock: VirtualClock) -> DeliveredMessage:
    queue, t = delivery.queue, delivery.t
    body: Any = delivery.body
    if delivery.base64:
        body = base64.b64decode(body)
    decoded = serialization.loads(body, delivery.content_type, delivery.content_encoding)
    headers = dict(zip(delivery.header_names, delivery.header_values))
    if isinstance(decoded, dict) and "task" in decoded:  # task protocol 1
        headers = {**headers, **decoded}
        args, kwargs = decoded.get("args", ()), decoded.get("kwargs", {})
    else:
        args, kwargs = decoded[0], decoded[1]
    eta = headers.get("eta")
    countdown = None
    if eta:
        countdown = round((parse_eta(eta) - clock.started_at).total_seconds() - t, 6)
    return DeliveredMessage(
        queue=queue,
        t=t,
        task_name=headers.get("task", ""),
        task_id=headers.get("id", ""),
        args=args,
        kwargs=kwargs,
        headers=headers,
        eta=eta,
        retries=int(headers.get("retries") or 0),
        countdown=countdown,
    )


__getattr__ = moved_names(
    __name__,
    {
        "VisibilityTimeout": (
            "pytest_celery_retry.flavors.VisibilityTimeout",
            lambda: flavors.VisibilityTimeout,
        ),
        "FLAVORS": ("pytest_celery_retry.flavors.FLAVORS", lambda: tuple(flavors.FLAVORS)),
        "flavor_for_url": (
            "pytest_celery_retry.flavors.flavor_for_url(url).name",
            lambda: lambda url: flavors.flavor_for_url(url).name,
        ),
        "CONSUMER_ROLE_OPTION": (
            "pytest_celery_retry.transport.CONSUMER_ROLE_OPTION",
            lambda: transport.CONSUMER_ROLE_OPTION,
        ),
    },
)
