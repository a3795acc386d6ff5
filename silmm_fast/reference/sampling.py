"""Readable reference of ``sample_tokens``: classifier-free guidance, temperature, top-k, top-p and one draw per row,
with the kept set found by sorting. Same signature as the public op.

Every backend returns the same token for the same inputs and the same uniform numbers, bit for bit. That works
because every number that decides a token is computed exactly the same way everywhere:

1. Mixed logits, fp32, each step rounded to fp32 (no fused multiply-add):
   ``z = u + s·(c − u)`` with uncond (``s = fp32(cfg_scale)``), else ``z = c``; ``z = −inf`` where c or u is −inf.
2. Gaps below the row max: ``a = (m − z) · τ⁻¹ ≥ 0`` with ``m = max z`` and ``τ⁻¹ = fp32(1 / temperature)``
   (clamped to the largest fp32). ``a = 0`` at the max, ``+inf`` at −inf logits. The token ordering, the top-k /
   top-p thresholds and every tie are judged on ``a``: smaller gap = larger probability.
3. Integer weights ``w = floor(2^40 · 2^(−a·log2 e))`` (int64), from a fixed degree-6 polynomial for ``2^f`` on
   [0, 1) evaluated with separate fp32 multiplies and adds (``weights``). Against ``2^40·e^(−a)`` the relative error
   is ≤ 1.4e-6 (half an fp32 ulp of ``a·log2 e`` ≤ 40, times ln 2, plus the polynomial's 9e-8; 8e-7 is the worst seen
   over 2e7 random gaps) plus the floor's absolute error < 1, i.e. 2^-40 of the top token's weight; a token more
   than 40·ln 2 ≈ 27.7 nats below the max weighs 0 and is never sampled. Sums of int64 weights are exact in any
   order, so block sums, prefix sums and sorted cumulative sums agree.

Kept set (ties at a threshold are all kept; tokens of weight 0 never count):

- top-k (``0 < top_k < V``): ``a_k`` = the k-th smallest gap; keep ``a ≤ a_k``. Mass ``M_k = Σ_{a ≤ a_k} w``.
- top-p: ``a_p`` = the smallest gap such that ``float64(Σ_{a ≤ a_p} w) ≥ float64(fp32(top_p)) · float64(M_k)``; keep
  ``a ≤ a_p``. This is the smallest set of most probable tokens with mass ≥ top_p (never empty: the max qualifies
  when nothing smaller does).

Draw (inverse CDF over the kept set in **vocabulary index order**): with ``M`` the kept mass and ``c_v`` the prefix
sums of kept weights, ``r = min(floor(u · M), M − 1)`` (float64 product) and the token is the smallest ``v`` with
``c_v > r``. ``temperature == 0``: ``argmax z``, ties to the smallest index, no random number used.

A row with a NaN or +inf logit (cond, uncond or mixed), or without any finite mixed logit, gives −1; so does a uniform
outside [0, 1). −inf logits are masked tokens.
"""

from __future__ import annotations

import torch

# fp32(log2 e) and the polynomial 2^f ≈ 1 + f·(C1 + f·(C2 + ... + f·C6)) on [0, 1), least-squares fit in relative
# error, coefficients rounded to fp32 (max relative error 8.6e-8 evaluated in fp32; non-decreasing from p(0) = 1 to
# p = 2 over every fp32 f in [0, 1), checked exhaustively, so weights never increase with the gap).
# kernels/sampling.py holds the same numbers; tests/ops/test_sample_tokens.py checks that they agree.
LOG2E = 1.4426950216293335
EXP2_COEFFS = (
    0.6931470632553101,
    0.24022932350635529,
    0.05548521876335144,
    0.009675532579421997,
    0.0012467376654967666,
    0.0002161380834877491,
)
WEIGHT_BITS = 40  # w ≤ 2^40 per token, so a row of up to 2^22 tokens sums below 2^62 in int64
MAX_VOCAB = 1 << 22
FP32_MAX = 3.4028234663852886e38


def fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (as a Python float), the way a Triton float argument is."""
    return torch.tensor(float(x), dtype=torch.float32).item()


def inverse_temperature(temperature: float) -> float:
    """``τ⁻¹ = fp32(1 / temperature)``, clamped to the largest finite fp32 (tiny temperatures then stay greedy-like
    instead of forming ``0 · inf``)."""
    return min(fp32(1.0 / temperature), FP32_MAX)


def _nan_or_pos_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.isnan(x) | (x == float("inf"))


def mix(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed fp32 logits z [B, V] (step 1 above) and a per-row flag [B] for rows that cannot be sampled: NaN or +inf
    in either input or in z, or no finite z. ``cfg_scale`` must already be an fp32 value (``fp32``)."""
    c = cond.to(torch.float32).contiguous()
    bad = _nan_or_pos_inf(c).any(-1)
    if uncond is None:
        z = c
    else:
        u = uncond.to(torch.float32).contiguous()
        z = u + cfg_scale * (c - u)  # three fp32 roundings: c − u, s·(…), u + (…)
        z = torch.where((c == float("-inf")) | (u == float("-inf")), float("-inf"), z)
        bad |= _nan_or_pos_inf(u).any(-1)
    bad |= _nan_or_pos_inf(z).any(-1) | (z == float("-inf")).all(-1)
    return z, bad


def gaps(z: torch.Tensor, inv_t: float) -> torch.Tensor:
    """``a = (m − z) · τ⁻¹`` (fp32, ≥ 0; step 2 above), ``m`` the row max. Rows flagged by ``mix`` give garbage."""
    m = z.amax(-1, keepdim=True)
    return (m - z) * inv_t


def weights(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sort key int32, weight int64) of the gaps ``a`` (step 3 above).

    The key is the bit pattern of ``a`` read as int32: for ``a ≥ +0`` it orders exactly like ``a``.
    ``w = floor(2^40 · 2^(−x))`` with ``x = a·log2 e``: ``j = ceil(x)``, ``f = j − x`` in [0, 1), ``p ≈ 2^f`` in
    [1, 2], ``P = p·2^23`` an exact integer, ``w = (P·2^17) >> j``.
    """
    key = a.view(torch.int32)
    x = a * LOG2E
    valid = x <= WEIGHT_BITS
    x = torch.where(valid, x, 0.0)
    j = torch.ceil(x)
    f = j - x
    c1, c2, c3, c4, c5, c6 = EXP2_COEFFS
    p = f * c6 + c5  # Horner with one rounding per multiply and per add
    for c in (c4, c3, c2, c1, 1.0):
        p = p * f + c
    big = (p * 8388608.0).to(torch.int64)  # p·2^23: p in [1, 2] has 23 fraction bits, so this is an exact integer
    w = (big << (WEIGHT_BITS - 23)) >> j.to(torch.int64)
    return key, torch.where(valid, w, 0)


def draw(a: torch.Tensor, w: torch.Tensor, bound: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the kept tokens ``a ≤ bound`` ([B, 1]; None keeps every token) in index order."""
    kept = w if bound is None else torch.where(a <= bound, w, 0)
    c = kept.cumsum(-1)
    mass = c[:, -1]
    r = torch.minimum((u * mass.to(torch.float64)).to(torch.int64), mass - 1)
    token = torch.searchsorted(c, r.unsqueeze(-1), right=True).squeeze(-1)
    return token.clamp(max=a.shape[-1] - 1)  # only rows that are bad anyway can point past the end


def sample_tokens(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (optionally guided by ``uncond_logits`` [B, V]); LongTensor [B].

    Equivalent to: mix, scale by the temperature, keep the top-k then the top-p nucleus (ties kept), renormalize,
    draw with one uniform per row — with the exact rules of the module docstring. Memory: a few [B, V] fp32 / int64
    tensors and one sort of the gaps. Inputs are assumed valid (the public op checks them).
    """
    z, bad = mix(logits.detach(), None if uncond_logits is None else uncond_logits.detach(), fp32(cfg_scale))
    if temperature == 0:
        return torch.where(bad, -1, z.argmax(-1))  # argmax returns the first maximal index
    B, V = z.shape
    if noise is None:
        noise = torch.rand(B, generator=generator, device=z.device, dtype=torch.float64)
    u = noise.detach().to(torch.float64)
    bad |= ~((u >= 0) & (u < 1))
    u = torch.where(bad, 0.0, u)

    a = gaps(z, inverse_temperature(temperature))
    _, w = weights(a)
    a_sorted, order = torch.sort(a, dim=-1, stable=True)  # most probable first
    w_sorted = w.gather(-1, order)
    # top-k: keep every gap up to the k-th smallest (ties at the k-th kept)
    a_k = a_sorted[:, top_k - 1 : top_k] if 0 < top_k < V else a_sorted[:, -1:]
    mass_k = torch.where(a_sorted <= a_k, w_sorted, 0).sum(-1)
    # top-p: the first sorted position whose cumulative mass reaches top_p · M_k; its gap (and its ties) bound the set
    target = fp32(top_p) * mass_k.to(torch.float64)
    reached = w_sorted.cumsum(-1).to(torch.float64) >= target.unsqueeze(-1)
    first = reached.to(torch.int8).argmax(-1, keepdim=True)
    a_p = a_sorted.gather(-1, first)
    token = draw(a, w, a_p, u)
    return torch.where(bad, -1, token)
