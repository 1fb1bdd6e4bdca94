"""Benchmark pytest-celery-retry: prints figures and ratios measured in one run, asserts nothing.

Run from the repository root:

    .venv/bin/python benchmarks/bench.py

Wall times use ``freezegun.api.real_perf_counter``: while a virtual clock runs, freezegun
replaces ``time.perf_counter`` (and every module-level copy of it) with its frozen one, but
leaves its own module alone.
"""

from __future__ import annotations

import cProfile
import gc
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import freezegun.api

STARTUP_RUNS = 15
BEST_OF = 5
# Whose code a profiled function is, by the package its file lives in. Standard-library and
# built-in functions are charged to whoever called them (see ``charge_to_owners``).
OWNERS = {
    "pytest_celery_retry": "plugin",
    "freezegun": "plugin (virtual clock)",
    "celery": "Celery/kombu/billiard",
    "kombu": "Celery/kombu/billiard",
    "billiard": "Celery/kombu/billiard",
    "amqp": "Celery/kombu/billiard",
    "vine": "Celery/kombu/billiard",
    "benchmarks": "the task's own body",
}


def real_perf() -> float:
    return freezegun.api.real_perf_counter()


def make_app() -> Any:
    from celery import Celery

    app = Celery("bench", broker="memory://", set_as_current=False)

    @app.task(name="bench.many", bind=True, max_retries=None, shared=False)  # type: ignore[untyped-decorator]
    def many(self: Any, limit: int) -> int:
        if self.request.retries < limit:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    @app.task(name="bench.once", shared=False)  # type: ignore[untyped-decorator]
    def once() -> int:
        return 1

    @app.task(  # type: ignore[untyped-decorator]
        name="bench.hourly",
        autoretry_for=(ConnectionError,),
        retry_backoff=True,
        retry_backoff_max=3600,
        retry_jitter=False,
        max_retries=12,
        shared=False,
    )
    def hourly() -> None:
        raise ConnectionError("still down")

    return app


def with_worker(body: Callable[[Any, Any], Any]) -> Any:
    """Run ``body(worker, session)`` on a fresh session and worker, as the fixtures would."""
    from pytest_celery_retry.session import RetrySession, Settings
    from pytest_celery_retry.worker import RetryWorker

    session = RetrySession(settings=Settings(max_attempts=100_000)).start()
    worker = RetryWorker(session)
    try:
        return body(worker, session)
    finally:
        worker.close()
        session.close()


def worker_retries(app: Any, n: int) -> float:
    """Wall seconds for one task retrying ``n`` times (countdown 0) on the retry worker."""

    def body(worker: Any, _: Any) -> float:
        start = real_perf()
        run = worker.apply(app.tasks["bench.many"], args=(n,))
        elapsed = real_perf() - start
        if run.retries != n or run.result != n:
            raise RuntimeError(f"benchmark task misbehaved: {run!r}")
        return elapsed

    return with_worker(body)  # type: ignore[no-any-return]


def eager_retries(app: Any, n: int) -> float:
    """Wall seconds for Celery's own eager ``Task.apply()`` of the same task (it recurses)."""
    start = real_perf()
    result = app.tasks["bench.many"].apply(args=(n,))
    elapsed = real_perf() - start
    if result.result != n:
        raise RuntimeError(f"benchmark task misbehaved: {result.result!r}")
    return elapsed


def eager_once(app: Any, calls: int) -> float:
    """Wall seconds per ``Task.apply()`` of a task that succeeds at once."""
    task = app.tasks["bench.once"]
    start = real_perf()
    for _ in range(calls):
        task.apply()
    return (real_perf() - start) / calls


def peak_memory(app: Any, n: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        worker_retries(app, n)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def hourly_backoff(app: Any) -> tuple[float, float, list[float]]:
    def body(worker: Any, session: Any) -> tuple[float, float, list[float]]:
        start = real_perf()
        run = worker.apply(app.tasks["bench.hourly"])
        return real_perf() - start, session.clock.elapsed, run.countdowns

    return with_worker(body)  # type: ignore[no-any-return]


def _owner_of(filename: str) -> str | None:
    parts = filename.replace("\\", "/").split("/")
    for package, owner in OWNERS.items():
        if package in parts:
            return owner
    return None


def charge_to_owners(stats: pstats.Stats) -> dict[str, float]:
    """Own (exclusive) profiled time per owner.

    A standard-library or built-in function's time is split among its callers in proportion
    to the time spent in it from each caller, up to the first caller with an owner: ``json``
    called by kombu's deserializer counts for kombu, the same ``json`` called by the plugin
    for the plugin.
    """
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    shares: dict[Any, dict[str, float]] = {}

    def owners(func: Any, visiting: frozenset[Any]) -> dict[str, float]:
        if func in shares:
            return shares[func]
        owner = _owner_of(func[0])
        result: defaultdict[str, float] = defaultdict(float)
        if owner is not None:
            result[owner] = 1.0
        else:
            callers = raw[func][4]
            total = sum(edge[3] for edge in callers.values()) or 1.0
            for caller, edge in callers.items():
                if caller in visiting or caller not in raw:
                    continue
                for name, share in owners(caller, visiting | {func}).items():
                    result[name] += share * edge[3] / total
            if not result:
                result["Python itself"] = 1.0
        shares[func] = result
        return result

    charged: defaultdict[str, float] = defaultdict(float)
    for func, (_, _, tottime, _, _) in raw.items():
        for name, share in owners(func, frozenset()).items():
            charged[name] += tottime * share
    return charged


def profile_retries(app: Any, n: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    profiler = cProfile.Profile()
    profiler.enable()
    worker_retries(app, n)
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    heaviest = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:6]
    top = [
        (f"{os.path.basename(func[0])}:{func[1]}({func[2]})", row[2] / n) for func, row in heaviest
    ]
    return charge_to_owners(stats), top


COLLECT_ONLY = ("--collect-only", "-q", "-p", "no:cacheprovider")


def startup_environment(directory: str, bytecode: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPYCACHEPREFIX"] = os.path.join(directory, "empty-pycache")
    return env


def pytest_startup(directory: str, bytecode: bool) -> tuple[list[float], list[float]]:
    """Wall seconds of ``pytest --collect-only`` with the plugin unused, and disabled.

    The two kinds of run alternate, so that load from elsewhere on the machine hits both.
    pytest rewrites the asserts of every module of a plugin's distribution and caches the
    result as bytecode; without any bytecode cache (an empty ``PYTHONPYCACHEPREFIX``, nothing
    written) every start compiles and rewrites again, hence both measurements.
    """
    env = startup_environment(directory, bytecode)
    command = [sys.executable, "-m", "pytest", *COLLECT_ONLY]

    def run(extra: list[str]) -> None:
        subprocess.run(command + extra, cwd=directory, env=env, capture_output=True, check=False)

    run([])  # fills the caches
    unused: list[float] = []
    disabled: list[float] = []
    for _ in range(STARTUP_RUNS):
        for times, extra in ((unused, []), (disabled, ["-p", "no:celery_retry"])):
            start = real_perf()
            run(extra)
            times.append(real_perf() - start)
    return unused, disabled


def plugin_import_time(directory: str, bytecode: bool) -> float:
    """Seconds pytest spends importing the plugin's modules at start-up (median of 5).

    ``-X importtime`` inside ``pytest --collect-only``: it includes pytest's assert rewriting
    of those modules, and unlike a difference of wall times it does not drown in the noise.
    """
    env = startup_environment(directory, bytecode)
    command = [sys.executable, "-X", "importtime", "-m", "pytest", *COLLECT_ONLY]
    totals = []
    for _ in range(5):
        probe = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
        microseconds = 0
        for line in probe.stderr.splitlines():
            # "import time: self [us] | cumulative | imported package"
            fields = [field.strip() for field in line.removeprefix("import time:").split("|")]
            if len(fields) == 3 and fields[2].startswith("pytest_celery_retry"):
                microseconds += int(fields[0])
        totals.append(microseconds / 1e6)
    return statistics.median(totals)


def modules_loaded_at_startup(directory: str) -> str:
    """Does a plain ``pytest`` run (plugin enabled, no fixture used) import Celery or kombu?"""
    probe = os.path.join(directory, "probe")
    os.makedirs(probe, exist_ok=True)
    with open(os.path.join(probe, "conftest.py"), "w") as handle:
        handle.write(
            "import sys\n\n"
            "def pytest_sessionfinish(session):\n"
            "    loaded = [m for m in ('celery', 'kombu', 'freezegun') if m in sys.modules]\n"
            "    open('loaded.txt', 'w').write(','.join(loaded))\n"
        )
    subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=probe,
        capture_output=True,
        check=False,
    )
    with open(os.path.join(probe, "loaded.txt")) as handle:
        return handle.read()


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label.ljust(width)}  {value}" for label, value in rows)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def main() -> None:
    import celery
    import kombu

    import pytest_celery_retry

    print(
        f"pytest-celery-retry {pytest_celery_retry.__version__}, Celery {celery.__version__}, "
        f"kombu {kombu.__version__}, freezegun {freezegun.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU(s), {platform.machine()}"
    )
    app = make_app()

    # (a) cost per attempt: the retry worker against Celery's eager Task.apply()
    eager_n, worker_n = 100, 200
    eager_retries(app, eager_n)  # warm-up: imports, tracer, result backend
    eager_once(app, 50)
    worker_retries(app, 20)
    once = min(eager_once(app, 500) for _ in range(BEST_OF))
    eager = min(eager_retries(app, eager_n) for _ in range(BEST_OF)) / (eager_n + 1)
    worker = min(worker_retries(app, worker_n) for _ in range(BEST_OF)) / (worker_n + 1)

    # (b) 10,000 retries against 1,000: wall time and peak memory
    wall_1k = worker_retries(app, 1_000)
    wall_10k = worker_retries(app, 10_000)
    peak_1k = peak_memory(app, 1_000)
    peak_10k = peak_memory(app, 10_000)

    # (c) a backoff schedule of more than an hour
    hourly_wall, virtual, countdowns = hourly_backoff(app)

    # (d) where a retry's time goes
    profile_n = 1_000
    charged, heaviest = profile_retries(app, profile_n)

    # (e) pytest start-up with the plugin installed but unused
    with tempfile.TemporaryDirectory() as directory:
        startup = {
            bytecode: (pytest_startup(directory, bytecode), plugin_import_time(directory, bytecode))
            for bytecode in (True, False)
        }
        loaded = modules_loaded_at_startup(directory)

    print(f"\n(a) cost per attempt (best of {BEST_OF})")
    print(
        table(
            [
                ("Task.apply() of a task that succeeds at once", f"{ms(once)} per call"),
                (f"Task.apply(), {eager_n} retries (eager, recursive)", f"{ms(eager)}/attempt"),
                (f"retry_worker, {worker_n} retries (countdown=0)", f"{ms(worker)}/attempt"),
                ("retry_worker / eager retrying attempt", f"{worker / eager:.2f}x"),
                ("retry_worker / one Task.apply()", f"{worker / once:.2f}x"),
            ]
        )
    )
    print("\n(b) many retries on the retry worker (one run each)")
    print(
        table(
            [
                ("1,000 retries", f"{wall_1k:.2f} s wall, {ms(wall_1k / 1_001)}/attempt"),
                ("10,000 retries", f"{wall_10k:.2f} s wall, {ms(wall_10k / 10_001)}/attempt"),
                (
                    "Celery's own floor: 10,000 eager retrying attempts",
                    f"{eager * 10_000:.2f} s (no plugin, no broker; extrapolated from (a))",
                ),
                ("peak memory, 1,000 retries", f"{peak_1k / 2**20:.2f} MiB (tracemalloc)"),
                ("peak memory, 10,000 retries", f"{peak_10k / 2**20:.2f} MiB (tracemalloc)"),
                (
                    "growth 1,000 -> 10,000",
                    f"{peak_10k / peak_1k:.2f}x, "
                    f"{(peak_10k - peak_1k) / 9_000:.0f} bytes per extra retry",
                ),
            ]
        )
    )
    print("\n(c) backoff schedule (retry_backoff=True, retry_backoff_max=3600, 12 retries)")
    print(
        table(
            [
                ("countdowns", ", ".join(f"{c:g}" for c in countdowns)),
                ("virtual time", f"{virtual:g} s ({virtual / 3600:.2f} h)"),
                ("wall time", ms(hourly_wall)),
                ("speed-up over a real worker", f"{virtual / hourly_wall:,.0f}x"),
            ]
        )
    )
    total = sum(charged.values())
    print(f"\n(d) where {profile_n:,} retries spend their time (cProfile, own time by owner)")
    print(
        table(
            [
                (owner, f"{seconds / total:6.1%}")
                for owner, seconds in sorted(charged.items(), key=lambda item: -item[1])
            ]
            + [(f"heaviest: {name}", f"{ms(seconds)}/attempt") for name, seconds in heaviest]
        )
    )
    print(f"\n(e) pytest --collect-only, empty directory ({STARTUP_RUNS} runs each, alternating)")
    rows = []
    for bytecode, ((unused, disabled), import_time) in startup.items():
        label = "bytecode cached" if bytecode else "no bytecode cache"
        median_unused, median_disabled = statistics.median(unused), statistics.median(disabled)
        rows += [
            (f"{label}: -p no:celery_retry, median", f"{median_disabled * 1e3:.0f} ms"),
            (f"{label}: plugin unused, median", f"{median_unused * 1e3:.0f} ms"),
            (
                f"{label}: difference",
                f"{(median_unused - median_disabled) * 1e3:+.0f} ms (medians), "
                f"{(min(unused) - min(disabled)) * 1e3:+.0f} ms (fastest runs)",
            ),
            (f"{label}: importing the plugin", f"{import_time * 1e3:.1f} ms (-X importtime)"),
        ]
    rows.append(("modules loaded at start-up", loaded or "none of celery, kombu, freezegun"))
    print(table(rows))


if __name__ == "__main__":
    main()
