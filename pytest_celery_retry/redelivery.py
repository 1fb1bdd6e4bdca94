"""Which deliveries of which tasks the worker loses, so that the broker delivers them again.

``retry_worker.redeliver`` adds a rule; the worker asks, for each attempt, whether the
attempt's message is to be lost and how: its worker dies after the task body ran (before the
ack of an ``acks_late`` task leaves), or its worker process dies as the task starts (Celery's
``WorkerLostError``). What then becomes of the message is Celery's and the broker's doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["WHEN", "RedeliveryPlan", "When"]

When = Literal["after_run", "during_run"]
WHEN: tuple[When, ...] = ("after_run", "during_run")


@dataclass(frozen=True)
class _Rule:
    # None: every task.
    task_name: str | None
    times: int
    when: When


class RedeliveryPlan:
    """The rules of one worker, first match wins."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []

    def add(self, task_name: str | None, times: int, when: When) -> None:
        self._rules.append(_Rule(task_name, times, when))

    def lose(self, task_name: str, delivery: int) -> When | None:
        """How the ``delivery``-th delivery of a message of ``task_name`` is lost, if it is."""
        for rule in self._rules:
            if rule.task_name in (None, task_name) and delivery <= rule.times:
                return rule.when
        return None
