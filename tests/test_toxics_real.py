"""The fault proxy's blackhole and toxics against the real Redis and RabbitMQ.

Skipped without CELERY_RETRY_REDIS_URL / CELERY_RETRY_AMQP_URL (a failure in CI). Real time,
scaled down, with generous margins: the machine may be busy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from kombu.exceptions import OperationalError
from test_real_brokers import POLICY, configure, drain, new_queue, publish, real_url

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


def timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def payloads(kind: str, queue: str) -> list[Any]:
    """The tasks' arguments waiting in ``queue`` on the real broker (not through the proxy);
    the queue is deleted afterwards."""
    from kombu import Connection, Queue

    found = []
    with Connection(real_url(kind), connect_timeout=2) as conn:
        bound = Queue(queue).bind(conn.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            found.append(message.decode()[0])
        drain(kind, queue)
    return found


BIG = ["x" * 100_000]  # a publish of about 100 KB
WRITE_INTO_A_CLOSED_CONNECTION = ("Connection reset by peer", "Broken pipe")


@pytest.mark.parametrize("retry", [True, False], ids=["retry", "no-retry"])
@pytest.mark.parametrize("kind", KINDS)
def test_limit_data_cuts_a_publish_mid_frame(
    broker_proxy: ProxyFactory, app: Any, kind: str, retry: bool
) -> None:
    proxy = broker_proxy(kind)
    configure(app, kind)
    queue = new_queue()
    error: BaseException | None = None
    try:
        publish(app, queue)  # the pooled connection the limit cuts
        proxy.limit_data(5000, stream="upstream", connections="open")
        try:
            app.send_task("foo.task", args=BIG, queue=queue, retry=retry, retry_policy=POLICY)
        except OperationalError as exc:
            error = exc
    finally:
        found = payloads(kind, queue)
    assert "limit_data closed it after 5000 bytes upstream" in proxy.timeline()
    # The broker drops the partial command or frame: the message arrives whole or not at all.
    if retry:  # kombu's retry policy republishes on a new connection
        assert (error, found) == (None, [[], BIG]), proxy.timeline()
        assert len(proxy.connections) > 1
    else:  # the client writes into the connection the proxy closed
        # The proxy's close() sends RST while the client's bytes wait unread (ECONNRESET),
        # or FIN when it read them all; the client's next write then meets the proxy's RST
        # in CLOSE_WAIT, which Linux reports as EPIPE. Which one is a race, as with Toxiproxy.
        assert any(text in str(error) for text in WRITE_INTO_A_CLOSED_CONNECTION), error
        assert found == [[]]


@pytest.mark.parametrize("kind", KINDS)
def test_bandwidth_makes_a_big_publish_take_its_time(
    broker_proxy: ProxyFactory, app: Any, kind: str
) -> None:
    proxy = broker_proxy(kind)
    configure(app, kind)  # amqp: publisher confirms, so the publish waits for the broker
    queue = new_queue()
    try:
        publish(app, queue)
        fast = timed(lambda: app.send_task("foo.task", args=BIG, queue=queue))
        # 200 KB/s: 100 KB take 0.5 s (Redis stores the body in base64, a third more).
        proxy.bandwidth(200, stream="upstream")
        slow = timed(lambda: app.send_task("foo.task", args=BIG, queue=queue))
    finally:
        found = payloads(kind, queue)
    assert fast < 0.4, proxy.timeline()
    assert 0.45 <= slow < 3, proxy.timeline()
    assert found == [[], BIG, BIG]


@pytest.mark.parametrize("kind", KINDS)
def test_slicer_delivers_intact_messages_both_ways(
    broker_proxy: ProxyFactory, app: Any, kind: str
) -> None:
    from kombu import Connection, Queue

    proxy = broker_proxy(kind)
    configure(app, kind)
    queue = new_queue()
    proxy.slicer(64, 32, delay_us=100)  # every connection, both ways, from its handshake on
    sent = [[f"task {number}", "y" * 3000] for number in range(10)]
    try:
        for args in sent:
            app.send_task("foo.task", args=args, queue=queue)
        with Connection(proxy.url, connect_timeout=2) as conn:
            bound = Queue(queue).bind(conn.default_channel)
            received = [bound.get(no_ack=True) for _ in sent]
    finally:
        drain(kind, queue)
    assert [message.decode()[0] for message in received] == sent, proxy.timeline()
    assert all("toxics: slicer" in c.note for c in proxy.connections), proxy.timeline()


@pytest.mark.parametrize("ms", [0, 800])
def test_slow_close_delays_a_redis_client_noticing_the_broker_closed(
    broker_proxy: ProxyFactory, ms: int
) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    proxy = broker_proxy("redis")
    proxy.slow_close(ms, stream="downstream")
    client = redis.Redis.from_url(proxy.url, socket_timeout=10, retry=Retry(NoBackoff(), 0))
    broker = redis.Redis.from_url(real_url("redis"))
    own_id = client.client_id()
    killed: list[float] = []

    def kill() -> None:
        killed.append(time.monotonic())
        broker.client_kill_filter(_id=own_id)

    threading.Timer(0.3, kill).start()
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            client.blpop([new_queue()], timeout=8)  # Redis closes it while it waits
        noticed = time.monotonic() - killed[0]
    finally:
        client.close()
        broker.close()
    if ms:
        assert 0.75 <= noticed < 3, proxy.timeline()
        assert "slow_close holds its close (downstream)" in proxy.timeline()
    else:
        assert noticed < 0.3, proxy.timeline()


@pytest.mark.parametrize("ms", [0, 800])
def test_slow_close_delays_rabbitmq_redelivering_what_a_lost_consumer_held(
    broker_proxy: ProxyFactory, ms: int
) -> None:
    # A worker that dies holding a message: RabbitMQ gives the message to another consumer
    # when it sees the connection close, which slow_close holds back.
    from kombu import Connection, Producer, Queue

    proxy = broker_proxy("amqp")
    queue = Queue(new_queue())
    direct = Connection(real_url("amqp"), connect_timeout=2)
    consumer = Connection(proxy.url, connect_timeout=2)
    try:
        Producer(direct.default_channel).publish({"n": 1}, routing_key=queue.name, declare=[queue])
        held = queue.bind(consumer.default_channel).get(no_ack=False)
        assert held is not None
        proxy.slow_close(ms, stream="upstream")
        # Dies without closing the AMQP connection: only the TCP connection ends.
        consumer.connection.sock.shutdown(socket.SHUT_RDWR)
        died = time.monotonic()
        other = queue.bind(direct.default_channel)
        while (again := other.get(no_ack=True)) is None and time.monotonic() - died < 5:
            time.sleep(0.01)
        redelivered = time.monotonic() - died
    finally:
        consumer.collect()
        drain("amqp", queue.name)
        direct.close()
    assert again is not None and again.delivery_info["redelivered"], proxy.timeline()
    if ms:
        assert 0.75 <= redelivered < 3, proxy.timeline()
    else:
        assert redelivered < 0.4, proxy.timeline()


def answered(proxy: BrokerProxy, kind: str, count: int) -> list[bool]:
    """Whether the broker answered each of ``count`` new connections through ``proxy``."""
    request, answer = HELLO[kind]
    replies = []
    for _ in range(count):
        with raw_connection(proxy, timeout=2) as sock:
            sock.sendall(request)
            try:
                replies.append(sock.recv(64).startswith(answer))
            except ConnectionResetError:
                replies.append(False)
    return replies


@pytest.mark.parametrize("kind", KINDS)
def test_toxicity_picks_the_connections_reproducibly(broker_proxy: ProxyFactory, kind: str) -> None:
    patterns = []
    for _ in range(2):  # both proxies draw from the run's seed
        proxy = broker_proxy(kind)
        proxy.limit_data(4, stream="upstream", toxicity=0.5)  # the request never arrives whole
        replies = answered(proxy, kind, 10)
        spared = ["spared: limit_data" in c.note for c in proxy.connections]
        assert replies == spared, proxy.timeline()
        patterns.append(replies)
    assert patterns[0] == patterns[1]
    assert 0 < sum(patterns[0]) < 10
