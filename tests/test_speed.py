"""What the speed work (issue #15) must not change, and what makes it fast.

Speed itself is measured by benchmarks/bench.py, not here: these tests pin behaviour.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import freezegun.api
import pytest

from pytest_celery_retry.clock import VirtualClock


# -- the clock: freezegun's start() without listing every module again ------------------------
@pytest.fixture
def module_listings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The modules whose attributes freezegun lists (with ``dir()``) while a clock starts."""
    listed: list[str] = []
    real = freezegun.api._get_module_attributes_hash

    def spy(module: types.ModuleType) -> str:
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
    # Before: every loaded module, over 500 of them with Celery, on every start. Still asked:
    # what stands in sys.modules without being a module (typing.io is a class).
    assert [
        name for name in module_listings if isinstance(sys.modules[name], types.ModuleType)
    ] == []


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
    with VirtualClock():
        assert fresh_module.time is freezegun.api.fake_time
    assert fresh_module.time is time.time


def test_a_module_whose_names_change_at_the_same_count_is_listed_again(
    fresh_module: types.ModuleType,
) -> None:
    fresh_module.clock = None  # type: ignore[attr-defined]
    with VirtualClock():
        pass
    del fresh_module.clock  # type: ignore[attr-defined]
    fresh_module.now = time.time  # type: ignore[attr-defined]
    with VirtualClock():
        assert fresh_module.now is freezegun.api.fake_time
    assert fresh_module.now is time.time


def test_a_freeze_time_of_the_test_keeps_freezegun_s_own_cache(module_listings: list[str]) -> None:
    with VirtualClock():
        pass
    with freezegun.freeze_time("2030-01-01"):
        pass
    assert len(module_listings) > 100


# -- what a test reads directly: pinned, as docs/worker.md says -------------------------------
def test_time_read_in_the_test_itself_is_real_and_datetime_is_virtual(retry_worker: Any) -> None:
    retry_worker.clock.advance(3600)
    # freezegun answers with real time any call made within five frames of pytest's own code,
    # so time.time() right in a test (or a fixture) is real; datetime.now() is not.
    assert abs(time.time() - freezegun.api.real_time()) < 60
    assert datetime.now(timezone.utc) == retry_worker.clock.now()
    assert abs(retry_worker.clock.now().timestamp() - freezegun.api.real_time() - 3600) < 60
