"""Public log-prob ops over given logits: ``gather_logprobs`` (per token) and ``sequence_logprobs`` (per sequence).

Backends (chosen per call by ``silmm_fast._backend.choose``):
- ``triton``: one fused pass per row (online log-sum-exp over vocabulary blocks + target gather), backward recomputes
  the softmax blockwise from the saved per-row max and log-sum. Extra memory: three floats per token.
- ``torch``: PyTorch's fused log_softmax / softmax, chunked over rows, so the fp32 working set is O(chunk·V) instead of
  a full fp32 copy of the logits plus its log_softmax; the backward recomputes each chunk's softmax.
- ``reference``: ``silmm_fast.reference.logprobs`` (materialized log_softmax).

The per-sequence reduction is a sum over T of the per-token values (a [B, T] tensor, O(N) memory, deterministic, no
host sync); autograd carries it back to the per-token backward.
"""

from __future__ import annotations

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_choice, check_float, check_integer, check_ndim, check_same_device, has_data
from silmm_fast.reference import logprobs as _reference

# torch backend: fp32 working set per chunk, in elements (rows per chunk = this // V, at least 1). 2^19 fp32 values
# = 2 MiB stays cache-resident between the softmax and the scale/scatter that follow it. On a shared 2-core CPU,
# single-threaded, N=4096, V=16384, fp32 forward+backward: 2^19 ran in ~375 ms, 2^16 ~790 ms, 2^21 ~950 ms.
TORCH_CHUNK_ELEMENTS = 1 << 19
# triton backend: vocabulary block override (None = the kernel's heuristic); tests shrink it to cover multi-block rows.
_TRITON_BLOCK_V: int | None = None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- validation -----------------------------------------------------------------------------------------------------
def _skip_label_check(labels: torch.Tensor) -> bool:
    # Inside torch.compile tracing or CUDA graph capture a data-dependent check cannot run; the kernels then give NaN
    # for an out-of-range label (never an out-of-bounds read), so the error stays visible downstream. Meta tensors
    # have no values to check.
    if not has_data(labels) or torch.compiler.is_compiling():
        return True
    return labels.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """One fused reduction over the labels; on CUDA it costs one host sync of a single bool (labels are O(N), tiny
    next to the [N, V] logits). A clear ValueError beats a NaN that surfaces many steps later."""
    if labels.numel() == 0 or _skip_label_check(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels: expected values in [0, {V}) (the vocabulary size, logits.shape[-1]) or ignore_index="
            f"{ignore_index}, got {first}"
        )


def _validate(logits: object, labels: object, ignore_index: object, *, sequence: bool) -> None:
    check_float("logits", logits)
    check_integer("labels", labels)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    assert isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)
    if sequence:
        check_ndim("logits", logits, 3, "[B, T, V]")
        check_ndim("labels", labels, 2, "[B, T]")
    elif logits.dim() == 0:
        raise ValueError("logits: expected shape [..., V] with at least one dimension, got a 0-d tensor")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a vocabulary of at least 1 (shape [..., V]), got {tuple(logits.shape)}")
    check_same_device(logits=logits, labels=labels)
    _check_label_range(labels, logits.shape[-1], ignore_index)


# --- triton backend -------------------------------------------------------------------------------------------------
class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        from silmm_fast.kernels import logprobs as kernels

        logp, row_max, row_logsum = kernels.logprobs_forward(logits, labels, ignore_index, _TRITON_BLOCK_V)
        ctx.save_for_backward(logits, labels, row_max, row_logsum)
        ctx.ignore_index = ignore_index
        ctx.block_v = _TRITON_BLOCK_V
        return logp.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: torch.Tensor):
        from silmm_fast.kernels import logprobs as kernels

        logits, labels, row_max, row_logsum = ctx.saved_tensors
        grad = kernels.logprobs_backward(logits, labels, row_max, row_logsum, grad_logp, ctx.ignore_index, ctx.block_v)
        return grad, None, None


# --- torch backend --------------------------------------------------------------------------------------------------
def _as_grid(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as a [P, Q, V] view (a copy only when leading dims of a >3-d tensor cannot merge)."""
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.flatten(0, -3)


def _chunks(P: int, Q: int, V: int):
    rows = max(1, TORCH_CHUNK_ELEMENTS // V)
    for p in range(P):
        for q0 in range(0, Q, rows):
            yield p, slice(q0, min(q0 + rows, Q))


class _TorchLogprobs(torch.autograd.Function):
    """Chunked over rows with PyTorch's fused (log_)softmax kernels: one pass over each chunk forward, one backward
    (the softmax is recomputed from the logits, nothing of size V is saved). Composing max / sub / exp / sum by hand
    instead measured ~4x slower on CPU, so the math is left to the fused kernels, which shift by the row max
    internally (fp32 accuracy at |z| ~ 1e4)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        acc = _acc(logits.dtype)
        x3 = _as_grid(logits)
        P, Q, V = x3.shape
        lab = labels.reshape(P, Q)
        logp = torch.empty(P, Q, dtype=acc, device=logits.device)
        for p, qs in _chunks(P, Q, V):
            lc = lab[p, qs]
            keep = lc != ignore_index
            in_range = (lc >= 0) & (lc < V)
            safe = torch.where(keep & in_range, lc, torch.zeros_like(lc)).long()
            # O(chunk·V) working set, freed per chunk. Upcast first: log_softmax(dtype=) on bf16 ran 3.5x slower on CPU
            chunk = torch.log_softmax(x3[p, qs].to(acc), dim=-1)
            picked = chunk.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            picked = torch.where(in_range, picked, torch.full_like(picked, float("nan")))
            logp[p, qs] = torch.where(keep, picked, torch.zeros_like(picked))
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index
        return logp.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: torch.Tensor):
        logits, labels = ctx.saved_tensors
        acc = _acc(logits.dtype)
        x3 = _as_grid(logits)
        P, Q, V = x3.shape
        lab = labels.reshape(P, Q)
        g_all = grad_logp.reshape(P, Q).to(acc)
        grad = torch.empty(P, Q, V, dtype=logits.dtype, device=logits.device)
        for p, qs in _chunks(P, Q, V):
            lc = lab[p, qs]
            keep = (lc != ctx.ignore_index) & (lc >= 0) & (lc < V)
            g = torch.where(keep, g_all[p, qs], torch.zeros_like(g_all[p, qs]))
            safe = torch.where(keep, lc, torch.zeros_like(lc)).long()
            # g · (onehot − softmax): softmax is finite and ≤ 1, so ignored rows (g = 0) get exactly 0
            probs = torch.softmax(x3[p, qs].to(acc), dim=-1)
            probs.mul_(-g.unsqueeze(-1))
            probs.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
            grad[p, qs] = probs
        return grad.view(logits.shape), None, None


# --- public ops -----------------------------------------------------------------------------------------------------
def _per_token(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _TritonLogprobs.apply(logits, labels, ignore_index)
    if backend == "reference":
        return _reference.gather_logprobs(logits, labels, ignore_index=ignore_index)
    return _TorchLogprobs.apply(logits, labels, ignore_index)


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
    _validate(logits, labels, ignore_index, sequence=False)
    backend = _backend.choose("gather_logprobs", logits.device)
    return _per_token(logits, labels, ignore_index, backend)


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
    _validate(logits, labels, ignore_index, sequence=True)
    backend = _backend.choose("sequence_logprobs", logits.device)
    total = _per_token(logits, labels, ignore_index, backend).sum(-1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(-1).clamp(min=1)
    return total / count.to(total.dtype)
