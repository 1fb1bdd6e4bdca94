"""pytest wiring: options, ini values, markers and fixtures. The work lives elsewhere."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .app_state import app_from_spec
from .errors import UsageError, moved_names
from .flavors import FLAVORS, flavor_for_broker
from .session import MEMORY_RESULT_BACKEND, RetrySession, Settings

if TYPE_CHECKING:
    from .broker import InMemoryBroker
    from .clock import VirtualClock
    from .explorer import FaultExplorer
    from .proxy import BrokerProxy
    from .worker import RetryWorker

# The defaults: the options and ini values below start from them.
_DEFAULTS = Settings()
# The settings of this pytest run, parsed once at configure time.
SETTINGS = pytest.StashKey[Settings]()
_OUTAGE_KEYS = {"fail_next", "seconds", "on", "flavor", "down", "how"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-retry", "Celery retry testing (pytest-celery-retry)")
    group.addoption(
        "--celery-retry-seed",
        type=int,
        default=None,
        help=f"seed for retry jitter and random broker faults (default {_DEFAULTS.seed})",
    )
    group.addoption(
        "--celery-retry-max-attempts",
        type=int,
        default=None,
        help="attempts after which a retrying task is stopped as endless "
        f"(default {_DEFAULTS.max_attempts})",
    )
    group.addoption(
        "--celery-retry-eager",
        action="store_true",
        default=None,
        help="run eager tasks (task_always_eager, Task.apply()) on the retry worker and "
        "report what eager mode hides (ini celery_retry_eager)",
    )
    for flavor in FLAVORS.values():
        group.addoption(
            f"--celery-retry-{flavor.broker}-url",
            default=None,
            help=f"real {flavor.broker} broker for broker_proxy tests (default: "
            f"${flavor.url_variable})",
        )
    parser.addini("celery_retry_app", "the Celery app to test, as module:attribute", default="")
    parser.addini("celery_retry_seed", "seed for jitter and random faults", default="")
    parser.addini("celery_retry_max_attempts", "endless-retry guard", default="")
    parser.addini(
        "celery_retry_serialize",
        "send task arguments through the app's serializer on every attempt",
        type="bool",
        default=_DEFAULTS.serialize,
    )
    parser.addini(
        "celery_retry_eager",
        "run eager tasks on the retry worker, as --celery-retry-eager",
        type="bool",
        default=_DEFAULTS.eager,
    )
    parser.addini(
        "celery_retry_result_backend",
        "result backend installed for the test ('keep' leaves the app's own)",
        default=MEMORY_RESULT_BACKEND,
    )


def pytest_configure(config: pytest.Config) -> None:
    settings = config.stash[SETTINGS] = _settings(config)
    if settings.eager:
        # Only now: the switch imports Celery, which an unused plugin must not.
        from .eager import EagerSwitch

        switch = EagerSwitch(settings)
        switch.install()
        config.pluginmanager.register(switch, "celery-retry-eager")
    config.addinivalue_line(
        "markers",
        "broker_outage(fail_next=N, on='connect', seconds=S, down=False, how='refuse', "
        "flavor=None): "
        "make the flaky_broker fail for this test",
    )
    config.addinivalue_line(
        "markers",
        "redeliver(task=None, times=1, when='after_run'): the broker delivers each message of "
        "the task (of every task) again, as retry_worker.redeliver(...) makes it",
    )
    config.addinivalue_line(
        "markers",
        "real_broker: needs a real Redis or RabbitMQ (skipped without its URL; the skip fails "
        f"when {REQUIRE_REAL_BROKERS} is set)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    settings = config.stash[SETTINGS]
    header = (
        f"celery-retry: seed={settings.seed} (--celery-retry-seed), "
        f"max attempts={settings.max_attempts}"
    )
    if settings.eager:
        header += ", eager tasks run on the retry worker (--celery-retry-eager)"
    return header


REQUIRE_REAL_BROKERS = "CELERY_RETRY_REQUIRE_REAL_BROKERS"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # In CI nothing real may be skipped silently: with CELERY_RETRY_REQUIRE_REAL_BROKERS set,
    # a skipped real_broker test is reported as failed, with the skip's reason.
    report = yield
    if (
        report.skipped
        and os.environ.get(REQUIRE_REAL_BROKERS)
        and item.get_closest_marker("real_broker") is not None
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{REQUIRE_REAL_BROKERS} is set, so this real-broker test may not be skipped: "
            f"{report.longrepr}"
        )
    return report


def _int_setting(config: pytest.Config, option: str, ini: str, default: int) -> int:
    value = config.getoption(option)
    if value is None:
        raw = str(config.getini(ini)).strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise pytest.UsageError(
                f"ini option {ini} = {raw!r}: expected a whole number"
            ) from None
    return int(value)


def _settings(config: pytest.Config) -> Settings:
    backend = str(config.getini("celery_retry_result_backend")).strip()
    return Settings(
        seed=_int_setting(config, "celery_retry_seed", "celery_retry_seed", _DEFAULTS.seed),
        max_attempts=_int_setting(
            config,
            "celery_retry_max_attempts",
            "celery_retry_max_attempts",
            _DEFAULTS.max_attempts,
        ),
        serialize=bool(config.getini("celery_retry_serialize")),
        eager=bool(config.getoption("celery_retry_eager") or config.getini("celery_retry_eager")),
        result_backend=None if backend == "keep" else backend or MEMORY_RESULT_BACKEND,
    )


@pytest.fixture
def celery_retry_app(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> Any:
    """The Celery app the fixtures install on: the ini option ``celery_retry_app``, else the
    test's ``celery_app`` (Celery's own pytest plugin) when it uses one, else the current app.
    """
    spec = str(pytestconfig.getini("celery_retry_app")).strip()
    if spec:
        return app_from_spec(spec)
    if "celery_app" in request.fixturenames:
        return request.getfixturevalue("celery_app")
    from celery import current_app

    return current_app._get_current_object()


@pytest.fixture
def celery_retry_flavor() -> str | None:
    """Which real transport the flaky broker imitates; None: the app's own broker_url's."""
    return None


@pytest.fixture
def celery_retry_result_backend(pytestconfig: pytest.Config) -> str | None:
    """The result backend installed for the test (the ini option; None keeps the app's own).

    Override it for a backend without a native chord join, e.g. ``f"file://{tmp_path}"``.
    """
    return pytestconfig.stash[SETTINGS].result_backend


@pytest.fixture
def celery_retry_session(
    pytestconfig: pytest.Config, celery_retry_result_backend: str | None
) -> Iterator[RetrySession]:
    """The test's virtual clock and everything the plugin installed, undone at teardown."""
    # A copy: a test may change its own settings (retry_worker.settings.max_attempts = 20).
    settings = dataclasses.replace(
        pytestconfig.stash[SETTINGS], result_backend=celery_retry_result_backend
    )
    session = RetrySession(settings=settings).start()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def celery_retry_clock(celery_retry_session: RetrySession) -> VirtualClock:
    """The virtual clock shared by ``retry_worker`` and ``flaky_broker``."""
    return celery_retry_session.clock


@pytest.fixture
def retry_worker(
    celery_retry_session: RetrySession, celery_retry_app: Any, celery_retry_flavor: str | None
) -> Iterator[RetryWorker]:
    """An in-process Celery worker that records every attempt and retry on virtual time."""
    from .worker import RetryWorker

    # Installed now, so that what the test publishes before its first apply() (a delay(),
    # send_task()) goes to the in-memory broker, where run_until_idle() finds it.
    celery_retry_session.installation(celery_retry_app, flavor=celery_retry_flavor)
    worker = RetryWorker(celery_retry_session)
    try:
        yield worker
    finally:
        worker.close()


@pytest.fixture
def flaky_broker(
    request: pytest.FixtureRequest,
    celery_retry_session: RetrySession,
    celery_retry_app: Any,
    celery_retry_flavor: str | None,
) -> InMemoryBroker:
    """The in-memory broker installed on the app, with faults on command."""
    marker = request.node.get_closest_marker("broker_outage")
    options = _outage_options(marker) if marker is not None else {}
    flavor = options.pop("flavor", None) or celery_retry_flavor
    broker = celery_retry_session.installation(celery_retry_app, flavor=flavor).broker
    if options:
        _apply_outage(broker, options)
    return broker


@pytest.fixture(autouse=True)
def _celery_retry_outage_marker(request: pytest.FixtureRequest) -> None:
    # The marker works without naming the fixture in the test's arguments.
    if request.node.get_closest_marker("broker_outage") is not None:
        request.getfixturevalue("flaky_broker")


@pytest.fixture(autouse=True)
def _celery_retry_redeliver_marker(request: pytest.FixtureRequest) -> None:
    # A test (or a module, with pytestmark) runs with every delivery lost as the marker says.
    marker = request.node.get_closest_marker("redeliver")
    if marker is None:
        return
    worker = request.getfixturevalue("retry_worker")
    try:
        worker.redeliver(*marker.args, **marker.kwargs)
    except UsageError as exc:
        raise UsageError(f"@pytest.mark.redeliver: {exc}") from None
    except TypeError:
        raise UsageError(
            f"@pytest.mark.redeliver{marker.args!r} {marker.kwargs!r}: it takes task=None, "
            "times=1 and when='after_run' or 'during_run', as retry_worker.redeliver()"
        ) from None


def _outage_options(marker: pytest.Mark) -> dict[str, Any]:
    if marker.args:
        raise UsageError(
            f"@pytest.mark.broker_outage{marker.args!r}: pass keywords, e.g. "
            "broker_outage(fail_next=3) or broker_outage(seconds=10)"
        )
    unknown = set(marker.kwargs) - _OUTAGE_KEYS
    if unknown:
        raise UsageError(
            f"@pytest.mark.broker_outage: unknown argument(s) {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(_OUTAGE_KEYS))}"
        )
    down = marker.kwargs.get("down", False)
    if not isinstance(down, bool):
        raise UsageError(
            f"@pytest.mark.broker_outage(down={down!r}): down takes True (down until "
            "flaky_broker.up()) or False"
        )
    flavor = marker.kwargs.get("flavor")
    if flavor is not None and flavor not in FLAVORS:
        raise UsageError(
            f"@pytest.mark.broker_outage(flavor={flavor!r}): choose one of "
            f"{', '.join(map(repr, FLAVORS))}, or leave it out for the app's broker URL's"
        )
    # Present counts, not truthy: seconds=0 is a mistake to report, not an absent option.
    chosen = [key for key in ("fail_next", "seconds") if key in marker.kwargs]
    chosen += ["down"] if down else []
    if len(chosen) > 1:
        raise UsageError(
            f"@pytest.mark.broker_outage: give one of fail_next=, seconds= or down=True, "
            f"not {' and '.join(chosen)}"
        )
    if "on" in marker.kwargs and "fail_next" not in marker.kwargs:
        raise UsageError("@pytest.mark.broker_outage: on= goes with fail_next=")
    if "how" in marker.kwargs and not ("seconds" in marker.kwargs or down):
        raise UsageError(
            "@pytest.mark.broker_outage: how= goes with seconds= or down=True, e.g. "
            "broker_outage(down=True, how='hang')"
        )
    return dict(marker.kwargs)


def _apply_outage(broker: InMemoryBroker, options: dict[str, Any]) -> None:
    # The broker checks the values (one rule for the marker and the methods); the marker is
    # named, since the traceback of a set-up error points into the plugin.
    try:
        if "fail_next" in options:
            broker.fail_next(options["fail_next"], on=options.get("on", "connect"))
        elif "seconds" in options:
            broker.outage(options["seconds"], how=options.get("how", "refuse"))
        elif options.get("down"):
            broker.down(how=options.get("how", "refuse"))
    except UsageError as exc:
        raise UsageError(f"@pytest.mark.broker_outage: {exc}") from None


@pytest.fixture(scope="session")
def fault_explorer(pytestconfig: pytest.Config) -> FaultExplorer:
    """For property-based tests: ``with fault_explorer.example(schedule) as (worker, broker):``
    gives each example a fresh session, worker and in-memory broker (session-scoped, so that
    Hypothesis's ``@given`` may use it)."""
    from .explorer import FaultExplorer

    return FaultExplorer(
        pytestconfig.stash[SETTINGS], str(pytestconfig.getini("celery_retry_app")).strip()
    )


@pytest.fixture
def broker_proxy(
    request: pytest.FixtureRequest, pytestconfig: pytest.Config, celery_retry_app: Any
) -> Iterator[Callable[[str], BrokerProxy]]:
    """Factory: ``broker_proxy("redis")`` or ``("amqp")`` puts a fault proxy in front of that real
    broker and points the app's broker URL at it. Skips when the broker's URL is not given."""
    from .app_state import AppPatch, real_broker_apps
    from .proxy import BrokerProxy

    request.applymarker(pytest.mark.real_broker)
    proxies: list[BrokerProxy] = []
    patches: list[AppPatch] = []

    def make(kind: str) -> BrokerProxy:
        flavor = flavor_for_broker(kind)
        if flavor is None:
            choices = " or ".join(repr(known.broker) for known in FLAVORS.values())
            raise UsageError(f"broker_proxy({kind!r}): choose {choices}")
        variable = flavor.url_variable
        url = pytestconfig.getoption(f"celery_retry_{kind}_url") or os.environ.get(variable)
        if not url:
            pytest.skip(
                f"no real {kind} broker: set {variable} (or --celery-retry-{kind}-url), "
                f"e.g. {variable}={flavor.example_url}"
            )
        proxy = BrokerProxy(url, seed=pytestconfig.stash[SETTINGS].seed)
        proxies.append(proxy)
        proxy.start()
        if not patches:
            patches.append(AppPatch(celery_retry_app))
        patches[0].install_broker(proxy.url)
        # The one app the in-memory fixtures let out: the test asked for this broker.
        real_broker_apps.add(celery_retry_app)
        return proxy

    try:
        yield make
    finally:
        try:
            for patch in patches:
                real_broker_apps.discard(patch.app)
                patch.restore()
        finally:
            for proxy in proxies:
                proxy.close()


__getattr__ = moved_names(
    __name__,
    {
        "DEFAULT_SEED": ("pytest_celery_retry.session.Settings().seed", lambda: _DEFAULTS.seed),
        "DEFAULT_MAX_ATTEMPTS": (
            "pytest_celery_retry.session.Settings().max_attempts",
            lambda: _DEFAULTS.max_attempts,
        ),
    },
)
