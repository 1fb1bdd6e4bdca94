"""Settings of the example shop: only what a Django project with Celery needs."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "django-insecure-example-only"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = ["orders"]
ROOT_URLCONF = "shop.urls"
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

# Celery reads these through app.config_from_object("django.conf:settings", namespace="CELERY").
# kombu's in-memory transport lets the example run without RabbitMQ or Redis. In your project
# this is your amqp:// or redis:// URL: in tests the plugin installs its own in-memory broker
# either way, and imitates the errors of the transport the URL names (memory:// counts as
# RabbitMQ, Celery's default).
CELERY_BROKER_URL = "memory://"
# What .delay() does when the broker is away: 4 tries, 3 s, 4 s and 5 s apart.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 3,
    "interval_step": 1,
    "interval_max": 6,
}
