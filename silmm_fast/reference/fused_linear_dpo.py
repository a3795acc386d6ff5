"""Readable reference of the fused DPO head: materialize the logits, take sequence log-probs, apply the DPO loss."""

from __future__ import annotations

import torch

from silmm_fast.losses.dpo import dpo_loss
from silmm_fast.reference.fused_linear_logprobs import fused_linear_logprobs


def fused_linear_dpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "sum",
    nll_weight: float = 0.0,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, losses [B], chosen_logps [B], rejected_logps [B])`` of the policy ``hidden`` [2B, T, H] (B chosen
    rows, then B rejected) under the head ``weight`` [V, H] / ``bias``: the full [2B, T, V] logits, their sequence
    log-probs, ``dpo_loss`` per pair, minus ``nll_weight`` × each chosen sequence's log-prob per scored token.
    ``chunk_bytes`` is accepted for the same signature and ignored. Plain autograd; memory O(B·T·V)."""
    logps = fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction)
    pairs = hidden.shape[0] // 2
    chosen, rejected = logps[:pairs], logps[pairs:]
    losses = dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                      label_smoothing=label_smoothing).losses  # fmt: skip
    if nll_weight:
        scored = (labels[:pairs] != ignore_index).sum(-1).clamp(min=1)
        per_token = chosen if reduction == "mean" else chosen / scored.to(chosen.dtype)
        losses = losses - nll_weight * per_token.to(losses.dtype)
    return losses.mean(), losses, chosen.detach(), rejected.detach()
