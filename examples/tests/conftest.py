import pytest
from proj.tasks import rates_api


@pytest.fixture(autouse=True)
def _reset_rates_api():
    """The fake HTTP client counts calls: every test starts with a fresh count."""
    rates_api.calls = 0
