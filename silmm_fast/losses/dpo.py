"""Direct preference optimization losses over sequence log-probabilities (discrete image tokens).

Every variant starts from the same margin of log-ratios (policy vs. frozen reference):

    h = (logπθ(yw) − logπref(yw)) − (logπθ(yl) − logπref(yl))

and the per-pair losses are written with ``logsigmoid`` so no ``log(sigmoid(x))`` underflows to ``-inf``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from silmm_fast._validate import check_choice, check_float, check_positive, check_same_device, check_same_shape
from silmm_fast.ops.logprobs import sequence_logprobs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# loss types whose formula uses label_smoothing; the others reject a non-zero value instead of ignoring it
_SMOOTHED = ("sigmoid", "robust")


class DPOOutput(NamedTuple):
    """Result of a DPO-family loss.

    loss: scalar, the mean of ``losses``. losses: per-pair loss, shape of the inputs.
    chosen_rewards / rejected_rewards: β·(logπθ − logπref) for chosen / rejected, detached (for logging).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _check_config(beta: float, loss_type: str, label_smoothing: float) -> tuple[float, str, float]:
    beta = check_positive("beta", beta)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {label_smoothing!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing > 0.0 and loss_type not in _SMOOTHED:
        raise ValueError(
            f"label_smoothing: loss_type {loss_type!r} does not use label smoothing (only {_SMOOTHED} do); "
            f"got {label_smoothing!r}, expected 0.0"
        )
    return beta, loss_type, label_smoothing


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO-family preference loss from per-sequence log-probabilities of chosen and rejected samples.

    Equivalent to (``h`` the log-ratio margin above, ``ε = label_smoothing``, ``logσ`` = ``F.logsigmoid``)::

        sigmoid: −(1−ε)·logσ(β·h) − ε·logσ(−β·h)              # DPO; ε > 0 is "conservative DPO"
        robust:  (−(1−ε)·logσ(β·h) + ε·logσ(−β·h)) / (1−2ε)    # robust DPO (Chowdhury et al. 2024), unbiased
                                                               # under preference labels flipped with rate ε
        ipo:     (h − 1/(2β))²                                 # IPO (Azar et al. 2023); β plays the role of τ
        hinge:   relu(1 − β·h)                                 # SLiC-style hinge
        loss = losses.mean();  chosen_rewards = β·(policy_chosen − ref_chosen).detach(), likewise rejected

    With ε = 0, ``robust`` equals ``sigmoid``. ``ipo`` and ``hinge`` take no label smoothing (a non-zero value raises).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: floating tensors of one
            common shape (typically ``[B]``, one entry per preference pair), on one device. Reference log-probs are
            usually computed without grad; gradients flow to whichever inputs require them.
        beta: > 0, the inverse temperature of the implicit reward (IPO: the regularization τ).
        loss_type: one of ``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"robust"``.
        label_smoothing: ε in [0, 0.5), the assumed rate of flipped preference labels.

    Returns:
        ``DPOOutput(loss, losses, chosen_rewards, rejected_rewards)``: ``loss`` a scalar, the others of the input
        shape. Math runs in float32 for half-precision inputs (float64 stays float64), so outputs are float32 or
        float64.

    Raises:
        TypeError: a non-tensor or non-floating input. ValueError: shapes or devices differ, an empty input, ``beta``
        not positive, ``label_smoothing`` outside [0, 0.5), unknown ``loss_type``.
    """
    beta, loss_type, eps = _check_config(beta, loss_type, label_smoothing)
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, x in named.items():
        check_float(name, x)
    for name, x in named.items():
        check_same_shape(name, x, "policy_chosen_logps", policy_chosen_logps)
    check_same_device(**named)
    if policy_chosen_logps.numel() == 0:
        raise ValueError("policy_chosen_logps: expected at least one preference pair, got an empty tensor")

    return checked_dpo_loss(*named.values(), beta=beta, loss_type=loss_type, label_smoothing=eps)


def checked_dpo_loss(pc, pr, rc, rr, *, beta: float, loss_type: str, label_smoothing: float) -> DPOOutput:
    """``dpo_loss`` for inputs and settings already checked (the fused DPO head calls it once per chunk)."""
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in (pc, pr, rc, rr)) else torch.float32
    pc, pr, rc, rr = (x.to(dtype) for x in (pc, pr, rc, rr))
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if eps > 0.0:
            losses = (1.0 - eps) * losses - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return DPOOutput(losses.mean(), losses, chosen_rewards, rejected_rewards)


class DPOLoss(nn.Module):
    """DPO-family loss as a module: the configuration is fixed at construction, ``forward`` takes the four log-probs.

    Equivalent to: ``dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)``.
    See ``dpo_loss`` for the formulas, shapes and dtypes.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.beta, self.loss_type, self.label_smoothing = _check_config(beta, loss_type, label_smoothing)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
    ) -> DPOOutput:
        return dpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )

    def from_logits(
        self,
        policy_chosen_logits: torch.Tensor,
        policy_rejected_logits: torch.Tensor,
        ref_chosen_logits: torch.Tensor,
        ref_rejected_logits: torch.Tensor,
        chosen_labels: torch.Tensor,
        rejected_labels: torch.Tensor,
        *,
        ignore_index: int = -100,
        reduction: str = "sum",
    ) -> DPOOutput:
        """The loss straight from per-position logits of the image tokens (policy and reference, chosen and rejected).

        Equivalent to: ``self(sequence_logprobs(policy_chosen_logits, chosen_labels), sequence_logprobs(
        policy_rejected_logits, rejected_labels), sequence_logprobs(ref_chosen_logits, chosen_labels).detach(),
        sequence_logprobs(ref_rejected_logits, rejected_labels).detach())``.

        Logits are [B, T, V] (any float dtype; e.g. ``model_logits[:, :-1]``), labels [B, T] with ``ignore_index`` at
        prompt / padding positions; ``reduction="mean"`` gives length-normalized log-probs. Policy and reference go
        through the same fp32 ``sequence_logprobs`` path, so identical policy and reference logits give a margin of
        exactly 0. The reference terms are computed without grad.
        """
        kw = dict(ignore_index=ignore_index, reduction=reduction)
        policy_chosen = sequence_logprobs(policy_chosen_logits, chosen_labels, **kw)
        policy_rejected = sequence_logprobs(policy_rejected_logits, rejected_labels, **kw)
        with torch.no_grad():
            ref_chosen = sequence_logprobs(ref_chosen_logits, chosen_labels, **kw)
            ref_rejected = sequence_logprobs(ref_rejected_logits, rejected_labels, **kw)
        return self(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
