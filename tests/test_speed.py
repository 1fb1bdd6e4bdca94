"""What the speed work (issue #15) must not change, and what makes it fast.

Speed itself is measured by benchmarks/bench.py, not here: these tests pin behaviour.
"""

from __future__ import annotations

import base64
import gc
import sys
import time
import types
import weakref
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import freezegun.api
import pytest

from pytest_celery_retry import clock as clock_module
from pytest_celery_retry.clock import VirtualClock


# -- the clock: freezegun's start() without listing every module again ------------------------
@pytest.fixture
def module_listings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The modules whose attributes freezegun lists (with ``dir()``) while a clock starts.

    Only modules: what stands in ``sys.modules`` without being one is listed at every start,
    and may carry a module's name (zipp puts a namespace named ``zipfile`` there).
    """
    listed: list[str] = []
    real = freezegun.api._get_module_attributes_hash

    def spy(module: types.ModuleType) -> str:
        if isinstance(module, types.ModuleType):
            listed.append(module.__name__)
        return real(module)  # type: ignore[no-any-return]

    monkeypatch.setattr(freezegun.api, "_get_module_attributes_hash", spy)
    yield listed


def test_a_clock_lists_only_the_modules_imported_since_the_last(
    module_listings: list[str],
) -> None:
    import celery.worker.request  # noqa: F401  (what a retry test has loaded)

    # The first start imports what freezegun's listing touches (a package's lazy submodules).
    for _ in range(2):
        with VirtualClock():
            pass
    module_listings.clear()
    with VirtualClock():
        pass
    # Before: every loaded module, over 500 of them with Celery, on every start.
    assert module_listings == []


def assert_patched_only_while_the_clock_runs(module: types.ModuleType, name: str) -> None:
    """``module.name``, once ``time.time``, reads virtual time while a clock runs, and real
    time again after it stops."""
    with VirtualClock():
        assert getattr(module, name) is freezegun.api.fake_time
    assert getattr(module, name) is time.time


@pytest.fixture
def fresh_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("speed_fresh_module")
    sys.modules[module.__name__] = module
    try:
        yield module
    finally:
        del sys.modules[module.__name__]


def test_a_module_that_gains_a_time_function_is_patched(fresh_module: types.ModuleType) -> None:
    with VirtualClock():
        pass
    fresh_module.time = time.time  # type: ignore[attr-defined]  # as a later "from time import time"
    assert_patched_only_while_the_clock_runs(fresh_module, "time")


def test_a_module_whose_names_change_at_the_same_count_is_listed_again(
    fresh_module: types.ModuleType,
) -> None:
    fresh_module.clock = None  # type: ignore[attr-defined]
    with VirtualClock():
        pass
    del fresh_module.clock  # type: ignore[attr-defined]
    fresh_module.now = time.time  # type: ignore[attr-defined]
    assert_patched_only_while_the_clock_runs(fresh_module, "now")


def test_a_module_imported_while_the_clock_runs_gets_the_real_sleep_back(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "speed_sleeper.py").write_text("from time import sleep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real_sleep = time.sleep
    try:
        with VirtualClock():
            import speed_sleeper  # type: ignore[import-not-found]

            assert speed_sleeper.sleep is not real_sleep
        assert speed_sleeper.sleep is real_sleep
    finally:
        sys.modules.pop("speed_sleeper", None)


def _kombu_module(name: str) -> types.ModuleType:
    """A module of kombu's that does ``from time import sleep`` as it is imported, now."""
    module = types.ModuleType(f"kombu.{name}")
    exec("from time import sleep\n\ndef wait(seconds):\n    sleep(seconds)\n", module.__dict__)
    return module


def test_kombu_imported_while_the_clock_runs_sleeps_virtually_as_if_loaded_before() -> None:
    # Celery and kombu load lazily (the retry worker imports them once its clock runs): their
    # retry loops' sleeps must not wait in the first test of a process only.
    with VirtualClock() as clock:
        module = _kombu_module("celery_retry_probe_late")
        started = time.perf_counter()
        module.wait(30)
        assert clock.elapsed == 30
    assert freezegun.api.real_perf_counter() - started < 5  # type: ignore[attr-defined]


def test_a_module_a_lazy_package_imports_during_the_clock_s_pass_is_patched_too() -> None:
    # kombu's package imports kombu.connection (and kombu.utils.functional, with its
    # ``from time import sleep``) when freezegun's pass reads its attributes: the pass goes
    # on over what it imported.
    imported: list[types.ModuleType] = []
    lazy = types.ModuleType("celery_retry_probe_lazy")

    def __getattr__(name: str) -> Any:
        if name != "thing":
            raise AttributeError(name)
        module = _kombu_module("celery_retry_probe_lazy_import")
        sys.modules[module.__name__] = module
        imported.append(module)
        return module

    lazy.__getattr__ = __getattr__  # type: ignore[method-assign]
    lazy.__dir__ = lambda: ["thing"]  # type: ignore[method-assign]
    sys.modules[lazy.__name__] = lazy
    try:
        with VirtualClock() as clock:
            [module] = imported
            module.wait(30)
            assert clock.elapsed == 30
        assert module.sleep is time.sleep
    finally:
        sys.modules.pop(lazy.__name__, None)
        sys.modules.pop("kombu.celery_retry_probe_lazy_import", None)


def test_a_module_a_lazy_package_imports_during_the_clock_s_pass_reads_virtual_time_next_time() -> (
    None
):
    # Celery's and kombu's lazy packages import amqp.connection and kombu.utils.functional
    # (``from time import monotonic``, ``time``) when the first clock's pass reads them: they
    # take freezegun's fakes, which its stop() turns back into the real functions without
    # changing their namespace's shape. The next clock must patch them all the same (a rate
    # limit's wait read real time in every test of a process after the first).
    lazy = types.ModuleType("celery_retry_probe_lazy_timed")

    def __getattr__(name: str) -> Any:
        if name != "thing":
            raise AttributeError(name)
        module = types.ModuleType("celery_retry_probe_timed")
        exec("from time import monotonic", module.__dict__)
        sys.modules[module.__name__] = module
        return module

    lazy.__getattr__ = __getattr__  # type: ignore[method-assign]
    lazy.__dir__ = lambda: ["thing"]  # type: ignore[method-assign]
    sys.modules[lazy.__name__] = lazy
    try:
        with VirtualClock():
            module = sys.modules["celery_retry_probe_timed"]
        assert module.monotonic is time.monotonic  # freezegun's stop put the real one back
        with VirtualClock() as clock:
            before = module.monotonic()
            clock.advance(30)
            assert module.monotonic() - before == 30
        assert module.monotonic is time.monotonic
    finally:
        sys.modules.pop(lazy.__name__, None)
        sys.modules.pop("celery_retry_probe_timed", None)


def test_a_freeze_time_of_the_test_keeps_freezegun_s_own_cache(module_listings: list[str]) -> None:
    with VirtualClock():
        pass
    with freezegun.freeze_time("2030-01-01"):
        pass
    assert len(module_listings) > 100


def _start_twice() -> None:
    """A clock started twice: the second start repeats the first's pass over the modules."""
    for _ in range(2):
        with VirtualClock():
            pass


def test_a_clock_started_with_the_same_modules_goes_over_none_of_them_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _start_twice()
    passes: list[str] = []
    real = clock_module._every_module

    def spy() -> Iterator[tuple[str, Any]]:
        passes.append("over every module")
        return real()

    monkeypatch.setattr(clock_module, "_every_module", spy)
    with VirtualClock():
        pass
    assert passes == []


def test_a_module_replaced_under_the_same_name_is_looked_at(
    fresh_module: types.ModuleType,
) -> None:
    _start_twice()
    replacement = types.ModuleType(fresh_module.__name__)
    replacement.time = time.time  # type: ignore[attr-defined]
    sys.modules[fresh_module.__name__] = replacement  # same name, same place in sys.modules
    assert_patched_only_while_the_clock_runs(replacement, "time")


def test_a_module_that_gains_a_time_function_after_a_repeated_start_is_patched(
    fresh_module: types.ModuleType,
) -> None:
    _start_twice()
    fresh_module.now = time.time  # type: ignore[attr-defined]
    assert_patched_only_while_the_clock_runs(fresh_module, "now")


def test_an_empty_module_does_not_hide_a_later_module_s_change(
    fresh_module: types.ModuleType,
) -> None:
    # Each namespace's last name is read in one go; an empty namespace has none, and must not
    # cut the comparison short for the modules after it.
    empty = types.ModuleType("speed_empty_module")
    empty.__dict__.clear()
    del sys.modules[fresh_module.__name__]
    sys.modules["speed_empty_module"] = empty
    sys.modules[fresh_module.__name__] = fresh_module
    try:
        fresh_module.clock = None  # type: ignore[attr-defined]
        _start_twice()
        del fresh_module.clock  # type: ignore[attr-defined]
        fresh_module.now = time.time  # type: ignore[attr-defined]
        assert_patched_only_while_the_clock_runs(fresh_module, "now")
    finally:
        del sys.modules["speed_empty_module"]


def test_the_clock_keeps_no_module_alive_once_it_is_unloaded() -> None:
    module = types.ModuleType("speed_unloaded_module")
    module.marker = _Marker()  # type: ignore[attr-defined]
    marker = weakref.ref(module.marker)  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        _start_twice()
    finally:
        del sys.modules[module.__name__]
    del module
    gc.collect()
    assert marker() is None
    _start_twice()  # and the next clocks look at the modules loaded now


class _Marker:
    pass


# -- what a test reads directly: virtual, as docs/worker.md says; pytest's own timing: real ---
def _read_time_here() -> float:
    return time.time()


@pytest.fixture
def read_in_a_fixture(retry_worker: Any) -> float:
    retry_worker.clock.advance(3600)
    return time.time()


def test_time_read_in_the_test_itself_is_virtual(
    read_in_a_fixture: float, retry_worker: Any
) -> None:
    # freezegun gives real time to calls made within five frames of an ignored module; the
    # clock ignores pytest's modules but not those that call the test, the fixtures and them.
    virtual = retry_worker.clock.now().timestamp()
    assert virtual - freezegun.api.real_time() > 3500
    assert read_in_a_fixture == virtual
    assert time.time() == _read_time_here() == virtual
    assert time.monotonic() == time.monotonic()
    assert datetime.now(timezone.utc) == retry_worker.clock.now()


def test_pytest_keeps_real_time_for_its_own_timing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time

        import freezegun.api
        import pytest


        @pytest.fixture
        def an_hour_on(retry_worker):
            retry_worker.clock.advance(3600)
            yield
            assert time.time() - freezegun.api.real_time() > 3500, "teardown"


        def test_an_hour(an_hour_on):
            assert time.time() - freezegun.api.real_time() > 3500
        """
    )
    result = pytester.runpytest("--durations=0", "-vv", "--junitxml=report.xml")
    result.assert_outcomes(passed=1)
    durations = [
        float(line.split("s ")[0])
        for line in result.outlines
        if "test_an_hour" in line and line.split("s ")[0].replace(".", "").isdigit()
    ]
    assert len(durations) == 3 and max(durations) < 60, result.outlines
    report = (pytester.path / "report.xml").read_text()
    assert 'time="' in report and "3600" not in report, report


# -- tracebacks: remembered per code object, the same as made afresh ---------------------------
def _app_that_fails() -> Any:
    from celery import Celery

    app = Celery("speed-einfo", broker="memory://", set_as_current=False)

    def deeper(depth: int) -> None:
        # The same code object several times in one traceback.
        if depth:
            deeper(depth - 1)
        raise KeyError(f"missing at depth {depth}")

    @app.task(name="speed.retries", bind=True, max_retries=2, shared=False)
    def retries(self: Any) -> None:
        try:
            deeper(3)
        except KeyError as exc:
            raise self.retry(exc=exc, countdown=1) from exc

    @app.task(name="speed.fails", shared=False)
    def fails() -> None:
        try:
            {}["key"]
        except KeyError as exc:
            raise ValueError("chained") from exc

    return app


def _frames(tb: Any) -> list[dict[str, Any]]:
    """Everything billiard's traceback copy holds, frame by frame."""
    frames = []
    while tb is not None:
        frame = tb.tb_frame
        frames.append(
            {
                "tb": {k: v for k, v in vars(tb).items() if k not in ("tb_frame", "tb_next")},
                "frame": {k: v for k, v in vars(frame).items() if k != "f_code"},
                "code": dict(vars(frame.f_code)),
                "positions": list(getattr(frame.f_code, "co_positions", tuple)()),
            }
        )
        tb = tb.tb_next
    return frames


def _observe(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """Run both tasks on the retry worker; what signal handlers, the backend and logs see."""
    import logging
    import pickle
    import traceback

    from celery import signals

    from pytest_celery_retry.session import RetrySession
    from pytest_celery_retry.worker import RetryWorker

    app = _app_that_fails()
    seen: dict[str, Any] = {"signals": [], "einfo": []}

    def on_signal(signal: Any = None, sender: Any = None, **kwargs: Any) -> None:
        einfo = kwargs.pop("einfo")
        seen["signals"].append((signal.name, sorted(kwargs), str(kwargs.get("exception", ""))))
        reloaded = pickle.loads(pickle.dumps(einfo))
        seen["einfo"].append(
            {
                "traceback": einfo.traceback,
                "repr": repr(einfo),
                "format_tb": traceback.format_tb(einfo.tb),
                "frames": _frames(einfo.tb),
                "pickled frames": _frames(reloaded.tb),
                "pickled traceback": reloaded.traceback,
                "pickled exception": repr(reloaded.exception),
            }
        )

    for signal in (signals.task_retry, signals.task_failure):
        signal.connect(on_signal, weak=False, dispatch_uid="speed-einfo")
    session = RetrySession().start()
    try:
        session.installation(app)
        worker = RetryWorker(session)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="celery"):
            runs = [worker.apply(app.tasks[name]) for name in ("speed.retries", "speed.fails")]
        seen["backend"] = [app.backend.get_task_meta(run.task_id)["traceback"] for run in runs]
        seen["logs"] = [
            (record.levelname, record.getMessage().replace(run.task_id, "<id>"))
            for record in caplog.records
            for run in runs
            if run.task_id in record.getMessage()
        ]
        seen["logged tracebacks"] = [
            logging.Formatter().formatException(record.exc_info)
            for record in caplog.records
            if record.exc_info
        ]
        seen["records"] = [
            [(a.outcome, repr(a.exc), a.countdown) for a in run.attempts] for run in runs
        ]
        worker.close()
    finally:
        session.close()
        for signal in (signals.task_retry, signals.task_failure):
            signal.disconnect(on_signal, dispatch_uid="speed-einfo")
    return seen


def test_tracebacks_are_the_same_remembered_or_made_afresh(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_celery_retry import einfo

    remembered = _observe(caplog)
    with monkeypatch.context() as afresh:
        afresh.setattr(einfo, "_REMEMBERED", [])
        made_afresh = _observe(caplog)
    assert remembered == made_afresh
    assert len(remembered["einfo"]) == 4  # two retries and a failure, and a failure
    assert all(traceback for traceback in remembered["backend"])
    assert remembered["logged tracebacks"]


def test_tracebacks_are_remembered_only_while_the_worker_executes(
    retry_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import traceback

    from billiard import einfo

    app = _app_that_fails()
    names = ("_get_code_position", "_extract_caret_anchors_from_line_segment")
    originals = [getattr(traceback, name, None) for name in names]
    retry_worker.apply(app.tasks["speed.retries"])
    assert [getattr(traceback, name, None) for name in names] == originals
    assert einfo._Frame.Code is einfo._Code


@pytest.mark.skipif(sys.version_info < (3, 11), reason="billiard copies positions on 3.11+")
def test_each_code_object_is_copied_once_not_once_per_retry(
    retry_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billiard import einfo

    app = _app_that_fails()
    app.tasks["speed.retries"].max_retries = 20
    copied: list[Any] = []
    real_init = einfo._Code.__init__

    def counting_init(self: Any, code: Any) -> None:
        copied.append(code)
        real_init(self, code)

    monkeypatch.setattr(einfo._Code, "__init__", counting_init)
    retry_worker.apply(app.tasks["speed.retries"])
    # Before: every frame of every retry's traceback, about 20 for each of the 20 retries.
    assert len(copied) == len({id(code) for code in copied})


# -- memory: what the records keep, every field read as before ---------------------------------
def test_delivered_messages_read_as_kombu_handed_them_over(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from kombu import serialization

    from pytest_celery_retry.broker import InMemoryBroker
    from pytest_celery_retry.session import RetrySession
    from pytest_celery_retry.worker import RetryWorker

    handed_over: list[dict[str, Any]] = []
    record = InMemoryBroker._record_delivery

    def spy(self: InMemoryBroker, queue: str, message: dict[str, Any]) -> None:
        handed_over.append(copy.deepcopy(message))
        record(self, queue, message)

    monkeypatch.setattr(InMemoryBroker, "_record_delivery", spy)
    app = _app_that_fails()
    session = RetrySession().start()
    try:
        broker = session.installation(app).broker
        worker = RetryWorker(session)
        worker.apply(app.tasks["speed.retries"], headers={"tags": ["a", "b"]})
        worker.close()
        messages = broker.messages(queue=None)
    finally:
        session.close()
    assert len(messages) == len(handed_over) == 3
    for message, original in zip(messages, handed_over):
        body = original["body"]
        if original["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = serialization.loads(
            body, original["content-type"], original["content-encoding"]
        )
        assert message.headers == original["headers"]
        assert list(message.headers) == list(original["headers"])
        assert (message.args, message.kwargs) == (args, kwargs)
    # A retry's equal strings are the earlier message's; what a test could change is its own.
    first, second = (message.headers for message in messages[1:])
    assert first["argsrepr"] is second["argsrepr"] and first["id"] is second["id"]
    # Celery makes each message's timelimit list afresh.
    assert first["timelimit"] == second["timelimit"]
    assert first["timelimit"] is not second["timelimit"]
    assert first["retries"] != second["retries"]
