"""The token sampler the adapters call: ``silmm_fast.sample_tokens`` when the installed package has it, else a
private pure-PyTorch stand-in with the same signature and semantics."""

from __future__ import annotations

import torch


def _sample_tokens_torch(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] with classifier-free guidance, temperature, top-k and nucleus top-p.

    Equivalent to: ``z = uncond + cfg_scale * (logits - uncond)`` (just ``logits`` when ``uncond_logits`` is None),
    then ``argmax(z)`` when ``temperature`` is 0, else a draw from ``softmax(z / temperature)`` restricted to the
    ``top_k`` largest (0 = all) and to the smallest most-likely set whose mass reaches ``top_p``. The draw is an
    inverse-CDF lookup of one uniform number per row: ``noise`` [B] in [0, 1) when given, else drawn from
    ``generator`` on the generator's device (so a CPU generator drives sampling on any device).
    Returns LongTensor [B] on ``logits.device``.
    """
    z = logits.float()
    if uncond_logits is not None:
        u = uncond_logits.float()
        z = u + cfg_scale * (z - u)
    if temperature == 0:
        return z.argmax(-1)
    z = z / temperature
    if top_k and 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs, order = torch.softmax(z, dim=-1).sort(dim=-1, descending=True)
    if top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    if noise is None:
        gen_device = generator.device if generator is not None else z.device
        noise = torch.rand(z.shape[0], generator=generator, device=gen_device)
    target = noise.to(z.device, torch.float32)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True)
    # u · mass can round up to the mass itself: fall back to the last token with nonzero probability.
    pick = torch.minimum(pick, (probs > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)


try:  # the package's fused sampler, once it exists
    from silmm_fast import sample_tokens  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the installed version
    sample_tokens = _sample_tokens_torch

__all__ = ["sample_tokens"]
