"""Bad input across the public ops: one table, each row asserting the error type and that the message names the
argument; then the op edge cases of issue 26 (empty KC-DPO batch, meta tensors, noise with a generator)."""

from __future__ import annotations

import re

import pytest
import torch

import silmm_fast as sf

INF, NAN = float("inf"), float("nan")


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _lp():  # four per-pair log-probs for dpo_loss
    return [_t(3) for _ in range(4)]


def _feats(B=2, L=3, D=4):  # policy, reference, chosen, rejected for kc_dpo_loss
    return [torch.randn(B, L, D) for _ in range(4)]


LONG = dict(dtype=torch.long)

# (id, call, error type, the argument the message must name)
CASES = [
    # gather_logprobs / sequence_logprobs
    ("gather-int-logits", lambda: sf.gather_logprobs(_t(2, 5, **LONG), _t(2, **LONG)), TypeError, "logits"),
    ("gather-float-labels", lambda: sf.gather_logprobs(_t(2, 5), _t(2)), TypeError, "labels"),
    ("gather-label-shape", lambda: sf.gather_logprobs(_t(2, 5), _t(3, **LONG)), ValueError, "labels"),
    ("gather-label-range", lambda: sf.gather_logprobs(_t(2, 5), torch.tensor([0, 5])), ValueError, "labels"),
    ("gather-ignore-index", lambda: sf.gather_logprobs(_t(2, 5), _t(2, **LONG), ignore_index="x"), TypeError,
     "ignore_index"),
    ("gather-device", lambda: sf.gather_logprobs(_t(2, 5), _t(2, **LONG, device="meta")), ValueError, "labels"),
    ("sequence-reduction", lambda: sf.sequence_logprobs(_t(1, 2, 5), _t(1, 2, **LONG), reduction="max"), ValueError,
     "reduction"),
    ("sequence-rank", lambda: sf.sequence_logprobs(_t(2, 5), _t(2, **LONG)), ValueError, "logits"),
    # fused_linear_logprobs
    ("fused-int-hidden", lambda: sf.fused_linear_logprobs(_t(1, 2, 4, **LONG), _t(5, 4), _t(1, 2, **LONG)), TypeError,
     "hidden"),
    ("fused-weight-width", lambda: sf.fused_linear_logprobs(_t(1, 2, 4), _t(5, 3), _t(1, 2, **LONG)), ValueError,
     "weight"),
    ("fused-bias-shape", lambda: sf.fused_linear_logprobs(_t(1, 2, 4), _t(5, 4), _t(1, 2, **LONG), bias=_t(4)),
     ValueError, "bias"),
    ("fused-reduction", lambda: sf.fused_linear_logprobs(_t(1, 2, 4), _t(5, 4), _t(1, 2, **LONG), reduction="avg"),
     ValueError, "reduction"),
    # dpo_loss / DPOLoss / FusedLinearDPOLoss settings: finite numbers only
    ("dpo-beta-inf", lambda: sf.dpo_loss(*_lp(), beta=INF), ValueError, "beta"),
    ("dpo-beta-nan", lambda: sf.dpo_loss(*_lp(), beta=NAN), ValueError, "beta"),
    ("dpo-beta-str", lambda: sf.dpo_loss(*_lp(), beta="0.1"), ValueError, "beta"),
    ("dpo-smoothing-nan", lambda: sf.dpo_loss(*_lp(), label_smoothing=NAN), ValueError, "label_smoothing"),
    ("dpo-smoothing-inf", lambda: sf.dpo_loss(*_lp(), label_smoothing=INF), ValueError, "label_smoothing"),
    ("dpo-loss-type", lambda: sf.dpo_loss(*_lp(), loss_type="kto"), ValueError, "loss_type"),
    ("dpo-shape", lambda: sf.dpo_loss(_t(3), _t(2), _t(3), _t(3)), ValueError, "policy_rejected_logps"),
    ("dpo-empty", lambda: sf.dpo_loss(*[_t(0)] * 4), ValueError, "policy_chosen_logps"),
    ("DPOLoss-beta-inf", lambda: sf.DPOLoss(beta=INF), ValueError, "beta"),
    ("FusedLinearDPOLoss-beta-nan", lambda: sf.FusedLinearDPOLoss(beta=NAN), ValueError, "beta"),
    # kc_dpo_loss / KCDPOLoss
    ("kc-gamma-inf", lambda: sf.kc_dpo_loss(*_feats(), gamma=INF), ValueError, "gamma"),
    ("kc-gamma-nan", lambda: sf.kc_dpo_loss(*_feats(), gamma=NAN), ValueError, "gamma"),
    ("kc-sigma-inf", lambda: sf.kc_dpo_loss(*_feats(), kernel="rbf", sigma=INF), ValueError, "sigma"),
    ("kc-sigma-nan", lambda: sf.kc_dpo_loss(*_feats(), kernel="rbf", sigma=NAN), ValueError, "sigma"),
    ("kc-empty-batch", lambda: sf.kc_dpo_loss(*_feats(B=0)), ValueError, "policy"),
    ("kc-no-features", lambda: sf.kc_dpo_loss(*_feats(D=0)), ValueError, "policy"),
    ("kc-kernel", lambda: sf.kc_dpo_loss(*_feats(), kernel="l1"), ValueError, "kernel"),
    ("kc-pool", lambda: sf.kc_dpo_loss(*_feats(), pool="sum"), ValueError, "pool"),
    ("kc-chosen-shape", lambda: sf.kc_dpo_loss(*_feats()[:2], torch.randn(2, 3, 5), _feats()[3]), ValueError,
     "chosen"),
    ("KCDPOLoss-sigma-inf", lambda: sf.KCDPOLoss(sigma=INF), ValueError, "sigma"),
    # pairwise_distance
    ("pd-sigma-inf", lambda: sf.pairwise_distance(_t(1, 2, 3, 4), _t(1, 2, 3, 4), sigma=INF), ValueError, "sigma"),
    ("pd-sigma-nan", lambda: sf.pairwise_distance(_t(1, 2, 3, 4), _t(1, 2, 3, 4), sigma=NAN), ValueError, "sigma"),
    ("pd-sigma-neg-inf", lambda: sf.pairwise_distance(_t(1, 2, 3, 4), _t(1, 2, 3, 4), sigma=-INF), ValueError,
     "sigma"),
    ("pd-rank", lambda: sf.pairwise_distance(_t(2, 3, 4), _t(1, 2, 3, 4)), ValueError, "x"),
    ("pd-dtype", lambda: sf.pairwise_distance(_t(1, 2, 3, 4), _t(1, 2, 3, 4, dtype=torch.float64)), TypeError, "y"),
    # diverse_select
    ("select-n-too-big", lambda: sf.diverse_select(torch.randn(1, 3, 4), 4), ValueError, "n"),
    ("select-n-float", lambda: sf.diverse_select(torch.randn(1, 3, 4), 2.0), TypeError, "n"),
    ("select-method", lambda: sf.diverse_select(torch.randn(1, 3, 4), 2, method="random"), ValueError, "method"),
    ("select-quality-nan", lambda: sf.diverse_select(torch.randn(1, 3, 4), 2, quality=torch.tensor([[1, NAN, 1]])),
     ValueError, "quality"),
    ("select-quality-negative", lambda: sf.diverse_select(torch.randn(1, 3, 4), 2, quality=-torch.ones(1, 3)),
     ValueError, "quality"),
    ("select-int-features", lambda: sf.diverse_select(_t(1, 3, 4, **LONG), 2), TypeError, "features"),
    # sample_tokens
    ("sample-temperature-inf", lambda: sf.sample_tokens(_t(2, 5), temperature=INF), ValueError, "temperature"),
    ("sample-temperature-nan", lambda: sf.sample_tokens(_t(2, 5), temperature=NAN), ValueError, "temperature"),
    ("sample-top-p-inf", lambda: sf.sample_tokens(_t(2, 5), top_p=INF), ValueError, "top_p"),
    ("sample-top-p-nan", lambda: sf.sample_tokens(_t(2, 5), top_p=NAN), ValueError, "top_p"),
    ("sample-cfg-inf", lambda: sf.sample_tokens(_t(2, 5), _t(2, 5), cfg_scale=INF), ValueError, "cfg_scale"),
    ("sample-top-k", lambda: sf.sample_tokens(_t(2, 5), top_k=-1), ValueError, "top_k"),
    ("sample-noise-and-generator", lambda: sf.sample_tokens(_t(2, 5), noise=_t(2), generator=torch.Generator()),
     ValueError, "generator"),
    # decompose_prompt, use_backend
    ("decompose-none", lambda: sf.decompose_prompt(None), TypeError, "prompt"),
    ("decompose-blank", lambda: sf.decompose_prompt(" \u200b ,"), ValueError, "prompt"),
    ("use-backend", lambda: sf.use_backend("cuda").__enter__(), ValueError, "name"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(call, error, argument):
    with pytest.raises(error) as info:
        call()
    assert re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", str(info.value)), str(info.value)


def test_the_table_is_large_and_spans_every_op():
    assert len(CASES) >= 40
    ids = {c[0].split("-")[0] for c in CASES}
    assert {"gather", "sequence", "fused", "dpo", "kc", "pd", "select", "sample", "decompose"} <= ids


# --- op edge cases --------------------------------------------------------------------------------------------------
def test_kc_dpo_loss_empty_batch_raises_like_dpo_loss():
    with pytest.raises(ValueError, match="policy: expected at least one prompt"):
        sf.kc_dpo_loss(*_feats(B=0))
    with pytest.raises(ValueError, match="policy_chosen_logps: expected at least one preference pair"):
        sf.dpo_loss(*[_t(0)] * 4)


def test_sample_tokens_refuses_noise_with_a_generator():
    with pytest.raises(ValueError, match="noise, generator: pass one source of randomness"):
        sf.sample_tokens(torch.randn(2, 5), noise=torch.rand(2), generator=torch.Generator().manual_seed(0))
    # each alone is fine
    assert sf.sample_tokens(torch.randn(2, 5), noise=torch.rand(2)).shape == (2,)
    assert sf.sample_tokens(torch.randn(2, 5), generator=torch.Generator().manual_seed(0)).shape == (2,)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# Meta tensors carry shapes only: every op either computes the output's shape or raises an error naming an argument,
# never "Tensor.item() cannot be called on meta tensors". (fused_linear_logprobs is left to its own module's tests.)
META_CALLS = {
    "gather_logprobs": (lambda: sf.gather_logprobs(_meta(2, 3, 5), _meta(2, 3, dtype=torch.long)), (2, 3)),
    "sequence_logprobs": (lambda: sf.sequence_logprobs(_meta(2, 3, 5), _meta(2, 3, dtype=torch.long)), (2,)),
    "dpo_loss": (lambda: sf.dpo_loss(*[_meta(3) for _ in range(4)]).losses, (3,)),
    "kc_dpo_loss": (lambda: sf.kc_dpo_loss(*[_meta(2, 3, 4) for _ in range(4)]).losses, (2,)),
    "pairwise_distance": (lambda: sf.pairwise_distance(_meta(2, 2, 3, 4), _meta(2, 3, 3, 4), kernel="rbf"), (2, 2, 3)),
    "diverse_select": (lambda: sf.diverse_select(_meta(2, 5, 4), 2), (2, 2)),
    "diverse_select_fps": (lambda: sf.diverse_select(_meta(2, 5, 3, 4), 2, method="fps"), (2, 2)),
    "diverse_select_quality": (lambda: sf.diverse_select(_meta(2, 5, 4), 2, quality=_meta(2, 5)), (2, 2)),
    "sample_tokens": (lambda: sf.sample_tokens(_meta(2, 5), noise=_meta(2)), (2,)),
}


@pytest.mark.parametrize("name", list(META_CALLS))
def test_meta_tensors_give_shapes_not_item_errors(name):
    call, shape = META_CALLS[name]
    out = call()
    assert out.is_meta and tuple(out.shape) == shape
