"""How long the README's second command takes: the project's own suite, real brokers included.

    .venv/bin/python benchmarks/suite_time.py [runs] [extra pytest arguments...]

Runs the command ``runs`` times (default 3) one after the other and prints, per run, its wall
time, the CPU it used (its processes and theirs), the machine's load average before and after,
and pytest's last line; then the minimum and median wall time. The real-broker tests need
``CELERY_RETRY_REDIS_URL`` and ``CELERY_RETRY_AMQP_URL`` (as ``.ci/run`` sets them); without
them they skip and the figure means little, so the script says so. Prints figures, asserts
nothing (docs/performance.md, "The project's own suite").
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# README.md, second command.
COMMAND = ["-m", "pytest", "-n", "6", "--dist", "load", "--maxschedchunk", "1", "-q"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    extra = sys.argv[2:]
    if not (os.environ.get("CELERY_RETRY_REDIS_URL") and os.environ.get("CELERY_RETRY_AMQP_URL")):
        print("CELERY_RETRY_REDIS_URL / CELERY_RETRY_AMQP_URL unset: the real-broker tests skip")
    walls = []
    for number in range(1, runs + 1):
        load_before = os.getloadavg()[0]
        cpu_before = children_cpu()
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, *COMMAND, *extra], cwd=ROOT, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        walls.append(wall)
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(
            f"run {number}: {wall:6.1f} s wall, {children_cpu() - cpu_before:6.1f} s CPU, "
            f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}: {last}"
        )
    print(f"wall: min {min(walls):.1f} s, median {statistics.median(walls):.1f} s")


if __name__ == "__main__":
    main()
