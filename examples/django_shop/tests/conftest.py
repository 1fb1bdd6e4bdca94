import pytest
from orders.payments import gateway as payment_gateway


@pytest.fixture(autouse=True)
def gateway():
    """The fake payment gateway, up at the start of every test: set ``down`` to get 503s."""
    payment_gateway.down = False
    return payment_gateway
