"""Benchmark pytest-celery-retry: prints figures and ratios measured in one run, asserts nothing.

Run from the repository root:

    .venv/bin/python benchmarks/bench.py
    .venv/bin/python benchmarks/bench.py explore   # (h) alone
    .venv/bin/python benchmarks/bench.py per-test  # (f) alone
    .venv/bin/python benchmarks/bench.py per-test-without-gc  # (f), the cyclic GC off
    .venv/bin/python benchmarks/bench.py memory    # what the records keep alive, by part

Every ratio compares two things measured as alternating pairs in one process (the second
right after the first, PAIRS times), in CPU time (``time.process_time``, which freezegun leaves
alone): load from elsewhere on the machine hits both sides of a pair alike. Each is reported
as the minimum and the median over the pairs. Wall times (start-up, 10,000 retries) use
``freezegun.api.real_perf_counter``: while a virtual clock runs, freezegun replaces
``time.perf_counter`` (and every module-level copy of it) with its frozen one, but leaves its
own module alone.
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import gc
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import freezegun.api

STARTUP_RUNS = 15
PAIRS = 9
EXPLORE_PAIRS = 3
EXPLORE_EXAMPLES = 200
PER_TEST_ROUNDS = 40
MEMORY_RETRIES = 1_000
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


def cpu() -> float:
    return time.process_time()


def pairs(*measures: Callable[[], float], count: int = PAIRS) -> list[list[float]]:
    """Each measure's figures, the measures taking turns ``count`` times (after one warm-up)."""
    for measure in measures:
        measure()
    figures: list[list[float]] = [[] for _ in measures]
    for _ in range(count):
        for figure, measure in zip(figures, measures):
            figure.append(measure())
    return figures


def spread(values: list[float], unit: Callable[[float], str]) -> str:
    return f"min {unit(min(values))}, median {unit(statistics.median(values))}"


def ratio(top: list[float], bottom: list[float]) -> str:
    """Min and median of the per-pair ratios."""
    ratios = [a / b for a, b in zip(top, bottom)]
    return f"{min(ratios):.2f}x min, {statistics.median(ratios):.2f}x median"


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

    @app.task(name="foo.task", bind=True, max_retries=3, shared=False)  # type: ignore[untyped-decorator]
    def seed_task(self: Any) -> None:
        """The seed's task: countdowns 1, 3, 9 s, then MaxRetriesExceededError."""
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            self.retry(countdown=3**self.request.retries)

    # The seed's publish policy, which the retries go out with.
    app.conf.task_publish_retry_policy = {
        "max_retries": 3,
        "interval_start": 3,
        "interval_step": 1,
        "interval_max": 6,
    }
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
    """CPU seconds for one task retrying ``n`` times (countdown 0) on the retry worker."""

    def body(worker: Any, _: Any) -> float:
        start = cpu()
        run = worker.apply(app.tasks["bench.many"], args=(n,))
        elapsed = cpu() - start
        if run.retries != n or run.result != n:
            raise RuntimeError(f"benchmark task misbehaved: {run!r}")
        return elapsed

    return with_worker(body)  # type: ignore[no-any-return]


def worker_retries_afresh(app: Any, n: int) -> float:
    """``worker_retries`` with billiard and ``traceback`` doing all their work on every retry."""
    from pytest_celery_retry import einfo

    remembered = list(einfo._REMEMBERED)
    einfo._REMEMBERED.clear()
    try:
        return worker_retries(app, n)
    finally:
        einfo._REMEMBERED[:] = remembered


def eager_retries(app: Any, n: int) -> float:
    """CPU seconds for Celery's own eager ``Task.apply()`` of the same task (it recurses)."""
    start = cpu()
    result = app.tasks["bench.many"].apply(args=(n,))
    elapsed = cpu() - start
    if result.result != n:
        raise RuntimeError(f"benchmark task misbehaved: {result.result!r}")
    return elapsed


def per_attempt_of(retries: Callable[[Any, int], float], app: Any, n: int) -> float:
    return retries(app, n) / (n + 1)


def eager_once(app: Any, calls: int) -> float:
    """CPU seconds per ``Task.apply()`` of a task that succeeds at once."""
    task = app.tasks["bench.once"]
    start = cpu()
    for _ in range(calls):
        task.apply()
    return (cpu() - start) / calls


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
        # A RabbitMQ without consumer_timeout: the worker holds the 2,048 s retry past its
        # default 30 min, which would stop the worker (docs/broker-limits.md).
        session.installation(app).broker.consumer_timeout = None
        start = real_perf()
        run = worker.apply(app.tasks["bench.hourly"])
        return real_perf() - start, session.clock.elapsed, run.countdowns

    return with_worker(body)  # type: ignore[no-any-return]


def memory_by_part(app: Any, n: int) -> tuple[float, list[tuple[str, float]]]:
    """Bytes per retry that the records keep alive: in all, and what each part costs.

    A part's cost is what tracemalloc finds freed when that part alone is dropped from the
    records, so shared objects count for the last part that holds them.
    """

    def body(worker: Any, session: Any) -> tuple[float, list[tuple[str, float]]]:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            run = worker.apply(app.tasks["bench.many"], args=(n,))
            broker = next(iter(session.installations.values())).broker

            def held() -> float:
                gc.collect()
                return (tracemalloc.get_traced_memory()[0] - before) / n

            total = held()
            parts: list[tuple[str, Callable[[], None]]] = [
                (
                    "Attempt.exc and .raised (the Retry, its signature)",
                    lambda: _drop_exceptions(run),
                ),
                ("broker: delivered messages", broker._deliveries.clear),
                ("broker: publishes", broker.publishes.clear),
                ("broker: operations", broker.operations.clear),
                ("worker: message events", worker.events.clear),
                ("the Attempt records themselves", run.attempts.clear),
            ]
            costs = []
            last = total
            for label, drop in parts:
                drop()
                now = held()
                costs.append((label, last - now))
                last = now
            costs.append(("anything else", last))
            return total, costs
        finally:
            tracemalloc.stop()

    return with_worker(body)  # type: ignore[no-any-return]


def explore_seed_task(app: Any, kinds: tuple[str, ...]) -> tuple[float, int]:
    """CPU seconds for a property of the seed task (no task lost) over up to
    EXPLORE_EXAMPLES fault schedules of ``kinds``, and how many examples ran. Where it fails,
    the figure includes shrinking the failure."""
    from hypothesis import HealthCheck, given, settings

    from pytest_celery_retry import FaultSchedule, assert_no_task_lost
    from pytest_celery_retry.explorer import FaultExplorer
    from pytest_celery_retry.session import Settings
    from pytest_celery_retry.strategies import fault_schedules

    explorer = FaultExplorer(Settings())
    task = app.tasks["foo.task"]

    @settings(
        max_examples=EXPLORE_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(schedule=fault_schedules(kinds=kinds, horizon=30))
    def never_lost(schedule: FaultSchedule) -> None:
        with explorer.example(schedule, app=app) as (worker, _):
            worker.apply(task)
            assert_no_task_lost(worker)

    started = cpu()
    # Found and shrunk where it fails: the seed task is lost to four failed publishes in a row.
    with contextlib.suppress(AssertionError):
        never_lost()
    return cpu() - started, explorer.examples


def explore_figures(app: Any) -> None:
    """(h): a property over EXPLORE_EXAMPLES schedules of the seed task, in CPU time."""
    import logging

    kinds = {
        "outages only: holds over every schedule": ("outage",),
        "every broker fault: fails, found and shrunk": (
            "outage",
            "connect",
            "publish",
            "consume",
            "ack",
        ),
    }
    examples: dict[str, int] = {}

    def measure(label: str) -> float:
        seconds, examples[label] = explore_seed_task(app, kinds[label])
        return seconds

    # Celery logs each failed retry and reconnect: thousands of lines, not what is measured.
    logging.disable(logging.CRITICAL)
    try:
        measures = [functools.partial(measure, label) for label in kinds]
        figures = pairs(*measures, count=EXPLORE_PAIRS)
    finally:
        logging.disable(logging.NOTSET)
    print(
        f"\n(h) the seed task, no task lost, over up to {EXPLORE_EXAMPLES} fault schedules: "
        f"CPU per property ({EXPLORE_PAIRS} pairs; target: a few seconds)"
    )
    rows = []
    for (label, ran), seconds in zip(examples.items(), figures):
        rows += [
            (f"{label} ({ran} examples)", spread(seconds, lambda x: f"{x:.2f} s")),
            ("  per example", spread([x / ran for x in seconds], ms)),
        ]
    print(table(rows))


def _drop_exceptions(run: Any) -> None:
    for attempt in run.attempts:
        attempt.exc = attempt.raised = None


def clock_start_stop(count: int = 20) -> tuple[float, float]:
    """CPU seconds per start and stop: the virtual clock's, and a bare ``freeze_time``'s."""
    from freezegun import freeze_time

    from pytest_celery_retry.clock import VirtualClock

    def ours() -> float:
        start = cpu()
        for _ in range(count):
            with VirtualClock():
                pass
        return (cpu() - start) / count

    def freezegun_own() -> float:
        start = cpu()
        for _ in range(count):
            with freeze_time("2026-01-01", ignore=["_pytest."]):
                pass
        return (cpu() - start) / count

    first, second = pairs(ours, freezegun_own)
    return statistics.median(first), statistics.median(second)


PER_TEST_CONFTEST = """
import json
import time
from unittest import mock

import pytest
from celery import Celery, signals
from celery.exceptions import Retry

app = Celery("per-test", broker="memory://", set_as_current=False)


@app.task(name="seed", bind=True, max_retries=3)
def seed(self):
    try:
        raise RuntimeError("boom")
    except Exception:
        self.retry(countdown=3 ** self.request.retries)


COUNTDOWNS = []


@signals.task_retry.connect(weak=False)
def on_retry(request=None, reason=None, **kwargs):
    COUNTDOWNS.append(reason.when)


@pytest.fixture
def celery_retry_app():
    return app


CPU = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.process_time()
    try:
        return (yield)
    finally:
        CPU.setdefault(item.name.split("_")[1], []).append(time.process_time() - start)


def pytest_sessionfinish(session):
    with open("per_test.json", "w") as handle:
        json.dump(CPU, handle)
"""

GC_OFF = "import gc\n\ngc.disable()\n"

PER_TEST_KINDS = {
    "plugin": """
def test_plugin_{i}(retry_worker):
    run = retry_worker.apply(seed)
    assert run.countdowns == [1, 3, 9]
""",
    "eager": """
def test_eager_{i}():
    COUNTDOWNS.clear()
    assert seed.apply().failed()
    assert COUNTDOWNS == [1, 3, 9]
""",
    "mock": """
def test_mock_{i}():
    with mock.patch.object(seed, "retry", side_effect=Retry()) as retry:
        seed.apply()
    retry.assert_called_once_with(countdown=1)
""",
    "empty": """
def test_empty_{i}():
    pass
""",
    "unused": """
def test_unused_{i}(retry_worker):
    pass
""",
}


def per_test(directory: str, collect_garbage: bool = True) -> dict[str, list[float]]:
    """CPU seconds per test (set-up, call, teardown), the kinds interleaved in one pytest run.

    Without ``collect_garbage`` the run has Python's cyclic garbage collector off: each test
    then costs only its own work, not the collections its garbage (or an earlier test's)
    happens to set off.
    """
    folder = os.path.join(directory, "per_test")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "conftest.py"), "w") as handle:
        handle.write(PER_TEST_CONFTEST if collect_garbage else GC_OFF + PER_TEST_CONFTEST)
    with open(os.path.join(folder, "test_kinds.py"), "w") as handle:
        handle.write("from conftest import COUNTDOWNS, Retry, mock, seed\n")
        for i in range(PER_TEST_ROUNDS):
            for template in PER_TEST_KINDS.values():
                handle.write(template.format(i=i))
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=folder,
        capture_output=True,
        check=True,
    )
    with open(os.path.join(folder, "per_test.json")) as handle:
        figures: dict[str, list[float]] = json.load(handle)
    # The first rounds import and warm up what the later ones reuse.
    return {kind: values[3:] for kind, values in figures.items()}


def over_round(tests: dict[str, list[float]], kind: str) -> list[float]:
    """Each round's test of ``kind`` minus the same round's empty test."""
    return [cost - empty for cost, empty in zip(tests[kind], tests["empty"])]


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


def print_per_test(tests: dict[str, list[float]]) -> None:
    empty = statistics.median(tests["empty"])

    def over_empty(kind: str) -> float:
        return statistics.median(tests[kind]) - empty

    print(
        f"\n(f) CPU per test (set-up + call + teardown), {len(tests['empty'])} of each kind "
        "interleaved in one pytest run"
    )
    labels = {
        "plugin": "retry_worker.apply(seed), asserts countdowns [1, 3, 9]",
        "eager": "seed.apply() eager (recursive retries), asserts them by signal",
        "mock": "eager + mock.patch.object(seed, 'retry')",
        "unused": "requests retry_worker, uses nothing",
        "empty": "empty test",
    }
    print(
        table(
            [(label, spread(tests[kind], ms)) for kind, label in labels.items()]
            + [
                (
                    "plugin / eager, over an empty test (target <= 1.5x)",
                    f"{over_empty('plugin') / over_empty('eager'):.2f}x (medians); round by "
                    + ratio(*(over_round(tests, kind) for kind in ("plugin", "eager"))),
                ),
                (
                    "unused fixture, over an empty test (target <= 2 ms)",
                    f"{ms(over_empty('unused'))} (medians); round by round: "
                    + spread(over_round(tests, "unused"), ms),
                ),
            ]
        )
    )


def print_memory_by_part(kept: float, kept_by_part: list[tuple[str, float]]) -> None:
    print(f"\n(b') kept alive by the records, {MEMORY_RETRIES:,} retries (tracemalloc)")
    print(
        table(
            [("in all", f"{kept:.0f} bytes per retry")]
            + [(f"  of which {label}", f"{cost:.0f} bytes") for label, cost in kept_by_part]
        )
    )


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

    load_before = os.getloadavg()

    # (a) cost per attempt: the retry worker against Celery's eager Task.apply(), in pairs
    eager_once(app, 50)  # warm-up: imports, tracer, result backend
    per_attempt = {
        n: pairs(
            functools.partial(per_attempt_of, worker_retries, app, n),
            functools.partial(per_attempt_of, eager_retries, app, n),
        )
        for n in (3, 10, 100)
    }
    (once,) = pairs(lambda: eager_once(app, 200))
    remembered, afresh = pairs(
        functools.partial(per_attempt_of, worker_retries, app, 10),
        functools.partial(per_attempt_of, worker_retries_afresh, app, 10),
    )

    # (b) 10,000 retries against 1,000: CPU time and peak memory; what the records keep
    cpu_1k = worker_retries(app, 1_000)
    cpu_10k = worker_retries(app, 10_000)
    peak_1k = peak_memory(app, 1_000)
    peak_10k = peak_memory(app, 10_000)
    kept, kept_by_part = memory_by_part(app, MEMORY_RETRIES)

    # (c) a backoff schedule of more than an hour
    hourly_wall, virtual, countdowns = hourly_backoff(app)

    # (d) where a retry's time goes
    profile_n = 1_000
    charged, heaviest = profile_retries(app, profile_n)

    # (f) per test: the plugin, eager mode, eager + mock, an empty test, an unused fixture
    # (g) the virtual clock's start and stop
    clock_ours, clock_freezegun = clock_start_stop()

    # (e) pytest start-up with the plugin installed but unused
    with tempfile.TemporaryDirectory() as directory:
        tests = per_test(directory)
        startup = {
            bytecode: (pytest_startup(directory, bytecode), plugin_import_time(directory, bytecode))
            for bytecode in (True, False)
        }
        loaded = modules_loaded_at_startup(directory)

    print(f"\n(a) CPU per attempt, retry worker vs eager retrying Task.apply() ({PAIRS} pairs)")
    rows = [("Task.apply() of a task that succeeds at once", spread(once, ms))]
    for n, (worker, eager) in per_attempt.items():
        rows += [
            (f"N={n}: retry_worker, per attempt", spread(worker, ms)),
            (f"N={n}: eager Task.apply(), per attempt", spread(eager, ms)),
            (f"N={n}: retry_worker / eager (target <= 1.0x)", ratio(worker, eager)),
        ]
    # What one more retry costs, without what every apply() costs once (the first publish,
    # the consumer, the result); pair i of N=3 and pair i of N=10 ran close together.
    extra = [
        [
            (later * 11 - earlier * 4) / 7
            for earlier, later in zip(per_attempt[3][k], per_attempt[10][k])
        ]
        for k in (0, 1)
    ]
    rows += [
        ("one more retry (N=3 -> 10): retry_worker", spread(extra[0], ms)),
        ("one more retry (N=3 -> 10): eager", spread(extra[1], ms)),
        ("one more retry: retry_worker / eager", ratio(extra[0], extra[1])),
    ]
    rows += [
        ("N=10: tracebacks made afresh (einfo.py off)", spread(afresh, ms)),
        ("N=10: remembered / afresh", ratio(remembered, afresh)),
    ]
    print(table(rows))
    print("\n(b) many retries on the retry worker (one run each)")
    eager_100 = statistics.median(per_attempt[100][1])
    print(
        table(
            [
                ("1,000 retries", f"{cpu_1k:.2f} s CPU, {ms(cpu_1k / 1_001)}/attempt"),
                ("10,000 retries", f"{cpu_10k:.2f} s CPU, {ms(cpu_10k / 10_001)}/attempt"),
                (
                    "Celery's own floor: 10,000 eager retrying attempts",
                    f"{eager_100 * 10_000:.2f} s (no plugin, no broker; extrapolated from (a))",
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
    print_memory_by_part(kept, kept_by_part)
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
    print_per_test(tests)
    print(f"\n(g) CPU per start + stop of a clock ({PAIRS} pairs of 20, medians)")
    print(
        table(
            [
                ("VirtualClock (freezegun + sleeps + local offset)", ms(clock_ours)),
                ("freezegun's own freeze_time, for comparison", ms(clock_freezegun)),
            ]
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
    explore_figures(app)
    print_load(load_before)


def per_test_alone(collect_garbage: bool = True) -> None:
    """(f) alone, with the load around it."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as directory:
        tests = per_test(directory, collect_garbage)
    if not collect_garbage:
        print("\n(f) with the cyclic garbage collector off")
    print_per_test(tests)
    print_load(load_before)


def memory_alone() -> None:
    """What the records keep alive, by part, alone."""
    app = make_app()
    worker_retries(app, 10)  # warm-up: imports, tracer, the remembered tracebacks
    print_memory_by_part(*memory_by_part(app, MEMORY_RETRIES))


def print_load(before: tuple[float, float, float]) -> None:
    after = os.getloadavg()
    print(
        f"\nload average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in before)} before, "
        f"{', '.join(f'{x:.2f}' for x in after)} after"
    )


SECTIONS: dict[str, Callable[[], None]] = {
    "explore": lambda: explore_figures(make_app()),
    "per-test": per_test_alone,
    "per-test-without-gc": lambda: per_test_alone(collect_garbage=False),
    "memory": memory_alone,
}

if __name__ == "__main__":
    if not sys.argv[1:]:
        main()
    elif len(sys.argv) == 2 and sys.argv[1] in SECTIONS:
        SECTIONS[sys.argv[1]]()
    else:
        sys.exit(f"usage: bench.py [{' | '.join(SECTIONS)}]")
