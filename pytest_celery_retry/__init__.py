"""pytest-celery-retry: test Celery retry behaviour for real, on a virtual clock.

Importing this package does not import Celery: the worker and the broker, which need it,
load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

__version__ = "0.1.0"

pytest.register_assert_rewrite("pytest_celery_retry.assertions")

from .assertions import (  # noqa: E402  (after the rewrite hook is registered)
    assert_backoff,
    assert_fits_broker_limits,
    assert_not_retried,
    assert_publish_retries,
    assert_retried,
)
from .canvas import CanvasRun  # noqa: E402
from .clock import VirtualClock  # noqa: E402
from .errors import (  # noqa: E402
    BlocksForeverError,
    CeleryRetryError,
    ConfigurationError,
    EndlessRetryError,
    UsageError,
    WorkerStoppedError,
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
    TaskRun,
    UnackedMessage,
)

if TYPE_CHECKING:
    from .broker import BrokerDownError, InMemoryBroker
    from .proxy import BrokerProxy
    from .worker import ArgumentEncodeError, RetryWorker

# What needs Celery or kombu loads on first use.
_LAZY = {
    "ArgumentEncodeError": "worker",
    "BrokerDownError": "broker",
    "BrokerProxy": "proxy",
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
    "InMemoryBroker",
    "MessageEvent",
    "ProxyEvent",
    "PublishRecord",
    "Redelivery",
    "RetryWorker",
    "TaskRun",
    "UnackedMessage",
    "UsageError",
    "VirtualClock",
    "WorkerStoppedError",
    "__version__",
    "assert_backoff",
    "assert_fits_broker_limits",
    "assert_not_retried",
    "assert_publish_retries",
    "assert_retried",
]
