"""``fused_linear_dpo``: the DPO loss over a linear head with its gradients formed in the forward, per chunk of whole
preference pairs, logits never materialized beyond one chunk.

Rows of ``hidden`` [2B, T, H] are B chosen sequences then B rejected ones; pair i is rows i and B + i. Per chunk of
pairs, over its n kept tokens (label != ignore_index), with head W [V, H], bias b:

    z = h Wᵀ + b                 one product into a [n, V] slab                              2·n·H·V FLOPs
    m, r = log Σ exp(z − m), z_y  per token;  logp_t = (z_y − m) − r;  sequence log-probs (sum or mean)
    per pair: the DPO-family loss (plus ``nll_weight`` × the chosen NLL) and its derivatives c = d loss / d logp
    dz = c_t · (onehot(y_t) − exp(z − m − r))   written over the slab
    dh = dz W  (hidden needs a gradient)                                                        2·n·H·V
    dW += dzᵀ h,  db += Σ_t dz  (the head trains; accumulated in fp32, fp64 for fp64 inputs)    2·n·H·V

The backward multiplies the stored gradients by the incoming gradient of the loss: 6·N·H·V matrix FLOPs in all with
a trainable head and 4 with a frozen one, where recomputing the logits in the backward costs 8 (6). Each product
covers a whole chunk and goes through the vendor BLAS (``torch.mm`` / ``addmm``: MKL / oneDNN, cuBLAS;
``head_products``); the row statistics and dz are torch elementwise passes on the ``torch`` backend and the Triton
kernels of ``silmm_fast.kernels.logprobs`` on the ``triton`` backend. On CUDA, half-precision inputs give an fp32
logit slab where the installed torch can write one from the product (``torch.mm(..., out_dtype=)``), and dz is
written in the input dtype for the tensor-core products.

Memory: one chunk's slab, at most ``chunk_bytes``, plus the stored gradients (dh [2B·T, H], dW [V, H], db [V]: what
the backward would produce anyway). A pair whose slab alone exceeds the budget makes the call fall back to the
two-pass path (``fused_linear_logprobs``, logits recomputed in the backward), with a warning the first time. The
default (``chunk_bytes=None``, ``default_budget``) groups pairs up to ``GROUP_BYTES`` per device type and still gives a
larger pair a chunk of its own while its slab stays under ``single_pair_limit`` (a Lumina pair, 2 × 1024 tokens at
V = 65,536, on a GPU); only beyond that (an Emu3 pair: 12 GB of fp32 logits) does it fall back.

A gradient that reaches the per-pair ``losses`` output with unequal weights (not just through ``loss``, their mean)
cannot be applied by a rescale: that backward recomputes the logits (the two-pass backward) with per-pair weights.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from silmm_fast import _backend
from silmm_fast.losses.dpo import dpo_loss
from silmm_fast.ops import fused_linear_logprobs as _flp
from silmm_fast.ops import head_products as hp
from silmm_fast.reference import fused_linear_dpo as _reference

# Default grouping budget per device type (bytes of logit slab a chunk of several pairs may hold): about one Janus
# pair (576 image tokens each side, V = 16,384, fp32: 72 MiB), so the slab plus the stored gradients stay under a
# quarter of what materialized logits take, while each product still has a thousand rows or more.
GROUP_BYTES = {"cpu": 96 * 2**20, "cuda": 128 * 2**20}
OTHER_GROUP_BYTES = 96 * 2**20  # other device types
CPU_SINGLE_PAIR_LIMIT = 512 * 2**20
_fallback_warned = False


class FusedDPOResult(NamedTuple):
    """``loss`` (scalar, mean of ``losses``), ``losses`` [B] per pair, ``chosen_logps`` / ``rejected_logps`` [B]
    (the policy's sequence log-probs, detached)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def default_budget(device: torch.device | str) -> tuple[int, int]:
    """``(group_bytes, single_pair_limit)`` that ``chunk_bytes=None`` stands for on ``device``: pairs are grouped into
    chunks of at most ``group_bytes`` of logits; a pair larger than that runs alone up to ``single_pair_limit`` (a
    sixteenth of a GPU's memory; 512 MiB on a CPU). An explicit ``chunk_bytes`` is both."""
    device = torch.device(device)
    group = GROUP_BYTES.get(device.type, OTHER_GROUP_BYTES)
    if device.type == "cuda":
        return group, max(group, torch.cuda.get_device_properties(device).total_memory // 16)
    return group, max(group, CPU_SINGLE_PAIR_LIMIT)


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
    token (``chosen_tokens`` [B]: its count of scored tokens; ``"mean"`` log-probs are already per token)."""
    losses = dpo_loss(
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


def _plan(kept_per_pair: list[int], bytes_per_token: int, budget: int, limit: int) -> list[tuple[int, int]] | None:
    """Chunks of pairs ``[(p0, p1), ...]`` whose slabs fit ``budget`` bytes (a pair larger than that alone in its
    chunk, up to ``limit`` bytes): as few chunks as greedy filling needs, then pairs spread evenly over them; None
    when a pair exceeds ``limit``."""
    cap = budget // max(bytes_per_token, 1)
    if any(k * bytes_per_token > limit for k in kept_per_pair):
        return None
    count, filled = 1, 0
    for k in kept_per_pair:
        if filled + k > cap:
            count, filled = count + 1, 0
        filled += k
    target = -(-sum(kept_per_pair) // count)
    chunks, start, filled = [], 0, 0
    for i, k in enumerate(kept_per_pair):
        if filled and (filled + k > cap or filled >= target):
            chunks.append((start, i))
            start, filled = i, 0
        filled += k
    chunks.append((start, len(kept_per_pair)))
    return chunks


class _Pass:
    """The forward over chunks of pairs shared by the loss and by the reference log-probs, so both take the same
    arithmetic (same chunks, same product blocks, same summation order: the margin at initialization is exactly 0).

    ``labels`` [2B, T] int64 with -1 at ignored tokens, ``keep`` [2B, T] their mask. Iterating yields, per chunk, the
    pairs (p0, p1) with the chunk's state filled in: ``tokens`` (flat indices of its kept tokens into the [2B·T, H]
    rows, chosen rows first), ``rows`` (its 2P sequence rows), ``h`` / ``y`` (their hidden rows in the product dtype
    and labels), ``local`` (each token's row among the chunk's 2P), ``slab`` [n, V] (the logits; exp(z − m) on the
    torch backend), ``m`` / ``r`` per token and ``seq`` [2P] (the sequence log-probs)."""

    def __init__(self, hidden, weight, bias, labels, keep, chunks, backend, reduction):
        B2, T, H = hidden.shape
        self.B, self.T, self.V = B2 // 2, T, weight.shape[0]
        self.backend, self.reduction, self.chunks = backend, reduction, chunks
        self.prod, slab_dtype, self.acc = hp.dtypes(hidden.dtype, hidden.device, backend)
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
            logp, self.m, self.r = hp.row_stats(self.backend, z, self.y)
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
        return hp.write_dz(self.backend, self.slab, self.y, self.m, self.r, c, out)


def _sequence_logps(hidden, weight, bias, labels, keep, chunks, backend, reduction) -> torch.Tensor:
    """Sequence log-probs [2B] by the loss's own forward pass (no gradients)."""
    run = _Pass(hidden, weight, bias, labels, keep, chunks, backend, reduction)
    logps = torch.empty(2 * run.B, dtype=run.acc, device=hidden.device)
    for _ in run:
        logps[run.rows] = run.seq
    return logps


def _forward_with_grads(hidden, weight, bias, labels, ref_chosen, ref_rejected, cfg, chunks, keep, backend, needs):
    """Everything the autograd Function keeps: per-pair losses, log-probs, the loss-side derivatives and the stored
    gradients of the mean loss (dh, dW, db; None where not needed), plus m, r per token for a recomputing backward."""
    need_h, need_w, need_b = needs
    run = _Pass(hidden, weight, bias, labels, keep, chunks, backend, cfg["reduction"])
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
        if cfg["reduction"] == "mean":
            c_seq = c_seq / run.counts.index_select(0, run.rows).clamp(min=1).to(acc)
        dz = run.dz(c_seq.index_select(0, run.local))
        if need_h:
            dh.index_copy_(0, run.tokens, torch.mm(dz, run.w).to(dh.dtype))
        if need_w:
            hp.accumulate(dw, dz.t(), run.h)
        if need_b:
            db.add_(dz.sum(0, dtype=acc))
    return losses, logps, loss_grads, m_all, r_all, dh, dw, db


class _FusedLinearDPO(torch.autograd.Function):
    """(loss, losses [B], chosen_logps [B], rejected_logps [B]); gradients formed in the forward, rescaled in the
    backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_chosen, ref_rejected, labels, keep, cfg, chunks, backend):
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        losses, logps, loss_grads, m, r, dh, dw, db = _forward_with_grads(
            hidden, weight, bias, labels, ref_chosen, ref_rejected, cfg, chunks, keep, backend, needs
        )
        B = losses.shape[0]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, labels, keep, loss_grads, m, r)
        ctx.grads = (dh, dw, db)
        ctx.cfg, ctx.backend, ctx.used = cfg, backend, False
        chosen, rejected = logps[:B], logps[B:]
        ctx.mark_non_differentiable(chosen, rejected)
        return losses.mean(), losses, chosen, rejected

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, g_losses, _g_chosen, _g_rejected):
        hidden, weight, bias, labels, keep, loss_grads, m, r = ctx.saved_tensors
        need_h, need_w, need_b, need_rc, need_rr = ctx.needs_input_grad[:5]
        B = loss_grads.shape[1]
        if g_loss is None and g_losses is None:
            return (None,) * 10
        if g_losses is None:
            # The common case: only the mean loss was differentiated, so every stored gradient scales by g_loss.
            if ctx.used:
                raise RuntimeError(
                    "fused_linear_dpo: backward ran twice through the same forward; its stored gradients serve one "
                    "backward (run the forward again, or use fused_linear_logprobs + dpo_loss for retain_graph)"
                )
            ctx.used = True
            scale = g_loss.to(loss_grads.dtype)
            dh, dw, db = (None if x is None else x.mul_(scale) for x in ctx.grads)
            ctx.grads = None
            per_pair = scale.expand(B) / B
        else:
            per_pair = g_losses.to(loss_grads.dtype)
            if g_loss is not None:
                per_pair = per_pair + g_loss.to(loss_grads.dtype) / B
            dh, dw, db = _recompute(hidden, weight, bias, labels, keep, loss_grads, per_pair, m, r, ctx)
        d_ref_c = loss_grads[2] * per_pair if need_rc else None
        d_ref_r = loss_grads[3] * per_pair if need_rr else None
        B2, T, H = hidden.shape
        dh = None if dh is None or not need_h else dh.view(B2, T, H).to(hidden.dtype)
        dw = None if dw is None or not need_w else dw.to(weight.dtype)
        db = None if db is None or not need_b else db.to(bias.dtype)
        return dh, dw, db, d_ref_c, d_ref_r, None, None, None, None, None


def _recompute(hidden, weight, bias, labels, keep, loss_grads, per_pair, m, r, ctx):
    """The two-pass backward with per-pair weights: per-token upstream gradients from the loss-side derivatives,
    then the logits recomputed (``fused_linear_logprobs``'s backward)."""
    B2, T, H = hidden.shape
    counts = keep.sum(1).clamp(min=1).to(per_pair.dtype)
    g_seq = torch.cat([loss_grads[0] * per_pair, loss_grads[1] * per_pair])
    if ctx.cfg["reduction"] == "mean":
        g_seq = g_seq / counts
    g_tok = (g_seq.unsqueeze(1) * keep).reshape(-1)
    needs = ctx.needs_input_grad[:3]
    flp_backend = "torch" if ctx.backend == "torch" else "triton"
    return _flp.recompute_backward(
        flp_backend, hidden.reshape(B2 * T, H), weight, bias, labels.reshape(-1), m, r, g_tok, -1, *needs
    )


def _plan_for(hidden, weight, keep, backend, chunk_bytes):
    """(chunks or None, slab bytes of the largest pair, budget) for this call."""
    B = hidden.shape[0] // 2
    _, slab_dtype, _ = hp.dtypes(hidden.dtype, hidden.device, backend)
    per_pair = (keep[:B].sum(1) + keep[B:].sum(1)).tolist()
    budget, limit = default_budget(hidden.device) if chunk_bytes is None else (chunk_bytes, chunk_bytes)
    bytes_per_token = weight.shape[0] * slab_dtype.itemsize
    return _plan(per_pair, bytes_per_token, budget, limit), max(per_pair) * bytes_per_token, limit


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Sequence log-probs [2B] of ``hidden`` [2B, T, H] without gradients, by the same arithmetic as
    ``fused_linear_dpo``'s forward with the same ``chunk_bytes`` (reference log-probs: a policy equal to its
    reference gets a margin of exactly 0). Equivalent to ``fused_linear_logprobs(...).detach()``."""
    if hidden.is_meta:
        acc = hp.acc_dtype(hidden.dtype)
        return hidden.new_empty((hidden.shape[0],), dtype=acc)
    backend = _backend.choose("fused_linear_dpo", hidden.device)
    keep = labels != ignore_index
    if backend != "reference":
        chunks, _, _ = _plan_for(hidden, weight, keep, backend, chunk_bytes)
        if chunks is not None:
            with torch.no_grad():
                y = torch.where(keep, labels, -1).long()
                return _sequence_logps(hidden, weight, bias, y, keep, chunks, backend, reduction)
    with torch.no_grad():
        return _flp.fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                          reduction=reduction)  # fmt: skip


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
) -> FusedDPOResult:
    """DPO-family loss of the policy ``hidden`` [2B, T, H] (B chosen rows, then B rejected) under the linear head
    ``weight`` [V, H] / ``bias`` [V], gradients formed in the forward (module docstring).

    Equivalent to::

        logps = sequence_logprobs(hidden @ weight.T + bias, labels, ignore_index=..., reduction=...)
        losses = dpo_loss(logps[:B], logps[B:], ref_chosen_logps, ref_rejected_logps, ...).losses
                 - nll_weight * (the chosen sequences' log-probs per scored token)
        FusedDPOResult(losses.mean(), losses, logps[:B].detach(), logps[B:].detach())

    Arguments are validated by the caller (``FusedLinearDPOLoss``); ``chunk_bytes`` is the slab budget (None: the
    device's ``default_budget``). Outputs are float32 (float64 for float64 inputs).
    """
    B2, T, H = hidden.shape
    B = B2 // 2
    if hidden.is_meta:  # shapes and dtypes only
        acc = hp.acc_dtype(hidden.dtype)
        return FusedDPOResult(*(hidden.new_empty(shape, dtype=acc) for shape in ((), (B,), (B,), (B,))))
    cfg = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction,
               nll_weight=nll_weight)  # fmt: skip
    backend = _backend.choose("fused_linear_dpo", hidden.device)
    bias_grad = bias is not None and bias.requires_grad
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or bias_grad
        or ref_chosen_logps.requires_grad or ref_rejected_logps.requires_grad
    )  # fmt: skip
    if backend == "reference":
        return FusedDPOResult(*_reference.fused_linear_dpo(
            hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias=bias, ignore_index=ignore_index, **cfg
        ))  # fmt: skip
    keep = labels != ignore_index
    chunks, pair_bytes, budget = _plan_for(hidden, weight, keep, backend, chunk_bytes)
    y = torch.where(keep, labels, -1).long()  # ignored tokens never enter a chunk; -1 marks them
    if chunks is not None and wants_grad:
        loss, losses, chosen, rejected = _FusedLinearDPO.apply(
            hidden, weight, bias, ref_chosen_logps, ref_rejected_logps, y, keep, cfg, chunks, backend
        )
        return FusedDPOResult(loss, losses, chosen, rejected)
    if chunks is not None:
        with torch.no_grad():
            logps = _sequence_logps(hidden, weight, bias, y, keep, chunks, backend, reduction)
        chosen, rejected = logps[:B], logps[B:]
        losses = pair_losses(chosen, rejected, ref_chosen_logps, ref_rejected_logps, keep[:B].sum(1), **cfg)
        return FusedDPOResult(losses.mean(), losses, chosen, rejected)
    if wants_grad:
        _warn_fallback(pair_bytes, budget)
    # Two-pass path: log-probs by fused_linear_logprobs (logits recomputed in its backward), the loss by plain
    # autograd.
    logps = _flp.fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                       reduction=reduction)  # fmt: skip
    chosen, rejected = logps[:B], logps[B:]
    losses = pair_losses(chosen, rejected, ref_chosen_logps, ref_rejected_logps, keep[:B].sum(1), **cfg)
    return FusedDPOResult(losses.mean(), losses, chosen.detach(), rejected.detach())


def _warn_fallback(pair_bytes: int, budget: int) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"fused_linear_dpo: one preference pair's logit slab needs {pair_bytes / 2**20:.1f} MiB, more than the "
            f"{budget / 2**20:.1f} MiB allowed (chunk_bytes); using the two-pass path (logits recomputed in the "
            "backward). Pass a larger chunk_bytes to form the gradients in the forward.",
            stacklevel=3,
        )
