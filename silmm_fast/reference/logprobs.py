"""Readable references for the log-prob ops: materialize log_softmax, gather, mask. Same signatures as the fast ops."""

from __future__ import annotations

import torch

from silmm_fast.ops._common import acc_dtype


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Per-token log p(label) under softmax(logits); 0 where ``labels == ignore_index``.

    Equivalent to: ``log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]`` with ignored positions 0.
    logits [..., V] floating; labels [...] integer. Returns [...] float32 (float64 for float64 logits).
    Memory: a full fp32 copy of the logits plus its log_softmax.
    """
    logp = torch.log_softmax(logits.to(acc_dtype(logits.dtype)), dim=-1)
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    picked = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked))


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "sum"
) -> torch.Tensor:
    """Per-sequence log-likelihood: sum (or mean over non-ignored tokens) of ``gather_logprobs`` along T.

    Equivalent to: ``gather_logprobs(logits, labels).sum(-1)``, or that divided by the number of non-ignored tokens
    (a sequence without any gives 0). logits [B, T, V]; labels [B, T]. Returns [B] float32 (float64 for float64).
    """
    per_token = gather_logprobs(logits, labels, ignore_index=ignore_index)
    total = per_token.sum(-1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(-1)
    return total / count.clamp(min=1).to(total.dtype)
