"""A small Celery project whose retry behaviour is tested with pytest-celery-retry."""
