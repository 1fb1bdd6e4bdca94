"""The fault proxy's blackhole and toxics against the real Redis and RabbitMQ.

Skipped without CELERY_RETRY_REDIS_URL / CELERY_RETRY_AMQP_URL (a failure in CI). Real time,
scaled down, with generous margins: the machine may be busy.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from pytest_celery_retry.proxy import BrokerProxy

pytestmark = pytest.mark.real_broker

KINDS = ["redis", "amqp"]
ProxyFactory = Callable[[str], BrokerProxy]
# A request each broker answers at once, and the start of its answer.
HELLO = {"redis": (b"PING\r\n", b"+PONG"), "amqp": (b"AMQP\x00\x00\x09\x01", b"\x01\x00\x00")}


def raw_connection(proxy: BrokerProxy, timeout: float = 0.5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", urlsplit(proxy.url).port), timeout=timeout)


@pytest.mark.parametrize("kind", KINDS)
def test_blackhole_stops_open_connections_at_once(broker_proxy: ProxyFactory, kind: str) -> None:
    # Regression: the forwarding threads looked at the mode only between two reads, so a
    # request sent within 50 ms of blackhole() still reached the broker and was answered.
    proxy = broker_proxy(kind)
    request, answer = HELLO[kind]
    with raw_connection(proxy) as sock:
        if kind == "redis":  # the connection is in use: its threads wait in select()
            sock.sendall(request)
            assert sock.recv(64).startswith(answer)
        else:
            time.sleep(0.1)
        proxy.blackhole()
        sock.sendall(request)
        with pytest.raises(socket.timeout):
            sock.recv(64)
        proxy.restore()
        sock.settimeout(5)
        assert sock.recv(64).startswith(answer), proxy.timeline()
