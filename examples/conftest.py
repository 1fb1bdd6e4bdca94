# The Django project and the eager suite have their own settings and pytest.ini: run them with
# `pytest examples/django_shop` and `pytest examples/eager_suite`. django.md runs in the former.
collect_ignore = ["django_shop", "eager_suite", "tests/docs/django.md"]
# The Python blocks of README.md and docs/ (tests/README.md, tests/docs/) run as tests here.
pytest_plugins = ["docs_blocks"]
