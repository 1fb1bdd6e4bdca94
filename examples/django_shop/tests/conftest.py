import pytest
from orders.payments import gateway as payment_gateway


@pytest.fixture(autouse=True)
def gateway():
    """The fake payment gateway, fresh for every test: set ``failures`` to get 503s."""
    payment_gateway.failures = 0
    payment_gateway.calls = 0
    return payment_gateway
