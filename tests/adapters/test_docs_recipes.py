"""docs/adapters.md runs as written: every ```python block is executed, each in a fresh namespace."""
from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "adapters.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_doc_has_the_four_recipes():
    text = DOC.read_text(encoding="utf-8")
    for title in ("Recipe 1", "Recipe 2", "Recipe 3", "Recipe 4"):
        assert f"## {title}" in text
    assert len(BLOCKS) == 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_recipe_block_runs(i, capsys):
    exec(compile(BLOCKS[i], f"docs/adapters.md block {i}", "exec"), {"__name__": f"recipe_{i}"})
