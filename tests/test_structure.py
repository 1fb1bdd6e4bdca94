"""The package's shape: one class per broker flavour, the public names, the moved ones."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import pytest_celery_retry

PACKAGE = Path(pytest_celery_retry.__file__).parent


def test_a_new_flavour_is_one_class(pytester: pytest.Pytester) -> None:
    # The checklist of docs/architecture.md: the class alone makes the flavour work with the
    # broker, its transport, the worker and the plugin's marker.
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery
        from pytest_celery_retry import assert_retried
        from pytest_celery_retry.flavors import FLAVORS, Flavor, flavor_for_url


        class Refused(Exception):
            pass


        class Fake(Flavor):
            name = "fake"
            broker = "fakemq"
            schemes = {"fake": 7777}
            proxy_schemes = ()
            url_variable = "CELERY_RETRY_FAKEMQ_URL"
            example_url = "fake://127.0.0.1:7777/"

            def real_transport(self):
                from kombu.transport import memory

                class Declared(memory.Transport):
                    connection_errors = (Refused,)
                    recoverable_connection_errors = (Refused,)

                return Declared

            def error(self, kind, address):
                return Refused(f"{kind} refused by {address}")


        app = Celery("fake", broker="fake://mq.example", set_as_current=False)


        @app.task(name="poll", bind=True, max_retries=2)
        def poll(self):
            if self.request.retries < 2:
                raise self.retry(countdown=5)
            return "done"


        @pytest.fixture
        def celery_retry_app():
            return app


        def test_chosen_by_its_scheme():
            assert flavor_for_url("fake://mq.example") is FLAVORS["fake"]


        @pytest.mark.broker_outage(fail_next=1, on="publish", flavor="fake")
        def test_its_errors_are_retried(retry_worker, flaky_broker):
            run = retry_worker.apply(poll)
            assert run.state == "SUCCESS"
            assert_retried(run, times=2)
            [failed] = [op for op in flaky_broker.operations if not op.ok]
            assert repr(failed.error) == "Refused('publish refused by mq.example:7777')"
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_no_module_but_flavors_compares_flavour_names() -> None:
    name = r"[\"'](pyamqp|redis|amqp)[\"']"
    comparison = re.compile(rf"(==|!=)\s*{name}|{name}\s*(==|!=)")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "flavors.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if comparison.search(line)
    ]
    assert found == []


def test_the_types_users_meet_are_exported() -> None:
    from pytest_celery_retry import records, worker

    for name in ("ConnectionAttempt", "MessageEvent", "ProxyEvent", "Redelivery", "UnackedMessage"):
        assert getattr(pytest_celery_retry, name) is getattr(records, name)
    assert pytest_celery_retry.ArgumentEncodeError is worker.ArgumentEncodeError
    for name in pytest_celery_retry.__all__:
        assert getattr(pytest_celery_retry, name) is not None


def test_redeliveries_are_records_that_still_unpack(
    retry_worker: Any, flaky_broker: Any, app: Any
) -> None:
    @app.task(name="late", bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)
    def late(self: Any) -> str:
        return "done"

    retry_worker.crash_during(late)
    run = retry_worker.apply(late)
    assert run.state == "SUCCESS"
    [redelivery] = flaky_broker.redeliveries
    assert tuple(redelivery) == (redelivery.t, run.task_id, "late")
    assert redelivery.task_name == "late"


@pytest.mark.parametrize(
    ("module", "name", "new"),
    [
        ("broker", "VisibilityTimeout", "flavors.VisibilityTimeout"),
        ("broker", "FLAVORS", "flavors.FLAVORS"),
        ("broker", "flavor_for_url", "flavors.flavor_for_url"),
        ("broker", "CONSUMER_ROLE_OPTION", "transport.CONSUMER_ROLE_OPTION"),
        ("proxy", "URL_VARIABLES", "url_variable"),
        ("proxy", "AttemptOutcome", "records.ConnectionOutcome"),
        ("proxy", "broker_kind", "flavor_for_proxy"),
        ("plugin", "DEFAULT_SEED", "Settings().seed"),
        ("plugin", "DEFAULT_MAX_ATTEMPTS", "Settings().max_attempts"),
    ],
)
def test_moved_names_still_work_with_a_warning(module: str, name: str, new: str) -> None:
    import importlib

    imported = importlib.import_module(f"pytest_celery_retry.{module}")
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        value = getattr(imported, name)
    assert value is not None


def test_old_values_of_moved_names() -> None:
    from pytest_celery_retry import broker, plugin, proxy

    with pytest.warns(DeprecationWarning):
        assert broker.FLAVORS == ("pyamqp", "redis")
        assert broker.flavor_for_url("rediss://cache") == "redis"
        assert proxy.URL_VARIABLES == {
            "amqp": "CELERY_RETRY_AMQP_URL",
            "redis": "CELERY_RETRY_REDIS_URL",
        }
        assert proxy.broker_kind("pyamqp://host") == "amqp"
        assert (plugin.DEFAULT_SEED, plugin.DEFAULT_MAX_ATTEMPTS) == (1234, 1000)


def test_renamed_methods_warn(retry_worker: Any, app: Any) -> None:
    from pytest_celery_retry.proxy import BrokerProxy

    run = retry_worker.apply(app.tasks["foo.task"])
    with pytest.warns(DeprecationWarning, match="task_run"):
        assert retry_worker.run(run.task_id) is retry_worker.task_run(run.task_id)
    proxy = BrokerProxy("redis://127.0.0.1:6379/0")
    with pytest.warns(DeprecationWarning, match="BrokerProxy.connections"):
        assert proxy.connection_attempts == proxy.connections == []


def test_pytest_mock_is_no_dependency() -> None:
    # Nothing in the package uses it, and a dependency's plugin loads into every user's run.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("pytest-mock")]
    assert not [p.name for p in PACKAGE.glob("*.py") if "pytest_mock" in p.read_text()]
