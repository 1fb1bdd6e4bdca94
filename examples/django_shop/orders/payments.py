"""Stands in for the payment provider's HTTP client."""


class GatewayUnavailable(Exception):
    """A 503 from the payment provider: worth retrying."""


class PaymentGateway:
    """A 503 for every charge while the provider is down."""

    def __init__(self) -> None:
        self.down = False

    def charge(self, order_id: int, amount_cents: int) -> str:
        if self.down:
            raise GatewayUnavailable("503 Service Unavailable")
        return f"ch_{order_id}_{amount_cents}"


gateway = PaymentGateway()
