"""examples/docs_blocks.py: the docs' Python blocks run as tests, and a broken one fails CI."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

PAGE = """# A page

```python
def test_passes():
    assert 1 + 1 == 2
```

<!-- skip: next "a signature" -->

```python
run = retry_worker.apply(task, *, max_attempts=None)
```

```python
def helper():
    return 3


def test_fails():
    assert helper() == 4
```

```python
from proj.tasks import no_such_task
```

```text
not Python
```
"""


def test_each_block_is_a_test_module_and_a_broken_one_fails(pytester: pytest.Pytester) -> None:
    pytest.importorskip("sybil")
    pytester.makeini(f"[pytest]\npythonpath = {EXAMPLES}\ntestpaths = tests\n")
    pytester.makeconftest('pytest_plugins = ["docs_blocks"]')
    pytester.mkdir("tests")
    (pytester.path / "tests" / "page.md").write_text(PAGE)

    result = pytester.runpytest("-p", "no:randomly", "--continue-on-collection-errors")

    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            # An import that fails is a collection error that says what to do.
            "*the block at page.md:23 does not run as written (mark a block that is not "
            'meant to run with <!-- skip: next "why" -->)*',
            "*tests/page.md:24: in <module>",
            "*ImportError: cannot import name 'no_such_task'*",
            # A failure points at the page's own line, with pytest's assertion message.
            "*assert 3 == 4*",
            "tests/page.md:20: AssertionError",
        ]
    )
    assert result.ret != 0
    # The block the comment skips is not collected: no SyntaxError from its signature.
    assert "SyntaxError" not in result.stdout.str()
