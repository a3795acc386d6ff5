"""KC-DPO: kernel-based continuous DPO for models whose images are feature matrices (SPEC.md §2).

With H the policy's features, Hr the frozen reference's, Hw / Hl a winner's / loser's and k a distance:

    L = −log σ(γ·[−k(H, Hw) + k(Hr, Hw) + k(H, Hl) − k(Hr, Hl)])

It is DPO with an isotropic Gaussian policy around the model output (k = squared Euclidean, γ = β/(2σ²)): a
negative distance plays the role of the log-likelihood. All distances a batch needs come from one fused
``pairwise_distance`` call (one kernel launch each way on the Triton backend): x = [policy, reference]
([B, 2, L, D]) against y = [winners..., losers...].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from silmm_fast._validate import check_choice, check_float, check_ndim, check_positive, check_same_device
from silmm_fast.losses.dpo import DPOOutput
from silmm_fast.ops.pairwise_distance import KERNELS, POOLS, distances


def _check_config(gamma: float, kernel: str, pool: str, sigma: float) -> tuple[float, str, str, float]:
    gamma = check_positive("gamma", gamma)
    check_choice("kernel", kernel, KERNELS)
    check_choice("pool", pool, POOLS)
    sigma = check_positive("sigma", sigma)
    return gamma, kernel, pool, sigma


def _candidates(name: str, t: object, policy: torch.Tensor) -> torch.Tensor:
    t = check_float(name, t)
    check_ndim(name, t, (3, 4), "[B, L, D] or [B, K, L, D]")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.shape[0] != policy.shape[0] or t.shape[2:] != policy.shape[1:]:
        B, L, D = policy.shape
        raise ValueError(
            f"{name}: expected shape [{B}, L, D] or [{B}, K, L, D] with L, D = {L}, {D} (like policy), "
            f"got {tuple(t.shape)}"
        )
    if t.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one candidate (K ≥ 1), got shape {tuple(t.shape)}")
    if t.dtype != policy.dtype:
        raise TypeError(f"{name}: expected dtype {policy.dtype} (same as policy), got {t.dtype}")
    return t


def kc_dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    gamma: float = 1.0,
    kernel: str = "cosine",
    pool: str = "mean",
    sigma: float = 1.0,
) -> DPOOutput:
    """KC-DPO loss of policy features against chosen (winner) and rejected (loser) feature matrices.

    Equivalent to (``k = pairwise_distance(..., kernel=kernel, pool=pool, sigma=sigma)`` on single matrices,
    i over the Kw winners, j over the Kl losers)::

        cw_i = γ·(k(Hr, Hw_i) − k(H, Hw_i));   rl_j = γ·(k(Hr, Hl_j) − k(H, Hl_j))
        losses[b] = mean_{i, j} −log σ(cw_i − rl_j)          # every winner paired with every loser
        loss = losses.mean();  chosen_rewards[b] = mean_i cw_i;  rejected_rewards[b] = mean_j rl_j

    Args:
        policy: [B, L, D] the policy's features H (gradients flow here).
        reference: [B, L, D] the reference model's features Hr (detached: no gradient).
        chosen: [B, L, D] or [B, Kw, L, D] winners Hw. rejected: [B, L, D] or [B, Kl, L, D] losers Hl. Usually
            sampled without grad; gradients flow to them if they require it.
        gamma: > 0, the inverse temperature γ. kernel, pool, sigma: as in ``pairwise_distance``.
        All tensors floating, one dtype, one device.

    Returns:
        ``DPOOutput(loss, losses, chosen_rewards, rejected_rewards)``: ``loss`` a scalar; ``losses`` the per-prompt
        loss [B] (mean over that prompt's Kw·Kl pairs); rewards [B], detached. float32 (float64 for float64 inputs).
        One fused distance call ([B, 2, L, D] against [B, Kw + Kl, L, D]; on the Triton backend one kernel launch
        forward and one backward); inputs are stacked once for it.

    Raises:
        TypeError: non-tensor, non-floating or mixed dtypes. ValueError: shapes or devices differ, an empty batch
        (B, L or D = 0), no candidate, ``gamma`` / ``sigma`` not a finite number > 0, unknown ``kernel`` / ``pool``.
    """
    gamma, kernel, pool, sigma = _check_config(gamma, kernel, pool, sigma)
    policy = check_float("policy", policy)
    check_ndim("policy", policy, 3, "[B, L, D]")
    if policy.numel() == 0:
        # an empty batch would average zero losses into NaN; dpo_loss refuses it the same way
        raise ValueError(
            f"policy: expected at least one prompt, token and feature ([B, L, D], each ≥ 1), got shape "
            f"{tuple(policy.shape)}"
        )
    reference = check_float("reference", reference)
    if reference.shape != policy.shape:
        raise ValueError(
            f"reference: expected shape {tuple(policy.shape)} (same as policy), got {tuple(reference.shape)}"
        )
    if reference.dtype != policy.dtype:
        raise TypeError(f"reference: expected dtype {policy.dtype} (same as policy), got {reference.dtype}")
    chosen = _candidates("chosen", chosen, policy)
    rejected = _candidates("rejected", rejected, policy)
    check_same_device(policy=policy, reference=reference, chosen=chosen, rejected=rejected)

    kw = chosen.shape[1]
    x = torch.stack((policy, reference.detach()), dim=1)  # [B, 2, L, D]
    y = torch.cat((chosen, rejected), dim=1)  # [B, Kw + Kl, L, D]
    dist = distances(x, y, kernel, pool, sigma)  # [B, 2, Kw + Kl]; the arguments are checked above
    chosen_terms = gamma * (dist[:, 1, :kw] - dist[:, 0, :kw])  # [B, Kw]
    rejected_terms = gamma * (dist[:, 1, kw:] - dist[:, 0, kw:])  # [B, Kl]
    margins = chosen_terms.unsqueeze(2) - rejected_terms.unsqueeze(1)  # [B, Kw, Kl]
    losses = -F.logsigmoid(margins).mean(dim=(1, 2))
    return DPOOutput(losses.mean(), losses, chosen_terms.mean(1).detach(), rejected_terms.mean(1).detach())


class KCDPOLoss(nn.Module):
    """KC-DPO loss as a module: the configuration is fixed at construction, ``forward`` takes the four feature sets.

    Equivalent to: ``kc_dpo_loss(policy, reference, chosen, rejected, gamma=gamma, kernel=kernel, pool=pool,
    sigma=sigma)``. See ``kc_dpo_loss`` for the formula, shapes and dtypes.
    """

    def __init__(self, gamma: float = 1.0, kernel: str = "cosine", pool: str = "mean", sigma: float = 1.0) -> None:
        super().__init__()
        self.gamma, self.kernel, self.pool, self.sigma = _check_config(gamma, kernel, pool, sigma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, kernel={self.kernel!r}, pool={self.pool!r}, sigma={self.sigma}"

    def forward(
        self, policy: torch.Tensor, reference: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
    ) -> DPOOutput:
        return kc_dpo_loss(
            policy, reference, chosen, rejected, gamma=self.gamma, kernel=self.kernel, pool=self.pool, sigma=self.sigma
        )
