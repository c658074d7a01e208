"""The trainer snippets in the docs are the code tests/integrations runs.

Each ```python block of docs/trainers.md and of the README's "Use it with your trainer" section
must appear, line for line (indentation and blank lines aside), in one test file of this
folder, so a snippet cannot drift from what is tested.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def code_lines(text: str) -> list[str]:
    """Non-blank lines without indentation or a trailing lint marker."""
    lines = (re.sub(r"\s+# noqa.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def contains_run(haystack: list[str], needle: list[str]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


TEST_SOURCES = {path.name: code_lines(path.read_text()) for path in HERE.glob("test_*.py")
                if path.name != Path(__file__).name}
TRAINERS_BLOCKS = python_blocks((ROOT / "docs" / "trainers.md").read_text())
README_SECTION = re.search(r"^## Use it with your trainer\n(.*?)(?=^## |\Z)", (ROOT / "README.md").read_text(),
                           flags=re.MULTILINE | re.DOTALL)
README_BLOCKS = python_blocks(README_SECTION.group(1)) if README_SECTION else []


def test_every_stack_has_snippets():
    assert len(TRAINERS_BLOCKS) >= 8
    assert len(README_BLOCKS) >= 4  # HF Trainer, Lightning, Flax NNX, Equinox


@pytest.mark.parametrize("block", TRAINERS_BLOCKS + README_BLOCKS, ids=lambda block: code_lines(block)[0][:40])
def test_snippet_is_a_run_of_test_lines(block):
    snippet = code_lines(block)
    found_in = [name for name, lines in TEST_SOURCES.items() if contains_run(lines, snippet)]
    assert found_in, f"no test in {HERE} contains this snippet line for line:\n{block}"
