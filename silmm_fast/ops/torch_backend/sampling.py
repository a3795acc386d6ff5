"""The torch backend of ``sample_tokens``: vectorized PyTorch over chunks of rows, giving the reference's tokens bit
for bit (``silmm_fast.reference.sampling`` states the rules and the exact arithmetic). No sort for plain sampling,
``topk`` for top-k, and for top-p a partial selection grown until the nucleus is reached (on CPU) or one sort (on
other devices). Per chunk: the mixed logits, the gaps and the int64 weights, each [rows, V].
"""

from __future__ import annotations

import torch

from silmm_fast.reference import sampling as _reference

# Logits per chunk (rows per chunk = this // V, at least 1). The weight math is ~20 elementwise fp32 / int64 ops per
# logit, so a chunk small enough to stay in cache between them pays off: 2^18 elements (1 MiB of fp32).
CHUNK_ELEMENTS = 1 << 18


def _bad_max(m: torch.Tensor) -> torch.Tensor:
    """Row maxima (amax propagates NaN) that mark an unusable row: NaN or +inf anywhere in it."""
    return torch.isnan(m) | (m == float("inf"))


def _mix(
    cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.mix`` in fewer passes: the same three fp32 roundings done in place, and the checks read off row
    maxima (one reduction each; the max of z is needed anyway). Also returns the row max [B, 1]."""
    c = cond.to(torch.float32)
    if uncond is None:
        z = c.contiguous()
        bad = torch.zeros(c.shape[0], dtype=torch.bool, device=c.device)
    else:
        u = uncond.to(torch.float32)
        bad = _bad_max(c.amax(-1)) | _bad_max(u.amax(-1))
        z = torch.sub(c, u, out=torch.empty(c.shape, dtype=torch.float32, device=c.device))
        z.mul_(cfg_scale).add_(u)  # u + s·(c − u): addition commutes exactly
        z.masked_fill_(torch.minimum(c, u) == float("-inf"), float("-inf"))
    m = z.amax(-1, keepdim=True)
    return z, bad | _bad_max(m.squeeze(-1)) | (m.squeeze(-1) == float("-inf")), m


def weights(a: torch.Tensor) -> torch.Tensor:
    """``reference.weights(a)[1]`` bit for bit, in fewer passes: in-place Horner, and instead of masking x > 40, x is
    clamped to 41: every x in (40, 41] has j = 41 and f = 41 − x ≤ 1 − 2^-18 (the fp32 step above 40 is 2^-18), so
    p < 2, P·2^17 < 2^41 and the shift by 41 leaves 0, the reference's weight there."""
    x = (a * _reference.LOG2E).clamp_(max=_reference.WEIGHT_BITS + 1)
    j = torch.ceil(x)
    f = j - x
    c1, c2, c3, c4, c5, c6 = _reference.EXP2_COEFFS
    p = f * c6
    for c in (c5, c4, c3, c2, c1):
        p.add_(c).mul_(f)
    p.add_(1.0).mul_(8388608.0)
    w = p.to(torch.int64).bitwise_left_shift_(_reference.WEIGHT_BITS - 23)
    return w.bitwise_right_shift_(j.to(torch.int64))


def _smallest_gaps(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest gaps per row, ascending, and their indices (a full sort when k is the whole row)."""
    if k >= a.shape[-1]:
        return torch.sort(a, dim=-1)
    return torch.topk(a, k, dim=-1, largest=False, sorted=True)


def _bound(a: torch.Tensor, w: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """Largest kept gap per row ([rows, 1]; keep ``a ≤ bound``), or None when every token is kept."""
    V = a.shape[-1]
    use_k = 0 < top_k < V
    if not use_k and top_p >= 1.0:
        return None
    if use_k:
        # the k smallest gaps; ties of the k-th beyond position k are in the set too, so the mass is over the row
        a_top, order = _smallest_gaps(a, top_k)
        a_k = a_top[:, -1:]
        if top_p >= 1.0:
            return a_k
        mass_k = torch.where(a <= a_k, w, 0).sum(-1)
    else:
        a_k = None
        mass_k = w.sum(-1)
    target = (top_p * mass_k.to(torch.float64)).unsqueeze(-1)
    # Without top-k, the nucleus usually holds few tokens: on CPU, where a data-dependent branch costs no device sync,
    # grow a partial selection (256, 1024, ...) until every row's cumulative mass reaches the target instead of
    # sorting whole rows. On other devices, one sort.
    k = top_k if use_k else (min(V, 256) if a.device.type == "cpu" else V)
    while True:
        if not use_k:
            a_top, order = _smallest_gaps(a, k)
        reached = w.gather(-1, order).cumsum(-1).to(torch.float64) >= target
        if use_k or k >= V or bool(reached[:, -1].all()):
            break
        k = min(V, 4 * k)
    # The first position reaching the target bounds the set; the order among equal gaps does not change which gap
    # that is. With top-k, a row that reaches it nowhere in the list reaches it in the k-th gap's tail of ties.
    first = reached.to(torch.int8).argmax(-1, keepdim=True)
    bound = a_top.gather(-1, first)
    return bound if a_k is None else torch.where(reached.any(-1, keepdim=True), bound, a_k)


@torch.no_grad()
def sample_tokens_fwd(
    logits: torch.Tensor,
    uncond: torch.Tensor | None,
    noise: torch.Tensor | None,
    *,
    cfg_scale: float,
    inv_temperature: float | None,
    top_k: int,
    top_p: float,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (``uncond`` [B, V] or None): LongTensor [B], −1 for an unusable row.

    The arguments as for ``silmm_fast.kernels.sampling.sample_tokens_fwd``: fp32 values of ``cfg_scale``,
    ``inv_temperature`` (None: greedy, ``noise`` unused) and ``top_p``; ``noise`` [B] float64 uniforms.
    ``chunk_elements``: logits per chunk of rows (None: ``CHUNK_ELEMENTS``). The logits are never written.
    """
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    rows = max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // V)
    for r0 in range(0, B, rows):
        rs = slice(r0, min(B, r0 + rows))
        z, bad, m = _mix(logits[rs], None if uncond is None else uncond[rs], cfg_scale)
        if inv_temperature is None:
            out[rs] = torch.where(bad, -1, z.argmax(-1))
            continue
        uc = noise[rs]
        bad |= ~((uc >= 0) & (uc < 1))
        a = torch.sub(m, z).mul_(inv_temperature)  # reference.gaps (z may be the caller's logits: never written)
        w = weights(a)
        bound = _bound(a, w, top_k, top_p)
        token = _reference.draw(a, w, bound, torch.where(bad, 0.0, uc))
        out[rs] = torch.where(bad, -1, token)
    return out
