"""The fault proxy's toxics in front of a local echo server: no real broker needed.

tests/test_toxics_real.py runs them against the real Redis and RabbitMQ.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from kombu.exceptions import OperationalError
from test_proxy import EchoServer, connect, echo, proxy, roundtrip

from pytest_celery_retry import UsageError
from pytest_celery_retry.proxy import BrokerProxy

__all__ = ["echo", "proxy"]  # fixtures, imported for pytest


def receive(sock: socket.socket, size: int) -> list[bytes]:
    """The chunks ``sock`` reads until ``size`` bytes came or the peer closed."""
    chunks: list[bytes] = []
    while sum(map(len, chunks)) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    return chunks


def echo_time(sock: socket.socket, payload: bytes) -> float:
    """Seconds ``payload`` takes to go through the proxy to the echo server and back."""
    started = time.monotonic()
    sock.sendall(payload)
    receive(sock, len(payload))
    return time.monotonic() - started


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.bandwidth(-1), r"bandwidth\(rate=-1\): kilobytes \(1000 bytes\) a second"),
        (lambda p: p.bandwidth(float("inf")), r"bandwidth\(rate=inf\)"),
        (lambda p: p.bandwidth("10"), r"bandwidth\(rate='10'\)"),
        (lambda p: p.slow_close(-5), r"slow_close\(ms=-5\): a number of milliseconds >= 0"),
        (lambda p: p.limit_data(1.5), r"limit_data\(nbytes=1.5\): a whole number of bytes"),
        (lambda p: p.limit_data(True), r"limit_data\(nbytes=True\)"),
        (lambda p: p.slicer(-1), r"slicer\(average_size=-1\)"),
        (lambda p: p.slicer(10, 10), r"slicer\(size_variation=10\): .* from 0 to .* \(9\)"),
        (lambda p: p.slicer(10, 2, -1), r"slicer\(delay_us=-1\): microseconds between"),
        (lambda p: p.latency(5, stream="up"), r"latency\(stream='up'\): 'upstream' \(client"),
        (lambda p: p.bandwidth(5, toxicity=1.5), r"bandwidth\(toxicity=1.5\): the probability"),
        (lambda p: p.slicer(5, toxicity=float("nan")), r"slicer\(toxicity=nan\)"),
        (lambda p: p.limit_data(5, connections="new"), r"limit_data\(connections='new'\): 'all'"),
    ],
)
def test_bad_values_name_the_argument_and_what_it_takes(
    call: Callable[[BrokerProxy], None], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        call(BrokerProxy("redis://127.0.0.1:6379/0"))


def test_the_seed_is_a_whole_number() -> None:
    with pytest.raises(UsageError, match=r"BrokerProxy\(seed=1.5\): a whole number"):
        BrokerProxy("redis://127.0.0.1:6379/0", seed=1.5)  # type: ignore[arg-type]


# -- each toxic ------------------------------------------------------------------------------
def test_bandwidth_limits_the_rate_and_zero_ends_it(proxy: BrokerProxy) -> None:
    payload = bytes(20_000)
    with connect(proxy, timeout=5) as sock:
        proxy.bandwidth(40, stream="upstream")  # 40 KB/s: 20 KB take 0.5 s
        slow = echo_time(sock, payload)
        proxy.bandwidth(0)
        fast = echo_time(sock, payload)
    assert 0.45 <= slow < 2, proxy.timeline()
    assert fast < 0.3
    timeline = proxy.timeline()
    assert "bandwidth 40 KB/s upstream" in timeline
    assert "bandwidth off" in timeline


def test_slicer_delivers_every_byte_in_slices_of_the_given_size(proxy: BrokerProxy) -> None:
    payload = bytes(range(200))
    proxy.slicer(10, 3, delay_us=5000, stream="downstream")
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        chunks = receive(sock, len(payload))
        took = time.monotonic() - started
    assert b"".join(chunks) == payload
    # 5 ms apart, the slices mostly arrive as reads of their own; a reader that falls behind on
    # a loaded machine reads two at once (TCP keeps no boundaries: seen once in CI).
    sizes = [len(chunk) for chunk in chunks[:-1]]
    assert sum(7 <= size <= 13 for size in sizes) >= len(sizes) // 2, sizes
    assert len(chunks) >= 200 // 26
    # At least 200 // 13 slices, each 5 ms after the last, however they were read.
    assert took >= 0.005 * (200 // 13 - 1)


def test_limit_data_closes_after_the_limit_and_drops_the_rest(proxy: BrokerProxy) -> None:
    proxy.limit_data(10, stream="downstream")
    for _ in range(2):  # every new connection is limited too
        with connect(proxy) as sock:
            sock.sendall(b"0123456789abcdef")
            assert b"".join(receive(sock, 16)) == b"0123456789"
    events = [event.what for event in proxy.events]
    assert events[0] == "limit_data 10 bytes downstream"
    assert events[1:] == [
        f"connection {n}: limit_data closed it after 10 bytes downstream" for n in (1, 2)
    ]


def test_limit_data_on_open_connections_spares_later_ones(proxy: BrokerProxy) -> None:
    with connect(proxy) as first:
        assert roundtrip(first, b"abc") == b"abc"  # counted from the call, not from the start
        proxy.limit_data(4, stream="downstream", connections="open")
        with connect(proxy) as later:
            assert roundtrip(later, b"0123456789") == b"0123456789"
        first.sendall(b"0123456789")
        assert b"".join(receive(first, 10)) == b"0123"
    assert "limit_data 4 bytes downstream, open connections only" in proxy.timeline()


def close_reached_after(server: EchoServer, sock: socket.socket) -> float:
    """Seconds until ``sock`` reads end of stream once the server closed its end."""
    started = time.monotonic()
    server.close()
    assert sock.recv(10) == b""
    return time.monotonic() - started


@pytest.mark.parametrize("ms", [0, 300])
def test_slow_close_holds_the_brokers_close_back(ms: int) -> None:
    server = EchoServer()
    with BrokerProxy(f"redis://127.0.0.1:{server.port}/0") as proxy, connect(proxy) as sock:
        assert roundtrip(sock) == b"ping"
        proxy.slow_close(ms, stream="downstream")
        took = close_reached_after(server, sock)
    assert (0.28 <= took < 1.5) if ms else took < 0.2


def test_slow_close_holds_back_the_close_limit_data_makes(proxy: BrokerProxy) -> None:
    proxy.limit_data(4, stream="downstream")
    proxy.slow_close(300, stream="downstream")
    with connect(proxy) as sock:
        sock.sendall(b"0123456789")
        started = time.monotonic()
        assert sock.recv(10) == b"0123"  # the data up to the limit passes at once
        assert sock.recv(10) == b""
        took = time.monotonic() - started
    assert 0.28 <= took < 1.5
    assert "connection 1: slow_close holds its close (downstream)" in proxy.timeline()


def test_slow_close_upstream_does_not_delay_a_close_travelling_downstream() -> None:
    server = EchoServer()
    with BrokerProxy(f"redis://127.0.0.1:{server.port}/0") as proxy, connect(proxy) as sock:
        proxy.slow_close(500, stream="upstream")
        assert roundtrip(sock) == b"ping"
        assert close_reached_after(server, sock) < 0.2


# -- toxicity --------------------------------------------------------------------------------
def cut_connections(proxy: BrokerProxy, count: int) -> list[int]:
    """Open ``count`` connections through ``proxy``; the numbers of those limit_data cut."""
    cut = []
    for _ in range(count):
        with connect(proxy) as sock:
            sock.sendall(b"0123456789")
            if b"".join(receive(sock, 10)) != b"0123456789":
                cut.append(proxy.connections[-1].number)
    return cut


def test_toxicity_is_drawn_per_connection_from_the_seed(echo: EchoServer) -> None:
    patterns = []
    for seed in (7, 7, 8):
        with BrokerProxy(f"redis://127.0.0.1:{echo.port}/0", seed=seed) as proxy:
            proxy.limit_data(5, toxicity=0.5)
            cut = cut_connections(proxy, 12)
            noted = [c.number for c in proxy.connections if "toxics: limit_data" in c.note]
            spared = [c.number for c in proxy.connections if "spared: limit_data" in c.note]
            assert cut == noted, proxy.timeline()
            assert sorted(cut + spared) == list(range(1, 13))
            patterns.append(cut)
    assert patterns[0] == patterns[1]  # the same seed, the same connections
    assert patterns[0] != patterns[2]
    assert 0 < len(patterns[0]) < 12


@pytest.mark.parametrize(("toxicity", "expected"), [(0, []), (1, [1, 2, 3])])
def test_toxicity_zero_spares_every_connection_and_one_hits_every_one(
    proxy: BrokerProxy, toxicity: float, expected: list[int]
) -> None:
    proxy.limit_data(5, toxicity=toxicity)
    assert cut_connections(proxy, 3) == expected


def test_toxicity_on_open_connections_is_in_the_timeline(proxy: BrokerProxy) -> None:
    socks = [connect(proxy) for _ in range(6)]
    try:
        for sock in socks:
            roundtrip(sock)
        proxy.latency(1, toxicity=0.5)
    finally:
        for sock in socks:
            sock.close()
    [event] = [e.what for e in proxy.events if e.what.startswith("latency")]
    assert event.startswith("latency 1 ms, toxicity 0.5 (open connections: on [")
    assert "spared [" in event


# -- the in-memory prediction of a publish cut mid-frame (tests/test_toxics_real.py) ---------
@pytest.mark.parametrize("retry", [True, False], ids=["retry", "no-retry"])
@pytest.mark.parametrize("celery_retry_flavor", ["pyamqp", "redis"], indirect=True)
def test_flaky_broker_predicts_a_publish_cut_mid_frame(
    app: Any, flaky_broker: Any, celery_retry_flavor: str, retry: bool
) -> None:
    # limit_data cuts the pooled connection in the middle of the publish: to kombu, the publish
    # failed with a connection error. The real brokers: republished and arrived once with the
    # retry policy, lost with OperationalError without.
    app.send_task("foo.task")  # the pooled connection
    flaky_broker.fail_next(1, on="publish")
    policy = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
    error = None
    try:
        app.send_task("foo.task", args=["x" * 100], retry=retry, retry_policy=policy)
    except OperationalError as exc:
        error = exc
    arrived = [m.args for m in flaky_broker.messages() if m.task_name == "foo.task"]
    if retry:  # kombu reconnects and publishes again: the message arrives once
        assert (error, arrived) == (None, [[], ["x" * 100]]), flaky_broker.timeline()
        assert flaky_broker.last_publish.attempts == 2
    else:
        assert isinstance(error, OperationalError)
        assert arrived == [[]], flaky_broker.timeline()
