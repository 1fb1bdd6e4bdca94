"""What the real brokers do to a retry that waits: issue #13's measurements, pinned.

Redis's visibility sweep (celery#2481), RabbitMQ's consumer_timeout (celery#6760), brokers
that hang instead of refusing (celery#4296, #6911, kombu#902) and native delayed delivery
through quorum queues (celery#9912, #10111), each scaled down to seconds of real time.
docs/broker-limits.md has the figures; benchmarks/broker_limits_oracle.py the slow ones.
Skipped without CELERY_RETRY_REDIS_URL / CELERY_RETRY_AMQP_URL (a failure in CI).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from broker_cleanup import forget
from conftest import real_broker_url
from hang_cases import CASES as HANG_CASES
from hang_cases import HangCase
from hang_cases import configure as configure_hang
from hang_cases import publish as hang_publish
from kombu.exceptions import OperationalError
from limits_figures import RABBITMQ, REDIS, SWEEP_OPTIONS_WORK, RabbitClose, RedisCopies
from rabbitmq_node import channel_tick_lowered, consumer_timeout_lowered, rabbitmqctl
from test_real_brokers import start_worker, wait_until

from pytest_celery_retry.proxy import BrokerProxy

ProxyFactory = Callable[[str], BrokerProxy]
real_broker = pytest.mark.real_broker


@dataclass(frozen=True)
class Seen:
    """One run of a task (or one message the worker received), relative to the test's start."""

    t: float
    task_id: str
    retries: int
    redelivered: bool
    exchange: str = ""


class Recorder:
    """Runs of the ``waits`` task and the messages the worker received, with their times."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.runs: list[Seen] = []
        self.received: list[Seen] = []

    def seen(self, task_id: str, retries: int, delivery_info: dict[str, Any] | None) -> Seen:
        delivery = delivery_info or {}
        return Seen(
            t=time.monotonic() - self.started,
            task_id=task_id,
            retries=retries,
            redelivered=bool(delivery.get("redelivered")),
            exchange=delivery.get("exchange") or "",
        )

    def retries(self, which: list[Seen]) -> list[Seen]:
        return [seen for seen in which if seen.retries == 1]


@contextlib.contextmanager
def recording(app: Any, countdown: float) -> Iterator[Recorder]:
    """``waits`` retries once with ``countdown``; the worker's receipts are recorded too."""
    from celery.signals import task_received

    recorder = Recorder()

    @app.task(name="waits", bind=True, max_retries=1, shared=False)
    def waits(self: Any) -> None:
        request = self.request
        recorder.runs.append(recorder.seen(request.id, request.retries, request.delivery_info))
        if self.request.retries == 0:
            raise self.retry(countdown=countdown)

    def on_received(request: Any, **_: Any) -> None:
        retries = request.request_dict.get("retries", 0)
        recorder.received.append(recorder.seen(request.id, retries, request.delivery_info))

    task_received.connect(on_received, weak=False)
    try:
        yield recorder
    finally:
        task_received.disconnect(on_received)


_open_apps: list[Any] = []


def real_app(kind: str, url: str | None = None, **config: Any) -> Any:
    """An app on the real broker (not through the proxy, unless ``url`` is the proxy's),
    closed after the test."""
    from celery import Celery

    app = Celery(f"limits-{uuid.uuid4().hex[:8]}", broker=url or real_broker_url(kind))
    app.conf.update(worker_hijack_root_logger=False, broker_heartbeat=2, **config)
    _open_apps.append(app)
    return app


@pytest.fixture(autouse=True)
def _close_real_apps() -> Iterator[None]:
    yield
    while _open_apps:
        _open_apps.pop().close()


def new_name() -> str:
    return f"celery-retry-limits-{uuid.uuid4().hex[:12]}"


# -- 1. Redis: a countdown longer than visibility_timeout (celery#2481) ---------------------
# kombu's QoS puts each delivered message in the ``unacked`` hash with its delivery time; a
# sweep every unacked_restore_interval * unacked_restore_throttle seconds pushes back onto the
# queue every entry older than visibility_timeout, marked redelivered. The worker still holds
# the first copy for its ETA and now receives the restored one, holds it too, and so on: every
# copy runs at the ETA. 1.5 s between two 1 s sweeps: a copy is restored at the second sweep
# after its delivery, so copies come 2 s apart and a 5 s countdown runs 3 times. The figures
# are those the simulation reproduces (limits_figures.py). With visibility_timeout 2 the real
# copies come at 0, ~3, ~5, ~7 and the sweep that would restore a fifth at ~9.0 races the
# ETA (9.0) by milliseconds: 4 or 5 runs, both real (RedisCopies.races_eta).
REDIS_CASES = [
    ("countdown-5-vt-1.5", False),
    ("countdown-5-vt-1.5", True),
    ("countdown-9-vt-2", False),
]


def near(measured: float, simulated: float, late_by: float) -> bool:
    """A real time is the simulated one, or up to ``late_by`` later (a sweep or a tick's
    phase: the real worker's timers do not start with the task), give or take 0.3 s."""
    return simulated - 0.3 <= measured <= simulated + late_by + 0.5


@real_broker
@pytest.mark.holds_no_rabbitmq_delivery
@pytest.mark.parametrize(
    ("figures", "acks_late"),
    [(REDIS[name], acks_late) for name, acks_late in REDIS_CASES],
    ids=[f"{name}-{'acks-late' if late else 'early-ack'}" for name, late in REDIS_CASES],
)
def test_redis_runs_a_retry_held_past_visibility_timeout_once_per_sweep(
    figures: RedisCopies, acks_late: bool
) -> None:
    queue = new_name()
    # Our own unacked keys: a 1.5 s sweep of kombu's shared ones would restore messages that
    # other tests' workers hold on this Redis.
    keys = {
        f"unacked{suffix}_key": f"{queue}-unacked{suffix}" for suffix in ("", "_index", "_mutex")
    }
    app = real_app(
        "redis",
        task_acks_late=acks_late,
        broker_transport_options={**figures.transport_options, **keys},
    )
    try:
        with recording(app, countdown=figures.countdown) as recorder, start_worker(app, queue):
            recorder.started = time.monotonic()
            app.tasks["waits"].apply_async(queue=queue)
            timeout = figures.countdown + 5
            fewest = min(figures.real_runs)
            assert wait_until(lambda: len(recorder.runs) > fewest, timeout), (
                recorder.runs,
                recorder.received,
            )
            time.sleep(1.0)  # room for another copy to show up
    finally:
        forget("redis", queue, *keys.values())
    first, *retried = recorder.runs
    held = recorder.retries(recorder.received)
    # Which way a race went, shown with -rP: docs/broker-limits.md counts them.
    print(f"retry copies received at {[round(copy.t, 2) for copy in held]}")
    assert first.retries == 0
    # One task id, one run of its retry per copy the worker received, all at the ETA: the
    # original and the restored copies.
    assert len(held) in figures.real_runs, recorder.received
    assert [run.retries for run in retried] == [1] * len(held), (recorder.runs, held)
    assert {run.task_id for run in recorder.runs} == {first.task_id}
    redelivered = figures.redelivered[: len(held)]
    assert sorted(run.redelivered for run in retried) == sorted(redelivered)
    assert all(run.t == pytest.approx(figures.countdown, abs=0.5) for run in retried), retried
    assert [copy.redelivered for copy in held] == redelivered, recorder.received
    sweep = figures.transport_options["unacked_restore_interval"]
    assert all(near(copy.t, simulated, sweep) for copy, simulated in zip(held, figures.received)), (
        held,
        figures.received,
    )


if not SWEEP_OPTIONS_WORK:  # kombu < 5.7 sweeps every 100 s: see benchmarks/broker_limits_oracle.py
    del test_redis_runs_a_retry_held_past_visibility_timeout_once_per_sweep


# -- 2. RabbitMQ: a countdown longer than consumer_timeout (celery#6760) --------------------
# consumer_timeout 2 s, above the 1 s a task of the other real-broker tests holds; the
# channel checks it on its tick (1 s here, 60 s by default).
DEFAULT = RABBITMQ["default-countdown-6"]
CONSUMER_TIMEOUT_MS = round(DEFAULT.consumer_timeout * 1000)
TICK_MS = round(DEFAULT.tick * 1000)


def rabbitmq_version() -> tuple[int, ...]:
    from kombu import Connection

    with Connection(real_broker_url("amqp"), connect_timeout=2) as conn:
        conn.connect()
        version = conn.connection.server_properties["version"]
    return tuple(int(part) for part in version.split(".")[:2])


def consumers_of(queue: str) -> int:
    """How many consumers RabbitMQ has on ``queue`` (0 before it exists)."""
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(real_broker_url("amqp"), connect_timeout=2) as conn:
        try:
            return int(conn.channel().queue_declare(queue, passive=True).consumer_count)
        except NotFound:
            return 0


def log_times(caplog: pytest.LogCaptureFixture, started: float, text: str) -> list[float]:
    """When (test time) the worker logged ``text``."""
    wall_start = time.time() - (time.monotonic() - started)
    return [r.created - wall_start for r in caplog.records if text in r.getMessage()]


@real_broker
@pytest.mark.changes_rabbitmq_node
def test_rabbitmq_closes_the_channel_and_the_worker_dies(caplog: pytest.LogCaptureFixture) -> None:
    # Celery's default: PRECONDITION_FAILED is a channel error, not a connection error, so the
    # consumer does not restart: the worker stops and the retry waits in the queue.
    queue = new_name()
    app = real_app("amqp")
    with consumer_timeout_lowered(CONSUMER_TIMEOUT_MS, TICK_MS):
        try:
            with recording(app, countdown=DEFAULT.countdown) as recorder, start_worker(app, queue):
                recorder.started = time.monotonic()
                app.tasks["waits"].apply_async(queue=queue)
                assert wait_until(lambda: "Unrecoverable error" in caplog.text, 6), caplog.text
        finally:
            left = forget("amqp", queue)
    crashed = log_times(caplog, recorder.started, "Unrecoverable error: PreconditionFailed")
    assert "delivery acknowledgement on channel 1 timed out" in caplog.text
    # Closed at the first tick past the timeout: 2 s + up to 1 s (measured 2.99 s), later on a
    # loaded machine.
    assert len(crashed) == 1 and 2 <= crashed[0] <= 4.5, crashed
    assert near(crashed[0], DEFAULT.closes[0], DEFAULT.tick), crashed
    assert len(recorder.runs) - 1 == DEFAULT.retry_runs, recorder.runs
    assert left == DEFAULT.left_in_queue  # RabbitMQ requeued the retry; nobody consumes it


RETRY_CASES = ["retry-countdown-5", "retry-countdown-8"]


@real_broker
@pytest.mark.changes_rabbitmq_node
@pytest.mark.parametrize("figures", [RABBITMQ[name] for name in RETRY_CASES], ids=RETRY_CASES)
def test_rabbitmq_channel_error_retry_reconnects_and_runs_the_retry_once(
    figures: RabbitClose, caplog: pytest.LogCaptureFixture
) -> None:
    queue = new_name()
    app = real_app("amqp", broker_channel_error_retry=True)
    with consumer_timeout_lowered(
        round(figures.consumer_timeout * 1000), round(figures.tick * 1000)
    ):
        try:
            with recording(app, countdown=figures.countdown) as recorder, start_worker(app, queue):
                recorder.started = time.monotonic()
                app.tasks["waits"].apply_async(queue=queue)
                assert wait_until(lambda: len(recorder.runs) == 2, figures.countdown + 4), (
                    recorder.runs
                )
                time.sleep(1.0)  # room for a duplicate
        finally:
            left = forget("amqp", queue)
    lost = log_times(caplog, recorder.started, "Connection to broker lost")
    assert "PRECONDITION_FAILED" in caplog.text
    # Each reconnect opens a channel whose ticks start then: the closes come a timeout plus a
    # tick apart (measured 3.0 and 6.01 s with countdown 8).
    assert len(lost) == len(figures.closes), lost
    assert all(near(t, close, figures.tick) for t, close in zip(lost, figures.closes)), lost
    # RabbitMQ redelivers the one message it took back: no duplicate, unlike Redis.
    first, retried = recorder.runs
    assert (first.retries, retried.retries, retried.redelivered) == (0, 1, True)
    assert retried.t == pytest.approx(figures.countdown, abs=0.5)
    assert "Unrecoverable error" not in caplog.text
    assert left == figures.left_in_queue


@real_broker
def test_rabbitmq_per_queue_consumer_timeout_needs_3_12(caplog: pytest.LogCaptureFixture) -> None:
    from kombu import Queue

    queue = new_name()
    app = real_app("amqp")
    app.conf.task_queues = [Queue(queue, queue_arguments={"x-consumer-timeout": 1000})]
    honoured = rabbitmq_version() >= (3, 12)  # RabbitMQ 3.12 added the queue argument
    # Only the tick is lowered: the node's 30 min consumer_timeout stays.
    with channel_tick_lowered(TICK_MS):
        try:
            with recording(app, countdown=3) as recorder, start_worker(app, queue):
                recorder.started = time.monotonic()
                app.tasks["waits"].apply_async(queue=queue)
                wait_until(lambda: len(recorder.runs) == 2, 5)
        finally:
            forget("amqp", queue)
    assert ("PRECONDITION_FAILED" in caplog.text) is honoured, caplog.text
    if not honoured:
        assert [run.retries for run in recorder.runs] == [0, 1]
        assert not recorder.runs[1].redelivered


# -- 4. A broker that hangs instead of refusing (celery#4296, #6911, #4627, kombu#902) ------
# broker_proxy.blackhole() accepts connections and never answers, and stalls open ones. The
# publish cases are hang_cases.py's: test_hanging_broker.py runs the same on the virtual clock.


def timed_publish(app: Any, case: HangCase, queue: str) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        hang_publish(app, case, queue)
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def still_blocked(app: Any, case: HangCase, queue: str, proxy: BrokerProxy) -> tuple[bool, float]:
    """Whether a publish is still blocked after 2 s, and how long it takes once the proxy
    restores (a blackholed connection closes then; a stalled one resumes)."""
    done = threading.Event()

    def publish() -> None:
        with contextlib.suppress(Exception):
            hang_publish(app, case, queue)
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    blocked = not done.wait(2.0)
    restored = time.monotonic()
    proxy.restore()
    assert done.wait(5.0), proxy.timeline()
    return blocked, time.monotonic() - restored


def hang_config(app: Any, **transport_options: Any) -> None:
    app.conf.update(
        broker_connection_timeout=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )


def publish_into_a_blackhole(proxy: BrokerProxy, app: Any, case: HangCase) -> list[str]:
    """Run one case through a new proxy; what differs from the case's expectations."""
    configure_hang(app, case)
    queue = new_name()
    try:
        if case.pooled:
            app.send_task("foo.task", queue=queue)
        proxy.blackhole()
        before = len(proxy.connections)
        if case.blocks_for_ever:
            blocked, after_restore = still_blocked(app, case, queue, proxy)
            return [] if blocked and after_restore < 1.5 else [f"returned ({after_restore=})"]
        took, error = timed_publish(app, case, queue)
        connects = len(proxy.connections) - before
    finally:
        proxy.restore()
        forget(case.broker, queue)
    wrong = []
    if case.error is None:
        wrong += [f"raised {error!r}"] if error is not None else []
    elif not isinstance(error, OperationalError) or str(error) != case.error:
        wrong.append(f"raised {error!r}, not OperationalError({case.error!r})")
    # Real time: a little later than the virtual figure, more on a loaded machine.
    if not case.seconds - 0.05 <= took <= case.seconds + 1.5:
        wrong.append(f"took {took:.3f} s, simulated {case.seconds} s")
    if connects != case.connects:
        wrong.append(f"{connects} new connections, simulated {case.connects}")
    return wrong


@real_broker
@pytest.mark.holds_no_rabbitmq_delivery
@pytest.mark.parametrize("kind", ["redis", "amqp"], ids=["redis", "amqp"])
def test_publish_into_a_hang_as_simulated(kind: str, broker_proxy: ProxyFactory, app: Any) -> None:
    wrong = {}
    for param in HANG_CASES:
        (case,) = param.values
        if case.broker == kind:
            # A proxy of its own: the app's pool starts afresh.
            wrong[param.id] = publish_into_a_blackhole(broker_proxy(kind), app, case)
    assert not any(wrong.values()), wrong


@real_broker
def test_amqp_worker_notices_a_hang_by_its_heartbeat(
    broker_proxy: ProxyFactory, app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = broker_proxy("amqp")
    hang_config(app)
    app.conf.broker_heartbeat = 2
    # Without remote control: a reconnect that comes before RabbitMQ has dropped the
    # blackholed connection finds that connection's exclusive pidbox queue still there, and the
    # worker dies of "Unrecoverable error: ResourceLocked" (seen under load; a real race, in
    # docs/broker-limits.md). What this test measures is when the heartbeat notices.
    app.conf.worker_enable_remote_control = False
    queue = new_name()
    runs: list[float] = []

    @app.task(name="record", shared=False)
    def record() -> None:
        runs.append(time.monotonic())

    try:
        with start_worker(app, queue):
            # A hang during the worker's start-up blocks it in a wait for the broker's reply,
            # before the event loop that checks heartbeats runs (it never noticed in 8 s):
            # the hang starts once RabbitMQ has the worker's consumer, and its loop runs.
            assert wait_until(lambda: consumers_of(queue) > 0, 10), proxy.timeline()
            time.sleep(0.5)
            started = time.monotonic()
            proxy.blackhole()
            assert wait_until(lambda: "Too many heartbeats missed" in caplog.text, 8), caplog.text
            proxy.restore()
            restored = time.monotonic()
            real = real_app("amqp")
            real.send_task("record", queue=queue)
            assert wait_until(lambda: bool(runs), 10), proxy.timeline()
    finally:
        proxy.restore()
        forget("amqp", queue)
    lost = log_times(caplog, started, "Too many heartbeats missed")
    # Missed heartbeats are counted on the worker's 1 s heartbeat_check ticks: at 2x-2.5x
    # broker_heartbeat.
    assert 3.5 <= lost[0] <= 6, lost
    assert runs[0] - restored < 6


def hang_while_the_retry_waits(proxy: BrokerProxy, recorder: Recorder) -> float:
    """Once the worker holds the retry (countdown 3), the broker hangs from 0.5 s later until
    10 s; return when the hang ended (test time), 6 s later: room for a redelivery."""
    assert wait_until(lambda: bool(recorder.received[1:]), 10), recorder.received
    time.sleep(0.5)
    proxy.blackhole()
    time.sleep(9.5)
    proxy.restore()
    restored = time.monotonic() - recorder.started
    time.sleep(6)
    return restored


@real_broker
@pytest.mark.parametrize("heartbeat", [2, 0], ids=["heartbeat-2", "heartbeat-0"])
def test_amqp_worker_holding_a_retry_waits_out_a_hang(
    heartbeat: int, broker_proxy: ProxyFactory, app: Any
) -> None:
    # Simulated in test_hanging_worker.py: the retry runs at its ETA, its ack waits in the
    # socket buffer and basic_qos for the hang's end; with heartbeats RabbitMQ has closed the
    # connection by then, and the reconnected worker runs the retry again.
    proxy = broker_proxy("amqp")
    hang_config(app)
    app.conf.broker_heartbeat = heartbeat
    queue = new_name()
    try:
        with recording(app, countdown=3) as recorder, start_worker(app, queue):
            assert wait_until(lambda: consumers_of(queue) > 0, 10), proxy.timeline()
            recorder.started = time.monotonic()  # not at the worker's start: slow under load
            app.send_task("waits", queue=queue)
            restored = hang_while_the_retry_waits(proxy, recorder)
    finally:
        proxy.restore()
        forget("amqp", queue)
    # Measured: the retry ran at its ETA (3.1-3.2 s) in the hang; with heartbeats it ran again,
    # redelivered, 0.1-0.2 s after the hang ended (RabbitMQ had closed the connection, and the
    # ack waiting in the socket buffer was lost); without them, once.
    runs = [(round(run.t), run.redelivered) for run in recorder.retries(recorder.runs)]
    assert runs[0] == (3, False), recorder.runs
    if heartbeat:
        assert len(runs) == 2 and runs[1][1], recorder.runs
        assert restored <= recorder.retries(recorder.runs)[1].t <= restored + 2.5, recorder.runs
    else:
        assert len(runs) == 1, recorder.runs


# (socket_timeout, Celery's worker-heartbeat events, when the retry due at 3 s runs: from,
# to). A hang from 0.5 to 10 s.
REDIS_WORKER_HANGS = [
    (1, True, "hang-end", 2.5),
    (None, True, "hang-end", 1.0),
    (1, False, "eta", 3.0),
    (None, False, "hang-end", 1.0),
]


@real_broker
@pytest.mark.holds_no_rabbitmq_delivery
@pytest.mark.parametrize(
    ("socket_timeout", "heartbeat", "runs_from", "late_by"),
    REDIS_WORKER_HANGS,
    ids=[
        f"{'socket-timeout-1' if timeout else 'no-socket-timeout'}-"
        f"{'heartbeat' if heartbeat else 'without-heartbeat'}"
        for timeout, heartbeat, _, _ in REDIS_WORKER_HANGS
    ],
)
def test_redis_worker_holding_a_retry_waits_out_a_hang(
    socket_timeout: float | None,
    heartbeat: bool,
    runs_from: str,
    late_by: float,
    broker_proxy: ProxyFactory,
    app: Any,
) -> None:
    # Simulated without worker heartbeats in test_hanging_worker.py (the ack waits out
    # socket_timeout). What else blocks the real worker's event loop in the hang, seen in
    # thread dumps, and which the simulated worker does not run: kombu 5.7's
    # binding-expiry refresh (a timer every 1 s: a synchronous Redis script call, which waits
    # out socket_timeout, or the hang without it) and Celery's worker-heartbeat event publish
    # (every 2 s: kombu's ensure reconnects, each connect's PING waiting out socket_timeout,
    # until the hang ends). The ETA's timer waits for the loop.
    proxy = broker_proxy("redis")
    queue = new_name()
    # Our own unacked keys: a sweep of kombu's shared ones would restore other tests' messages.
    keys = {
        f"unacked{suffix}_key": f"{queue}-unacked{suffix}" for suffix in ("", "_index", "_mutex")
    }
    options: dict[str, Any] = dict(keys)
    if socket_timeout is not None:
        options["socket_timeout"] = socket_timeout
    hang_config(app, **options)
    try:
        worker = start_worker(app, queue, heartbeat=heartbeat)
        with recording(app, countdown=3) as recorder, worker:
            recorder.started = time.monotonic()  # not at the worker's start: slow under load
            app.send_task("waits", queue=queue)
            restored = hang_while_the_retry_waits(proxy, recorder)
    finally:
        proxy.restore()
        forget("redis", queue, *keys.values())
    # Measured: the retry runs once, not redelivered. With the worker's heartbeat, after the
    # hang ended: 1.0-1.2 s after with socket_timeout=1 (the reconnect loop's next try), at once
    # without it. Without the heartbeat and with socket_timeout=1, in the hang, 1 s late
    # (4.1 s: a call that waited out socket_timeout first); without either, at the hang's end.
    retries = recorder.retries(recorder.runs)
    print(f"retry ran at {[round(run.t, 2) for run in retries]}, the hang ended at {restored:.2f}")
    assert [run.redelivered for run in retries] == [False], recorder.runs
    start = restored if runs_from == "hang-end" else 3.0
    assert start - 0.2 <= retries[0].t <= start + late_by, (restored, recorder.runs)


# -- 6. Quorum queues: native delayed delivery (celery#9912, #10111) -------------------------
@contextlib.contextmanager
def own_vhost() -> Iterator[str]:
    """The real RabbitMQ's URL on a virtual host of the test's own, deleted with all it holds
    afterwards. The celery_delayed_* exchanges and queues are per virtual host: tests that
    share them (other runs on the same RabbitMQ too) would delete them under each other."""
    from urllib.parse import urlsplit, urlunsplit

    url = urlsplit(real_broker_url("amqp"))
    name = new_name()
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, url.username or "guest", ".*", ".*", ".*")
        yield urlunsplit(url._replace(path=f"/{name}"))
    finally:
        rabbitmqctl("delete_vhost", name)


def use_queue(app: Any, queue: str, queue_type: str) -> None:
    """Route every task of ``app`` to ``queue``: quorum behind a topic exchange (native
    delayed delivery), or classic behind a direct one."""
    from kombu import Exchange, Queue

    exchange_type = "topic" if queue_type == "quorum" else "direct"
    arguments = {"x-queue-type": queue_type}
    app.conf.update(
        task_queues=[
            Queue(queue, Exchange(queue, type=exchange_type), queue, queue_arguments=arguments)
        ],
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_exchange_type=exchange_type,
        task_default_routing_key=queue,
    )


@real_broker
def test_quorum_queue_countdown_goes_through_celery_delayed_queues() -> None:
    queue = new_name()
    errors: list[BaseException] = []
    short_runs: list[float] = []
    with own_vhost() as url:
        app = real_app("amqp", url)
        use_queue(app, queue, "quorum")

        @app.task(name="too_short", bind=True, max_retries=1, shared=False)
        def too_short(self: Any) -> None:
            short_runs.append(time.monotonic())
            try:
                self.retry(countdown=0.5)
            except Exception as exc:
                errors.append(exc)
                raise

        with recording(app, countdown=1.5) as recorder, start_worker(app, queue):
            recorder.started = time.monotonic()
            app.tasks["waits"].apply_async()
            too_short.apply_async()
            assert wait_until(lambda: len(recorder.runs) == 2, 6), recorder.received
            time.sleep(0.5)
    # The retry left through celery_delayed_27 with its countdown, truncated to whole seconds,
    # in the routing key; it was dead-lettered level by level and came back after 1 s, not
    # held by the worker; the worker then held the rest of its ETA.
    first, held = recorder.received[0], recorder.retries(recorder.received)[0]
    assert held.exchange.startswith("celery_delayed_"), recorder.received
    retried_at = recorder.runs[0].t  # the countdown counts from the retry, in the first run
    assert held.t - retried_at == pytest.approx(1, abs=0.4), recorder.received
    assert recorder.runs[1].t - retried_at == pytest.approx(1.5, abs=0.3), recorder.runs
    assert first.exchange == queue
    # countdown < 1: kombu's calculate_routing_key refuses int(0.5) == 0, and Celery turns the
    # ValueError into a Reject without requeue: the task is dropped, not retried.
    assert len(short_runs) == 1
    assert [type(e).__name__ for e in errors] == ["Reject"], errors
    assert "countdown must be a positive number" in str(errors[0])


@real_broker
def test_quorum_queue_retries_more_than_twice_through_celery_delayed_queues() -> None:
    # celery#10111: from the third retry on, RabbitMQ's dead-letter cycle detection dropped
    # the message (the retry carried the x-death header of the one before); celery#10095
    # (in the Celery measured here) filters the header out.
    queue = new_name()
    recorder = Recorder()
    with own_vhost() as url:
        app = real_app("amqp", url)
        use_queue(app, queue, "quorum")

        @app.task(name="again", bind=True, max_retries=3, shared=False)
        def again(self: Any) -> None:
            request = self.request
            recorder.runs.append(recorder.seen(request.id, request.retries, request.delivery_info))
            if request.retries < 3:
                raise self.retry(countdown=1)

        with start_worker(app, queue):
            recorder.started = time.monotonic()
            again.apply_async()
            assert wait_until(lambda: len(recorder.runs) == 4, 10), recorder.runs
    runs = recorder.runs
    assert [run.retries for run in runs] == [0, 1, 2, 3], runs
    assert [run.exchange for run in runs[1:]] == ["celery_delayed_delivery"] * 3, runs
    gaps = [b.t - a.t for a, b in zip(runs, runs[1:])]
    assert all(gap == pytest.approx(1, abs=0.4) for gap in gaps), runs


def unacknowledged_on(url: str) -> int:
    """The deliveries RabbitMQ's channels on ``url``'s virtual host wait to hear an ack for.
    A channel counts an ack once it processed it; a quorum queue's own count lags seconds."""
    from urllib.parse import unquote, urlsplit

    vhost = unquote(urlsplit(url).path[1:])
    rows = rabbitmqctl("list_channels", "-q", "vhost", "messages_unacknowledged").splitlines()
    cells = [row.split("\t") for row in rows]
    return sum(int(count) for name, count in cells if name == vhost and count.isdigit())


@real_broker
@pytest.mark.parametrize("queue_type", ["quorum", "classic"], ids=["quorum", "classic"])
def test_countdown_retry_through_a_cut(queue_type: str) -> None:
    # The worker loses RabbitMQ (the proxy cuts it) while a retry with countdown 7 waits
    # (odd: a quorum queue's retry then reaches the queue from celery_delayed_delivery).
    queue = new_name()
    woken: list[float] = []
    with own_vhost() as url, BrokerProxy(url) as proxy:
        app = real_app("amqp", proxy.url, broker_connection_retry_on_startup=True)
        use_queue(app, queue, queue_type)

        @app.task(name="wake", shared=False)
        def wake() -> None:
            woken.append(time.monotonic())

        def only_the_retry_is_held() -> bool:
            # The first run's and the wake's acks processed; the retry delivered and held
            # by the worker (classic), or waiting in RabbitMQ's delayed queues (quorum).
            unacknowledged = unacknowledged_on(url)
            if queue_type == "quorum":
                return unacknowledged == 0
            return unacknowledged == 1 and any(copy.retries for copy in recorder.received)

        with recording(app, countdown=7) as recorder, start_worker(app, queue):
            recorder.started = time.monotonic()
            app.tasks["waits"].apply_async()
            assert wait_until(lambda: len(recorder.runs) == 1, 5), recorder.received
            # The solo worker sends the first run's ack from its event loop when the loop
            # next wakes; with a quorum queue nothing arrives (the retry waits in RabbitMQ)
            # until a timer fires, so a delivery wakes it. A cut before RabbitMQ processed
            # the ack would run the first attempt again: the cut waits for the broker's count.
            wake.apply_async()
            assert wait_until(lambda: bool(woken), 5), recorder.received
            assert wait_until(only_the_retry_is_held, 5), unacknowledged_on(url)
            cut_at = time.monotonic() - recorder.started
            # Reconnecting takes up to 2 s after the outage (Celery's first interval).
            assert cut_at + 1.5 + 2 < 7, f"the cut came late, at {cut_at:.1f} s"
            proxy.outage(1.5)
            assert wait_until(lambda: len(recorder.runs) == 2, 12), proxy.timeline()
    held = recorder.retries(recorder.received)
    assert [run.retries for run in recorder.runs] == [0, 1], recorder.runs
    assert recorder.runs[1].t - recorder.runs[0].t == pytest.approx(7, abs=0.5), recorder.runs
    if queue_type == "quorum":
        # RabbitMQ holds the retry in the celery_delayed_* queues, whatever the worker's
        # connection does: it reaches the queue at its countdown, first delivery.
        assert [(copy.exchange, copy.redelivered) for copy in held] == [
            ("celery_delayed_delivery", False)
        ], recorder.received
    else:
        # The worker held the retry unacknowledged; the cut gave it back to the queue, and
        # the reconnected worker receives it again (redelivered) and holds it to its ETA.
        assert [copy.redelivered for copy in held] == [False, True], recorder.received
        assert held[0].t < cut_at < held[1].t


def test_native_delayed_delivery_cannot_run_on_kombus_memory_transport() -> None:
    # The plugin's pyamqp flavour is kombu's memory transport: its driver_type is "memory", so
    # Celery never takes the quorum path there, and kombu's set-up needs exchange-to-exchange
    # bindings, which the virtual transport lacks (and message TTL and dead-lettering).
    # tests/test_quorum_queues.py checks that the plugin refuses such an app.
    from celery import Celery
    from celery.utils.quorum_queues import detect_quorum_queues
    from kombu import Connection, Queue
    from kombu.transport.native_delayed_delivery import (
        declare_native_delayed_delivery_exchanges_and_queues,
    )

    app = Celery("memory-quorum", broker="memory://", set_as_current=False)
    app.conf.task_queues = [Queue("q", queue_arguments={"x-queue-type": "quorum"})]
    with Connection("memory://") as conn:
        assert conn.transport.driver_type == "memory"
        assert detect_quorum_queues(app, conn.transport.driver_type) == (False, "")
        assert detect_quorum_queues(app, "amqp") == (True, "q")
        with pytest.raises(NotImplementedError, match="exchange_bind"):
            declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
