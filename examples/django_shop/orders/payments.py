"""Stands in for the payment provider's HTTP client."""


class GatewayUnavailable(Exception):
    """A 503 from the payment provider: worth retrying."""


class PaymentGateway:
    """The first ``failures`` charges get a 503, the next ones go through."""

    def __init__(self) -> None:
        self.failures = 0
        self.calls = 0

    def charge(self, order_id: int, amount_cents: int) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise GatewayUnavailable(f"503 Service Unavailable (call {self.calls})")
        return f"ch_{order_id}_{amount_cents}"


gateway = PaymentGateway()
