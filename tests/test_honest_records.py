"""Honest records: what a run reports is what the task asked for and what the worker did."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from tests.conftest import SEED_POLICY, make_app


def test_countdown_is_what_the_task_asked_even_when_the_publish_took_longer(
    app, flaky_broker, retry_worker
):
    # The case: the broker goes down as the attempt starts; the retry's publish is
    # retried by kombu (intervals 3, 4, 5 s) and gets through at t=12, after its ETA (t=1).
    @app.task(name="outage_then_retry", bind=True, max_retries=1, shared=False)
    def outage_then_retry(self: Any) -> str:
        if self.request.retries == 0:
            flaky_broker.outage(10)
            raise self.retry(countdown=1, retry=True, retry_policy=SEED_POLICY)
        return "done"

    run = retry_worker.apply(outage_then_retry)

    assert [a.outcome for a in run.attempts] == ["retry", "success"]
    assert flaky_broker.last_publish is not None
    assert flaky_broker.last_publish.ended_at == 12
    assert run.countdowns == [1]
    assert run.attempts[0].eta == run.attempts[0].started_at + timedelta(seconds=1)
    assert run.attempts[1].t == 12  # the ETA had passed when the message arrived
    # The message's own countdown is measured from when the broker accepted it.
    assert [m.countdown for m in flaky_broker.messages() if m.retries == 1] == [-11]
    assert "countdown" in run.timeline() and "-11" not in run.timeline()
