"""The SILMM loop on a Janus model (``--model janus --model-path DIR``): a tiny random Janus checkpoint written to
disk, one iteration end to end, resume, and the command-line spellings."""

import pytest

from silmm_fast.loop.adapters.random_janus import random_janus
from silmm_fast.loop.train import config, loop, store


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("janus") / "ckpt"
    random_janus("tiny").save(path)
    return path


def janus_config(out, path, **overrides) -> config.TrainConfig:
    data = {
        "out": str(out),
        "iterations": 1,
        "model": {"name": "janus", "path": str(path), "cfg_scale": 3.0},
        "sample": {"prompts_per_category": 1, "candidates": 2, "chunk": 4},
        "pairs": {"min_margin": 0.0},
        "optim": {"epochs": 1, "batch_size": 2},
        "eval": {"heldout_per_category": 1, "samples": 1},
        **overrides,
    }
    return config.from_dict(data).validate()


def test_one_janus_iteration(tmp_path, checkpoint):
    run_dir = tmp_path / "run"
    summary = loop.run(janus_config(run_dir, checkpoint))
    assert summary["model"] == "janus" and "not ground truth" in summary["evaluator"]
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    prompts = store.read_jsonl(run_dir / "iter1" / "prompts.jsonl")
    assert len(prompts) == 6 and {r["source"] for r in prompts} <= {"model", "template"}
    questions = store.read_jsonl(run_dir / "iter1" / "questions.jsonl")
    assert all(r["questions"] and r["source"] in ("model", "rules") for r in questions)
    tokens = store.read_tensors(run_dir / "iter1" / "candidates.pt")["tokens"]
    assert tokens.shape == (6, 2, 16)
    assert (run_dir / "iter1" / "candidates.png").is_file()
    assert (run_dir / "iter1" / "checkpoint" / "model.safetensors").is_file()
    again = loop.run(janus_config(run_dir, checkpoint))  # resumes: nothing left to do
    assert again["iterations"] == summary["iterations"]


def test_janus_config_and_flags(tmp_path, checkpoint):
    cfg = config.parse_args(["--model", "janus", "--model-path", str(checkpoint), "--out", str(tmp_path)])
    assert (cfg.model.name, cfg.model.path) == ("janus", str(checkpoint))
    with pytest.raises(ValueError, match="model.path"):
        config.parse_args(["--model", "janus"])
    with pytest.raises(ValueError, match="config mode: expected 'discrete'"):
        config.parse_args(["--model", "janus", "--model-path", str(checkpoint), "--mode", "continuous"])
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        loop.run(janus_config(tmp_path / "run", tmp_path))
