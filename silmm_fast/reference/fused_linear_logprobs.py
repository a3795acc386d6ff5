"""Readable reference of the fused linear head + log-prob gather: materialize the logits, then ``log_softmax``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from silmm_fast.ops._common import acc_dtype
from silmm_fast.reference.logprobs import gather_logprobs, sequence_logprobs


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    """Sequence log-probabilities of ``labels`` under the linear head ``hidden @ weight.T + bias``.

    Equivalent to: ``sequence_logprobs(F.linear(hidden.float(), weight.float(), bias), labels)`` (``"none"``:
    ``gather_logprobs`` of the same logits).
    hidden [B, T, H], weight [V, H], bias [V] or None (floating); labels [B, T] integer. Returns [B] (``"none"``:
    [B, T]) float32, float64 for float64 inputs. Memory: the full [B, T, V] logits and their log_softmax.
    """
    acc = acc_dtype(hidden.dtype)
    logits = F.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    if reduction == "none":
        return gather_logprobs(logits, labels, ignore_index=ignore_index)
    return sequence_logprobs(logits, labels, ignore_index=ignore_index, reduction=reduction)
