"""The Celery app.

The broker is kombu's in-memory transport so that the example runs on a machine without
RabbitMQ or Redis. In a real project this is your ``amqp://`` or ``redis://`` URL: in tests
the plugin replaces the broker with its own in-memory one either way, and imitates the
errors of the transport your URL names (``memory://`` counts as RabbitMQ, Celery's default).
"""

from celery import Celery

app = Celery("proj", broker="memory://", include=["proj.tasks"])
app.conf.update(
    # What .delay() and .apply_async() use when they publish without their own policy.
    task_publish_retry_policy={
        "max_retries": 3,
        "interval_start": 3,
        "interval_step": 1,
        "interval_max": 6,
    },
)
