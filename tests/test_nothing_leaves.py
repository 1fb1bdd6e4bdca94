"""While an in-memory fixture is active, no Celery app reaches a real broker or result backend.

A TCP listener stands in for the apps' brokers (``amqp://`` and ``redis://``) and their redis
result backends, and counts the connections it gets. The inner tests publish in every way a
test might (``delay()`` before any ``apply()``, ``send_task``, another app's task, a pool and
a backend the app built before the test) and read results: the listener must see nothing.
Control runs show that it does count what goes out.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

pytest_plugins = ["pytester"]


class Listener:
    """A TCP server on 127.0.0.1 that accepts, counts and closes every connection."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._socket.close()
        self._thread.join(timeout=5)


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()


CONFTEST = """
import os

import pytest
from celery import Celery

PORT = os.environ["LISTENER_PORT"]
amqp_app = Celery(
    "amqp_app",
    broker=f"amqp://guest:guest@127.0.0.1:{PORT}//",
    backend=f"redis://127.0.0.1:{PORT}/0",
    set_as_current=False,
)
redis_app = Celery(
    "redis_app",
    broker=f"redis://127.0.0.1:{PORT}/1",
    backend=f"redis://127.0.0.1:{PORT}/2",
    set_as_current=False,
)
for app in (amqp_app, redis_app):
    app.conf.broker_connection_timeout = 1
    app.conf.broker_connection_max_retries = 1
    app.conf.task_publish_retry = False  # a publish that does go out fails fast
    app.conf.redis_backend_health_check_interval = None
# Built before any test, as an app that published and read results in an earlier test has.
redis_app.pool
redis_app.producer_pool
redis_app.backend


@amqp_app.task(name="add")
def add(x, y):
    return x + y


@redis_app.task(name="mul")
def mul(x, y):
    return x * y


@pytest.fixture
def celery_retry_app():
    return amqp_app
"""

IN_MEMORY = """
import pytest
from conftest import add, amqp_app, mul, redis_app
from pytest_celery_retry import UsageError


def test_delay_before_the_first_apply(retry_worker):
    result = add.delay(1, 2)

    runs = retry_worker.run_until_idle()

    assert runs[result.id].result == 3
    assert result.get(timeout=1) == 3


def test_send_task(retry_worker):
    result = amqp_app.send_task("add", (2, 3))

    assert retry_worker.run_until_idle()[result.id].result == 5
    assert result.get(timeout=1) == 5


def test_publish_with_flaky_broker_only(flaky_broker):
    add.delay(1, 1)
    amqp_app.send_task("add", (1, 1))

    assert flaky_broker.pending() == 2


def test_another_app_with_a_pool_and_backend_from_before(retry_worker):
    result = mul.delay(2, 3)

    assert retry_worker.run_until_idle(app=redis_app)[result.id].result == 6
    assert redis_app.AsyncResult(result.id).get(timeout=1) == 6


def test_another_apps_result_backend_and_connection(celery_retry_clock):
    assert redis_app.AsyncResult("never-sent").state == "PENDING"
    with redis_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
    with amqp_app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)


def test_apply(retry_worker):
    assert retry_worker.apply(mul, args=(3, 4)).result == 12


def test_a_bad_publish_retry_policy_is_refused_at_publish(retry_worker):
    amqp_app.conf.task_publish_retry_policy = {"max_retry": 3}
    with pytest.raises(UsageError, match="max_retry"):
        add.delay(1, 2)
"""

GOES_OUT = """
import pytest
from conftest import add, redis_app
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError


def test_without_the_fixtures():
    # ignore_result: the result backend would first retry its subscription for 20 real seconds
    with pytest.raises(OperationalError):
        add.apply_async((1, 2), ignore_result=True)


def test_its_own_result_backend_kept(retry_worker):
    with pytest.raises(RedisConnectionError):
        redis_app.AsyncResult("never-sent").state


def test_an_app_pointed_at_broker_proxy(broker_proxy, celery_retry_app, retry_worker):
    proxy = broker_proxy("redis")  # the listener stands in for the real Redis
    with pytest.raises(OperationalError):
        with celery_retry_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
    assert [attempt.outcome for attempt in proxy.connections][:1] == ["accepted"]
"""


def run(
    pytester: pytest.Pytester, listener: Listener, tests: str, *options: str, ini: str = ""
) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=tests)
    pytester.syspathinsert()
    pytester.makeini(f"[pytest]\n{ini}")
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("LISTENER_PORT", str(listener.port))
        environment.delenv("CELERY_BROKER_URL", raising=False)
        environment.setenv("CELERY_RETRY_REDIS_URL", f"redis://127.0.0.1:{listener.port}/3")
        return pytester.runpytest("-p", "no:cacheprovider", "-rA", *options)


@pytest.mark.parametrize(
    "options",
    [("-p", "no:randomly"), ("-p", "randomly", "--randomly-seed=3", "-p", "xdist", "-n", "2")],
    ids=["in-order", "xdist"],
)
def test_nothing_reaches_the_apps_brokers_or_backends(
    pytester: pytest.Pytester, listener: Listener, options: tuple[str, ...]
) -> None:
    result = run(pytester, listener, IN_MEMORY, *options)
    result.assert_outcomes(passed=7)
    assert listener.connections == 0


def test_the_listener_counts_what_goes_out(pytester: pytest.Pytester, listener: Listener) -> None:
    result = run(
        pytester, listener, GOES_OUT, "-p", "no:randomly", ini="celery_retry_result_backend = keep"
    )
    result.assert_outcomes(passed=3)
    assert listener.connections >= 3
