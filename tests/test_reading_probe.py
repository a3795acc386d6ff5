"""scripts/reading_probe.py: the VQA-only training probe runs, reports what it says, and refuses bad switches."""

import importlib.util
from pathlib import Path

import pytest
import torch

from silmm_fast.world import ImageTokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reading_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("reading_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_trains_and_reports_per_kind(probe, tmp_path):
    out = tmp_path / "probe.jsonl"
    args = ["--steps", "3", "--batch", "4", "--eval-every", "2", "--eval-items", "60", "--out", str(out)]
    reports = probe.main(args + ["--order", "question-first", "--image-embedding", "word-tied", "--cell-targets"])
    assert [r["step"] for r in reports] == [2, 3]
    last = reports[-1]
    assert 0 <= last["accuracy"] <= 1 and 0 <= last["cell_accuracy"] <= 1 and last["loss"] > 0
    assert set(last) >= {"exists", "relation", "count"}  # 60 items of all kinds cover every kind
    rows = out.read_text().splitlines()
    assert len(rows) == 2 and '"order": "question-first"' in rows[0]
    only = probe.main(["--steps", "1", "--batch", "2", "--eval-items", "20", "--questions", "count"])
    assert set(only[-1]) == {"step", "seconds", "loss", "accuracy", "count"}


def test_word_tied_image_embedding_adds_the_attribute_words(probe):
    p = probe.Probe(probe.parse_args(["--image-embedding", "word-tied", "--eval-items", "1"]))
    v, tokenizer = p.v, ImageTokenizer()
    embed = p.model.lm.model.embed_tokens
    red_circle = tokenizer.token_of("circle", "red", "striped")
    ids = torch.tensor([[v.token_id("red"), v.image_offset + red_circle, v.image_offset + tokenizer.EMPTY]])
    out = embed(ids)[0]
    table = embed.base.weight
    assert torch.equal(out[0], table[v.token_id("red")])  # words are untouched
    expected = table[v.image_offset + red_circle] + sum(table[v.token_id(w)] for w in ("circle", "red", "striped"))
    torch.testing.assert_close(out[1], expected)
    assert torch.equal(out[2], table[v.image_offset])  # the empty cell gets nothing added


def test_cell_embedding_adds_each_image_token_its_cell(probe):
    p = probe.Probe(probe.parse_args(["--cell-embedding", "--eval-items", "1"]))
    v = p.v
    embed = p.model.lm.model.embed_tokens
    empty = v.image_offset  # the same image token in cells 0, 1 and 2, after two text tokens
    ids = torch.tensor([[v.bos, v.img, empty, empty, empty, v.img_close]])
    out = embed(ids)[0]
    table, cells = embed.base.weight, embed.cells.weight
    assert torch.equal(out[0], table[v.bos]) and torch.equal(out[5], table[v.img_close])
    for cell in range(3):
        torch.testing.assert_close(out[2 + cell], table[empty] + cells[cell])
    assert not torch.equal(out[2], out[3])


def test_probe_bad_switches(probe, capsys):
    with pytest.raises(SystemExit):
        probe.parse_args(["--cell-targets"])
    assert "--cell-targets: needs --order question-first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.parse_args(["--steps", "0"])
    assert "--steps: expected a positive int, got 0" in capsys.readouterr().err
