"""Side effects a test tracks: a function its tasks call, wrapped to record every call.

The wrapper calls through to the real function and notes which attempt of which task made
the call (the worker tells it), so that a test can check that an e-mail went out once
however often the broker delivered the task (``assert_side_effect``).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .clock import VirtualClock
from .errors import UsageError
from .records import SideEffect, SideEffectCall, TaskRun

__all__ = ["CallContext", "Tracked"]


class CallContext(NamedTuple):
    """The task attempt a call is made in (all ``None`` outside a task)."""

    task_id: str | None = None
    task_name: str | None = None
    attempt: int | None = None
    retries: int | None = None
    delivery: int | None = None
    redelivered: bool = False


_MISSING = object()


class Tracked:
    """One ``target.attribute`` replaced by a recording wrapper, until :meth:`restore`."""

    def __init__(
        self,
        target: Any,
        attribute: str,
        name: str | None,
        clock: VirtualClock,
        context: Callable[[], CallContext],
        runs: Mapping[str, TaskRun],
    ) -> None:
        if not isinstance(attribute, str) or not attribute:
            raise UsageError(
                f"track(target, {attribute!r}): name the attribute as a string, e.g. "
                "track(mailer, 'send')"
            )
        try:
            static = inspect.getattr_static(target, attribute)
        except AttributeError:
            raise UsageError(
                f"track({_describe(target)}, {attribute!r}): it has no attribute {attribute!r}; "
                "name the function your task calls, where the task looks it up"
            ) from None
        if not callable(getattr(target, attribute)):
            raise UsageError(
                f"track({_describe(target)}, {attribute!r}): {attribute!r} is not callable; "
                "track a function or method your task calls"
            )
        self.target, self.attribute = target, attribute
        self._clock, self._context = clock, context
        self.effect = SideEffect(name or f"{_describe(target)}.{attribute}", runs=runs)
        # What to put back: the target's own value, or nothing (it was inherited).
        self._own = _own_value(target, attribute)
        setattr(target, attribute, self._replacement(target, static))

    def restore(self) -> None:
        if self._own is _MISSING:
            delattr(self.target, self.attribute)
        else:
            setattr(self.target, self.attribute, self._own)

    def _replacement(self, target: Any, static: Any) -> Any:
        if isinstance(target, type):
            # A class attribute stays the kind of attribute it was: instances and the class
            # still bind methods, and what a call records leaves ``self`` or ``cls`` out.
            if isinstance(static, staticmethod):
                return staticmethod(self._wrap(static.__func__, bound=False))
            if isinstance(static, classmethod):
                return classmethod(self._wrap(static.__func__, bound=True))
            if isinstance(static, types.FunctionType):
                return self._wrap(static, bound=True)
        return self._wrap(getattr(target, self.attribute), bound=False)

    def _wrap(self, function: Callable[..., Any], bound: bool) -> Callable[..., Any]:
        @functools.wraps(function)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            call = self._record(args[1:] if bound else args, kwargs)
            try:
                call.result = function(*args, **kwargs)
            except BaseException as exc:
                call.raised = exc
                raise
            return call.result

        return tracked

    def _record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SideEffectCall:
        context = self._context()
        call = SideEffectCall(
            number=len(self.effect.calls) + 1,
            t=self._clock.elapsed,
            task_id=context.task_id,
            task_name=context.task_name,
            attempt=context.attempt,
            retries=context.retries,
            delivery=context.delivery,
            redelivered=context.redelivered,
            args=args,
            kwargs=dict(kwargs),
        )
        self.effect.calls.append(call)
        return call


def _own_value(target: Any, attribute: str) -> Any:
    try:
        own = vars(target)
    except TypeError:  # no __dict__ (__slots__): the value is the target's own
        return getattr(target, attribute)
    return own.get(attribute, _MISSING)


def _describe(target: Any) -> str:
    if isinstance(target, types.ModuleType):
        return target.__name__
    if isinstance(target, type):
        return target.__qualname__
    return f"<{type(target).__qualname__} object>"
