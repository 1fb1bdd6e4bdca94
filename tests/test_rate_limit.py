"""Rate limits (issue 10, item 7): the worker's token bucket holds tasks back, ETA retries too.

Every expected time below was measured on a real solo worker (Celery 5.7, kombu 5.7, memory
transport) by benchmarks/rate_limit_oracle.py, in seconds after the first attempt; the
fidelity suite (tests/test_fidelity.py) compares a few of them against a real worker live.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import make_app

# The virtual clock moves in whole microseconds, and a token bucket's float arithmetic on
# epoch-sized monotonic readings may ask for one more.
CLOCK_RESOLUTION = 2e-6


def limited_task(app: Any, rate_limit: str, countdown: float, retries: int) -> Any:
    @app.task(name="limited", bind=True, max_retries=retries, rate_limit=rate_limit, shared=False)
    def limited(self: Any) -> str:
        if self.request.retries < retries:
            raise self.retry(countdown=countdown)
        return "ok"

    return limited


def starts(run: Any) -> list[float]:
    return [a.t for a in run.attempts]


@pytest.mark.parametrize(
    ("rate_limit", "countdown", "retries", "measured"),
    [
        ("1/s", 0, 3, [0, 1, 2, 3]),
        # The retry's ETA comes first, then the bucket: 1 s apart whatever the countdown below.
        ("1/s", 0.2, 2, [0, 1, 2]),
        ("2/s", 0, 3, [0, 0.5, 1, 1.5]),
        ("30/m", 0, 2, [0, 2, 4]),
        ("10/m", 0, 2, [0, 6, 12]),
        # A countdown longer than the bucket's wait: the ETA alone decides.
        ("1/s", 1.5, 2, [0, 1.5, 3]),
        # The later of the two, not their sum.
        ("0.5/s", 1.5, 2, [0, 2, 4]),
    ],
)
def test_a_retrying_task_keeps_to_its_rate_limit(
    retry_worker: Any, rate_limit: str, countdown: float, retries: int, measured: list[float]
) -> None:
    run = retry_worker.apply(limited_task(make_app(), rate_limit, countdown, retries))
    assert run.state == "SUCCESS"
    assert starts(run) == pytest.approx(measured, abs=CLOCK_RESOLUTION)
    # The delay comes from the worker: the retries asked for what the task asked.
    assert run.countdowns == [countdown] * retries


def test_tasks_of_one_type_share_its_bucket(app: Any, flaky_broker: Any, retry_worker: Any) -> None:
    task = limited_task(app, "1/s", 0, 1)
    ids = [task.delay().id for _ in range(3)]
    retry_worker.run_until_idle()
    # Measured: [[0, 3], [1, 4], [2, 5]]: the retries queue behind the tasks already waiting.
    assert [starts(retry_worker.runs[task_id]) for task_id in ids] == [
        pytest.approx(times, abs=CLOCK_RESOLUTION) for times in ([0, 3], [1, 4], [2, 5])
    ]


def test_worker_disable_rate_limits(retry_worker: Any) -> None:
    app = make_app(worker_disable_rate_limits=True)
    run = retry_worker.apply(limited_task(app, "1/s", 0, 3))
    assert starts(run) == [0, 0, 0, 0]
    assert all(a.rate_limit_hold == 0 and not a.note for a in run.attempts)


def test_other_tasks_are_not_held(app: Any, flaky_broker: Any, retry_worker: Any) -> None:
    limited = limited_task(app, "1/s", 0, 1)

    @app.task(name="free", bind=True, max_retries=2, shared=False)
    def free(self: Any) -> None:
        raise self.retry(countdown=0)

    limited.delay()
    run = retry_worker.apply(free)
    assert starts(run) == [0, 0, 0]


def test_a_task_registered_after_the_worker_started_is_limited(retry_worker: Any) -> None:
    app = make_app()
    retry_worker.apply(limited_task(app, "1/s", 0, 1))

    @app.task(name="later", bind=True, max_retries=1, rate_limit="1/s", shared=False)
    def later(self: Any) -> str:
        if not self.request.retries:
            raise self.retry(countdown=0)
        return "ok"

    first = retry_worker.clock.elapsed
    run = retry_worker.apply(later)
    assert [t - first for t in starts(run)] == pytest.approx([0, 1], abs=CLOCK_RESOLUTION)


def test_the_hold_is_recorded_where_it_is_read(retry_worker: Any) -> None:
    run = retry_worker.apply(limited_task(make_app(), "1/s", 0.2, 2))
    assert [a.rate_limit_hold for a in run.attempts] == pytest.approx(
        [0, 0.8, 0.8], abs=CLOCK_RESOLUTION
    )
    assert run.attempts[0].note == ""
    assert run.attempts[1].note == "held 0.8 s by rate_limit='1/s'"
    lines = run.timeline().splitlines()
    assert "note" in lines[1]
    assert lines[3].strip().startswith("2  +1.000s")
    assert lines[3].endswith("held 0.8 s by rate_limit='1/s'")


def test_a_lost_connection_drops_what_the_bucket_held(
    app: Any, flaky_broker: Any, retry_worker: Any
) -> None:
    task = limited_task(app, "1/s", 0, 0)
    for _ in range(2):
        task.delay()
    # The second message waits in the bucket when the connection drops at t=0.5. As in
    # Celery's Consumer.on_close the bucket forgets it (its delivery tag died with the
    # channel); the broker delivers it again once the worker has reconnected, at t=2.5
    # (Celery's first reconnect comes 2 s after the loss), and it runs once, then.
    flaky_broker.outage(0.1, starting_in=0.5)
    runs = retry_worker.run_until_idle()
    assert sorted(starts(run)[0] for run in runs.values()) == pytest.approx(
        [0, 2.5], abs=CLOCK_RESOLUTION
    )
    assert all(len(run.attempts) == 1 for run in runs.values())


@pytest.mark.parametrize(("multiplier", "measured"), [(4, 2), (2, 4), (1, 5), (0, 0)])
def test_a_rate_limited_backlog_fills_the_prefetch_limit(
    app: Any, flaky_broker: Any, retry_worker: Any, multiplier: int, measured: float
) -> None:
    # Measured on a real solo worker: six "1/s" tasks published before a free one hold
    # worker_prefetch_multiplier messages; the free task is fetched only when a slot frees.
    app.conf.worker_prefetch_multiplier = multiplier
    limited = limited_task(app, "1/s", 0, 0)

    @app.task(name="free", shared=False)
    def free() -> None:
        pass

    for _ in range(6):
        limited.delay()
    free_id = free.delay().id
    retry_worker.run_until_idle()
    assert starts(retry_worker.runs[free_id]) == pytest.approx([measured], abs=CLOCK_RESOLUTION)
    assert sorted(run.attempts[0].t for run in retry_worker.runs.values()) == pytest.approx(
        sorted([0, 1, 2, 3, 4, 5, measured]), abs=CLOCK_RESOLUTION
    )
