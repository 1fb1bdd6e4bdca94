"""The fault proxy's toxics: Toxiproxy's per-connection faults, checked and described.

A toxic acts on the bytes of one or both directions of a proxied connection: ``upstream``
(client to broker) and ``downstream`` (broker to client), as Toxiproxy names its streams.
Its ``toxicity`` is the probability that it applies to a connection, drawn once per
connection. ``BrokerProxy``'s forwarding threads apply the toxics; this module only builds
and checks them, so it imports neither Celery nor kombu.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, cast

from .errors import UsageError, is_finite_number, is_whole_number

__all__ = ["Direction", "Reach", "Stream", "Toxic"]

Stream = Literal["upstream", "downstream", "both"]
Direction = Literal["upstream", "downstream"]
# Which connections a toxic reaches: those open now and every later one, or only the open ones.
Reach = Literal["all", "open"]
Kind = Literal["latency", "bandwidth", "slow_close", "limit_data", "slicer"]

_DIRECTIONS: dict[str, frozenset[Direction]] = {
    "upstream": frozenset({"upstream"}),
    "downstream": frozenset({"downstream"}),
    "both": frozenset({"upstream", "downstream"}),
}


@dataclass(frozen=True)
class Toxic:
    """One fault as the forwarding threads apply it, in bytes and seconds."""

    kind: Kind
    # Seconds (latency, slow_close), bytes a second (bandwidth), bytes (limit_data; the
    # slicer's average slice).
    amount: float
    directions: frozenset[Direction]
    toxicity: float
    label: str
    variation: int = 0  # the slicer's +/- bytes
    pause: float = 0.0  # the slicer's seconds between slices

    def acts_on(self, direction: Direction) -> bool:
        return direction in self.directions

    def slices(self, data: bytes, rng: random.Random) -> list[bytes]:
        """``data`` cut into slices of ``amount`` +/- ``variation`` bytes (the slicer)."""
        size, pieces, start = int(self.amount), [], 0
        while start < len(data):
            end = start + size + rng.randint(-self.variation, self.variation)
            pieces.append(data[start:end])
            start = end
        return pieces


def delay(
    kind: Literal["latency", "slow_close"], ms: object, stream: object, toxicity: object
) -> Toxic | None:
    """A toxic that holds data (latency) or a close (slow_close) back ``ms`` milliseconds."""
    _require(
        is_finite_number(ms) and cast(float, ms) >= 0,
        f"{kind}(ms={ms!r})",
        "a number of milliseconds >= 0 (0 ends it)",
    )
    return _toxic(kind, cast(float, ms) / 1000, f"{kind} {ms:g} ms", stream, toxicity)


def bandwidth(rate: object, stream: object, toxicity: object) -> Toxic | None:
    _require(
        is_finite_number(rate) and cast(float, rate) >= 0,
        f"bandwidth(rate={rate!r})",
        "kilobytes (1000 bytes) a second, a number >= 0 (0 ends the limit)",
    )
    # Toxiproxy's unit: a rate of 1 passes 1000 bytes a second.
    return _toxic(
        "bandwidth", cast(float, rate) * 1000, f"bandwidth {rate:g} KB/s", stream, toxicity
    )


def limit_data(nbytes: object, stream: object, toxicity: object) -> Toxic | None:
    _require(
        is_whole_number(nbytes) and cast(int, nbytes) >= 0,
        f"limit_data(nbytes={nbytes!r})",
        "a whole number of bytes >= 0 (0 ends the limit)",
    )
    label = f"limit_data {nbytes} bytes"
    return _toxic("limit_data", cast(int, nbytes), label, stream, toxicity)


def slicer(
    average_size: object, size_variation: object, delay_us: object, stream: object, toxicity: object
) -> Toxic | None:
    _require(
        is_whole_number(average_size) and cast(int, average_size) >= 0,
        f"slicer(average_size={average_size!r})",
        "a whole number of bytes >= 0 (0 ends the slicing)",
    )
    average = cast(int, average_size)
    _require(
        is_whole_number(size_variation) and 0 <= cast(int, size_variation) < max(average, 1),
        f"slicer(size_variation={size_variation!r})",
        f"a whole number of bytes from 0 to average_size - 1 ({average - 1}): every slice "
        "holds at least one byte",
    )
    _require(
        is_finite_number(delay_us) and cast(float, delay_us) >= 0,
        f"slicer(delay_us={delay_us!r})",
        "microseconds between two slices, a number >= 0",
    )
    variation = cast(int, size_variation)
    label = f"slicer {average}+/-{variation} bytes, {delay_us:g} us apart"
    pause = cast(float, delay_us) / 1_000_000
    return _toxic("slicer", average, label, stream, toxicity, variation=variation, pause=pause)


def reach(method: str, connections: object) -> Reach:
    _require(
        connections in ("all", "open"),
        f"{method}(connections={connections!r})",
        "'all' (the open connections and every later one) or 'open' (only those open now)",
    )
    return cast(Reach, connections)


def describe(toxic: Toxic, connections: Reach) -> str:
    """The toxic as the proxy's timeline shows it when it is switched on."""
    where = "" if toxic.directions == _DIRECTIONS["both"] else f" {next(iter(toxic.directions))}"
    chance = f", toxicity {toxic.toxicity:g}" if toxic.toxicity < 1 else ""
    scope = ", open connections only" if connections == "open" else ""
    return f"{toxic.label}{where}{chance}{scope}"


def _require(ok: bool, call: str, expected: str) -> None:
    if not ok:
        raise UsageError(f"{call}: {expected}")


def _toxic(
    kind: Kind,
    amount: float,
    label: str,
    stream: object,
    toxicity: object,
    variation: int = 0,
    pause: float = 0.0,
) -> Toxic | None:
    _require(
        isinstance(stream, str) and stream in _DIRECTIONS,
        f"{kind}(stream={stream!r})",
        "'upstream' (client to broker), 'downstream' (broker to client) or 'both'",
    )
    _require(
        is_finite_number(toxicity) and 0 <= cast(float, toxicity) <= 1,
        f"{kind}(toxicity={toxicity!r})",
        "the probability that the fault applies to a connection, a number from 0 to 1",
    )
    if not amount:
        return None
    directions = _DIRECTIONS[cast(str, stream)]
    return Toxic(kind, amount, directions, cast(float, toxicity), label, variation, pause)
