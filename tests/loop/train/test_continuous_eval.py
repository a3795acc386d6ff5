"""The continuous loop's held-out evaluation on a stub model whose images are known: the deterministic decode scores
exactly the model's dropout-free features, one image per prompt; the DropDiv decode scores the samples drawn under
dropout."""

import torch
from torch import nn

from silmm_fast.loop.adapters import ModelSpec
from silmm_fast.loop.train import config, phases
from silmm_fast.loop.train.distributed import Dist
from silmm_fast.loop.train.loop import HELDOUT_SEED
from silmm_fast.loop.world import FeatureCodec, canonical_scene, parse_prompt, prompt_split


class StubFeatureModel(nn.Module):
    """Each prompt's features are its canonical scene's codec features (every constraint met) when its MLP's output
    is kept; when DropDiv zeroes that output, an empty image (no constraint met). The MLP is a constant 1 per row."""

    def __init__(self) -> None:
        super().__init__()
        self.codec = FeatureCodec()
        self.mlp = nn.Identity()
        self.calls: list[int] = []

    def dropdiv_mlps(self) -> list[nn.Module]:
        return [self.mlp]

    def generate_features(self, prompts, n_samples=1):
        self.calls.append(n_samples)
        rows = [p for p in prompts for _ in range(n_samples)]
        keep = self.mlp(torch.ones(len(rows), 1, 1))  # DropDiv scales kept rows by 1/(1-p) and zeroes the others
        good = torch.stack([self.codec.encode(canonical_scene(parse_prompt(p))) for p in rows])
        feats = torch.where(keep > 0, good, torch.zeros_like(good))
        return feats.view(len(prompts), n_samples, *good.shape[1:])


def evaluate(tmp_path, decode: str, model) -> dict:
    """The loop's held-out evaluation of ``model`` (iteration 0, one process) under ``eval.decode``."""
    cfg = config.from_dict(
        {
            "out": str(tmp_path / decode),
            "mode": "continuous",
            "eval": {"heldout_per_category": 2, "samples": 3, "decode": decode},
            "sample": {"dropdiv_p": 0.5},
        }
    ).validate()
    heldout = prompt_split(HELDOUT_SEED, cfg.eval.heldout_per_category)["heldout"]
    return phases.evaluate(cfg, Dist(), 0, model, heldout, ModelSpec(variant="continuous"))


def test_deterministic_decode_scores_the_dropout_free_features_once_per_prompt(tmp_path):
    model = StubFeatureModel()
    result = evaluate(tmp_path, "deterministic", model)
    assert model.calls and set(model.calls) == {1}
    assert result["overall"]["n_prompts"] == 12  # 2 held-out prompts x 6 categories, one image each
    assert result["overall"]["all_constraints"] == 1.0


def test_dropdiv_decode_scores_samples_drawn_under_dropout(tmp_path):
    model = StubFeatureModel()
    result = evaluate(tmp_path, "dropdiv", model)
    assert set(model.calls) == {3}
    assert result["overall"]["n_prompts"] == 36  # 12 prompts x 3 samples
    # at p = 0.5 about half the samples keep their one MLP output: every constraint met there, none elsewhere
    assert 0.2 < result["overall"]["all_constraints"] < 0.8
    again = evaluate(tmp_path / "again", "dropdiv", StubFeatureModel())
    assert again == result  # the same masks at every call (common random numbers across iterations)


def test_eval_decode_is_validated():
    import pytest

    with pytest.raises(ValueError, match="eval.decode"):
        config.from_dict({"mode": "continuous", "eval": {"decode": "mean"}}).validate()
