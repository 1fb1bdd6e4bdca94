from celery import Celery

# Production settings: the tests switch to eager mode in tests/conftest.py.
app = Celery("billing", broker="redis://127.0.0.1:6379/0", include=["billing.tasks"])
