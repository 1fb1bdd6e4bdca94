"""Shared fixtures: a fresh Celery app per test, with the seed's tasks on it."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from rabbitmq_node import rabbitmq_node_lock

SEED_POLICY = {"max_retries": 3, "interval_start": 3, "interval_step": 1, "interval_max": 6}


def _kombu_version() -> tuple[int, int]:
    import kombu

    major, minor = kombu.__version__.split(".")[:2]
    return int(major), int(minor)


def _celery_version() -> tuple[int, int]:
    import celery

    return int(celery.VERSION[0]), int(celery.VERSION[1])


# kombu 5.5 made a fresh connection's connect retries follow the publish retry policy
# (Producer.publish puts the policy into the connection's transport options). Before, they
# follow kombu's defaults (2 s, then 4 s more) until broker_connection_timeout. The plugin runs
# kombu's code, so it reports what the installed kombu does; the tests expect the same.
POLICY_ON_FRESH_CONNECT = _kombu_version() >= (5, 5)
# kombu 5.7 fixed its TokenBucket counting the time a full bucket sat idle as refill time.
TOKEN_BUCKET_COUNTS_IDLE_TIME_RIGHT = _kombu_version() >= (5, 7)
# Tries of the seed's publish on a fresh connection refused twice (delivered on the third).
SEED_FRESH_TRIES = [0, 3, 7] if POLICY_ON_FRESH_CONNECT else [0, 2, 6]
SEED_FRESH_INTERVALS = [b - a for a, b in zip(SEED_FRESH_TRIES, SEED_FRESH_TRIES[1:])]
# Before Celery 5.7 a backend's native chord join (get_many) sleeps its 0.5 s poll interval
# once more after the last header result arrived, so the callback starts half a second after
# the last header task (measured on a real worker with Celery 5.3.6: 1.77 s instead of 1.25 s).
NATIVE_JOIN_WAIT = 0.0 if _celery_version() >= (5, 7) else 0.5
_app_names = itertools.count(1)
logger = logging.getLogger("tests")


def make_app(**config: Any) -> Any:
    """A new app with the seed's ``foo.task``: tests never share an app or its tasks."""
    from celery import Celery

    app = Celery(f"test-app-{next(_app_names)}", broker="memory://", set_as_current=False)
    app.conf.update(config)

    @app.task(name="foo.task", bind=True, max_retries=3, shared=False)
    def foo_task(self: Any) -> None:
        try:
            raise RuntimeError("boom")
        except Exception as exc:
            logger.warning("foo.task failed: %r, retrying", exc)
            self.retry(countdown=3**self.request.retries)

    return app


def make_poll_app(**config: Any) -> Any:
    """An app whose ``poll`` task retries once, with countdown=10, then returns "done"."""
    app = make_app(**config)

    @app.task(name="poll", bind=True, max_retries=1, shared=False)
    def poll(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=10)
        return "done"

    return app


def consumer_connects(broker: Any) -> list[tuple[float, bool]]:
    """(t, ok) of each connect the worker's consumer made."""
    return [(op.t, op.ok) for op in broker.connection_attempts if op.role == "consumer"]


def actions(worker: Any, task_id: str | None = None) -> list[str]:
    """What the worker did, in order (of one task and its connection, with ``task_id``)."""
    return [e.action for e in worker.events if task_id is None or e.task_id in ("", task_id)]


@pytest.fixture(autouse=True)
def _inner_runs_without_hypothesis(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inner pytest runs (``pytester``, in a subprocess) start without Hypothesis's plugin:
    importing it is about 0.6 s of every start-up, and no inner test uses it."""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # it clears PYTEST_ADDOPTS: set it afterwards
        monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest")


@pytest.fixture
def app() -> Any:
    return make_app()


@pytest.fixture
def celery_retry_app(app: Any) -> Any:
    return app


@pytest.fixture
def celery_retry_flavor(request: pytest.FixtureRequest) -> str | None:
    """The plugin's fixture, parametrizable: ``parametrize("celery_retry_flavor", [...],
    indirect=True)``; without a param, the app's broker URL decides."""
    return getattr(request, "param", None)


def real_broker_url(kind: str) -> str:
    """The real broker's URL from the environment, or a skip that says how to provide it."""
    import os

    from pytest_celery_retry.flavors import flavor_for_broker

    flavor = flavor_for_broker(kind)
    assert flavor is not None, kind
    url = os.environ.get(flavor.url_variable)
    if not url:
        pytest.skip(
            f"set {flavor.url_variable}={flavor.example_url} to run against a real {kind} broker"
        )
    return url


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: takes seconds (a real worker in real time, or many inner pytest runs) without "
        "a real broker; scheduled first, as real-broker tests are",
    )
    config.addinivalue_line(
        "markers",
        "own_rabbitmq_node_lock: a process the test starts takes the RabbitMQ node lock "
        "(tests/rabbitmq_node.py) as its test needs it",
    )
    config.addinivalue_line(
        "markers",
        "changes_rabbitmq_node: the test lowers the RabbitMQ node's consumer_timeout, taking "
        "the node lock exclusively itself; scheduled before every other test",
    )
    config.addinivalue_line(
        "markers",
        "holds_no_rabbitmq_delivery: a real-broker test that never holds a RabbitMQ delivery "
        "unacknowledged (it uses Redis, or only publishes and reads without acks), so a "
        "lowered consumer_timeout cannot reach it: it does not wait for the RabbitMQ node lock",
    )


def _may_hold_a_rabbitmq_delivery(node: pytest.Item) -> bool:
    """Only a test holding a RabbitMQ delivery unacknowledged can be hurt by a lowered
    consumer_timeout: one marked ``holds_no_rabbitmq_delivery``, or a case whose ``kind``
    parameter is Redis, need not wait for the lock (and hold up the one that lowers it)."""
    if node.get_closest_marker("holds_no_rabbitmq_delivery"):
        return False
    callspec = getattr(node, "callspec", None)
    return callspec is None or callspec.params.get("kind") != "redis"


@pytest.fixture(autouse=True)
def _share_the_rabbitmq_node(request: pytest.FixtureRequest) -> Iterator[None]:
    node = request.node
    if (
        not _uses_a_real_broker(node)
        or node.get_closest_marker("own_rabbitmq_node_lock")
        or node.get_closest_marker("changes_rabbitmq_node")
        or not _may_hold_a_rabbitmq_delivery(node)
    ):
        yield
        return
    with rabbitmq_node_lock(exclusive=False):
        yield


def _uses_a_real_broker(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker("real_broker")) or "broker_proxy" in getattr(
        item, "fixturenames", ()
    )


def _schedule_rank(item: pytest.Item) -> int:
    if item.get_closest_marker("changes_rabbitmq_node"):
        return 0
    real = _uses_a_real_broker(item)
    if not (real or item.get_closest_marker("slow")):
        return 3
    return 2 if real and _may_hold_a_rabbitmq_delivery(item) else 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that take seconds first, each group in the order pytest-randomly drew.

    With ``--dist load --maxschedchunk 1`` (README) each xdist worker takes the next test when
    it is free: the long waits start at once, side by side, and the short tests fill the gaps,
    instead of a long wait drawn last keeping the run going on its own. The few tests that
    lower RabbitMQ's consumer_timeout go before them all, and the long tests that may hold a
    RabbitMQ delivery after the other long ones: those wait for the first (tests/rabbitmq_node.py),
    and the others keep the workers busy meanwhile.
    """
    items.sort(key=_schedule_rank)
