import pytest
from proj.tasks import rates_api as exchange_rate_api


@pytest.fixture(autouse=True)
def rates_api():
    """The fake exchange-rate API, fresh for every test: its first 2 calls get a 503."""
    exchange_rate_api.failures = 2
    exchange_rate_api.calls = 0
    return exchange_rate_api
