"""``fused_linear_dpo``: the DPO loss over a linear head with its gradients formed in the forward, per chunk of whole
preference pairs, logits never materialized beyond one chunk (the algorithm: ``silmm_fast.ops.torch_backend.
fused_linear_dpo``).

Backends (``silmm_fast._backend.choose("fused_linear_dpo", device)``): ``torch`` (the row statistics and dz as torch
elementwise passes) and ``triton`` (the same chunks and vendor-BLAS products with the Triton row kernels of
``silmm_fast.kernels.logprobs``; on CUDA, half-precision inputs give an fp32 logit slab where the installed torch can
write one from the product, and dz is written in the input dtype for the tensor-core products); ``reference``:
``silmm_fast.reference.fused_linear_dpo`` (materialized logits).

The backward multiplies the stored gradients by the incoming gradient of the loss: 6·N·H·V matrix FLOPs in all with
a trainable head and 4 with a frozen one, where recomputing the logits in the backward costs 8 (6).

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
from silmm_fast._validate import (
    check_choice,
    check_chunk_bytes,
    check_linear_head,
    check_nll_weight,
    check_preference_pairs,
    check_reference_logps,
)
from silmm_fast.losses.dpo import _check_config
from silmm_fast.ops import fused_linear_logprobs as _flp
from silmm_fast.ops import head_products as hp
from silmm_fast.ops._common import acc_dtype
from silmm_fast.ops.torch_backend import fused_linear_dpo as torch_backend
from silmm_fast.ops.torch_backend.fused_linear_dpo import pair_losses
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


class _FusedLinearDPO(torch.autograd.Function):
    """(loss, losses [B], chosen_logps [B], rejected_logps [B]); gradients formed in the forward, rescaled in the
    backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_chosen, ref_rejected, labels, keep, cfg, chunks, backend):
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        losses, logps, loss_grads, m, r, dh, dw, db = torch_backend.fused_linear_dpo_fwd(
            hidden,
            weight,
            bias,
            labels,
            keep,
            ref_chosen,
            ref_rejected,
            cfg=cfg,
            chunks=chunks,
            epilogue=backend,
            needs=needs,
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
    return _flp.recompute_backward(
        ctx.backend, hidden.reshape(B2 * T, H), weight, bias, labels.reshape(-1), m, r, g_tok, -1, needs
    )


def _plan_for(hidden, weight, keep, backend, chunk_bytes):
    """(chunks or None, slab bytes of the largest pair, budget) for this call."""
    B = hidden.shape[0] // 2
    _, slab_dtype, _ = hp.dtypes(hidden.dtype, hidden.device, backend)
    per_pair = (keep[:B].sum(1) + keep[B:].sum(1)).tolist()
    budget, limit = default_budget(hidden.device) if chunk_bytes is None else (chunk_bytes, chunk_bytes)
    bytes_per_token = weight.shape[0] * slab_dtype.itemsize
    return _plan(per_pair, bytes_per_token, budget, limit), max(per_pair) * bytes_per_token, limit


def sequence_logps_on(
    backend: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """``sequence_logps`` on ``backend`` for validated inputs."""
    if hidden.is_meta:
        return hidden.new_empty((hidden.shape[0],), dtype=acc_dtype(hidden.dtype))
    keep = labels != ignore_index
    if backend != "reference":
        chunks, _, _ = _plan_for(hidden, weight, keep, backend, chunk_bytes)
        if chunks is not None:
            with torch.no_grad():
                y = torch.where(keep, labels, -1).long()
                return torch_backend.sequence_logps_fwd(
                    hidden, weight, bias, y, keep, chunks=chunks, epilogue=backend, reduction=reduction
                )
    with torch.no_grad():
        return _two_pass_logps(hidden, weight, labels, bias, ignore_index, reduction)


def fused_linear_dpo_on(
    backend: str,
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
    """``fused_linear_dpo`` on ``backend`` for validated inputs and settings: what the public op (and
    ``FusedLinearDPOLoss``) runs once the arguments are checked and the backend chosen."""
    B2, T, H = hidden.shape
    B = B2 // 2
    if hidden.is_meta:  # shapes and dtypes only
        acc = acc_dtype(hidden.dtype)
        return FusedDPOResult(*(hidden.new_empty(shape, dtype=acc) for shape in ((), (B,), (B,), (B,))))
    cfg = dict(
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction, nll_weight=nll_weight
    )
    if backend == "reference":
        out = _reference.fused_linear_dpo(
            hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias=bias, ignore_index=ignore_index, **cfg
        )
        return FusedDPOResult(*out)
    bias_grad = bias is not None and bias.requires_grad
    ref_grad = ref_chosen_logps.requires_grad or ref_rejected_logps.requires_grad
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or bias_grad or ref_grad)
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
            logps = torch_backend.sequence_logps_fwd(
                hidden, weight, bias, y, keep, chunks=chunks, epilogue=backend, reduction=reduction
            )
        chosen, rejected = logps[:B], logps[B:]
        losses = pair_losses(chosen, rejected, ref_chosen_logps, ref_rejected_logps, keep[:B].sum(1), **cfg)
        return FusedDPOResult(losses.mean(), losses, chosen, rejected)
    if wants_grad:
        _warn_fallback(pair_bytes, budget)
    # Two-pass path: log-probs by fused_linear_logprobs (logits recomputed in its backward), the loss by autograd.
    logps = _two_pass_logps(hidden, weight, labels, bias, ignore_index, reduction)
    chosen, rejected = logps[:B], logps[B:]
    losses = pair_losses(chosen, rejected, ref_chosen_logps, ref_rejected_logps, keep[:B].sum(1), **cfg)
    return FusedDPOResult(losses.mean(), losses, chosen.detach(), rejected.detach())


def _two_pass_logps(hidden, weight, labels, bias, ignore_index, reduction) -> torch.Tensor:
    """Sequence log-probs by ``fused_linear_logprobs`` on its own backend choice (logits recomputed in its
    backward): the path for a pair too large for the chunk budget."""
    backend = _backend.choose("fused_linear_logprobs", hidden.device)
    return _flp.fused_linear_logprobs_on(
        backend, hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction
    )


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
    reference gets a margin of exactly 0). Equivalent to ``fused_linear_logprobs(...).detach()``.

    Raises the errors of ``fused_linear_dpo`` for its arguments."""
    check_preference_pairs(hidden)
    check_linear_head(hidden, weight, labels, bias, ignore_index, hidden_doc="[2B, T, H]")
    check_choice("reduction", reduction, ("sum", "mean"))
    check_chunk_bytes(chunk_bytes)
    backend = _backend.choose("fused_linear_dpo", hidden.device)
    return sequence_logps_on(
        backend,
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_bytes=chunk_bytes,
    )


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

    Arguments as in ``FusedLinearDPOLoss`` (``chunk_bytes``: the slab budget; None: the device's
    ``default_budget``). Outputs are float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError naming the argument: those of ``fused_linear_logprobs`` for ``hidden`` / ``weight`` /
        ``labels`` / ``bias``, an odd or zero number of rows, reference log-probs not of shape [B], and settings out
        of range (``beta``, ``loss_type``, ``label_smoothing``, ``reduction``, ``nll_weight``, ``chunk_bytes``).
    """
    beta, loss_type, label_smoothing = _check_config(beta, loss_type, label_smoothing)
    check_choice("reduction", reduction, ("sum", "mean"))
    nll_weight = check_nll_weight(nll_weight)
    check_chunk_bytes(chunk_bytes)
    pairs = check_preference_pairs(hidden)
    check_linear_head(hidden, weight, labels, bias, ignore_index, hidden_doc="[2B, T, H]")
    check_reference_logps(pairs, hidden, ref_chosen_logps, ref_rejected_logps)
    return fused_linear_dpo_on(
        _backend.choose("fused_linear_dpo", hidden.device),
        hidden,
        weight,
        labels,
        ref_chosen_logps,
        ref_rejected_logps,
        bias=bias,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        nll_weight=nll_weight,
        chunk_bytes=chunk_bytes,
    )


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
