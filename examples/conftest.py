# The Django project and the eager suite have their own settings and pytest.ini: run them with
# `pytest examples/django_shop` and `pytest examples/eager_suite`.
collect_ignore = ["django_shop", "eager_suite"]
