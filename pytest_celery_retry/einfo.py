"""Tracebacks as Celery's tracer makes them, without redoing per retry what cannot change.

Celery's tracer wraps every retry and failure in a billiard ``ExceptionInfo``: a copy of the
traceback (``Traceback``, which copies each frame's code object) and the formatted traceback
string. On Python 3.11+ both walk the code positions of every frame (``co_positions()``), over
2,000 for Celery's ``trace_task`` alone, and the string's carets parse each source line: more
than a third of a simulated retry. All of that depends only on a code object or a line of
source text, neither of which can change, so while the retry worker executes a task it is done
once per code object (or line) and remembered:

- billiard's copy of a code object is copied from the first one made for it: an object of
  billiard's own class with equal attributes and a fresh positions list;
- ``traceback`` looks a frame's position up in the code's remembered positions instead of
  iterating them up to the instruction, and remembers the caret anchors of a source line.

The traceback string, the pickles, the signal arguments and the result backend's contents are
the same as without (tests/test_speed.py runs the same failures both ways and compares them).
"""

from __future__ import annotations

import functools
import sys
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from billiard import einfo

__all__ = ["remembered_tracebacks"]

_Remembered = dict[int, tuple["weakref.ref[Any]", Any]]
_billiard_copies: _Remembered = {}
_positions: _Remembered = {}


def _once_per_code(remembered: _Remembered, code: Any, make: Callable[[Any], Any]) -> Any:
    """``make(code)``, made once per code object: by identity, since equal code objects may
    come from different files; forgotten with the code object."""
    key = id(code)
    known = remembered.get(key)
    if known is not None and known[0]() is code:
        return known[1]
    value = make(code)
    remembered[key] = (weakref.ref(code, lambda _: remembered.pop(key, None)), value)
    return value


def _code_copy(code: Any) -> Any:
    """What ``billiard.einfo._Code(code)`` makes, from the first one made for ``code``."""
    state = _once_per_code(_billiard_copies, code, lambda code: vars(einfo._Code(code)))
    copy = einfo._Code.__new__(einfo._Code)
    copy.__dict__.update(state)
    copy._co_positions = list(state["_co_positions"])
    return copy


_get_code_position = getattr(traceback, "_get_code_position", None)


def _code_position(code: Any, instruction_index: int) -> Any:
    """``traceback._get_code_position``: the position of an instruction of ``code``."""
    positions = _once_per_code(_positions, code, lambda code: list(code.co_positions()))
    if 0 <= instruction_index // 2 < len(positions):
        return positions[instruction_index // 2]
    assert _get_code_position is not None  # installed only where it exists
    return _get_code_position(code, instruction_index)  # its own answer to the odd index


_caret_anchors = getattr(traceback, "_extract_caret_anchors_from_line_segment", None)
# (replacement, where, name): each installed only where this Python and billiard have it.
_REMEMBERED: list[tuple[Any, Any, str]] = []
if sys.version_info >= (3, 11):
    if "co_positions" in vars(einfo._Code):
        _REMEMBERED.append((staticmethod(_code_copy), einfo._Frame, "Code"))
    if _get_code_position is not None:
        _REMEMBERED.append((_code_position, traceback, "_get_code_position"))
    if _caret_anchors is not None:
        # A pure function of one line of source text; its answer is a tuple or None.
        _REMEMBERED.append(
            (functools.lru_cache(maxsize=4096)(_caret_anchors), traceback, _caret_anchors.__name__)
        )


@contextmanager
def remembered_tracebacks() -> Iterator[None]:
    """While the block runs, tracebacks are copied and formatted from what is remembered."""
    # Entered for every attempt: a plain list of what to put back, no ExitStack.
    originals = [(where, name, vars(where)[name]) for _, where, name in _REMEMBERED]
    for replacement, where, name in _REMEMBERED:
        setattr(where, name, replacement)
    try:
        yield
    finally:
        for where, name, original in originals:
            setattr(where, name, original)
