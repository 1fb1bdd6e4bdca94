"""pytest-celery-retry: test Celery retry behaviour for real, on a virtual clock.

Importing this package does not import Celery: the worker and the broker, which need it,
load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

__version__ = "0.1.0"

pytest.register_assert_rewrite("pytest_celery_retry.assertions", "pytest_celery_retry.invariants")

from .assertions import (  # noqa: E402  (after the rewrite hook is registered)
    assert_backoff,
    assert_fits_broker_limits,
    assert_not_retried,
    assert_publish_retries,
    assert_retried,
    assert_side_effect,
)
from .canvas import CanvasRun  # noqa: E402
from .clock import VirtualClock  # noqa: E402
from .errors import (  # noqa: E402
    AttemptHookError,
    BlocksForeverError,
    CeleryRetryError,
    ConfigurationError,
    EndlessRetryError,
    UsageError,
    WorkerStoppedError,
)
from .faults import FaultSchedule, OperationFault, Outage, WorkerCrash  # noqa: E402
from .invariants import (  # noqa: E402
    PublishOutcome,
    assert_finishes_within,
    assert_no_task_lost,
    assert_publish_succeeds_or_raises,
)
from .records import (  # noqa: E402
    Attempt,
    BrokerOperation,
    ConnectionAttempt,
    DeliveredMessage,
    MessageEvent,
    ProxyEvent,
    PublishRecord,
    Redelivery,
    SideEffect,
    SideEffectCall,
    TaskRun,
    UnackedMessage,
)

if TYPE_CHECKING:
    from .broker import BrokerDownError, InMemoryBroker
    from .explorer import FaultExplorer
    from .proxy import BrokerProxy
    from .worker import ArgumentEncodeError, RetryWorker

# What needs Celery or kombu loads on first use.
_LAZY = {
    "ArgumentEncodeError": "worker",
    "BrokerDownError": "broker",
    "BrokerProxy": "proxy",
    "FaultExplorer": "explorer",
    "InMemoryBroker": "broker",
    "RetryWorker": "worker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArgumentEncodeError",
    "Attempt",
    "AttemptHookError",
    "BlocksForeverError",
    "BrokerDownError",
    "BrokerOperation",
    "BrokerProxy",
    "CanvasRun",
    "CeleryRetryError",
    "ConfigurationError",
    "ConnectionAttempt",
    "DeliveredMessage",
    "EndlessRetryError",
    "FaultExplorer",
    "FaultSchedule",
    "InMemoryBroker",
    "MessageEvent",
    "OperationFault",
    "Outage",
    "ProxyEvent",
    "PublishOutcome",
    "PublishRecord",
    "Redelivery",
    "RetryWorker",
    "SideEffect",
    "SideEffectCall",
    "TaskRun",
    "UnackedMessage",
    "UsageError",
    "VirtualClock",
    "WorkerCrash",
    "WorkerStoppedError",
    "__version__",
    "assert_backoff",
    "assert_finishes_within",
    "assert_fits_broker_limits",
    "assert_no_task_lost",
    "assert_not_retried",
    "assert_publish_retries",
    "assert_publish_succeeds_or_raises",
    "assert_retried",
    "assert_side_effect",
]
