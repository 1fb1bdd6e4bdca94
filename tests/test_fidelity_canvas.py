"""Fidelity of canvases (issue 14): chains, groups, chords and errbacks whose tasks retry.

As in ``tests/test_fidelity.py``, whose real-worker harness this module shares, every case
defines its tasks once and runs them on a real Celery worker (``start_worker``, solo pool,
kombu's memory transport, real time) and on ``retry_worker`` (virtual time). The real worker
is observed through ``task_prerun``/``task_postrun``; its observations become ``TaskRun``
records, so that both sides are reduced by the same ``CanvasRun`` to the same
:class:`CanvasRecord`, compared whole. The chord-unlock cases use Celery's file-system result
backend, which cannot join a chord natively, so ``celery.chord_unlock`` polls the header.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import celery
import pytest
from celery import chain, chord, group, signals
from celery.contrib.testing.worker import start_worker

from pytest_celery_retry import CanvasRun, EndlessRetryError
from pytest_celery_retry.app_state import reset_connections
from pytest_celery_retry.canvas import task_names
from pytest_celery_retry.records import Attempt, AttemptOutcome, TaskRun
from tests.conftest import NATIVE_JOIN_WAIT, make_app
from tests.test_fidelity import (
    REAL_RUN_TIMEOUT,
    RefusedPublishes,
    describe,
    process_state_kept,
    receivers_connected,
    transport_for_run,
)

# Each case runs a real worker in real time beside the retry worker.
pytestmark = pytest.mark.slow

# The real worker is done with a canvas once its result is ready and nothing has started for
# this long (an errback, a callback the last poll published).
QUIET = 0.5
# A chord callback starts within this many seconds of the same moment on both sides: the
# real worker's timer and the transport's polling add a few hundredths per retry.
CALLBACK_TOLERANCE = 0.4
# The chord-unlock cases keep Celery's default poll interval, 1 s (its first poll is 1 s
# after the chord is published), and publish their ETAs in the order they fall due: the
# real worker's timer thread (timer2) sleeps until the earliest ETA it knew when it went to
# sleep, so an earlier ETA that arrives meanwhile would run late (on a production worker's
# event loop it does not).


# -- the tasks and the cases -------------------------------------------------------------------
def define_tasks(app: Any) -> dict[str, Any]:
    """The tasks every case builds its canvas from, registered on ``app``."""

    @app.task(name="canvas.flaky", bind=True, max_retries=3, shared=False)
    def flaky(self: Any, x: int, times: int = 2, countdown: float = 0.2) -> int:
        if self.request.retries < times:
            raise self.retry(countdown=countdown)
        return x

    @app.task(name="canvas.broken", bind=True, max_retries=1, shared=False)
    def broken(self: Any, *_: Any, countdown: float = 0.2) -> None:
        raise self.retry(exc=ValueError("broken for good"), countdown=countdown)

    @app.task(name="canvas.add", shared=False)
    def add(x: int, y: int = 0) -> int:
        return x + y

    @app.task(name="canvas.collect", shared=False)
    def collect(values: list[int]) -> list[int]:
        return sorted(values)

    @app.task(name="canvas.errback", shared=False)
    def errback(task_id: str) -> str:
        return f"cleaned up after {task_id}"

    @app.task(name="canvas.quiet", ignore_result=True, shared=False)
    def quiet(x: int) -> int:
        return x

    return {name.split(".")[1]: task for name, task in app.tasks.items() if "canvas." in name}


Publish = Callable[[dict[str, Any]], Any]
# Celery 5.7 fails a failed chain's chord steps down to their bodies (celery#9674, #10323).
CELERY_FAILS_A_CHORD_STEP_OF_A_CHAIN = celery.VERSION >= (5, 7)


def nested_chain_chord(t: dict[str, Any]) -> Any:
    """celery#9674's canvas: a chord whose header task is a chain failing before a group."""
    header = chain(
        t["add"].si(1),
        t["broken"].si(countdown=1.2),
        group(t["add"].si(2), t["add"].si(3)),
        t["add"].si(4),
    )
    return chord([header], t["collect"].s()).delay()


@dataclass(frozen=True)
class CanvasCase:
    id: str
    publish: Publish
    # A result backend without a native chord join (file://): celery.chord_unlock polls.
    polled: bool = False
    # When the chord's callback starts, after the canvas's first attempt (Celery 5.7; with a
    # native join, NATIVE_JOIN_WAIT later before).
    callback_at: float | None = None


CASES = [
    CanvasCase(
        "chain-with-a-retrying-link",
        lambda t: chain(t["flaky"].s(1), t["add"].s(10)).delay(),
    ),
    CanvasCase(
        "chain-whose-link-fails-for-good",
        lambda t: chain(t["add"].s(1, 1), t["broken"].s(), t["add"].s(10), t["add"].s(100)).delay(),
    ),
    CanvasCase(
        "group-with-retrying-tasks",
        lambda t: group(t["flaky"].s(1), t["flaky"].s(2, times=1), t["add"].s(3)).delay(),
    ),
    CanvasCase(
        "chord-with-a-retrying-header-task",
        lambda t: chord(
            [t["flaky"].s(1, times=3, countdown=0.4), t["add"].s(2)], t["collect"].s()
        ).delay(),
        callback_at=1.2,
    ),
    CanvasCase(
        "chord-whose-header-task-fails",
        lambda t: chord(
            [t["broken"].s(), t["add"].s(2)], t["collect"].s().on_error(t["errback"].s())
        ).delay(),
    ),
    CanvasCase(
        "link-error-of-a-retrying-task",
        lambda t: t["broken"].apply_async((1,), link_error=t["errback"].s()),
    ),
    # Polls at 1.0, 2.0 (the header task retries at 1.2 and succeeds at 2.4) and 3.0.
    CanvasCase(
        "chord-unlock-polls-a-retrying-header",
        lambda t: chord(
            [t["flaky"].s(1, times=2, countdown=1.2), t["add"].s(2)], t["collect"].s()
        ).delay(),
        polled=True,
        callback_at=3.0,
    ),
    # Polls at 1.0 and 2.0; the header task failed for good at 1.2: ChordError, errback.
    CanvasCase(
        "chord-unlock-header-task-fails",
        lambda t: chord(
            [t["broken"].s(countdown=1.2), t["add"].s(2)],
            t["collect"].s().on_error(t["errback"].s()),
        ).delay(),
        polled=True,
    ),
]
if CELERY_FAILS_A_CHORD_STEP_OF_A_CHAIN:
    # celery#9674: a header task that is a chain whose link fails before a group step. Celery
    # 5.7 fails that step's chord body, so the unlock ends: polls at 1 and 2 s, ChordError.
    # Before (measured with 5.3.6) the unlock polls for ever; test_canvas.py checks both.
    CASES.append(CanvasCase("chord-unlock-nested-chain-fails", nested_chain_chord, polled=True))
# A header task that stores no result: celery.chord_unlock polls for ever (max_retries=None).
ENDLESS = CanvasCase(
    "chord-unlock-header-stores-no-result",
    lambda t: chord([t["quiet"].s(1), t["add"].s(2)], t["collect"].s()).delay(),
    polled=True,
)


# -- the record both sides are reduced to ------------------------------------------------------
@dataclass(frozen=True)
class CanvasRecord:
    kind: str
    # Each task of the canvas, in canvas order: name, its attempts' outcomes, its state,
    # and what ended it (for a task that never ran, what the result backend holds).
    members: tuple[tuple[str, tuple[str | None, ...], str, str], ...]
    unlock_polls: tuple[str | None, ...]
    errbacks: tuple[tuple[str, str], ...]  # name, and the state of the task it was called for
    state: str
    result: Any


def canvas_record(canvas: CanvasRun) -> CanvasRecord:
    states = {run.task_id: run.state for run in canvas.members}
    return CanvasRecord(
        kind=canvas.kind,
        members=tuple(
            (
                run.task_name,
                tuple(a.outcome for a in run.attempts),
                run.state,
                describe(run.exception),
            )
            for run in canvas.members
        ),
        unlock_polls=tuple(a.outcome for run in canvas.unlocks for a in run.attempts),
        errbacks=tuple(
            (run.task_name, states.get(run.parent_id or "", "?")) for run in canvas.errbacks
        ),
        state=canvas.state,
        result=canvas.result,
    )


def callback_start(canvas: CanvasRun) -> float | None:
    if canvas.callback is None or not canvas.callback.attempts:
        return None
    first = min(a.t for run in canvas.members for a in run.attempts)
    return canvas.callback.attempts[0].t - first


def backend_url(case: CanvasCase, directory: Path) -> str:
    if not case.polled:
        return "cache+memory://"
    directory.mkdir()
    return f"file://{directory}"


# -- the virtual side --------------------------------------------------------------------------
def virtual_canvas(case: CanvasCase, request: pytest.FixtureRequest) -> CanvasRun:
    app = request.getfixturevalue("celery_retry_app")
    tasks = define_tasks(app)
    retry_worker = request.getfixturevalue("retry_worker")
    result = case.publish(tasks)
    retry_worker.run_until_idle()
    canvas: CanvasRun = retry_worker.canvas(result)
    return canvas


@pytest.fixture
def celery_retry_result_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params["case"] if callspec is not None else ENDLESS
    return backend_url(case, tmp_path / "virtual")


# -- the real side: a Celery worker, its attempts as TaskRuns -----------------------------------
@dataclass
class AttemptRecorder:
    """Every attempt a real worker ran, as ``TaskRun`` records (by task id)."""

    runs: dict[str, TaskRun] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    last_event: float = field(default_factory=time.monotonic)
    running: int = 0
    _order: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _in_progress: threading.local = field(default_factory=threading.local)

    @contextmanager
    def connected(self) -> Iterator[AttemptRecorder]:
        receivers = [(signals.task_prerun, self._prerun), (signals.task_postrun, self._postrun)]
        with receivers_connected(self, receivers):
            yield self

    def _prerun(
        self, task_id: str | None = None, task: Any = None, args: Any = (), **_: Any
    ) -> None:
        if task_id is None or task is None:
            return
        with self._lock:
            run = self.runs.get(task_id)
            if run is None:
                run = self.runs[task_id] = TaskRun(
                    task_id,
                    task.name,
                    parent_id=task.request.parent_id,
                    link_error=task_names(task.request.errbacks),
                )
            self._order += 1
            now = time.monotonic()
            attempt = Attempt(
                number=len(run.attempts) + 1,
                task_id=task_id,
                task_name=task.name,
                retries=int(task.request.retries or 0),
                started_at=datetime.now(timezone.utc),
                t=now - self.started,
                args=tuple(args or ()),
                order=self._order,
            )
            run.attempts.append(attempt)
            self.running += 1
            self.last_event = now
        self._in_progress.attempt = attempt

    def _postrun(self, state: str | None = None, retval: Any = None, **_: Any) -> None:
        attempt = getattr(self._in_progress, "attempt", None)
        if attempt is None:
            return
        self._in_progress.attempt = None
        outcomes: dict[str | None, AttemptOutcome] = {
            "RETRY": "retry",
            "SUCCESS": "success",
            "FAILURE": "failure",
        }
        with self._lock:
            attempt.outcome = outcomes.get(state, "failure")
            attempt.retry_published = state == "RETRY"
            if isinstance(retval, BaseException):
                attempt.raised = retval
            else:
                attempt.result = retval
            self.running -= 1
            self.last_event = time.monotonic()

    def idle_for(self, seconds: float) -> bool:
        with self._lock:
            return not self.running and time.monotonic() - self.last_event >= seconds


def real_canvas(
    case: CanvasCase, directory: Path, until: Callable[[Any, AttemptRecorder], bool]
) -> CanvasRun:
    transport = transport_for_run(RefusedPublishes())
    app = make_app(
        broker_url="memory://localhost/",
        broker_transport=transport,
        result_backend=backend_url(case, directory),
        worker_enable_remote_control=False,
        broker_transport_options={"polling_interval": 0.05},
    )
    tasks = define_tasks(app)
    recorder = AttemptRecorder()
    try:
        worker = start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10)
        with process_state_kept(), recorder.connected(), worker:
            recorder.started = time.monotonic()
            result = case.publish(tasks)
            deadline = time.monotonic() + REAL_RUN_TIMEOUT
            while not until(result, recorder):
                assert time.monotonic() < deadline, (
                    f"the real worker did not finish {case.id} in {REAL_RUN_TIMEOUT} s: "
                    f"{list(recorder.runs.values())}"
                )
                time.sleep(0.05)
    finally:
        reset_connections(app)
    return CanvasRun.from_result(result, recorder.runs)


def finished(result: Any, recorder: AttemptRecorder) -> bool:
    return bool(result.ready()) and recorder.idle_for(QUIET)


# -- the comparisons ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_canvas_runs_as_on_a_real_worker(
    case: CanvasCase, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    real = real_canvas(case, tmp_path / "real", finished)
    # Only now may the virtual clock start: freezegun stops time for every thread.
    virtual = virtual_canvas(case, request)

    assert canvas_record(virtual) == canvas_record(real), (
        f"virtual:\n{virtual.timeline()}\nreal:\n{real.timeline()}"
    )
    if case.callback_at is not None:
        expected = case.callback_at + (0 if case.polled else NATIVE_JOIN_WAIT)
        assert callback_start(virtual) == pytest.approx(expected)
        assert callback_start(real) == pytest.approx(expected, abs=CALLBACK_TOLERANCE)


def test_chord_unlock_polls_for_ever_for_a_header_task_that_stores_no_result(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    polls = 3

    def polled(result: Any, recorder: AttemptRecorder) -> bool:
        unlocks = [r for r in recorder.runs.values() if r.task_name == "celery.chord_unlock"]
        return bool(unlocks) and len(unlocks[0].attempts) >= polls and recorder.idle_for(0.05)

    real = real_canvas(ENDLESS, tmp_path / "real", polled)
    # The header is done, but one of its results will never be there: still polling.
    assert [run.state for run in real.header] == ["SUCCESS", "SUCCESS"]
    assert [a.outcome for a in real.unlocks[0].attempts][:polls] == ["retry"] * polls
    assert real.callback is not None and real.callback.attempts == []

    app = request.getfixturevalue("celery_retry_app")
    retry_worker = request.getfixturevalue("retry_worker")
    retry_worker.settings.max_attempts = 50
    ENDLESS.publish(define_tasks(app))
    with pytest.raises(EndlessRetryError, match=r"celery\.chord_unlock.*after 50 attempts") as err:
        retry_worker.run_until_idle()
    assert "ignore_result=True" in str(err.value)
