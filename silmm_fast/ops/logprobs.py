"""Public log-prob ops over given logits: ``gather_logprobs`` (per token) and ``sequence_logprobs`` (per sequence).

Backends (chosen per call by ``silmm_fast._backend.choose``):
- ``triton``: ``silmm_fast.kernels.logprobs``, one fused pass per row (online log-sum-exp over vocabulary blocks +
  target gather); the backward recomputes the softmax blockwise from the saved per-row max and log-sum. Extra memory:
  three floats per token.
- ``torch``: ``silmm_fast.ops.torch_backend.logprobs``, PyTorch's fused log_softmax / softmax chunked over rows (an
  O(chunk·V) fp32 working set); the backward recomputes each chunk's softmax.
- ``reference``: ``silmm_fast.reference.logprobs`` (materialized log_softmax).

The per-sequence reduction is a sum over T of the per-token values (a [B, T] tensor, O(N) memory, deterministic, no
host sync); autograd carries it back to the per-token backward.
"""

from __future__ import annotations

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_choice, check_logits_and_labels
from silmm_fast.ops.torch_backend import logprobs as torch_backend
from silmm_fast.reference import logprobs as _reference


class _GatherLogprobs(torch.autograd.Function):
    """Per-token log-probs on the ``triton`` or ``torch`` backend, with that backend's block size (None: its rule)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, backend: str, block_v: int | None, chunk_elements: int | None):
        if backend == "triton":
            from silmm_fast.kernels import logprobs as kernels

            logp, row_max, row_logsum = kernels.logprobs_fwd(logits, labels, ignore_index=ignore_index, block_v=block_v)
            ctx.save_for_backward(logits, labels, row_max, row_logsum)
            logp = logp.view(labels.shape)
        else:
            logp = torch_backend.logprobs_fwd(logits, labels, ignore_index=ignore_index, chunk_elements=chunk_elements)
            ctx.save_for_backward(logits, labels)
        ctx.ignore_index, ctx.backend = ignore_index, backend
        ctx.block_v, ctx.chunk_elements = block_v, chunk_elements
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        if ctx.backend == "triton":
            from silmm_fast.kernels import logprobs as kernels

            logits, labels, row_max, row_logsum = ctx.saved_tensors
            grad = kernels.logprobs_bwd(
                logits, labels, row_max, row_logsum, grad_logp, ignore_index=ctx.ignore_index, block_v=ctx.block_v
            )
        else:
            logits, labels = ctx.saved_tensors
            grad = torch_backend.logprobs_bwd(
                logits, labels, grad_logp, ignore_index=ctx.ignore_index, chunk_elements=ctx.chunk_elements
            )
        return grad, None, None, None, None, None


def gather_logprobs_on(
    backend: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    *,
    block_v: int | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """``gather_logprobs`` on ``backend`` for validated inputs: what the public op runs once it has checked its
    arguments and chosen the backend. ``block_v``: the Triton vocabulary block; ``chunk_elements``: logits per torch
    chunk (None: the backend's rule; tests pass small ones to cover several blocks)."""
    if backend == "reference":
        return _reference.gather_logprobs(logits, labels, ignore_index=ignore_index)
    return _GatherLogprobs.apply(logits, labels, ignore_index, backend, block_v, chunk_elements)


def sequence_logprobs_on(
    backend: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    *,
    block_v: int | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """``sequence_logprobs`` on ``backend`` for validated inputs (block sizes as in ``gather_logprobs_on``)."""
    per_token = gather_logprobs_on(
        backend, logits, labels, ignore_index, block_v=block_v, chunk_elements=chunk_elements
    )
    total = per_token.sum(-1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(-1).clamp(min=1)
    return total / count.to(total.dtype)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Per-token log-probability of ``labels`` under ``softmax(logits)``, without materializing ``log_softmax``.

    Equivalent to: ``log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]``, with 0 where
    ``labels == ignore_index``.

    Args:
        logits: [..., V] float16 / bfloat16 / float32 / float64, any strides (rows are read in place when the last
            dimension is contiguous and, for more than 3 dims, the leading dims merge; otherwise one copy is made).
        labels: [...] (= ``logits.shape[:-1]``), any integer dtype, values in [0, V) or ``ignore_index``.
        ignore_index: label value whose positions get log-prob 0 and gradient 0.

    Returns:
        [...] float32 (float64 for float64 logits, so gradcheck works); math is fp32 (fp64) for every input dtype.
        Differentiable in ``logits``; the gradient is a new tensor in the logits' dtype (the logits are never
        written).

    Raises:
        TypeError: non-floating ``logits``, non-integer ``labels``, non-int ``ignore_index``.
        ValueError: ``labels.shape != logits.shape[:-1]``, V = 0, different devices, or a label outside [0, V) that is
        not ``ignore_index`` (checked with one reduction over the labels: one host sync of a bool on CUDA, skipped
        under torch.compile / CUDA graph capture, where such a label yields NaN instead of an out-of-bounds read).

    NaN / Inf logits are not searched for (that would cost a full extra pass); they make the affected rows NaN.
    """
    check_logits_and_labels(logits, labels, ignore_index, sequence=False)
    return gather_logprobs_on(_backend.choose("gather_logprobs", logits.device), logits, labels, ignore_index)


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "sum"
) -> torch.Tensor:
    """Per-sequence log-likelihood of ``labels`` under ``softmax(logits)``: sum (or mean) over the non-ignored tokens.

    Equivalent to: ``gather_logprobs(logits, labels).sum(-1)``; for ``reduction="mean"`` divided by the number of
    non-ignored tokens of each sequence (a sequence with none gives 0, never NaN).

    Args:
        logits: [B, T, V] float16 / bfloat16 / float32 / float64 (e.g. ``model_logits[:, :-1]``, read in place).
        labels: [B, T] integer, values in [0, V) or ``ignore_index`` (e.g. prompt positions).
        ignore_index: label value excluded from the sum and from the mean's count.
        reduction: ``"sum"`` (DPO) or ``"mean"`` (length-normalized, SimPO-style).

    Returns:
        [B] float32 (float64 for float64 logits), differentiable in ``logits``. Extra memory O(B·T), no host sync
        beyond the label check documented in ``gather_logprobs``.
    """
    check_choice("reduction", reduction, ("sum", "mean"))
    check_logits_and_labels(logits, labels, ignore_index, sequence=True)
    backend = _backend.choose("sequence_logprobs", logits.device)
    return sequence_logprobs_on(backend, logits, labels, ignore_index, reduction)
