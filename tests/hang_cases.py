"""A publish into a broker that hangs (celery#4296, #6911, #4627, kombu#902): the cases.

One table for both sides: ``test_hanging_broker.py`` runs each case on ``flaky_broker.hang()``
in virtual time, ``real_limits_cases.py`` on a real broker behind ``broker_proxy(...).blackhole()``
in real time, and both check the same outcome: what ``send_task`` raises (or that it returns,
or blocks for ever), after how long, and how many new connections kombu tried meanwhile.
docs/broker-limits.md has the figures.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import POLICY_ON_FRESH_CONNECT
from kombu import Producer

# Two retries 0.2 s apart (kombu sleeps 0 s before the first).
POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# kombu < 5.5 takes no confirm_timeout: the publish passes it on as a message property, and a
# confirm waits for ever (measured with kombu 5.3 behind the proxy: blocked).
CONFIRM_TIMEOUT = "confirm_timeout" in inspect.signature(Producer.publish).parameters


@dataclass(frozen=True)
class HangCase:
    # The real broker, as broker_proxy() takes it: "redis" or "amqp".
    broker: str
    # A connection worked before the hang began (else the publish opens a fresh one in it).
    pooled: bool
    # send_task's options besides the policy: retry=, confirm_timeout=.
    publish: dict[str, Any]
    transport_options: dict[str, Any] = field(default_factory=dict)
    broker_connection_timeout: float = 1
    # What kombu's OperationalError says when the publish gives up; None: it returns.
    error: str | None = None
    # It never returns (the simulation raises BlocksForeverError naming this setting).
    blocks_for_ever: str | None = None
    # Seconds until send_task returns or raises: the simulated figure (virtual seconds; a
    # timeout fires 1 ms after it began, as it cannot fire sooner in production).
    seconds: float = 0.0
    # New connections kombu tried during the publish.
    connects: int = 0


SOCKET_TIMEOUT = {"socket_timeout": 1, "socket_connect_timeout": 1}
CONFIRMS = {"confirm_publish": True}
REDIS_TIMEOUT = "Timeout reading from socket"

_REDIS = {"broker": "redis", "transport_options": SOCKET_TIMEOUT, "error": REDIS_TIMEOUT}
_REDIS_WITHOUT_TIMEOUT = {
    "broker": "redis",
    "transport_options": {"socket_connect_timeout": 1},
    "blocks_for_ever": "socket_timeout",
}
_AMQP = {"broker": "amqp", "error": "timed out"}
_CONFIRMS = {**_AMQP, "pooled": True, "transport_options": CONFIRMS}

CASES = [
    pytest.param(case, id=name)
    for name, case in {
        # The TCP connect succeeds; kombu's PING of the new channel never gets its reply.
        "redis-fresh": HangCase(
            **_REDIS, pooled=False, publish={"retry": False}, seconds=1.001, connects=1
        ),
        # broker_connection_timeout (1 s) has passed when the first try times out: one try.
        "redis-fresh-retry": HangCase(
            **_REDIS, pooled=False, publish={"retry": True}, seconds=1.001, connects=1
        ),
        # kombu < 5.5 retries a fresh connect with its own defaults (2 s first), not the
        # policy: 2 tries, 4.0 s (measured with kombu 5.3: 4.13 s, 2 connections).
        "redis-fresh-retry-connection-timeout-3": HangCase(
            **_REDIS,
            pooled=False,
            publish={"retry": True},
            broker_connection_timeout=3,
            seconds=3.203 if POLICY_ON_FRESH_CONNECT else 4.002,
            connects=3 if POLICY_ON_FRESH_CONNECT else 2,
        ),
        "redis-pooled": HangCase(
            **_REDIS, pooled=True, publish={"retry": False}, seconds=1.001, connects=0
        ),
        # The LPUSH times out, then each of the policy's 3 reconnects (0 s, then 0.2 s apart).
        "redis-pooled-retry": HangCase(
            **_REDIS, pooled=True, publish={"retry": True}, seconds=4.204, connects=3
        ),
        "redis-pooled-no-socket-timeout": HangCase(
            **_REDIS_WITHOUT_TIMEOUT, pooled=True, publish={"retry": False}
        ),
        "redis-fresh-no-socket-timeout": HangCase(
            **_REDIS_WITHOUT_TIMEOUT, pooled=False, publish={"retry": True}
        ),
        # py-amqp's handshake times out at broker_connection_timeout, which also ends kombu's
        # connect retries: one try.
        "amqp-fresh": HangCase(
            **_AMQP, pooled=False, publish={"retry": True}, seconds=1.001, connects=1
        ),
        "amqp-fresh-connection-timeout-3": HangCase(
            **_AMQP,
            pooled=False,
            publish={"retry": True},
            broker_connection_timeout=3,
            seconds=3.001,
            connects=1,
        ),
        # Without publisher confirms nothing waits for the broker: the frames sit in a buffer.
        "amqp-pooled": HangCase(broker="amqp", pooled=True, publish={"retry": True}),
        # The confirm wait ends at confirm_timeout, then each of the 3 reconnects times out.
        "amqp-pooled-confirm-retry": (
            HangCase(
                **_CONFIRMS,
                publish={"retry": True, "confirm_timeout": 1},
                seconds=4.204,
                connects=3,
            )
            if CONFIRM_TIMEOUT
            else HangCase(
                **_CONFIRMS,
                publish={"retry": True, "confirm_timeout": 1},
                blocks_for_ever="confirm_timeout",
            )
        ),
        # The confirm times out at 1 s; kombu then hands the connection back to the pool by
        # closing its channel, and py-amqp waits for Close-Ok without a timeout.
        "amqp-pooled-confirm-no-retry": HangCase(
            **_CONFIRMS,
            publish={"retry": False, "confirm_timeout": 1},
            blocks_for_ever="retry=True" if CONFIRM_TIMEOUT else "confirm_timeout",
        ),
        "amqp-pooled-confirm-no-confirm-timeout": HangCase(
            **_CONFIRMS, publish={"retry": True}, blocks_for_ever="confirm_timeout"
        ),
    }.items()
]


def configure(app: Any, case: HangCase) -> None:
    app.conf.update(
        broker_connection_timeout=case.broker_connection_timeout,
        broker_transport_options=dict(case.transport_options),
    )


def publish(app: Any, case: HangCase, queue: str = "celery") -> None:
    app.send_task("foo.task", queue=queue, retry_policy=POLICY, **case.publish)
