from collections.abc import Iterator

import pytest
from billing import tasks
from billing.celery import app


@pytest.fixture(autouse=True)
def eager_celery() -> Iterator[None]:
    # Run tasks in the test process. (With task_eager_propagates, eager mode raises Retry
    # at a task's first retry: its retries could only be tested with retry mocked.)
    app.conf.update(task_always_eager=True)
    tasks.gateway.__init__()
    tasks.outbox.clear()
    yield
    app.conf.update(task_always_eager=False)
