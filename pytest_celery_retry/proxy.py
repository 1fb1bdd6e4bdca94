"""A TCP fault proxy between a Celery app and a real broker.

The in-memory broker imitates what a real transport raises; this proxy lets the real
transport raise it. It forwards bytes between 127.0.0.1 and the broker untouched, so the real
redis-py or py-amqp client talks to the real Redis or RabbitMQ, and on command it refuses,
drops, resets, delays or swallows connections, or applies Toxiproxy's toxics to them
(latency, bandwidth, slow_close, limit_data, slicer, each with a toxicity). Times are real
seconds since :meth:`start`.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import select
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable
from typing import Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from . import toxics
from .errors import ConfigurationError, UsageError, is_number, is_whole_number, moved_names
from .flavors import FLAVORS, flavor_for_proxy
from .records import (
    BrokerOperation,
    ConnectionAttempt,
    ConnectionOutcome,
    ProxyEvent,
    PublishRecord,
    format_table,
)
from .toxics import Direction, Reach, Stream, Toxic

__all__ = ["BrokerProxy", "ConnectionAttempt", "CutMode", "ProxyEvent", "Stream"]

CutMode = Literal["refuse", "reset"]
_Mode = Literal["open", "refuse", "reset", "blackhole"]

# How often a forwarding thread looks up from a quiet socket to notice a cut or close.
_POLL = 0.05
_CHUNK = 65536
_OTHER: dict[Direction, Direction] = {"upstream": "downstream", "downstream": "upstream"}


def _lists_several(url: object) -> bool:
    """A failover list: a list (Celery takes one), URLs joined by ';' (or ','), or hosts in
    one netloc."""
    if isinstance(url, (list, tuple)):
        return True
    return isinstance(url, str) and (
        ";" in url or url.count("://") > 1 or "," in urlsplit(url).netloc
    )


class _Ended(Exception):
    """The link was closed while a forwarding thread waited to send."""


class _TargetGone(Exception):
    """The end a forwarding thread sends to went away."""


class _Link:
    """One proxied connection: the client's socket and, unless blackholed, the broker's."""

    def __init__(
        self, number: int, client: socket.socket, upstream: socket.socket | None, seed: int = 0
    ) -> None:
        self.number = number
        self.client = client
        self.upstream = upstream
        self.ended = threading.Event()
        # A slow_close is holding this link's close back: other closes wait for it.
        self.closing = False
        # The toxics that apply to this connection (its toxicity draws), by kind.
        self.toxics: dict[str, Toxic] = {}
        # Bytes forwarded in each direction since limit_data was set on this connection.
        self.sent: dict[Direction, int] = {"upstream": 0, "downstream": 0}
        # When the bandwidth limit lets each direction send its next bytes (monotonic).
        self.due: dict[Direction, float] = {"upstream": 0.0, "downstream": 0.0}
        # The slicer's sizes: reproducible per connection.
        self.rng = random.Random(f"{seed}:slicer:{number}")
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.ended.is_set()

    def ends(self, direction: Direction) -> tuple[socket.socket, socket.socket]:
        assert self.upstream is not None
        if direction == "upstream":
            return self.client, self.upstream
        return self.upstream, self.client

    def toxic(self, kind: str, direction: Direction) -> Toxic | None:
        toxic = self.toxics.get(kind)
        return toxic if toxic is not None and toxic.acts_on(direction) else None

    def close(self, reset: bool = False) -> None:
        with self._lock:
            if self.ended.is_set():
                return
            self.ended.set()
        if reset:
            # Zero linger makes close() send RST instead of FIN: the client sees ECONNRESET.
            with contextlib.suppress(OSError):
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for sock in (self.client, self.upstream):
            if sock is not None:
                sock.close()


class BrokerProxy:
    """Forward a broker URL through 127.0.0.1 and break the connection on command.

    ``url`` is the upstream URL with the host and port replaced by the proxy's; scheme,
    credentials, virtual host and database are kept. ``seed`` makes the toxicity draws and
    the slicer's sizes reproducible (the ``broker_proxy`` fixture passes the run's
    ``--celery-retry-seed``).
    """

    def __init__(self, upstream_url: str, *, probe_timeout: float = 1.0, seed: int = 0) -> None:
        if not is_whole_number(seed):
            raise UsageError(f"BrokerProxy(seed={seed!r}): a whole number")
        if _lists_several(upstream_url):
            raise UsageError(
                f"broker URL {upstream_url!r} lists several brokers (failover), and the "
                "connections to all but one would bypass the proxy: give it a single URL. To "
                "test failover, put one BrokerProxy in front of each host and point the app at "
                "';'.join(proxy.url for proxy in proxies)"
            )
        self.upstream_url = upstream_url
        self._flavor = flavor_for_proxy(upstream_url)
        # The real broker's name, as broker_proxy() takes it ("redis", "amqp").
        self.kind = self._flavor.broker
        self._parts = urlsplit(upstream_url)
        self.upstream_host = self._parts.hostname or "127.0.0.1"
        self.upstream_port = self._parts.port or self._flavor.schemes[self._parts.scheme.lower()]
        self.probe_timeout = probe_timeout
        self.seed = seed
        self.events: list[ProxyEvent] = []
        self._attempts: list[ConnectionAttempt] = []
        self._numbers = itertools.count(1)
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        self._lock = threading.RLock()
        # Forwarding threads send under it, so no byte passes once blackhole() has returned.
        self._flow = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._mode: _Mode = "open"
        # The toxics every new connection draws for, and each one's toxicity draws.
        self._toxics: dict[str, Toxic] = {}
        self._draws: dict[str, random.Random] = {}
        self._t0 = 0.0
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> BrokerProxy:
        """Check that the broker answers, then listen on an ephemeral port."""
        with self._lock:
            if self._closed:
                raise UsageError("this BrokerProxy was closed: create a new one")
            if self._started:
                return self
            self._probe_upstream()
            self._t0 = time.monotonic()
            self._listen()
            self._started = True
        return self

    def close(self) -> None:
        """Stop listening, close every connection and wait for the proxy's threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for timer in self._timers:
                timer.cancel()
            self._stop_listening()
            links, self._links = self._links, []
            threads, self._threads = self._threads, []
        for link in links:
            link.close()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2)

    def __enter__(self) -> BrokerProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The broker URL to give the app: same scheme, credentials and path, via the proxy."""
        if self._port is None:
            raise UsageError("BrokerProxy.url: call start() first (the port is chosen then)")
        netloc = f"127.0.0.1:{self._port}"
        userinfo = self._parts.netloc.rpartition("@")[0]
        if userinfo:
            netloc = f"{userinfo}@{netloc}"
        return urlunsplit(SplitResult(self._parts.scheme, netloc, *self._parts[2:]))

    # -- faults ----------------------------------------------------------------------------
    def cut(self, how: CutMode = "refuse") -> None:
        """Take the broker away: drop every open connection and refuse new ones.

        ``how="refuse"`` closes the port, so a client gets ``ECONNREFUSED`` from the kernel,
        exactly as from a stopped broker; the proxy never sees those attempts, so they are not
        recorded. ``how="reset"`` accepts each attempt and resets it at once: the client fails
        on its first read or write instead of in ``connect()``, and every attempt is recorded
        (``refused``), which is what counting retries needs.
        """
        if how not in ("refuse", "reset"):
            raise UsageError(f"cut(how={how!r}): choose 'refuse' or 'reset'")
        with self._lock:
            self._require_started("cut")
            self._mode = how
            if how == "refuse":
                self._stop_listening()
            elif self._listener is None:
                self._listen()
            self._event(f"cut ({how})")
            links, self._links = self._links, []
        for link in links:
            link.close()

    def restore(self) -> None:
        """End a cut or a blackhole: new connections are forwarded again."""
        with self._lock:
            if self._closed:
                return  # an outage's timer may fire while the test tears the proxy down
            self._require_started("restore")
            held = [link for link in self._links if link.upstream is None]
            self._links = [link for link in self._links if link.upstream is not None]
            self._mode = "open"
            self._flow.notify_all()
            if self._listener is None:
                self._listen()
            self._event("restore")
        # A blackholed client has been waiting on a connection that never had a broker.
        for link in held:
            link.close()

    def outage(self, seconds: float, how: CutMode = "refuse") -> None:
        """:meth:`cut` now and :meth:`restore` after ``seconds`` of real time, in the background."""
        if not is_number(seconds) or seconds <= 0:
            raise UsageError(f"outage(seconds={seconds!r}): a positive number of real seconds")
        self.cut(how)
        timer = threading.Timer(seconds, self.restore)
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def reset_peers(self) -> None:
        """Reset every open connection (RST): the client sees ``ECONNRESET``; new ones work."""
        with self._lock:
            self._require_started("reset_peers")
            links, self._links = self._links, []
            self._event(f"reset {len(links)} connection(s)")
        for link in links:
            link.close(reset=True)

    def blackhole(self) -> None:
        """Accept connections but never answer, and stall open ones: the timeout case.

        Once it returns no byte passes, also on open connections: the forwarding threads send
        under the proxy's lock and look at the mode there first.
        """
        with self._lock:
            self._require_started("blackhole")
            self._mode = "blackhole"
            if self._listener is None:
                self._listen()
            self._event("blackhole")

    # -- toxics (Toxiproxy's vocabulary) ---------------------------------------------------
    # Each takes ``stream`` ("upstream": client to broker, "downstream", or "both"),
    # ``toxicity`` (the probability that it applies to a connection, drawn once per connection
    # from the proxy's seed) and ``connections`` ("all": the open ones and every later one;
    # "open": only those open now). A value of 0 ends the toxic; a new call replaces it.
    def latency(
        self,
        ms: float,
        *,
        stream: Stream = "both",
        toxicity: float = 1.0,
        connections: Reach = "all",
    ) -> None:
        """Hold every chunk of forwarded data ``ms`` milliseconds."""
        self._apply("latency", toxics.delay("latency", ms, stream, toxicity), connections)

    def bandwidth(
        self,
        rate: float,
        *,
        stream: Stream = "both",
        toxicity: float = 1.0,
        connections: Reach = "all",
    ) -> None:
        """Pass at most ``rate`` kilobytes (1000 bytes) a second in each direction it acts on."""
        self._apply("bandwidth", toxics.bandwidth(rate, stream, toxicity), connections)

    def slow_close(
        self,
        ms: float,
        *,
        stream: Stream = "both",
        toxicity: float = 1.0,
        connections: Reach = "all",
    ) -> None:
        """Hold a close back ``ms`` milliseconds: when the broker (``downstream``) or the
        client (``upstream``) closes, or ``limit_data`` cuts, the other end learns it late.
        The other direction still forwards meanwhile. ``cut``, ``reset_peers`` and ``close``
        are not delayed."""
        self._apply("slow_close", toxics.delay("slow_close", ms, stream, toxicity), connections)

    def limit_data(
        self,
        nbytes: int,
        *,
        stream: Stream = "both",
        toxicity: float = 1.0,
        connections: Reach = "all",
    ) -> None:
        """Close a connection once ``nbytes`` bytes passed in one direction (counted from
        this call on an open connection, from its start on a later one); the bytes beyond
        the limit are dropped."""
        self._apply("limit_data", toxics.limit_data(nbytes, stream, toxicity), connections)

    def slicer(
        self,
        average_size: int,
        size_variation: int = 0,
        delay_us: float = 0,
        *,
        stream: Stream = "both",
        toxicity: float = 1.0,
        connections: Reach = "all",
    ) -> None:
        """Forward data in slices of ``average_size`` +/- ``size_variation`` bytes, each sent
        on its own, ``delay_us`` microseconds apart: the client reads partial frames."""
        toxic = toxics.slicer(average_size, size_variation, delay_us, stream, toxicity)
        self._apply("slicer", toxic, connections)

    # -- records ---------------------------------------------------------------------------
    @property
    def connections(self) -> list[ConnectionAttempt]:
        """Every TCP connection a client opened (or tried to open, during a reset cut)."""
        with self._lock:
            return list(self._attempts)

    @property
    def connection_attempts(self) -> list[ConnectionAttempt]:
        """Deprecated: :attr:`connections` (the broker's ``connection_attempts`` are operations)."""
        warnings.warn(
            "BrokerProxy.connection_attempts is deprecated: use BrokerProxy.connections",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.connections

    @property
    def publishes(self) -> list[PublishRecord]:
        """The connection attempts as kombu's publish tries, for ``assert_publish_retries``.

        The proxy sees connections, not messages: each attempt is one try, and an accepted
        one ends the publish (``delivered`` then means the try reached the broker). Use
        ``cut(how="reset")``, or the refused tries are invisible.
        """
        records: list[PublishRecord] = []
        current: PublishRecord | None = None
        for attempt in self.connections:
            if current is None:
                current = PublishRecord(task_id=None, task_name=None)
                records.append(current)
            ok = attempt.outcome == "accepted"
            current.operations.append(BrokerOperation(kind="connect", t=attempt.t, ok=ok))
            if ok:
                current.delivered = True
                current = None
        return records

    @property
    def last_publish(self) -> PublishRecord | None:
        publishes = self.publishes
        return publishes[-1] if publishes else None

    def timeline(self) -> str:
        with self._lock:
            rows: list[tuple[float, str, str, str, str]] = [
                (a.t, f"connection {a.number}", a.outcome, a.peer, a.note) for a in self._attempts
            ]
            rows += [(e.t, "proxy", e.what, "", "") for e in self.events]
        rows.sort(key=lambda row: row[0])
        table = format_table(
            ["t", "what", "outcome", "client", "note"],
            [[f"{t:.3f}s", *rest] for t, *rest in rows],
        )
        head = (
            f"proxy timeline: 127.0.0.1:{self._port} -> {self.upstream_host}:{self.upstream_port}"
            f" ({self.kind}, real seconds since start)"
        )
        return f"{head}\n{table}"

    def __repr__(self) -> str:
        return (
            f"<BrokerProxy 127.0.0.1:{self._port} -> {self.upstream_host}:{self.upstream_port} "
            f"mode={self._mode}>"
        )

    # -- internals -------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _event(self, what: str) -> None:
        self.events.append(ProxyEvent(self._elapsed(), what))

    def _require_started(self, method: str) -> None:
        if not self._started:
            raise UsageError(f"BrokerProxy.{method}(): call start() first")

    def _probe_upstream(self) -> None:
        where = f"{self.upstream_host}:{self.upstream_port}"
        try:
            socket.create_connection(
                (self.upstream_host, self.upstream_port), timeout=self.probe_timeout
            ).close()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot reach the {self.kind} broker at {where} ({self.upstream_url}): {exc}. "
                f"Start the broker, or set {self._flavor.url_variable} to the URL of one that "
                "runs (unset it to skip the real-broker tests)"
            ) from exc

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A restore re-binds the port a cut released: clients keep the URL they were given.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._port or 0))
        listener.listen(64)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept_loop, listener, name="accept")

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        thread = threading.Thread(
            target=target,
            args=args,
            name=f"broker-proxy-{self._port}-{name}",
            daemon=True,
        )
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, address = listener.accept()
            except OSError:
                return  # the listener was closed by a cut or close()
            self._admit(client, f"{address[0]}:{address[1]}")

    def _admit(self, client: socket.socket, peer: str) -> None:
        with self._lock:
            mode = self._mode
            if self._closed:
                client.close()
                return
            if mode == "blackhole":
                self._links.append(_Link(self._record("blackholed", peer), client, None))
                return
            if mode != "open":
                _Link(self._record("refused", peer, "reset at once"), client, None).close(
                    reset=True
                )
                return
        try:
            upstream = socket.create_connection(
                (self.upstream_host, self.upstream_port), timeout=self.probe_timeout
            )
        except OSError as exc:
            with self._lock:
                number = self._record("refused", peer, f"broker unreachable: {exc}")
            _Link(number, client, None).close(reset=True)
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Sends wait in select(), so a forwarding thread never blocks holding the lock.
            sock.setblocking(False)
        with self._lock:
            if self._closed or self._mode != "open":
                client.close()
                upstream.close()
                return
            number = next(self._numbers)
            link = _Link(number, client, upstream, self.seed)
            applied = sorted(kind for kind in self._toxics if self._draw(link, self._toxics[kind]))
            spared = sorted(set(self._toxics) - set(applied))
            note = "; ".join(
                f"{what}: {', '.join(kinds)}"
                for what, kinds in (("toxics", applied), ("spared", spared))
                if kinds
            )
            self._links.append(link)
            self._record("accepted", peer, note, number)
            self._spawn(self._pump, link, "upstream", name="up")
            self._spawn(self._pump, link, "downstream", name="down")

    def _record(
        self, outcome: ConnectionOutcome, peer: str, note: str = "", number: int | None = None
    ) -> int:
        number = next(self._numbers) if number is None else number
        self._attempts.append(ConnectionAttempt(number, self._elapsed(), outcome, peer, note))
        return number

    def _apply(self, kind: str, toxic: Toxic | None, connections: Reach) -> None:
        reach = toxics.reach(kind, connections)
        with self._lock:
            self._toxics.pop(kind, None)
            if toxic is None:
                for link in self._links:
                    link.toxics.pop(kind, None)
                self._event(f"{kind} off")
                return
            self._draws[kind] = random.Random(f"{self.seed}:{kind}")
            if reach == "all":
                self._toxics[kind] = toxic
            hit = [link.number for link in self._links if self._draw(link, toxic)]
            what = toxics.describe(toxic, reach)
            if toxic.toxicity < 1 and self._links:
                spared = [link.number for link in self._links if link.number not in hit]
                what += f" (open connections: on {hit or 'none'}, spared {spared or 'none'})"
            self._event(what)

    def _draw(self, link: _Link, toxic: Toxic) -> bool:
        """Whether ``toxic`` applies to ``link`` (its toxicity drawn once); sets it on the link."""
        if link.upstream is None:
            return False  # blackholed: nothing passes to apply it to
        if self._draws[toxic.kind].random() >= toxic.toxicity:
            link.toxics.pop(toxic.kind, None)
            return False
        link.toxics[toxic.kind] = toxic
        if toxic.kind == "limit_data":
            link.sent = {"upstream": 0, "downstream": 0}
        return True

    def _pump(self, link: _Link, direction: Direction) -> None:
        """Forward one direction of ``link``, applying its toxics, until either end closes."""
        source, target = link.ends(direction)
        try:
            while not link.closed:
                with self._flow:
                    # Not reading while blackholed lets the sender's buffers fill, as behind
                    # a dead route.
                    if self._mode == "blackhole":
                        self._flow.wait(_POLL)
                        continue
                readable, _, _ = select.select([source], [], [], _POLL)
                if not readable:
                    continue
                try:
                    data = source.recv(_CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    break  # this end closed: the close travels on in this direction
                if not self._forward(link, direction, target, data):
                    return
        except _TargetGone:
            direction = _OTHER[direction]  # the news of that close travels back
        except (OSError, ValueError, _Ended):
            pass  # the link was closed under us (a cut, a reset, close()) or by the source
        self._end(link, direction)

    def _forward(
        self, link: _Link, direction: Direction, target: socket.socket, data: bytes
    ) -> bool:
        """Send ``data`` on through the link's toxics; False once limit_data closed the link."""
        limit = link.toxic("limit_data", direction)
        if limit is not None:
            data = data[: int(limit.amount) - link.sent[direction]]
        delay = link.toxic("latency", direction)
        if delay is not None and link.ended.wait(delay.amount):
            raise _Ended
        slicer = link.toxic("slicer", direction)
        pieces = [data] if slicer is None else slicer.slices(data, link.rng)
        for index, piece in enumerate(pieces):
            if index and slicer is not None and link.ended.wait(slicer.pause):
                raise _Ended
            self._send_at_rate(link, direction, target, piece)
        if limit is None:
            return True
        link.sent[direction] += len(data)
        if link.sent[direction] < limit.amount:
            return True
        with self._lock:
            self._event(
                f"connection {link.number}: limit_data closed it after {link.sent[direction]} "
                f"bytes {direction}"
            )
        self._end(link, direction)
        return False

    def _send_at_rate(
        self, link: _Link, direction: Direction, target: socket.socket, data: bytes
    ) -> None:
        limit = link.toxic("bandwidth", direction)
        if limit is None:
            self._send(link, target, data)
            return
        # As Toxiproxy: a big chunk goes in pieces of 100 ms' worth, each after its time.
        step = max(1, int(limit.amount / 10))
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            link.due[direction] = (
                max(link.due[direction], time.monotonic()) + len(piece) / limit.amount
            )
            if link.ended.wait(max(0.0, link.due[direction] - time.monotonic())):
                raise _Ended
            self._send(link, target, piece)

    def _send(self, link: _Link, target: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self._flow:
                while self._mode == "blackhole" and not link.closed:
                    self._flow.wait(_POLL)
                if link.closed:
                    raise _Ended
                try:
                    sent = target.send(view)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise _TargetGone from exc
            view = view[sent:]
            if view:
                select.select([], [target], [], _POLL)

    def _end(self, link: _Link, direction: Direction) -> None:
        """Close ``link`` because one end went away, the news travelling in ``direction``:
        at once, or after the link's slow_close for that direction."""
        delay = link.toxic("slow_close", direction)
        if delay is not None:
            with self._lock:
                if link.closing or link.closed:
                    return  # the close already held back ends the link
                link.closing = True
                self._event(f"connection {link.number}: slow_close holds its close ({direction})")
            if link.ended.wait(delay.amount):
                return
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        link.close()


__getattr__ = moved_names(
    __name__,
    {
        "AttemptOutcome": (
            "pytest_celery_retry.records.ConnectionOutcome",
            lambda: ConnectionOutcome,
        ),
        "URL_VARIABLES": (
            "the url_variable of pytest_celery_retry.flavors.FLAVORS",
            lambda: {flavor.broker: flavor.url_variable for flavor in FLAVORS.values()},
        ),
        "broker_kind": (
            "pytest_celery_retry.flavors.flavor_for_proxy(url).broker",
            lambda: lambda url: flavor_for_proxy(url).broker,
        ),
    },
)
