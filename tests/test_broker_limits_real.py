"""The real-broker measurements of ``real_limits_cases.py``, each in a pytest process of its own.

A real worker that died of an unrecoverable channel error, or whose broker hung, can leave
threads and Celery worker state behind that make a later in-process ``start_worker`` wait for
ever (seen under pytest-xdist). In a process of its own it cannot reach another test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import celery
import kombu
import pytest
import real_limits_cases as cases

# The outer test is a real-broker test too (a skip fails in CI), and scheduled as its case
# is (tests/conftest.py). It must not hold the RabbitMQ node lock while its case's process
# takes it: with a waiting exclusive holder between them, the two would wait for each other.
_PASSED_ON = ("real_broker", "changes_rabbitmq_node", "holds_no_rabbitmq_delivery")


def _node_ids(name: str, case: Any) -> list[str]:
    """One id per parametrized case (each must run in a process of its own too)."""
    marks = getattr(case, "pytestmark", [])
    ids = [list(m.kwargs.get("ids") or []) for m in marks if m.name == "parametrize"]
    return [f"{name}[{id_}]" for id_ in ids[0]] if ids else [name]


CASES = [
    pytest.param(
        node_id,
        marks=[
            *(m for m in getattr(case, "pytestmark", []) if m.name in _PASSED_ON),
            pytest.mark.own_rabbitmq_node_lock,
        ],
        id=node_id.removeprefix("test_"),
    )
    for name, case in vars(cases).items()
    if name.startswith("test_") and callable(case)
    for node_id in _node_ids(name, case)
]
# What was measured, with Celery 5.7 and kombu 5.7: older versions behave otherwise in places
# (a publish into a hung RabbitMQ blocked for ever on kombu 5.3) and are not measured yet.
if not all(
    tuple(int(part) for part in module.__version__.split(".")[:2]) >= (5, 7)
    for module in (celery, kombu)
):
    CASES = [
        pytest.param(
            "",
            marks=pytest.mark.skip(reason="measured with Celery 5.7 and kombu 5.7 only"),
            id="older-celery-or-kombu",
        )
    ]
# A case takes well under a minute: one that hangs fails instead of stalling the run.
CASE_TIMEOUT = 240


@pytest.mark.parametrize("name", CASES)
def test_in_its_own_process(name: str) -> None:
    try:
        result = _run(name)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"{name} still ran after {CASE_TIMEOUT} s: {hung.output!r:.4000}")
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{name} failed in its own process:\n{output[-6000:]}", pytrace=False)
    if not re.search(r"\d+ passed", output):
        skipped = re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", output)
        pytest.skip("; ".join(skipped) or output[-2000:])


def _run(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", f"{cases.__file__}::{name}", "-q", "-rs"),
            *("-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:xdist"),
            # Hypothesis's plugin is 0.6 s of each start-up, and no case uses it.
            *("-p", "no:hypothesispytest"),
        ],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT,
    )
