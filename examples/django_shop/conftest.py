# The Python blocks of docs/django.md (tests/django.md) run as tests here, with these settings.
pytest_plugins = ["docs_blocks"]
