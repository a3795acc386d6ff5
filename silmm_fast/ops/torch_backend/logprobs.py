"""The torch backend of ``gather_logprobs`` / ``sequence_logprobs``: PyTorch's fused log_softmax / softmax, chunked
over rows, so the fp32 working set is O(chunk·V) instead of a full fp32 copy of the logits plus its log_softmax.

Forward, per row z with target y: logp = log_softmax(z)_y (0 for ignored rows). Backward, upstream gradient g:
dz = g · (onehot(y) − softmax(z)), the softmax recomputed per chunk from the logits (nothing of size V is saved).
Composing max / sub / exp / sum by hand instead of the fused kernels is several times slower on CPU
(docs/performance.md); the fused kernels shift by the row max internally (fp32 accuracy at |z| ~ 1e4).
"""

from __future__ import annotations

import torch

from silmm_fast.ops._common import acc_dtype

# fp32 working set per chunk, in elements (rows per chunk = this // V, at least 1): 2^19 fp32 values = 2 MiB stay
# cache-resident between the softmax and the scale / scatter that follow it (docs/performance.md).
CHUNK_ELEMENTS = 1 << 19


def _as_grid(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as a [P, Q, V] view (a copy only when leading dims of a >3-d tensor cannot merge)."""
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.flatten(0, -3)


def _chunks(P: int, Q: int, V: int, chunk_elements: int | None):
    rows = max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // V)
    for p in range(P):
        for q0 in range(0, Q, rows):
            yield p, slice(q0, min(q0 + rows, Q))


def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, chunk_elements: int | None = None
) -> torch.Tensor:
    """Per-row log p(label) of ``logits [..., V]``, shaped like ``labels`` (= ``logits.shape[:-1]``), float32
    (float64 for float64 logits). ``chunk_elements``: logits per chunk (None: ``CHUNK_ELEMENTS``)."""
    acc = acc_dtype(logits.dtype)
    x3 = _as_grid(logits)
    P, Q, V = x3.shape
    lab = labels.reshape(P, Q)
    logp = torch.empty(P, Q, dtype=acc, device=logits.device)
    for p, qs in _chunks(P, Q, V, chunk_elements):
        lc = lab[p, qs]
        keep = lc != ignore_index
        in_range = (lc >= 0) & (lc < V)
        safe = torch.where(keep & in_range, lc, torch.zeros_like(lc)).long()
        # O(chunk·V) working set, freed per chunk. Upcast first: log_softmax(dtype=) on bf16 is slower on CPU.
        chunk = torch.log_softmax(x3[p, qs].to(acc), dim=-1)
        picked = chunk.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        picked = torch.where(in_range, picked, torch.full_like(picked, float("nan")))
        logp[p, qs] = torch.where(keep, picked, torch.zeros_like(picked))
    return logp.view(labels.shape)


def logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    ignore_index: int,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Gradient of Σ grad_logp · logp w.r.t. ``logits``: a new tensor of the logits' shape and dtype (the logits are
    never written). ``chunk_elements`` as in ``logprobs_fwd``."""
    acc = acc_dtype(logits.dtype)
    x3 = _as_grid(logits)
    P, Q, V = x3.shape
    lab = labels.reshape(P, Q)
    g_all = grad_logp.reshape(P, Q).to(acc)
    grad = torch.empty(P, Q, V, dtype=logits.dtype, device=logits.device)
    for p, qs in _chunks(P, Q, V, chunk_elements):
        lc = lab[p, qs]
        keep = (lc != ignore_index) & (lc >= 0) & (lc < V)
        g = torch.where(keep, g_all[p, qs], torch.zeros_like(g_all[p, qs]))
        safe = torch.where(keep, lc, torch.zeros_like(lc)).long()
        # g · (onehot − softmax): softmax is finite and ≤ 1, so ignored rows (g = 0) get exactly 0
        probs = torch.softmax(x3[p, qs].to(acc), dim=-1)
        probs.mul_(-g.unsqueeze(-1))
        probs.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
        grad[p, qs] = probs
    return grad.view(logits.shape)
