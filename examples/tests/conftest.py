import pytest
from proj.tasks import rates_api as exchange_rate_api


@pytest.fixture(autouse=True)
def rates_api():
    """The fake exchange-rate API, up at the start of every test."""
    exchange_rate_api.down = False
    return exchange_rate_api
