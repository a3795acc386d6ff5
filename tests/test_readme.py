"""Every ```python block of README.md runs, so the documentation cannot drift from the API.

A block runs in a fresh namespace, in a temporary working directory. A block that needs something the README cannot
define (a model checkpoint on disk) is preceded by ``<!-- readme-test: skip (reason) -->`` and reported as skipped
with that reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\s*$")


def python_blocks() -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for each ```python block of the README."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            marker = SKIP.match(lines[i - 1].strip()) if i > 0 else None
            blocks.append((start + 1, "\n".join(lines[start:end]), marker["reason"] if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    if "integrations.trl" in code:
        pytest.importorskip("trl", reason="the [trl] extra is not installed")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme_block"})
