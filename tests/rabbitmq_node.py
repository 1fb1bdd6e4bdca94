"""Lowering the shared RabbitMQ node's consumer_timeout and channel tick for a few tests.

Some real-broker tests lower ``consumer_timeout``, a setting of the whole node, for a few
seconds. RabbitMQ (3.10 here) reads it once per channel, when the channel opens, and keeps it for
the channel's life (measured: a channel opened while the node's value was 2 s was closed 2.6 s
after its delivery although the value had been set back to 30 min in between). A test that
lowers it holds ``rabbitmq_node_lock`` exclusively, and every other test that may hold a
RabbitMQ delivery shares that lock for its whole length (it may open a channel at any time).

``channel_tick_interval`` is read again each time a channel re-arms its tick, so a test's
tick stays lowered while its channels live; a shorter tick only makes the others check their
30 min more often, so lowering it alone needs no exclusive lock: the last test that needs it
lowered restores it.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_LOCKS = Path("/tmp/pytest-celery-retry-rabbitmq-node")
_NODE = _LOCKS.with_suffix(".lock")
_GATE = _LOCKS.with_suffix(".gate.lock")
# Shared by each test that needs the tick lowered; whoever finds it free on leaving restores it.
_TICK_USERS = _LOCKS.with_suffix(".tick-users.lock")
# Serialises reading, lowering and restoring the tick.
_TICK_MUTEX = _LOCKS.with_suffix(".tick.lock")
# The tick's value before the first user lowered it.
_TICK_ORIGINAL = _LOCKS.with_suffix(".tick-original")


@contextlib.contextmanager
def _locked(path: Path, operation: int) -> Iterator[Any]:
    with path.open("a") as file:  # closing it releases the lock
        fcntl.flock(file, operation)
        yield file


@contextlib.contextmanager
def rabbitmq_node_lock(exclusive: bool) -> Iterator[None]:
    """Exclusively to lower the node's consumer_timeout, shared to hold deliveries."""
    # A waiting exclusive holder keeps the gate, so the shared holders that keep coming cannot
    # starve it.
    with _locked(_GATE, fcntl.LOCK_EX) as gate, _NODE.open("a") as node:
        fcntl.flock(node, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield


def rabbitmqctl(*arguments: str) -> str:
    """Run ``rabbitmqctl`` on the RabbitMQ node: ``eval`` and an Erlang expression alone."""
    import pytest

    command = shutil.which("rabbitmqctl")
    if command is None:
        pytest.skip("rabbitmqctl (on the RabbitMQ node) is needed here: not found")
    if len(arguments) == 1:
        arguments = ("eval", *arguments)
    result = subprocess.run(
        [command, *arguments], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()


def _swap(name: str, value: int) -> str | None:
    """Set the node's ``rabbit`` setting ``name`` to ``value``; return what it was (None: it
    was not set). One ``rabbitmqctl`` call (an Erlang VM start, about half a second)."""
    found = rabbitmqctl(
        f"B = application:get_env(rabbit, {name}), application:set_env(rabbit, {name}, {value}), B."
    )
    previous = re.fullmatch(r"\{ok,(\d+)\}|undefined", found)
    assert previous is not None, found
    return previous.group(1)


def _restore(name: str, previous: str | None) -> None:
    rabbitmqctl(
        f"application:set_env(rabbit, {name}, {previous}), ok."
        if previous is not None
        else f"application:unset_env(rabbit, {name}), ok."
    )


@contextlib.contextmanager
def channel_tick_lowered(milliseconds: int) -> Iterator[None]:
    """The node's ``channel_tick_interval`` at ``milliseconds`` while the block runs, and
    back to what it was once no test needs it lowered (the tests lower it to one value), on
    every path."""
    try:
        with _locked(_TICK_USERS, fcntl.LOCK_SH):
            with _locked(_TICK_MUTEX, fcntl.LOCK_EX):
                previous = _swap("channel_tick_interval", milliseconds)
                if not _TICK_ORIGINAL.exists():
                    # RabbitMQ sets it at boot; a node without it could not open channels.
                    assert previous is not None
                    _TICK_ORIGINAL.write_text(previous)
            yield
    finally:
        with _locked(_TICK_MUTEX, fcntl.LOCK_EX), _TICK_USERS.open("a") as users:
            try:  # the last user out finds no other holder
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                if _TICK_ORIGINAL.exists():
                    _restore("channel_tick_interval", _TICK_ORIGINAL.read_text())
                    _TICK_ORIGINAL.unlink()


@contextlib.contextmanager
def consumer_timeout_lowered(milliseconds: int, tick: int) -> Iterator[None]:
    """The node's ``consumer_timeout`` at ``milliseconds`` and its tick at ``tick`` while the
    block runs, with every other test that may hold a RabbitMQ delivery kept waiting; the
    node's value comes back on every path."""
    with channel_tick_lowered(tick), rabbitmq_node_lock(exclusive=True):
        previous = _swap("consumer_timeout", milliseconds)
        try:
            yield
        finally:
            _restore("consumer_timeout", previous)
