"""Compatibility matrix: the test suite against each supported Celery, pytest and Python.

    nox -l                                    # every session
    nox -t edges                              # the oldest and the newest combination (CI)
    nox -s "tests(python='3.11', celery='5.3', pytest='7')"

Only the Python versions that run on this machine become sessions, so a plain ``nox`` runs
what can run here instead of failing on a missing interpreter. pyenv puts a shim on PATH for
every installed version, but the shim fails for versions that are not active: expose them
first, e.g. ``PYENV_VERSION=3.11.7:3.9.18:3.13.0 nox``.
"""

from __future__ import annotations

import shutil
import subprocess

import nox

CELERY = ("5.3", "5.4", "5.5", "5.6", "5.7")
PYTEST = ("7", "8", "9")
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
# Releases that declare a newer Python floor than the project's (their requires-python).
NEEDS_PYTHON_310 = {("celery", "5.7"), ("pytest", "9")}
# The oldest combination also pins the other dependencies to pyproject's floors, so that
# those floors are tested rather than only declared.
FLOORS = ("freezegun==1.2.*",)

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _runs(python: str) -> bool:
    executable = shutil.which(f"python{python}")
    if executable is None:
        return False
    probe = subprocess.run([executable, "--version"], capture_output=True, check=False)
    return probe.returncode == 0


def _installable(python: str, celery: str, pytest: str) -> bool:
    old_python = python == "3.9"
    return not (old_python and ({("celery", celery), ("pytest", pytest)} & NEEDS_PYTHON_310))


def _matrix() -> list[nox.param]:
    pythons = [python for python in PYTHONS if _runs(python)]
    if not pythons:
        return []
    oldest = (pythons[0], CELERY[0], PYTEST[0])
    newest = (pythons[-1], CELERY[-1], PYTEST[-1])
    return [
        nox.param(*combination, tags=["edges"] if combination in (oldest, newest) else [])
        for combination in (
            (python, celery, pytest) for python in pythons for celery in CELERY for pytest in PYTEST
        )
        if _installable(*combination)
    ]


@nox.session
@nox.parametrize(("python", "celery", "pytest"), _matrix())
def tests(session: nox.Session, celery: str, pytest: str) -> None:
    """The test suite with one Celery minor, the kombu of the same minor, and one pytest."""
    # Celery accepts any newer kombu 5.x and pip would pick the newest, so the kombu a
    # Celery release was made with is pinned explicitly.
    pins = [f"celery=={celery}.*", f"kombu=={celery}.*", f"pytest=={pytest}.*"]
    if (celery, pytest) == (CELERY[0], PYTEST[0]):
        pins += FLOORS
    # One resolver run, so the pins and the project's own dependencies are satisfied together.
    session.install(".[test]", *pins)
    session.run("python", "-m", "pip", "list", "--format=freeze")
    session.run("python", "-m", "pytest", *session.posargs)
