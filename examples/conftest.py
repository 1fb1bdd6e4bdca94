# The Django project has its own settings and pytest.ini: run it with `pytest examples/django_shop`.
# Its docs page, django.md, runs there too.
collect_ignore = ["django_shop", "tests/docs/django.md"]
# The Python blocks of README.md and docs/ (tests/README.md, tests/docs/) run as tests here.
pytest_plugins = ["docs_blocks"]
