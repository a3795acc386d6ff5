"""evals/reading_probe.py: the VQA-only training probe runs, reports what it says, and refuses bad switches."""

import importlib.util
from pathlib import Path

import pytest

from silmm_fast.loop.models.image_embedding import ImageEmbedding

SCRIPT = Path(__file__).resolve().parents[2] / "evals" / "reading_probe.py"


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
    only = probe.main(["--steps", "1", "--batch", "2", "--eval-items", "20", "--questions", "count", "--count-targets"])
    assert set(only[-1]) == {"step", "seconds", "loss", "accuracy", "count"}


def test_probe_switches_install_the_library_image_embedding(probe):
    p = probe.Probe(probe.parse_args(["--image-embedding", "word-tied", "--cell-embedding", "--eval-items", "1"]))
    embed = p.model.lm.model.embed_tokens
    assert isinstance(embed, ImageEmbedding) and embed.words is not None and embed.cells is not None
    plain = probe.Probe(probe.parse_args(["--eval-items", "1"]))
    assert not isinstance(plain.model.lm.model.embed_tokens, ImageEmbedding)


def test_probe_bad_switches(probe, capsys):
    with pytest.raises(SystemExit):
        probe.parse_args(["--cell-targets"])
    assert "--cell-targets: needs --order question-first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.parse_args(["--steps", "0"])
    assert "--steps: expected a positive int, got 0" in capsys.readouterr().err
