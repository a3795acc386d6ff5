"""The scripts in examples/ run as shipped (in-process, with fewer steps) and do what they say."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_trl_dpo_example_trains_and_prints_trl_metrics(capsys, tmp_path):
    pytest.importorskip("trl", reason="the [trl] extra is not installed")
    script = runpy.run_path(str(EXAMPLES / "trl_dpo.py"), run_name="example")
    last = script["main"](["--steps", "15", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in ("rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/chosen", "entropy", "loss"):
        assert f"'{name}'" in printed, name  # the trainer's metrics rows
    assert "after 15 steps: rewards/accuracies" in printed
    # the preference (red over other colors) is learned: the margin grows and most pairs are ranked right
    assert last["rewards/margins"] > 0.1 and last["rewards/accuracies"] >= 0.75


def test_dpo_training_step_example_learns_the_preference(capsys):
    pytest.importorskip("transformers", reason="the example builds its model with transformers")
    script = runpy.run_path(str(EXAMPLES / "dpo_training_step.py"), run_name="example")
    last = script["main"](["--steps", "20"])
    printed = capsys.readouterr().out
    assert "step   1: loss 0.6931" in printed  # policy == reference: the margin starts at exactly 0
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0.5
    # what the pairs teach reaches generation: the first image token moves to the prompt's color
    assert last["color_share/policy"] > last["color_share/reference"] + 0.1
