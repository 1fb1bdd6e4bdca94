"""The fault proxy on its own, in front of a local echo server: no real broker needed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pytest_celery_retry import ConfigurationError, UsageError, assert_publish_retries
from pytest_celery_retry.proxy import BrokerProxy


class EchoServer:
    """Sends back whatever it receives; counts the connections that reached it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._clients: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._clients.append(client)
            threading.Thread(target=self._echo, args=(client,), daemon=True).start()

    @staticmethod
    def _echo(client: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for client in self._clients:
            # shutdown() sends the FIN at once: close() alone waits for the thread in recv().
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[BrokerProxy]:
    with BrokerProxy(f"redis://127.0.0.1:{echo.port}/0") as started:
        # start() probes the upstream once; the echo thread counts that connection on its own
        # time, so wait for it before a test compares counts.
        deadline = time.monotonic() + 2
        while echo.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        yield started


def connect(proxy: BrokerProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(proxy)), timeout=timeout)


def _port(proxy: BrokerProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1].split("/")[0])


def roundtrip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return sock.recv(65536)


def wait_for(condition: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


# -- URLs and errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("redis://127.0.0.1:{port}/3", "redis://127.0.0.1:{proxy}/3"),
        ("redis://:s3cret@localhost:{port}/0", "redis://:s3cret@127.0.0.1:{proxy}/0"),
        ("amqp://guest:guest@127.0.0.1:{port}//", "amqp://guest:guest@127.0.0.1:{proxy}//"),
        (
            "pyamqp://u:p@127.0.0.1:{port}/vhost?heartbeat=5",
            "pyamqp://u:p@127.0.0.1:{proxy}/vhost?heartbeat=5",
        ),
    ],
)
def test_url_keeps_scheme_credentials_and_path(
    echo: EchoServer, upstream: str, expected: str
) -> None:
    with BrokerProxy(upstream.format(port=echo.port)) as proxy:
        assert proxy.url == expected.format(proxy=_port(proxy))
        assert proxy.upstream_port == echo.port


def test_default_port_comes_from_the_scheme() -> None:
    assert BrokerProxy("amqp://guest:guest@127.0.0.1//").upstream_port == 5672
    assert BrokerProxy("redis://127.0.0.1").upstream_port == 6379


@pytest.mark.parametrize(
    "url", ["memory://", "sqs://", "redis://a:1;redis://b:2", "127.0.0.1:6379"]
)
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(UsageError, match="URL"):
        BrokerProxy(url)


def test_url_before_start_says_what_to_do() -> None:
    with pytest.raises(UsageError, match=r"call start\(\) first"):
        _ = BrokerProxy("redis://127.0.0.1:6379/0").url


@pytest.mark.parametrize(
    ("scheme", "variable"), [("redis", "CELERY_RETRY_REDIS_URL"), ("amqp", "CELERY_RETRY_AMQP_URL")]
)
def test_unreachable_upstream_names_the_address_and_the_variable(
    scheme: str, variable: str
) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    proxy = BrokerProxy(f"{scheme}://127.0.0.1:{port}/0", probe_timeout=0.5)
    with pytest.raises(ConfigurationError) as excinfo:
        proxy.start()
    message = str(excinfo.value)
    assert f"127.0.0.1:{port}" in message
    assert variable in message
    assert "Connection refused" in message or "111" in message
    proxy.close()


# -- forwarding and faults -------------------------------------------------------------------
def test_forwards_both_ways_and_records_the_connection(
    proxy: BrokerProxy, echo: EchoServer
) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"PING") == b"PING"
    [attempt] = proxy.connections
    assert attempt.outcome == "accepted"
    assert 0 <= attempt.t < 5
    assert echo.connections == 2  # start() probes the upstream once


def test_cut_refuses_new_connections_and_drops_open_ones(proxy: BrokerProxy) -> None:
    sock = connect(proxy)
    assert roundtrip(sock) == b"ping"
    proxy.cut()
    assert sock.recv(10) == b""  # dropped: the client reads end of stream
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.restore()
    with connect(proxy) as again:
        assert roundtrip(again) == b"ping"
    assert [a.outcome for a in proxy.connections] == ["accepted", "accepted"]


def test_cut_with_reset_accepts_records_and_resets(proxy: BrokerProxy, echo: EchoServer) -> None:
    proxy.cut(how="reset")
    probes = echo.connections
    # The reset can beat connect()'s own return on loopback: either way the client is reset.
    with pytest.raises(ConnectionResetError), connect(proxy) as sock:
        roundtrip(sock)
    assert [a.outcome for a in proxy.connections] == ["refused"]
    assert echo.connections == probes


def test_reset_peers_sends_rst_and_new_connections_work(proxy: BrokerProxy) -> None:
    sock = connect(proxy)
    assert roundtrip(sock) == b"ping"
    proxy.reset_peers()
    with pytest.raises(ConnectionResetError):
        sock.recv(10)
    sock.close()
    with connect(proxy) as again:
        assert roundtrip(again) == b"ping"


def test_blackhole_accepts_but_never_answers(proxy: BrokerProxy, echo: EchoServer) -> None:
    probes = echo.connections
    proxy.blackhole()
    with connect(proxy, timeout=0.3) as sock:
        sock.sendall(b"hello?")
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            sock.recv(10)
        assert time.monotonic() - started >= 0.25
    assert echo.connections == probes
    assert proxy.connections[-1].outcome == "blackholed"
    proxy.restore()
    with connect(proxy) as again:
        assert roundtrip(again) == b"ping"


def test_blackhole_stalls_open_connections_until_restore(proxy: BrokerProxy) -> None:
    with connect(proxy, timeout=0.3) as sock:
        assert roundtrip(sock) == b"ping"
        proxy.blackhole()  # at once: no byte passes once it returns
        with pytest.raises(socket.timeout):
            roundtrip(sock, b"held")
        proxy.restore()
        sock.settimeout(2)
        assert sock.recv(10) == b"held"


def test_latency_delays_each_direction(proxy: BrokerProxy) -> None:
    with connect(proxy) as sock:
        started = time.monotonic()
        roundtrip(sock)
        fast = time.monotonic() - started
        proxy.latency(150)
        started = time.monotonic()
        roundtrip(sock)
        slow = time.monotonic() - started
        proxy.latency(0)
    assert fast < 0.1
    assert 0.3 <= slow < 1.0  # 150 ms on the way up and 150 ms on the way down


def test_outage_restores_after_real_seconds(proxy: BrokerProxy) -> None:
    proxy.outage(0.3)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    while True:
        try:
            sock = connect(proxy)
            break
        except ConnectionRefusedError:
            time.sleep(0.02)
    waited = time.monotonic() - started
    sock.close()
    assert 0.25 <= waited < 1.0
    timeline = proxy.timeline()
    assert "cut (refuse)" in timeline
    assert "restore" in timeline


def test_publish_tries_seen_as_connection_attempts(proxy: BrokerProxy) -> None:
    proxy.cut(how="reset")
    threading.Timer(0.25, proxy.restore).start()
    for _ in range(20):
        try:
            with connect(proxy) as sock:
                roundtrip(sock)
            break
        except OSError:
            time.sleep(0.1)
    assert_publish_retries(proxy, delivered=True)
    record = proxy.last_publish
    assert record is not None
    assert record.attempts >= 3
    assert all(0.08 <= gap <= 0.3 for gap in record.intervals)
    with pytest.raises(AssertionError, match="proxy timeline") as excinfo:
        assert_publish_retries(proxy, attempts=1)
    assert "refused" in str(excinfo.value)


def test_close_is_idempotent_and_stops_every_thread(echo: EchoServer) -> None:
    proxy = BrokerProxy(f"redis://127.0.0.1:{echo.port}/0").start()
    sock = connect(proxy)
    roundtrip(sock)
    proxy.close()
    proxy.close()
    assert sock.recv(10) == b""
    sock.close()
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("broker-proxy")])
    assert not [t for t in threading.enumerate() if t.name.startswith("broker-proxy")]
    with pytest.raises(UsageError, match="closed"):
        proxy.start()


# -- the broker_proxy fixture ----------------------------------------------------------------
FIXTURE_TESTS = """
import threading

import pytest
from celery import Celery

app = Celery("proj", broker="memory://", set_as_current=False)


@pytest.fixture
def celery_retry_app():
    return app


def test_fails_while_installed(broker_proxy):
    proxy = broker_proxy("redis")
    assert app.conf.broker_url == proxy.url
    assert proxy.url.startswith("redis://127.0.0.1:")
    raise RuntimeError("fail while the proxy is installed")


def test_after_the_failure():
    assert app.conf.broker_url == "memory://"
    assert not [t for t in threading.enumerate() if t.name.startswith("broker-proxy")]
"""


def test_fixture_restores_the_app_and_closes_the_proxy_when_the_test_fails(
    pytester: pytest.Pytester, echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELERY_RETRY_REQUIRE_REAL_BROKERS", raising=False)
    pytester.makepyfile(FIXTURE_TESTS)
    result = pytester.runpytest(
        "-p", "no:randomly", f"--celery-retry-redis-url=redis://127.0.0.1:{echo.port}/0"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*fail while the proxy is installed*"])


def test_fixture_skips_without_a_url_and_names_the_variable(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("CELERY_RETRY_REDIS_URL", "CELERY_RETRY_REQUIRE_REAL_BROKERS"):
        monkeypatch.delenv(variable, raising=False)
    pytester.makepyfile(FIXTURE_TESTS)
    result = pytester.runpytest("-p", "no:randomly", "-rs", "-k", "installed")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no real redis broker: set CELERY_RETRY_REDIS_URL*"])
    monkeypatch.setenv("CELERY_RETRY_REQUIRE_REAL_BROKERS", "1")
    required = pytester.runpytest("-p", "no:randomly", "-k", "installed")
    required.assert_outcomes(failed=1)  # the fixture marks its tests real_broker
