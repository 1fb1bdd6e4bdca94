"""Tests written the eager way: they pass in eager mode and on the retry worker."""

from unittest import mock

import pytest
from billing.tasks import (
    GatewayTimeout,
    charge,
    gateway,
    outbox,
    place_order,
    reminder,
    send_receipt,
)
from celery.exceptions import Retry


def test_charge_succeeds() -> None:
    assert charge.delay(1).get() == "charged 1"
    assert gateway.charges == [1]


def test_charge_retries_timeouts() -> None:
    gateway.failures = 2
    result = charge.delay(2)
    assert result.state == "SUCCESS"
    assert result.get() == "charged 2"
    assert gateway.charges == [2]


def test_charge_gives_up_after_max_retries() -> None:
    gateway.failures = 10
    result = charge.delay(3)
    assert result.state == "FAILURE"
    assert isinstance(result.result, GatewayTimeout)
    with pytest.raises(GatewayTimeout):
        result.get()


def test_receipt_retries_with_mocked_retry() -> None:
    # The classic idiom: patch retry and check that the task asked for it.
    gateway.failures = 1
    with (
        mock.patch.object(send_receipt, "retry", side_effect=Retry()) as retry,
        pytest.raises(Retry),
    ):
        send_receipt.apply(args=(4,), throw=True)
    retry.assert_called_once_with(countdown=60)
    assert outbox == []


def test_unknown_order_raises() -> None:
    with pytest.raises(ValueError, match="no order -1"):
        place_order.apply(args=(-1,), throw=True)


def test_order_sends_a_receipt() -> None:
    assert place_order.delay(5).get() == "charged 5"
    assert outbox == ["receipt for order 5"]


def test_reminder_in_an_hour() -> None:
    assert reminder.apply_async((6,), countdown=3600).get() == "reminded"
    assert outbox == ["reminder for order 6"]
