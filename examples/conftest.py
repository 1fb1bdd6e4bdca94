# The Django project has its own settings and pytest.ini: run it with `pytest examples/django_shop`.
collect_ignore = ["django_shop"]
