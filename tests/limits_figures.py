"""What the real brokers do to a retry held past their limits: the measured figures.

One table for both sides of issue #13: ``real_limits_cases.py`` checks them against a real
Redis and RabbitMQ (within a sweep or a tick of real-time slack), ``test_broker_limits.py``
against the simulation, exactly. docs/broker-limits.md shows them side by side. Times are
seconds after the task's first run; the task ``waits`` retries once with ``countdown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from kombu.transport import redis as redis_transport

# kombu 5.7 made the redis sweep timer configurable (unacked_restore_interval / _throttle);
# before, a sweep runs every 10 x 10 s whatever the transport options say.
SWEEP_OPTIONS_WORK = hasattr(redis_transport.Channel, "unacked_restore_interval")
needs_sweep_options = pytest.mark.skipif(
    not SWEEP_OPTIONS_WORK, reason="kombu < 5.7 has a fixed sweep timer (every 100 s)"
)

# A sweep every second instead of every 10 x 10 s (kombu 5.7's unacked_restore_* options).
FAST_SWEEP = {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}


@dataclass(frozen=True)
class RedisCopies:
    """Redis's visibility sweep restores the retry the worker holds, again and again."""

    countdown: float
    visibility_timeout: float
    # When the worker received each copy of the retry message (the first: its publish).
    received: tuple[float, ...]
    # Every copy runs at the ETA; all but the first redelivered.
    runs: int = field(init=False)
    # On a real worker the sweep that restores the last copy comes within milliseconds of the
    # ETA (its sweeps run about one sweep later than the simulation's): that copy exists only
    # when the sweep beats Celery's ETA timer; once the first copy ran and was acked, the
    # sweep finds nothing to restore.
    races_eta: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", len(self.received))

    @property
    def real_runs(self) -> tuple[int, ...]:
        """How many copies a real worker may run: without the last one when it lost the race."""
        return (self.runs - 1, self.runs) if self.races_eta else (self.runs,)

    @property
    def transport_options(self) -> dict[str, Any]:
        return {"visibility_timeout": self.visibility_timeout, **FAST_SWEEP}

    @property
    def redelivered(self) -> list[bool]:
        return [False] + [True] * (self.runs - 1)


REDIS = {
    # Measured: received at 0, ~2, ~4 (tests/real_limits_cases.py).
    "countdown-5-vt-1.5": RedisCopies(countdown=5, visibility_timeout=1.5, received=(0, 2, 4)),
    # Measured: received at 0.03, 2.98, 4.99 (benchmarks/broker_limits_oracle.py).
    "countdown-5-vt-2": RedisCopies(countdown=5, visibility_timeout=2, received=(0, 2, 4)),
    # Measured: received at 0.01, 2.99, 5.0, 7.0, then 9.01 (5 runs at 9.0-9.01) or no fifth
    # copy (4 runs at 9.0): the sweep at ~9.0 races the ETA (docs/broker-limits.md).
    "countdown-9-vt-2": RedisCopies(
        countdown=9, visibility_timeout=2, received=(0, 2, 4, 6, 8), races_eta=True
    ),
}


@dataclass(frozen=True)
class RabbitClose:
    """RabbitMQ's consumer_timeout closes the channel of the worker holding the retry."""

    countdown: float
    consumer_timeout: float
    tick: float
    channel_error_retry: bool
    # When RabbitMQ closed the worker's channel (each a "Connection to broker lost" with
    # broker_channel_error_retry; the first ends the worker without it).
    closes: tuple[float, ...]

    @property
    def retry_runs(self) -> int:
        """Without broker_channel_error_retry the worker stops: the retry never runs."""
        return 1 if self.channel_error_retry else 0

    @property
    def left_in_queue(self) -> int:
        """RabbitMQ requeued the held retry; only a reconnecting worker consumes it."""
        return 0 if self.channel_error_retry else 1


RABBITMQ = {
    # Measured: closed at 2.99 s, "Unrecoverable error", 1 message left.
    "default-countdown-6": RabbitClose(6, 2, 1, channel_error_retry=False, closes=(3,)),
    # Measured: "Unrecoverable error" at 59.99 s (the default 60 s tick; oracle).
    "default-tick-countdown-70": RabbitClose(70, 2, 60, channel_error_retry=False, closes=(60,)),
    # Measured: lost at ~3 s, the retry runs once at 5 s, redelivered.
    "retry-countdown-5": RabbitClose(5, 2, 1, channel_error_retry=True, closes=(3,)),
    # Measured by hand: lost at 3.0 and 6.01 s, the retry runs once at 8.01 s, redelivered.
    "retry-countdown-8": RabbitClose(8, 2, 1, channel_error_retry=True, closes=(3, 6)),
}
