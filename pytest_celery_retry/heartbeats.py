"""The worker's AMQP heartbeats on virtual time: py-amqp's own ``heartbeat_tick`` decides.

Celery's worker loop calls ``connection.heartbeat_check(rate)`` every ``heartbeat / rate``
seconds (``broker_heartbeat_checkrate``, 2.0), and py-amqp's ``Connection.heartbeat_tick``
raises ``ConnectionForced('Too many heartbeats missed')`` once it has seen no byte from the
broker for two heartbeat intervals. The in-memory broker's connection has no socket: this
object carries what ``heartbeat_tick`` reads of one (its byte counters and timestamps), and
the consumer calls py-amqp's method on it at each of the loop's ticks.

Loaded by ``flavors.PyAmqp`` when a worker's consumer connects: it imports py-amqp.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from amqp import Connection as AmqpConnection

__all__ = ["AmqpHeartbeats"]

# The virtual clock's resolution (freezegun's datetimes): a check "at" a time it rounded to a
# microsecond has happened.
_EPSILON = 1e-6


class AmqpHeartbeats:
    """The heartbeat state of a worker's py-amqp connection, checked by py-amqp's own code."""

    heartbeat_tick = AmqpConnection.heartbeat_tick

    def __init__(self, heartbeat: float, rate: float, opened_at: float) -> None:
        # The attributes heartbeat_tick reads and writes, as amqp.Connection starts them.
        self.heartbeat = heartbeat
        self.bytes_sent = self.bytes_recv = 0
        self.prev_sent: int | None = None
        self.prev_recv: int | None = None
        self.last_heartbeat_sent = 0.0
        self.last_heartbeat_received = 0.0
        self._connection_id = "celery-retry-consumer"
        # Celery's rate, and when its repeating timer started (the consumer's connect).
        self.rate = rate if rate > 0 else 2.0
        self.opened_at = opened_at
        self._checked_at: float | None = None

    @property
    def interval(self) -> float:
        """Seconds between the worker loop's checks."""
        return self.heartbeat / self.rate

    def next_check(self, now: float) -> float:
        """The loop's first check after ``now`` (kombu's call_repeatedly: every interval from
        the connect on)."""
        ticks = math.floor((now + _EPSILON - self.opened_at) / self.interval) + 1
        return self.opened_at + ticks * self.interval

    def send_heartbeat(self) -> None:
        self.bytes_sent += 1

    def check(self, now: float, answering: Callable[[float], bool]) -> None:
        """The check due at ``now``; raises what py-amqp raises (``ConnectionForced``).

        ``answering(t)``: whether the broker sends at ``t``. RabbitMQ sends a heartbeat frame
        every ``heartbeat / 2`` s, one per check at Celery's default rate: a check counts one
        received unless the broker hangs at that moment.
        """
        previous = now - self.interval
        skipped = self._checked_at is None or self._checked_at < previous - _EPSILON
        if skipped and previous > self.opened_at + _EPSILON and answering(previous):
            # The worker's loop also checked while the test, not the worker, held the clock
            # (between two runs, or a task's run): that check saw the broker's frames.
            self.bytes_recv += 1
            self.prev_recv = self.bytes_recv
            self.last_heartbeat_received = time.monotonic() - self.interval
        if answering(now):
            self.bytes_recv += 1
        self._checked_at = now
        self.heartbeat_tick(self.rate)

    def broker_closed_after(self, hung: float) -> bool:
        """Whether the broker closed this connection while it hung for ``hung`` seconds: it
        checks the client's heartbeats too, and hears none from a client it does not read."""
        return hung > self.heartbeat
