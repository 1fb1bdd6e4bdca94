"""Errors the plugin raises itself: each names the problem and the fix."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import cast

__all__ = [
    "BlocksForeverError",
    "CeleryRetryError",
    "ConfigurationError",
    "EndlessRetryError",
    "UsageError",
    "WorkerStoppedError",
    "is_finite_number",
    "is_number",
    "is_whole_number",
    "moved_names",
]


class CeleryRetryError(Exception):
    """Base class of every error raised by pytest-celery-retry itself."""


class UsageError(CeleryRetryError, ValueError):
    """The plugin was called with arguments it cannot honour (the message says how to fix it)."""


class EndlessRetryError(CeleryRetryError):
    """A task kept retrying past the attempt limit: probably ``max_retries=None`` forever."""


class WorkerStoppedError(CeleryRetryError):
    """The worker stopped as a real one would ("Unrecoverable error"): the message says why."""


class ConfigurationError(CeleryRetryError):
    """The Celery app or the pytest configuration does not let the plugin do its job."""


class BlocksForeverError(CeleryRetryError):
    """A call on a hung broker that no timeout bounds: in production it would never return.

    Not a connection error to kombu, so no retry policy swallows it: the test fails with the
    setting that would bound the wait.
    """


# The checks behind the plugin's UsageErrors: ``True`` is an int to Python, not a count.
def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A number that is neither NaN nor infinite: NaN compares false with every bound."""
    return is_number(value) and math.isfinite(cast(float, value))


def moved_names(
    module: str, moved: dict[str, tuple[str, Callable[[], object]]]
) -> Callable[[str], object]:
    """A module ``__getattr__`` serving names that moved or were renamed, with a warning.

    ``moved`` maps each old name to where it lives now (for the message) and how to get it.
    """

    def __getattr__(name: str) -> object:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new, get = moved[name]
        warnings.warn(f"{module}.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
        return get()

    return __getattr__
