"""The shop's retry behaviour with Django's database, tested with pytest-celery-retry.

Nothing here waits: 31 s of backoff or a 7 s broker outage take milliseconds.
"""

from datetime import timedelta

import celery
import pytest
from kombu.exceptions import OperationalError
from orders.models import Order
from orders.payments import GatewayUnavailable
from orders.tasks import charge_order

from pytest_celery_retry import assert_backoff, assert_publish_retries, assert_retried

CELERY_VERSION = tuple(int(part) for part in celery.__version__.split(".")[:2])


# -- the task retries, and each attempt works on the test's database ---------------------------
@pytest.mark.django_db
def test_charge_retries_until_the_gateway_answers(retry_worker, gateway):
    gateway.down = True
    order = Order.objects.create(amount_cents=1999)

    @retry_worker.before_attempt(charge_order, 3)
    def the_gateway_recovers():
        gateway.down = False

    run = retry_worker.apply(charge_order, args=(order.pk,))

    assert run.result == f"ch_{order.pk}_1999"
    assert_retried(run, times=2)
    assert_backoff(run, [1, 2])
    order.refresh_from_db()
    assert order.status == Order.Status.PAID
    assert order.charge_attempts == 3
    assert order.paid_at - order.created_at == timedelta(seconds=3)  # virtual seconds


@pytest.mark.django_db
def test_charge_gives_up_and_leaves_the_order_pending(retry_worker, gateway):
    gateway.down = True  # for good
    order = Order.objects.create(amount_cents=1999)

    run = retry_worker.apply(charge_order, args=(order.pk,))

    assert run.state == "FAILURE"
    assert isinstance(run.exception, GatewayUnavailable)
    assert_backoff(run, [1, 2, 4, 8, 16])
    order.refresh_from_db()
    assert order.status == Order.Status.PENDING
    assert order.charge_attempts == 6


# -- views that enqueue once the transaction commits -------------------------------------------
@pytest.mark.django_db
def test_place_order_publishes_only_after_commit(
    client, django_capture_on_commit_callbacks, flaky_broker, retry_worker, gateway
):
    gateway.down = True
    retry_worker.before_attempt(charge_order, 2, lambda: setattr(gateway, "down", False))
    # The test runs inside a transaction that never commits: capture the on_commit callbacks.
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post("/orders/", {"amount_cents": 1999})

    assert response.status_code == 202
    assert flaky_broker.messages() == []  # nothing is published before the commit
    [publish] = callbacks
    publish()
    assert [m.task_name for m in flaky_broker.messages()] == ["orders.charge_order"]

    runs = retry_worker.run_until_idle()

    [run] = runs.values()
    assert_backoff(run, [1])
    assert Order.objects.get(pk=response.json()["order"]).status == Order.Status.PAID


@pytest.mark.skipif(CELERY_VERSION < (5, 4), reason="Task.delay_on_commit is new in Celery 5.4")
@pytest.mark.django_db
def test_retry_charge_uses_delay_on_commit(
    client, django_capture_on_commit_callbacks, flaky_broker, retry_worker
):
    order = Order.objects.create(amount_cents=500, charge_attempts=6)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/orders/{order.pk}/charge/")

    assert response.status_code == 202
    retry_worker.run_until_idle()
    order.refresh_from_db()
    assert order.status == Order.Status.PAID
    assert order.charge_attempts == 1


# -- a broker outage while the view enqueues ---------------------------------------------------
# transaction=True: the view's transaction really commits, so the on_commit callback publishes
# inside the request, as in production, and the response is what the customer gets.
@pytest.mark.django_db(transaction=True)
def test_place_order_rides_out_a_short_broker_outage(
    client, flaky_broker, retry_worker, celery_retry_clock
):
    flaky_broker.outage(seconds=5)

    response = client.post("/orders/", {"amount_cents": 1999})

    assert response.status_code == 202
    # kombu tried at t=0, 3 and 7 (CELERY_TASK_PUBLISH_RETRY_POLICY): the request took 7 s.
    assert_publish_retries(flaky_broker, attempts=3, intervals=[3, 4], delivered=True)
    assert celery_retry_clock.elapsed == 7
    retry_worker.run_until_idle()
    assert Order.objects.get(pk=response.json()["order"]).status == Order.Status.PAID


@pytest.mark.django_db(transaction=True)
@pytest.mark.broker_outage(down=True)
def test_place_order_fails_after_commit_when_the_broker_stays_down(client, flaky_broker):
    with pytest.raises(OperationalError):
        client.post("/orders/", {"amount_cents": 1999})  # a 500 in production

    # A fresh connection gives up once kombu's connect timeout runs out: 3 tries, t=0, 3, 7.
    assert_publish_retries(flaky_broker, attempts=3, delivered=False)
    assert flaky_broker.messages() == []
    # The order was committed before the publish failed: it stays pending, never charged.
    [order] = Order.objects.all()
    assert order.status == Order.Status.PENDING
