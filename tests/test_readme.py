"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the API; the
README stays a user's document within its line budget, and the documents point only at files inside the
repository.

A block runs in a fresh namespace, in a temporary working directory, with the deprecated import paths of the loop
(``silmm_fast.train``, ``silmm_fast.adapters``, ...) turned into errors. A block that needs something the README
cannot define (a model checkpoint on disk) is preceded by ``<!-- readme-test: skip (reason) -->`` and reported as
skipped with that reason."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250  # narrative, sweeps and history belong in docs/
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, ROOT / "CHANGELOG.md", *DOCS]
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\s*$")


def python_blocks(doc: Path = README) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for each ```python block of ``doc``."""
    lines = doc.read_text().splitlines()
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
# the python blocks of docs/ run too, under the same rules: docs/<name>.md:<line>
DOC_BLOCKS = [(doc, *block) for doc in DOCS for block in python_blocks(doc)]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(line, code, skip, tmp_path, monkeypatch):
    run_block(f"README.md:{line}", code, skip, tmp_path, monkeypatch)


@pytest.mark.parametrize("doc, line, code, skip", DOC_BLOCKS, ids=[f"docs/{b[0].name}:{b[1]}" for b in DOC_BLOCKS])
def test_docs_python_block_runs(doc, line, code, skip, tmp_path, monkeypatch):
    run_block(f"docs/{doc.name}:{line}", code, skip, tmp_path, monkeypatch)


def run_block(where: str, code: str, skip: str | None, tmp_path: Path, monkeypatch) -> None:
    if skip:
        pytest.skip(skip)
    if "integrations.trl" in code:
        pytest.importorskip("trl", reason="the [trl] extra is not installed")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        # the loop's old import paths still work but warn: the documents show only the current ones
        warnings.filterwarnings("error", message=r"silmm_fast\.\S+ moved to ", category=FutureWarning)
        exec(compile(code, where, "exec"), {"__name__": "readme_block"})


def test_the_readme_fits_its_line_budget():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines, more than {MAX_LINES}: move narrative to docs/"


def test_the_readme_keeps_the_generated_performance_section():
    text = README.read_text()
    begin, end = text.find("<!-- perf:begin -->"), text.find("<!-- perf:end -->")
    assert 0 <= begin < end, "the markers bench/readme_table.py writes between are missing or out of order"
    assert "| op | case |" in text[begin:end]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=[str(d.relative_to(ROOT)) for d in DOCUMENTS])
def test_documents_link_only_to_files_in_the_repository(doc):
    text = doc.read_text()
    for outside in ("SPEC.md", "../shared", "/work/"):
        assert outside not in text, f"{doc.name} refers to {outside!r}, which is not part of the repository"
    for target in re.findall(r"\]\(([^)#\s]+)", text):  # markdown links [text](target)
        if "://" not in target:
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
