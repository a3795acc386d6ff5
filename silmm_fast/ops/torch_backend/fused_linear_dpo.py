"""The torch backend of ``fused_linear_dpo``: the DPO loss over a linear head with its gradients formed in the
forward, per chunk of whole preference pairs, logits never materialized beyond one chunk.

Rows of ``hidden`` [2B, T, H] are B chosen sequences then B rejected ones; pair i is rows i and B + i. Per chunk of
pairs, over its n kept tokens (label != ignore_index), with head W [V, H], bias b:

    z = h Wᵀ + b                 one product into a [n, V] slab                              2·n·H·V FLOPs
    m, r = log Σ exp(z − m), z_y  per token;  logp_t = (z_y − m) − r;  sequence log-probs (sum or mean)
    per pair: the DPO-family loss (plus ``nll_weight`` × the chosen NLL) and its derivatives c = d loss / d logp
    dz = c_t · (onehot(y_t) − exp(z − m − r))   written over the slab
    dh = dz W  (hidden needs a gradient)                                                        2·n·H·V
    dW += dzᵀ h,  db += Σ_t dz  (the head trains; accumulated in fp32, fp64 for fp64 inputs)    2·n·H·V

Each product covers a whole chunk and goes through the vendor BLAS (``silmm_fast.ops.head_products``); the
``epilogue`` argument names the row statistics and dz passes: ``"torch"`` elementwise passes (this backend) or
``"triton"``, the Triton row kernels of ``silmm_fast.kernels.logprobs`` (the op's ``triton`` backend on CUDA).
"""

from __future__ import annotations

import torch

from silmm_fast.losses.dpo import checked_dpo_loss
from silmm_fast.ops import head_products as hp


def pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    reduction: str,
    nll_weight: float,
) -> torch.Tensor:
    """Per-pair losses [B]: ``dpo_loss(...).losses`` plus ``nll_weight`` × the chosen sequence's NLL per scored
    token (``chosen_tokens`` [B]: its count of scored tokens; ``"mean"`` log-probs are already per token). The
    settings and inputs are checked by the caller."""
    losses = checked_dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    ).losses
    if not nll_weight:
        return losses
    per_token = chosen if reduction == "mean" else chosen / chosen_tokens.clamp(min=1).to(chosen.dtype)
    return losses - nll_weight * per_token.to(losses.dtype)


def _pair_grads(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, cfg: dict):
    """(losses [P], d losses_i / d (chosen_i, rejected_i, ref_chosen_i, ref_rejected_i) as a [4, P] tensor), by
    autograd over the P-element loss math (so every loss type shares ``pair_losses``)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in (chosen, rejected, ref_chosen, ref_rejected)]
        losses = pair_losses(*leaves, chosen_tokens, **cfg)
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return losses.detach(), torch.stack(grads)


class _ChunkPass:
    """The forward over chunks of pairs shared by the loss and by the reference log-probs, so both take the same
    arithmetic (same chunks, same product blocks, same summation order: the margin at initialization is exactly 0).

    ``labels`` [2B, T] int64 with -1 at ignored tokens, ``keep`` [2B, T] their mask. Iterating yields, per chunk, the
    pairs (p0, p1) with the chunk's state filled in: ``tokens`` (flat indices of its kept tokens into the [2B·T, H]
    rows, chosen rows first), ``rows`` (its 2P sequence rows), ``h`` / ``y`` (their hidden rows in the product dtype
    and labels), ``local`` (each token's row among the chunk's 2P), ``slab`` [n, V] (the logits; exp(z − m) on the
    torch epilogue), ``m`` / ``r`` per token and ``seq`` [2P] (the sequence log-probs)."""

    def __init__(self, hidden, weight, bias, labels, keep, *, chunks, epilogue, reduction):
        B2, T, H = hidden.shape
        self.B, self.T, self.V = B2 // 2, T, weight.shape[0]
        self.epilogue, self.reduction, self.chunks = epilogue, reduction, chunks
        self.prod, slab_dtype, self.acc = hp.dtypes(hidden.dtype, hidden.device, epilogue)
        self.h_all, self.y_all, self.keep = hidden.reshape(B2 * T, H), labels.reshape(B2 * T), keep
        self.w = weight.to(self.prod)
        self.b = None if bias is None else bias.to(slab_dtype)
        self.counts = keep.sum(1)
        largest = max(int(keep[p0:p1].sum() + keep[self.B + p0 : self.B + p1].sum()) for p0, p1 in chunks)
        self.slab_buf = torch.empty(largest * self.V, dtype=slab_dtype, device=hidden.device)
        # CUDA half precision with an fp32 slab: dz goes to its own buffer in the operands' dtype
        self.dz_buf = None if slab_dtype == self.prod else torch.empty_like(self.slab_buf, dtype=self.prod)

    def __iter__(self):
        device, acc, B, T, V = self.h_all.device, self.acc, self.B, self.T, self.V
        wt = self.w.t()
        for p0, p1 in self.chunks:
            P = p1 - p0
            self.rows = torch.cat([torch.arange(p0, p1), torch.arange(B + p0, B + p1)]).to(device)
            self.local, pos = self.keep.index_select(0, self.rows).nonzero(as_tuple=True)
            self.tokens = self.rows[self.local] * T + pos
            n = self.tokens.numel()
            self.h = self.h_all.index_select(0, self.tokens).to(self.prod)
            self.y = self.y_all.index_select(0, self.tokens)
            self.slab = self.slab_buf[: n * V].view(n, V)
            # one product over the whole chunk: on the CPU as on the GPU, the larger product (and one weight-gradient
            # accumulation per chunk) beats cache-sized row blocks (docs/performance.md)
            z = hp.mm_into(self.h, wt, self.slab, self.b)
            logp, self.m, self.r = hp.row_stats(self.epilogue, z, self.y)
            # a deterministic segmented sum (no atomics): scatter into [2P, T], then sum each row
            per_token = torch.zeros(2 * P, T, dtype=acc, device=device).index_put_((self.local, pos), logp)
            self.seq = per_token.sum(1)
            if self.reduction == "mean":
                self.seq = self.seq / self.counts.index_select(0, self.rows).clamp(min=1).to(acc)
            yield p0, p1

    def dz(self, c: torch.Tensor) -> torch.Tensor:
        """dz = c · (onehot − p) over the current chunk, c per token: over the slab (or into the dz buffer)."""
        n = self.tokens.numel()
        out = self.slab if self.dz_buf is None else self.dz_buf[: n * self.V].view(n, self.V)
        return hp.write_dz(self.epilogue, self.slab, self.y, self.m, self.r, c, out)


def sequence_logps_fwd(hidden, weight, bias, labels, keep, *, chunks, epilogue, reduction) -> torch.Tensor:
    """Sequence log-probs [2B] by the loss's own forward pass (no gradients). ``labels`` [2B, T] int64 with -1 at
    ignored tokens, ``keep`` their mask, ``chunks`` the pairs (p0, p1) of each chunk."""
    run = _ChunkPass(hidden, weight, bias, labels, keep, chunks=chunks, epilogue=epilogue, reduction=reduction)
    logps = torch.empty(2 * run.B, dtype=run.acc, device=hidden.device)
    for _ in run:
        logps[run.rows] = run.seq
    return logps


def fused_linear_dpo_fwd(hidden, weight, bias, labels, keep, ref_chosen, ref_rejected, *, cfg, chunks, epilogue, needs):
    """Everything the autograd Function keeps: per-pair losses [B], log-probs [2B], the loss-side derivatives [4, B]
    and the stored gradients of the mean loss (dh, dW, db; None where not needed), plus m, r per token for a
    recomputing backward. ``labels``, ``keep`` and ``chunks`` as in ``sequence_logps_fwd``; ``cfg`` the loss settings
    of ``pair_losses``; ``needs``: (hidden, weight, bias) flags."""
    need_h, need_w, need_b = needs
    reduction = cfg["reduction"]
    run = _ChunkPass(hidden, weight, bias, labels, keep, chunks=chunks, epilogue=epilogue, reduction=reduction)
    B2, T, H = hidden.shape
    B, V, acc, device = run.B, run.V, run.acc, hidden.device
    losses = torch.empty(B, dtype=acc, device=device)
    logps = torch.zeros(B2, dtype=acc, device=device)
    loss_grads = torch.empty(4, B, dtype=acc, device=device)
    m_all = torch.zeros(B2 * T, dtype=acc, device=device)
    r_all = torch.zeros(B2 * T, dtype=acc, device=device)
    dh = torch.zeros(B2 * T, H, dtype=acc if run.prod != hidden.dtype else run.prod, device=device) if need_h else None
    dw = torch.zeros(V, H, dtype=acc, device=device) if need_w else None
    db = torch.zeros(V, dtype=acc, device=device) if need_b else None
    for p0, p1 in run:
        P = p1 - p0
        m_all[run.tokens], r_all[run.tokens] = run.m, run.r
        logps[run.rows] = run.seq
        ref_c, ref_r = ref_chosen[p0:p1].to(acc), ref_rejected[p0:p1].to(acc)
        chunk_losses, chunk_grads = _pair_grads(run.seq[:P], run.seq[P:], ref_c, ref_r, run.counts[p0:p1], cfg)
        losses[p0:p1], loss_grads[:, p0:p1] = chunk_losses, chunk_grads
        if not (need_h or need_w or need_b):
            continue
        c_seq = torch.cat([chunk_grads[0], chunk_grads[1]]) / B  # d mean loss / d sequence log-prob
        if reduction == "mean":
            c_seq = c_seq / run.counts.index_select(0, run.rows).clamp(min=1).to(acc)
        dz = run.dz(c_seq.index_select(0, run.local))
        if need_h:
            dh.index_copy_(0, run.tokens, torch.mm(dz, run.w).to(dh.dtype))
        if need_w:
            hp.accumulate(dw, dz.t(), run.h)
        if need_b:
            db.add_(dz.sum(0, dtype=acc))
    return losses, logps, loss_grads, m_all, r_all, dh, dw, db
