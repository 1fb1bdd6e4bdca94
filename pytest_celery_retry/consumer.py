"""The retry worker's consumer: its connection to one app's broker and the messages it holds.

It fetches as a worker's consumer does (prefetch limit, Celery's own reconnect policy), holds
ETA messages and rate-limited requests on virtual time (Celery's own token buckets), builds
Celery's worker ``Request`` for each message, and runs the redis flavour's visibility sweeps.
What became of each message it settles (acked, rejected, requeued, or an ack that failed)
reaches the worker through one callback.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from celery.exceptions import WorkerShutdown
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request
from kombu.serialization import prepare_accept_content

from .errors import UsageError, WorkerStoppedError
from .records import MessageEvent
from .transport import CONSUMER_ROLE_OPTION

if TYPE_CHECKING:
    from .broker import InMemoryBroker
    from .flavors import Heartbeats, HeldLimit
    from .session import AppInstallation

__all__ = ["Consumer", "Settled"]

# The priority Celery's default strategy gives an ETA message on the worker's timer.
_ETA_PRIORITY = 6
# Told what became of a message the consumer settled: its task id and the action
# ("acked", "rejected", "requeued", or "ack failed", "reject failed", "requeue failed").
Settled = Callable[[str, str], None]


@dataclass(order=True)
class _Timed:
    """An entry of the worker's timer, ordered as kombu's Timer orders them."""

    due: datetime
    priority: int
    seq: int
    fire: Callable[..., None] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)


class Consumer:
    """The worker's own connection to one app's broker, and the messages it holds.

    Rate limits run on Celery's own Consumer code, borrowed below: a kombu TokenBucket per
    task type (it reads ``time.monotonic``, which the virtual clock freezes) and the
    scheduling that holds a request until its bucket has a token. This object stands in for
    the attributes that code reads: ``task_buckets``, ``timer`` (itself, on virtual time)
    and ``_limit_move_to_pool`` (the ready queue).
    """

    bucket_for_task = CeleryConsumer.bucket_for_task
    reset_rate_limits = CeleryConsumer.reset_rate_limits
    _limit_task = CeleryConsumer._limit_task
    _schedule_bucket_request = CeleryConsumer._schedule_bucket_request

    def __init__(
        self,
        installed: AppInstallation,
        events: list[MessageEvent],
        on_settled: Settled,
        on_limit: Callable[[MessageEvent], None],
    ) -> None:
        self.app = installed.app
        self.broker: InMemoryBroker = installed.broker
        self.events = events
        self._on_settled = on_settled
        self.ready: deque[Any] = deque()
        # ETA messages and rate-limited requests waiting for their moment (a heap).
        self.held: list[_Timed] = []
        self._seq = itertools.count()
        self.timer = self
        self._limit_order = 0
        self.disable_rate_limits = bool(self.app.conf.worker_disable_rate_limits)
        self.task_buckets: defaultdict[str, Any] = defaultdict(lambda: None)
        self.reset_rate_limits()
        # When each request met its bucket, then how long the bucket held it, by id(request).
        self._limited_since: dict[int, float] = {}
        self._rate_limit_holds: dict[int, float] = {}
        # The attributes Celery's Consumer.ensure_connected reads and updates.
        self._celery_state = SimpleNamespace(
            app=self.app, first_connection_attempt=True, broker_connection_retry_attempt=0
        )
        # What the broker does to a message held unacknowledged for long: Redis's visibility
        # sweep, RabbitMQ's consumer_timeout (read at each connect, see _connect).
        self.limit: HeldLimit | None = None
        self._on_limit = on_limit
        self.registered_at = 0.0
        # The last sweep or channel tick that acted on this connection.
        self.checked_at: float | None = None
        # Why the connection is known to be dead before the next poll (a failed ack).
        self.broken_by: str | None = None
        # What the worker's loop raises at its next turn (a heartbeat check that failed).
        self.loop_error: BaseException | None = None
        self.heartbeats: Heartbeats | None = None
        # An ETA's request went to the pool: the prefetch count comes down after it ran.
        self._prefetch_drops = False
        # Why the worker is dead (retry_worker.redeliver): it sends nothing more, and the next
        # poll is a new worker's, after the broker took back what the dead one held.
        self.died_of: str | None = None
        self.connection = self._connect()

    def _connect(self) -> Any:
        """Connect as a worker's consumer does: Celery's own ensure_connected and its policy."""
        connection = self.app.connection_for_read(
            transport_options={CONSUMER_ROLE_OPTION: "consumer"}
        )
        connected = CeleryConsumer.ensure_connected(self._celery_state, connection)
        # RabbitMQ reads consumer_timeout when a channel opens and keeps it for the channel's
        # life (measured, docs/broker-limits.md), and kombu's Redis channel its transport
        # options: a new value reaches the connection opened next.
        self.limit = self.broker.rules.held_limit(self.app, self.broker)
        # The consumer registers with the event loop now: its visibility sweeps (and its
        # channel's ticks) count from here.
        self.registered_at = self.broker.clock.elapsed
        self.checked_at = None
        self.heartbeats = self.broker.rules.heartbeats(self.app, self.registered_at)
        return connected

    def close(self) -> None:
        self.connection.release()

    def fetch(self) -> None:
        """Take what the broker holds; a lost connection is handled as Celery's consumer does."""
        recoverable = tuple(self.connection.connection_errors)
        if self.app.conf.broker_channel_error_retry:
            recoverable += tuple(self.connection.channel_errors)
        while True:
            try:
                if self.died_of is not None:
                    self._on_death(self.died_of)
                if self.broken_by is not None:
                    # A real consumer's next read on the dead socket fails.
                    self._on_connection_lost(self.broken_by)
                if self.loop_error is not None:
                    error, self.loop_error = self.loop_error, None
                    raise error
                self._after_the_pool()
                self._fetch()
                return
            except recoverable as exc:
                self._on_connection_lost(repr(exc), exc)
            except tuple(self.connection.channel_errors) as exc:
                self._stop(exc)

    def _stop(self, exc: BaseException) -> None:
        # As celery.worker.worker.WorkController.start: an error the consumer does not
        # recover from ends the worker ("Unrecoverable error"), and the broker takes back
        # what its connection held.
        self._connection_event("worker stopped", f"Unrecoverable error: {exc!r}")
        held = len(self.broker.unacked)
        self.ready.clear()
        self.held.clear()
        with self.broker.suspend_faults():
            self.connection.release()
        raise WorkerStoppedError(
            f"the worker stopped at t={self.broker.clock.elapsed:g}s with Celery's "
            f"'Unrecoverable error: {exc!r}'. Celery's consumer reconnects after a connection "
            "error, but after a channel error only with broker_channel_error_retry=True (off "
            f"by default): a real worker process exits here. The broker took back the {held} "
            "message(s) it held; they wait for a worker to start again. Keep countdowns "
            "within the broker's limits (assert_fits_broker_limits), set "
            "broker_channel_error_retry=True, or, if production's RabbitMQ allows longer, give "
            "the simulated one its consumer_timeout (flaky_broker.consumer_timeout = seconds)"
        ) from exc

    def _on_connection_lost(self, reason: str, exc: BaseException | None = None) -> None:
        # As celery.worker.consumer.Consumer.start: without broker_connection_retry the worker
        # shuts down; otherwise it drops the connection (the broker takes back every message
        # it had not acknowledged, ETA messages held here included) and reconnects with
        # broker_connection_max_retries, sleeping on the virtual clock.
        self.broken_by = None
        self._connection_event("connection lost", reason)
        if not self.app.conf.broker_connection_retry:
            self._connection_event("worker shutdown", "broker_connection_retry=False")
            raise WorkerShutdown(1) from exc
        self._reconnect(died=False)
        self._connection_event("reconnected")

    def die(self, reason: str) -> None:
        """The worker dies now: what it has not acknowledged stays unacknowledged."""
        self.died_of = reason
        self._connection_event("worker died", reason)

    def _on_death(self, reason: str) -> None:
        # A killed worker closes nothing: the broker takes back what it held as the broker
        # itself does that (RabbitMQ at once; on Redis the unacked hash keeps it for a
        # visibility sweep). The restarted worker connects afresh, when it next polls.
        self.died_of = self.broken_by = None
        self._reconnect(died=True)
        self._connection_event("worker restarted")

    def _reconnect(self, died: bool) -> None:
        """Drop the connection (the broker takes back what it held unacknowledged), reconnect."""
        self.ready.clear()
        self.held.clear()
        # As Celery's Consumer.on_close: the buckets keep their tokens, not their requests.
        for bucket in self.task_buckets.values():
            if bucket:
                bucket.clear_pending()
        self._limited_since.clear()
        self._rate_limit_holds.clear()
        with self.broker.suspend_faults(), self.broker.client_died(died):
            self.connection.release()
        self.connection = self._connect()

    def _connection_event(self, action: str, detail: str = "") -> None:
        """Record what happened to the connection itself (no task is concerned)."""
        self.events.append(MessageEvent(self.broker.clock.elapsed, "", "", action, detail))

    def _fetch(self) -> None:
        channel = self.connection.default_channel
        # A broker that is down neither sweeps nor ticks.
        if self.limit is not None and not self.broker.is_down:
            self.limit.enforce(self)
        now: datetime | None = None  # read once, for the first ETA: taking nothing moves it
        for queue in list(self.broker.queues):
            while self._can_reserve():
                message = channel.basic_get(queue, no_ack=False)
                if message is None:
                    break
                request = self._request_for(message)
                eta = request.eta
                if eta is not None and now is None:
                    now = self.broker.clock.now()
                if eta is not None and eta > now:
                    # Celery's default strategy: the ETA first, then the rate limit.
                    self.call_at(eta, self._admit, (request,), priority=_ETA_PRIORITY)
                else:
                    self._admit(request)

    def _can_reserve(self) -> bool:
        """Whether the worker's prefetch limit lets it take another message from the broker.

        The limit is worker_prefetch_multiplier x concurrency (1 here) unacknowledged
        messages. Celery raises it for each ETA message it holds, so those do not count, but
        messages waiting for their rate limit do: a rate-limited backlog keeps a real worker
        from fetching other tasks, and so it does here.
        """
        limit = self.app.conf.worker_prefetch_multiplier
        waiting = sum(len(bucket.contents) for bucket in self.task_buckets.values() if bucket)
        return not limit or len(self.ready) + waiting < limit

    def _admit(self, request: Any) -> None:
        """Let a due request go to the pool, through its task's rate limit if it has one."""
        bucket = None if self.disable_rate_limits else self._bucket(request.task)
        if bucket is None:
            self.ready.append(request)
            return
        self._limited_since[id(request)] = self.broker.clock.elapsed
        self._limit_task(request, bucket, 1)

    def _bucket(self, task: Any) -> Any:
        # A real worker builds its buckets when it starts, after every task is registered;
        # a test may register a task after this worker connected.
        if task.name not in self.task_buckets:
            self.task_buckets[task.name] = self.bucket_for_task(task)
        return self.task_buckets[task.name]

    def _limit_move_to_pool(self, request: Any) -> None:
        held = self.broker.clock.elapsed - self._limited_since.pop(id(request))
        if held > 0:
            self._rate_limit_holds[id(request)] = held
        self.ready.append(request)

    def rate_limit_hold(self, request: Any) -> float:
        """Virtual seconds the rate limit held ``request`` back before it went to the pool."""
        return self._rate_limit_holds.pop(id(request), 0.0)

    # -- the timer Celery's rate-limit code schedules on (kombu's Timer interface) ----------
    def call_at(
        self, eta: datetime, fun: Callable[..., None], args: tuple[Any, ...], priority: int = 0
    ) -> None:
        heapq.heappush(self.held, _Timed(eta, priority, next(self._seq), fun, args))

    def call_after(
        self, secs: float, fun: Callable[..., None], args: tuple[Any, ...], priority: int = 0
    ) -> None:
        # At least a microsecond (the clock's resolution): a bucket a float rounding short of
        # a token asks for a wait that would otherwise leave the clock, and the bucket, as is.
        wait = timedelta(microseconds=max(1, round(secs * 1e6)))
        self.call_at(self.broker.clock.now() + wait, fun, args, priority)

    # -- what a broker limit sees of this consumer (flavors.Holder) ------------------------
    def unacked(self) -> list[Any]:
        # What is ready to run now has run, as far as the broker's timers go: at one virtual
        # instant the ETA comes before a sweep or a tick.
        taken = {request.message.delivery_tag for request in self.ready}
        return [entry for entry in self.broker.unacked if entry.message.delivery_tag not in taken]

    def limit_crossed(self, message: Any, action: str, detail: str) -> None:
        headers = message.headers or {}
        self._on_limit(
            MessageEvent(
                self.broker.clock.elapsed,
                headers.get("id", ""),
                headers.get("task", ""),
                action,
                detail,
            )
        )

    def restore(self, messages: list[Any], action: str, detail: str) -> None:
        channel = self.connection.default_channel
        for message in messages:
            channel._restore(message)
        self._connection_event(action, detail)

    def holds(self, task_id: str) -> bool:
        """Whether a message of ``task_id`` waits here (a copy the broker delivered again, or
        one whose ack waits for a hung broker)."""
        if any(request.id == task_id for request in self.ready):
            return True
        if self.connection.default_channel.settles_later(task_id):
            return True
        return any(getattr(arg, "id", None) == task_id for entry in self.held for arg in entry.args)

    def next_request(self) -> Any | None:
        return self.ready.popleft() if self.ready else None

    def wait_for_work(self) -> bool:
        """Move the clock to the next thing a waiting worker would see; False if there is none.

        That is the earliest held ETA or rate-limit wait (whose messages may become ready:
        Celery's own code decides, at that moment) or the moment the broker acts on what the
        worker holds unacknowledged (a redis visibility sweep that restores it, RabbitMQ's
        tick that closes the channel), unless a scheduled outage begins first: a real worker
        notices a lost connection while it waits. The caller polls the broker again after the
        wait, and sees the outage there. While the broker hangs, the worker also waits for
        the hang's end when messages wait for it, and checks its heartbeats.
        """
        clock = self.broker.clock
        now = clock.elapsed

        def at(t: float) -> datetime:
            return clock.now() + timedelta(seconds=max(t - now, 0))

        wake = [self.held[0].due] if self.held else []
        limit = self.limit.next_action(self) if self.limit is not None else None
        if limit is not None:
            wake.append(at(limit))
        hang_ends_at = self.broker.hang_ends_at
        if hang_ends_at is not None and hang_ends_at != math.inf and self.broker.holds_undelivered:
            wake.append(at(hang_ends_at))
        if not wake:
            return False
        outage = self.broker.next_outage_start
        due = min(wake)
        if outage is not None:
            due = min(due, at(outage))
        check = check_at = None
        if hang_ends_at is not None and self.heartbeats is not None:
            check = self.heartbeats.next_check(now)
            check_at = at(check)
            due = min(due, check_at)
        clock.advance_to(due)
        if check is not None and self.heartbeats is not None and due == check_at:
            try:
                self.heartbeats.check(check, lambda t: not self.broker.hanging_at(t))
            except tuple(self.connection.connection_errors) as exc:
                # Celery's event loop raises the check's error at its next turn, when the hub's
                # poll returns: at its next timer, as a hung broker sends nothing.
                self.loop_error = exc
                next_timer = clock.now() + timedelta(seconds=self.heartbeats.interval)
                clock.advance_to(min([next_timer, *(entry.due for entry in self.held[:1])]))
                return True
        while self.held and self.held[0].due <= clock.now():
            entry = heapq.heappop(self.held)
            # Celery's apply_eta_task: the request goes to the pool, then the prefetch count
            # comes down (at the loop's next turn: _after_the_pool).
            self._prefetch_drops |= entry.priority == _ETA_PRIORITY
            entry.fire(*entry.args)
        return True

    def _after_the_pool(self) -> None:
        """What the consumer's loop does once the pool took what was ready: change the
        prefetch count (a hung broker answers when the hang ends, and may have closed the
        connection for the heartbeats it missed by then), and, with the broker answering
        again, let it have the acks a hang held back."""
        if self._prefetch_drops and not self.ready:
            self._prefetch_drops = False
            hung = self.broker.on_qos(self.connection.transport)
            heartbeats = self.heartbeats
            if hung is not None and heartbeats is not None and heartbeats.broker_closed_after(hung):
                raise self.broker.rules.closed_by_broker_error(self.broker.address)
        if self.broker.hang_ends_at is None:
            self.connection.default_channel.settle_stalled()

    # -- Celery's Request ------------------------------------------------------------------
    def _request_for(self, message: Any) -> Any:
        """Celery's worker Request for ``message``, settling it through this consumer."""
        app = self.app
        # A kombu Consumer stamps each message with what the worker accepts; basic_get does not.
        message.accept = prepare_accept_content(app.conf.accept_content)
        name = message.headers.get("task") if message.headers else None
        if name not in app.tasks:
            message.reject(requeue=False)
            raise UsageError(
                f"the broker holds a message for the unregistered task {name!r}: app "
                f"{app.main!r} does not know it. Import the module that defines the task "
                "(or fix the name) before running the worker"
            )

        def on_ack(*_: Any) -> None:
            if not self._lost(message, "ack"):
                message.ack_log_error(*_)
                self._settled(message, "acked", "ack")

        def on_reject(logger: Any, errors: Any, requeue: bool = False) -> None:
            verb = "requeue" if requeue else "reject"
            if not self._lost(message, verb):
                message.reject_log_error(logger, errors, requeue=requeue)
                self._settled(message, "requeued" if requeue else "rejected", verb)

        return Request(
            message,
            on_ack=on_ack,
            on_reject=on_reject,
            app=app,
            hostname="celery-retry@pytest",
            connection_errors=self.connection.connection_errors,
            task=app.tasks[name],
        )

    def _lost(self, message: Any, verb: str) -> bool:
        """Whether a dead worker was to send this ack or reject: then it never leaves."""
        if self.died_of is None:
            return False
        headers = message.headers or {}
        task_id = headers.get("id", "")
        action = f"{verb} lost"
        self.events.append(
            MessageEvent(self.broker.clock.elapsed, task_id, headers.get("task", ""), action)
        )
        self._on_settled(task_id, action)
        return True

    def _settled(self, message: Any, done: str, verb: str) -> None:
        # Celery logs a failed ack or reject and goes on; the broker still holds the message.
        headers = message.headers or {}
        task_id = headers.get("id", "")
        action = done if message.acknowledged else f"{verb} failed"
        self.events.append(
            MessageEvent(self.broker.clock.elapsed, task_id, headers.get("task", ""), action)
        )
        if not message.acknowledged and self.broker.hang_ends_at is None:
            # A hang closes no socket: the consumer's reads go on once it ends.
            self.broken_by = f"the {verb} of {headers.get('id')} failed"
        self._on_settled(task_id, action)
