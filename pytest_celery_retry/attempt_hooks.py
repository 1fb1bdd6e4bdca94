"""Code a test runs before an attempt of a task: the world changes between attempts.

A hook replaces the module-level counters a task's fake dependency would otherwise keep
("fail the first two calls"): the test says what changes before which attempt, and the
worker runs it on the virtual clock, between fetching the attempt's message and running it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from .errors import AttemptHookError, UsageError

__all__ = ["AttemptHooks", "Hook"]

# Called with no arguments for one attempt, with the attempt's number for every attempt.
Hook = Callable[..., object]


@dataclass(frozen=True)
class _Registered:
    task_name: str
    number: int | None
    fn: Hook


class AttemptHooks:
    """The hooks of one worker, by task name, in the order the test added them."""

    def __init__(self) -> None:
        self._hooks: list[_Registered] = []

    def add(self, task_name: str, number: int | None, fn: Hook) -> None:
        if not callable(fn):
            raise UsageError(
                f"before_attempt({task_name!r}, {number!r}, {fn!r}): pass a function, or use "
                "before_attempt(task, n) as a decorator"
            )
        arguments = () if number is not None else (1,)
        try:
            inspect.signature(fn).bind(*arguments)
        except TypeError:
            called = "with no arguments" if number is not None else "with the attempt number"
            raise UsageError(
                f"before_attempt({task_name!r}, {number!r}): {_name(fn)} is called {called}; "
                f"give it {'no parameters' if number is not None else 'one parameter'}"
            ) from None
        except ValueError:  # no signature to read (a builtin): the call will tell
            pass
        self._hooks.append(_Registered(task_name, number, fn))

    def run(self, task_name: str, task_id: str, number: int) -> None:
        """Run the hooks for attempt ``number`` of ``task_name``[``task_id``], in order."""
        for hook in self._hooks:
            if hook.task_name != task_name or hook.number not in (None, number):
                continue
            try:
                if hook.number is None:
                    hook.fn(number)
                else:
                    hook.fn()
            except Exception as exc:
                raise AttemptHookError(
                    f"the before_attempt hook {_name(hook.fn)} raised {type(exc).__name__}: "
                    f"{exc} (before attempt {number} of {task_name}[{task_id}], which did not "
                    "run; its message stays on the worker)"
                ) from exc


def _name(fn: Hook) -> str:
    return f"{getattr(fn, '__qualname__', None) or repr(fn)}()"
