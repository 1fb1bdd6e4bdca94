"""Runs every Python block of the documentation as a test file of an example project.

The pages are in ``tests/`` (symbolic links to README.md and docs/), and each ```python
block on them is collected as a test module of its own, as if it were copied alone into a
file next to the project's other tests: its imports, tasks and fixtures are in the block or
in the project, and pytest runs its tests with their markers, fixtures and assertion
messages. A block whose module cannot even be imported fails the run as a collection error.

Sybil (https://sybil.readthedocs.io) reads the pages: the fences, and the
``<!-- skip: next "why" -->`` comment that marks a block deliberately not run (a signature,
an excerpt, a test that fails on purpose). Neither Sybil nor pytest-markdown-docs can run a
block's test functions with pytest's fixtures, so each block becomes a pytest ``Module``.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import SkipTest

import pytest
from _pytest.assertion.rewrite import rewrite_asserts
from sybil import Document, Example
from sybil.parsers.markdown import CodeBlockParser, SkipParser


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".md":
        return DocsPage.from_parent(parent, path=file_path)
    return None


def runnable_blocks(page: Path) -> list[Example]:
    """The page's Python blocks, in order, without those a skip comment marks."""
    blocks: list[Example] = []
    # Sybil's own skip logic decides, so the comments mean what Sybil documents: the
    # collecting evaluator is only called for a block no skip applies to.
    document = Document.parse(str(page), CodeBlockParser("python", blocks.append), SkipParser())
    for example in document.examples():
        with contextlib.suppress(SkipTest):
            example.evaluate()
    return blocks


class DocsPage(pytest.File):
    def collect(self) -> Iterator[DocsBlock]:
        for block in runnable_blocks(self.path):
            name = f"line{block.line}"
            yield DocsBlock.from_parent(
                self,
                path=self.path,
                name=name,
                nodeid=f"{self.nodeid}::{name}",
                block=block,
            )


class DocsBlock(pytest.Module):
    """One block as a test module: its code starts on the line after the opening fence."""

    def __init__(self, *, block: Example, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block = block

    def _getobj(self) -> types.ModuleType:
        # pytest's Module imports its file; a block has none of its own, so the module is made
        # here, with pytest's assertion rewriting as a test file gets it. The source is padded
        # so that tracebacks and test locations give the page's own line numbers.
        source = "\n" * self.block.line + str(self.block.parsed)
        name = f"docs_{self.path.stem.replace('-', '_')}_line{self.block.line}"
        module = types.ModuleType(name)
        module.__file__ = str(self.path)
        sys.modules[name] = module
        try:
            tree = ast.parse(source, filename=str(self.path))
            rewrite_asserts(tree, source.encode(), str(self.path), self.config)
            exec(compile(tree, str(self.path), "exec", dont_inherit=True), module.__dict__)
        except Exception as exc:
            raise self.CollectError(
                f"the block at {self.path.name}:{self.block.line} does not run as written "
                '(mark a block that is not meant to run with <!-- skip: next "why" -->):\n'
                f"{pytest.ExceptionInfo.from_current().getrepr(style='short')}"
            ) from exc
        return module
