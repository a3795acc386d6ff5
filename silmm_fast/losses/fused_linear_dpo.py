"""DPO straight from hidden states: the head projection, log-prob gather and DPO loss without [B·T, V] logits."""

from __future__ import annotations

import torch
from torch import nn

from silmm_fast import _backend
from silmm_fast._validate import (
    check_choice,
    check_chunk_bytes,
    check_ignore_index,
    check_linear_head,
    check_nll_weight,
    check_preference_pairs,
    check_reference_logps,
)
from silmm_fast.losses.dpo import DPOOutput, _check_config
from silmm_fast.ops.fused_linear_dpo import fused_linear_dpo_on, sequence_logps_on


class FusedLinearDPOLoss(nn.Module):
    """DPO-family loss from the policy's hidden states and its (last) linear head, logits never materialized.

    Equivalent to::

        logps = sequence_logprobs(hidden @ weight.T + bias, labels, ignore_index=ignore_index, reduction=reduction)
        dpo_loss(logps[:B], logps[B:], ref_chosen_logps, ref_rejected_logps, beta=..., loss_type=...,
                 label_smoothing=...)

    computed in fp32 (fp64 for fp64 inputs) without the [2B·T, V] logits.

    Gradients in the forward: the forward runs the head over chunks of whole pairs (the chunk's logits once, as one
    slab), forms each pair's loss from the reference log-probs, and computes the input, weight and bias gradients
    right there; the backward only rescales them. 6·N·H·V matrix FLOPs with a trainable head, 4 with a frozen one
    (N kept tokens), against 8 / 6 for recomputing the logits in the backward. ``chunk_bytes`` bounds the slab; a
    pair too large for it falls back to the two-pass path with a warning (``silmm_fast.ops.fused_linear_dpo``).
    Plain autograd Functions: correct under DDP / FSDP2 and gradient accumulation. The stored gradients serve one
    backward through ``loss``; a backward through unequally weighted ``losses`` recomputes the logits instead.

    Reference log-probs: compute them with ``reference_logps`` (same fp32 path, no grad) from the reference model's
    hidden states and head, once per iteration, and cache them. Because policy and reference go through the same
    path, the margin at initialization (policy == reference) is exactly 0.

    A head that is an MLP (Janus: Linear → GELU → Linear): fuse its last Linear. Run the layers before it and pass the
    activations entering it as ``hidden``, with ``weight`` / ``bias`` of that last Linear; gradients flow back into
    the earlier layers through ``hidden``.

    A frozen head (``weight.requires_grad`` False, bias absent or frozen) takes the frozen-head fast path: the input
    gradient is formed during the forward and the backward only rescales it.

    Args (constructor):
        beta, loss_type, label_smoothing: as in ``dpo_loss`` (``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"robust"``).
        ignore_index: label value of positions that are not scored (prompt tokens, padding).
        reduction: ``"sum"`` (DPO) or ``"mean"`` (length-normalized log-probs, SimPO-style).
        nll_weight: adds ``nll_weight`` × the chosen image's negative log-likelihood per scored token to each pair's
            loss (DPO + NLL on the chosen, as in iterative RPO). DPO alone may lower the chosen sequences'
            likelihood along with the rejected ones', moving probability to sequences neither holds; the NLL term
            holds the chosen ones up. 0 (default) is plain DPO.
        chunk_bytes: the most bytes of logits one chunk of pairs may hold; a pair that needs more falls back to the
            two-pass path. None (default): pairs grouped up to 96 MiB (CPU) / 128 MiB (CUDA), a larger pair alone
            up to 512 MiB (CPU) / a sixteenth of the GPU's memory (``silmm_fast.ops.fused_linear_dpo.default_budget``).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "sum",
        nll_weight: float = 0.0,
        chunk_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.beta, self.loss_type, self.label_smoothing = _check_config(beta, loss_type, label_smoothing)
        self.nll_weight = check_nll_weight(nll_weight)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_choice("reduction", reduction, ("sum", "mean"))

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, nll_weight={self.nll_weight}, "
            f"chunk_bytes={self.chunk_bytes}"
        )

    def reference_logps(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen [B], rejected [B])`` log-probs, without grad, through the same path as ``forward``.

        hidden [2B, T, H] (the reference model's activations entering its head), weight [V, H], labels [2B, T],
        bias [V] or None. Returns float32 (float64 for float64 inputs) tensors to pass to ``forward``.
        """
        pairs = check_preference_pairs(hidden)
        check_linear_head(hidden, weight, labels, bias, self.ignore_index, hidden_doc="[2B, T, H]")
        logps = sequence_logps_on(
            _backend.choose("fused_linear_dpo", hidden.device),
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            chunk_bytes=self.chunk_bytes,
        )
        return logps[:pairs], logps[pairs:]

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> DPOOutput:
        """DPO loss of the policy given by ``hidden`` [2B, T, H] (B chosen rows then B rejected rows) and its head
        ``weight`` [V, H] / ``bias`` [V], with ``labels`` [2B, T] and reference log-probs ``ref_*_logps`` [B].

        Returns ``DPOOutput(loss, losses [B], chosen_rewards [B], rejected_rewards [B])`` (see ``dpo_loss``; with
        ``nll_weight`` the losses include the NLL term).
        """
        pairs = check_preference_pairs(hidden)
        check_linear_head(hidden, weight, labels, bias, self.ignore_index, hidden_doc="[2B, T, H]")
        check_reference_logps(pairs, hidden, ref_chosen_logps, ref_rejected_logps)
        out = fused_linear_dpo_on(
            _backend.choose("fused_linear_dpo", hidden.device),
            hidden,
            weight,
            labels,
            ref_chosen_logps,
            ref_rejected_logps,
            bias=bias,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            nll_weight=self.nll_weight,
            chunk_bytes=self.chunk_bytes,
        )
        ref_dtype = out.chosen_logps.dtype
        chosen_rewards = self.beta * (out.chosen_logps - ref_chosen_logps.detach().to(ref_dtype))
        rejected_rewards = self.beta * (out.rejected_logps - ref_rejected_logps.detach().to(ref_dtype))
        return DPOOutput(out.loss, out.losses, chosen_rewards, rejected_rewards)
