"""Fused token sampler: classifier-free guidance, temperature, top-k, top-p and an inverse-CDF draw, one program per row.

Per row, cond c / uncond u (length V), one uniform r in [0, 1) (silmm_fast.reference.sampling states every rule):
    z = u + s·(c − u)   (fp32, one rounding per step; −inf where c or u is −inf)      m = max z
    a = (m − z)·τ⁻¹ ≥ 0                 gap below the max: the order, thresholds and ties are judged on a
    w = floor(2^40 · 2^(−a·log2 e))     int64 weight from a fixed fp32 polynomial: sums are exact in any order
    keep {a ≤ A}: A = smallest gap with count{a ≤ A} ≥ top_k, then smallest with Σ_{a ≤ A} w ≥ top_p·M_k (fp64)
    token = smallest v with Σ_{v' ≤ v, kept} w > floor(r·M)                    (M = kept mass, index order)
temperature 0: argmax z, ties to the smallest index. Sampling has no gradient.

Thresholds without a sort: a ≥ +0, so the bit pattern of a read as int32 (the key) orders like a. Each threshold is
the smallest key whose count / mass reaches its target, found by bisection over [0, key of the last nonzero weight];
every step is one pass over the row giving the count and mass at or below the midpoint plus the nearest data keys on
either side, and the bracket shrinks to those data keys, so it ends as soon as one distinct gap is left (at most 31
steps, usually far fewer). Because weights are integers and the polynomial uses separate fp32 multiplies and adds
(launched with fp fusion off, so no FMA contracts them), the kept set and the token equal the sort-based reference's
bit for bit.

Memory traffic: the logits are read from HBM once; the later passes over the same row hit L2 (a row is 32–64 KiB at
V = 16384 in bf16 / fp32, cond + uncond; a 64-row batch is 4 MiB). The only write is one int64 per row, and there is
no [B, V] intermediate: the naive softmax / sort / cumsum / multinomial chain writes and re-reads about ten [B, V]
tensors over six launches. Passes per row: greedy 1; plain sampling 3 (max, total mass, draw); + one per bisection
step for top-k and for top-p. Rows are read in place with any strides (no copy for non-contiguous logits).

Kernels: ``_sample_tokens_fwd_kernel`` (the token per row; sampling has no backward) and
``_sample_tokens_weights_kernel`` (the per-element numbers, for tests against the reference). Launchers:
``sample_tokens_fwd`` and ``sampling_weights``; the vocabulary block is their ``block_v`` argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from silmm_fast.kernels._common import interpreted, on_device

# Vocabulary block per step. Each element carries an fp32 logit, an int32 key, an int64 weight and an int64 prefix
# sum, so 2048 per step with 8 warps keeps 8 elements per thread in registers. Not tuned on a GPU yet. Under the
# interpreter, where a block costs numpy calls rather than registers, whole rows up to 16384.
MAX_BLOCK_V = 2048
MAX_BLOCK_V_INTERPRETED = 16384

# The same numbers as silmm_fast.reference.sampling (tests check they agree): fp32(log2 e), the polynomial for 2^f
# on [0, 1), and the weight scale 2^40.
_LOG2E = tl.constexpr(1.4426950216293335)
_C1 = tl.constexpr(0.6931470632553101)
_C2 = tl.constexpr(0.24022932350635529)
_C3 = tl.constexpr(0.05548521876335144)
_C4 = tl.constexpr(0.009675532579421997)
_C5 = tl.constexpr(0.0012467376654967666)
_C6 = tl.constexpr(0.0002161380834877491)
_WEIGHT_BITS = tl.constexpr(40)
LOG2E = _LOG2E.value
EXP2_COEFFS = (_C1.value, _C2.value, _C3.value, _C4.value, _C5.value, _C6.value)
WEIGHT_BITS = _WEIGHT_BITS.value
_KEY_NONE = tl.constexpr(2147483647)  # above every key (+inf is 0x7F800000)


@triton.jit
def _mixed_block(cond_row, uncond_row, cols, V, stride_cv, stride_uv, cfg_scale):
    """Mixed fp32 logits of one block (−inf past V) and a per-element flag for values that make the row unusable.
    ``uncond_row`` None: no guidance, z = c."""
    in_row = cols < V
    offs = cols.to(tl.int64)
    c = tl.load(cond_row + offs * stride_cv, mask=in_row, other=0.0).to(tl.float32)
    bad = (c != c) | (c == float("inf"))
    if uncond_row is not None:
        u = tl.load(uncond_row + offs * stride_uv, mask=in_row, other=0.0).to(tl.float32)
        diff = c - u
        z = u + cfg_scale * diff
        masked = (c == float("-inf")) | (u == float("-inf")) | (cols >= V)
        z = tl.where(masked, float("-inf"), z)
        bad = bad | (u != u) | (u == float("inf"))
    else:
        z = tl.where(in_row, c, float("-inf"))
    bad = bad | (z != z) | (z == float("inf"))
    return z, bad


@triton.jit
def _key_and_weight(z, m, inv_t):
    """Sort key (int32 bits of the gap a ≥ 0) and integer weight floor(2^40 · 2^(−a·log2 e)) of each element."""
    a = (m - z) * inv_t
    key = a.to(tl.int32, bitcast=True)
    x = a * _LOG2E
    valid = x <= _WEIGHT_BITS
    x = tl.where(valid, x, 0.0)
    j = tl.ceil(x)
    f = j - x
    p = f * _C6 + _C5
    p = p * f + _C4
    p = p * f + _C3
    p = p * f + _C2
    p = p * f + _C1
    p = p * f + 1.0
    big = (p * 8388608.0).to(tl.int64)  # p·2^23, an exact integer
    w = (big << (_WEIGHT_BITS - 23)) >> j.to(tl.int64)
    return key, tl.where(valid, w, 0)


@triton.jit
def _scan_below(cond_row, uncond_row, V, stride_cv, stride_uv, cfg_scale, m, inv_t, mid, BLOCK_V: tl.constexpr):
    """One pass over the row for a bisection step: count and mass of the elements with key ≤ mid, the largest key
    ≤ mid and the smallest key above it."""
    count = tl.zeros([], tl.int64)
    mass = tl.zeros([], tl.int64)
    below = tl.full([], -1, tl.int32)
    above = tl.full([], _KEY_NONE, tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z, _ = _mixed_block(cond_row, uncond_row, cols, V, stride_cv, stride_uv, cfg_scale)
        key, w = _key_and_weight(z, m, inv_t)
        inside = key <= mid
        count += tl.sum(inside.to(tl.int64), 0)
        mass += tl.sum(tl.where(inside, w, 0), 0)
        below = tl.maximum(below, tl.max(tl.where(inside, key, -1), 0))
        above = tl.minimum(above, tl.min(tl.where(inside, _KEY_NONE, key), 0))
    return count, mass, below, above


@triton.jit
def _sample_tokens_fwd_kernel(
    # pointers: uncond_ptr None without guidance; noise_ptr None for greedy decoding (argmax, nothing drawn)
    cond_ptr,
    uncond_ptr,
    noise_ptr,
    out_ptr,
    # shape and strides
    V,
    stride_cb,
    stride_cv,
    stride_ub,
    stride_uv,
    # sampling settings, fp32 values (top_k an int)
    cfg_scale,
    inv_t,
    top_k,
    top_p,
    # compile-time switches and tile
    DO_TOP_K: tl.constexpr,
    DO_TOP_P: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cond_row = cond_ptr + row * stride_cb
    uncond_row = uncond_ptr
    if uncond_ptr is not None:
        uncond_row = uncond_ptr + row * stride_ub

    # Pass 1: row max, usability, and for greedy the first index of the max.
    m = tl.full([], float("-inf"), tl.float32)
    bad = tl.zeros([], tl.int32)
    best = tl.zeros([], tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z, bad_el = _mixed_block(cond_row, uncond_row, cols, V, stride_cv, stride_uv, cfg_scale)
        z = tl.where(bad_el, float("-inf"), z)
        block_max = tl.max(z, 0)
        if noise_ptr is None:
            first = tl.min(tl.where(z == block_max, cols, V), 0).to(tl.int64)
            best = tl.where(block_max > m, first, best)  # strict: an earlier block keeps a tie
        m = tl.maximum(m, block_max)
        bad = tl.maximum(bad, tl.max(bad_el.to(tl.int32), 0))
    unusable = (bad > 0) | (m == float("-inf"))

    if noise_ptr is None:
        tl.store(out_ptr + row, tl.where(unusable, -1, best))
    else:
        # Pass 2: total mass, the key of the last nonzero weight, and the number of nonzero weights.
        total = tl.zeros([], tl.int64)
        key_cut = tl.zeros([], tl.int32)
        n_pos = tl.zeros([], tl.int64)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z, _ = _mixed_block(cond_row, uncond_row, cols, V, stride_cv, stride_uv, cfg_scale)
            key, w = _key_and_weight(z, m, inv_t)
            total += tl.sum(w, 0)
            key_cut = tl.maximum(key_cut, tl.max(tl.where(w > 0, key, 0), 0))
            n_pos += tl.sum((w > 0).to(tl.int64), 0)

        # The kept set is {key ≤ hi}; mass_hi is its mass. Invariant of both searches: the answer lies in [lo, hi],
        # both data keys, and hi satisfies the condition.
        hi = key_cut
        mass_hi = total
        if DO_TOP_K:
            lo = tl.where(n_pos > top_k, 0, key_cut)  # fewer nonzero weights than k: nothing to cut
            while lo < hi:
                mid = lo + (hi - lo) // 2
                count, mass, below, above = _scan_below(
                    cond_row, uncond_row, V, stride_cv, stride_uv, cfg_scale, m, inv_t, mid, BLOCK_V
                )
                ok = count >= top_k
                mass_hi = tl.where(ok, mass, mass_hi)
                hi_next = tl.where(ok, below, hi)
                lo = tl.where(ok, lo, above)
                hi = hi_next
        if DO_TOP_P:
            target = mass_hi.to(tl.float64) * top_p  # exact fp32 → fp64 promotion, one rounding
            lo = tl.zeros([], tl.int32)
            while lo < hi:
                mid = lo + (hi - lo) // 2
                _, mass, below, above = _scan_below(
                    cond_row, uncond_row, V, stride_cv, stride_uv, cfg_scale, m, inv_t, mid, BLOCK_V
                )
                ok = mass.to(tl.float64) >= target
                mass_hi = tl.where(ok, mass, mass_hi)
                hi_next = tl.where(ok, below, hi)
                lo = tl.where(ok, lo, above)
                hi = hi_next

        # Last pass: the first kept index whose prefix mass exceeds r = floor(u·M), in vocabulary order.
        u = tl.load(noise_ptr + row).to(tl.float64)
        bad_u = ~((u >= 0.0) & (u < 1.0))  # also NaN
        u = tl.where(bad_u, 0.0, u)
        r = tl.minimum((u * mass_hi.to(tl.float64)).to(tl.int64), mass_hi - 1)
        running = tl.zeros([], tl.int64)
        token = tl.full([], -1, tl.int64)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z, _ = _mixed_block(cond_row, uncond_row, cols, V, stride_cv, stride_uv, cfg_scale)
            key, w = _key_and_weight(z, m, inv_t)
            kept = tl.where(key <= hi, w, 0)
            prefix = running + tl.cumsum(kept, 0)
            first = tl.min(tl.where(prefix > r, cols, V), 0).to(tl.int64)
            token = tl.where((token < 0) & (first < V), first, token)
            running += tl.sum(kept, 0)
        tl.store(out_ptr + row, tl.where(unusable | bad_u, -1, token))


@triton.jit
def _sample_tokens_weights_kernel(
    # pointers: uncond_ptr None without guidance
    cond_ptr,
    uncond_ptr,
    max_ptr,
    z_ptr,
    key_ptr,
    w_ptr,
    # shape and strides
    V,
    stride_cb,
    stride_cv,
    stride_ub,
    stride_uv,
    # settings, fp32 values
    cfg_scale,
    inv_t,
    # tile
    BLOCK_V: tl.constexpr,
):
    """The sampler's per-element numbers (mixed logit, key, weight) for a given row max: lets tests compare them bit
    for bit with the reference."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    uncond_row = uncond_ptr
    if uncond_ptr is not None:
        uncond_row = uncond_ptr + row * stride_ub
    z, _ = _mixed_block(cond_ptr + row * stride_cb, uncond_row, cols, V, stride_cv, stride_uv, cfg_scale)
    key, w = _key_and_weight(z, tl.load(max_ptr + row), inv_t)
    in_row = cols < V
    tl.store(z_ptr + row * V + cols, z, mask=in_row)
    tl.store(key_ptr + row * V + cols, key, mask=in_row)
    tl.store(w_ptr + row * V + cols, w, mask=in_row)


def default_block_v(V: int) -> int:
    """The vocabulary block the launchers use when ``block_v`` is None: the row, up to ``MAX_BLOCK_V``."""
    return min(triton.next_power_of_2(V), MAX_BLOCK_V_INTERPRETED if interpreted() else MAX_BLOCK_V)


def _uncond_strides(uncond: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if uncond is None else (uncond.stride(0), uncond.stride(1))


def sample_tokens_fwd(
    logits: torch.Tensor,
    uncond: torch.Tensor | None,
    noise: torch.Tensor | None,
    *,
    cfg_scale: float,
    inv_temperature: float | None,
    top_k: int,
    top_p: float,
    block_v: int | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (any strides; ``uncond`` [B, V] or None): LongTensor [B].

    ``cfg_scale``, ``inv_temperature`` and ``top_p`` must be fp32 values (they are passed as fp32 scalars and the
    reference rounds the same way); ``inv_temperature`` None means greedy (``noise`` unused). ``noise`` is [B]
    uniform in [0, 1), any float dtype (read as float64; a value outside [0, 1) or NaN gives −1 for its row).
    ``top_k`` 0 or ≥ V and ``top_p`` ≥ 1 switch those searches off at compile time. ``block_v``: vocabulary block
    (rounded up to a power of two; None: ``default_block_v(V)``). The caller validates; this only launches.
    """
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    greedy = inv_temperature is None
    noise = None if greedy else noise.to(torch.float64).contiguous()
    stride_ub, stride_uv = _uncond_strides(uncond)
    BLOCK_V = triton.next_power_of_2(block_v) if block_v is not None else default_block_v(V)
    with on_device(logits.device):
        _sample_tokens_fwd_kernel[(B,)](
            cond_ptr=logits,
            uncond_ptr=uncond,
            noise_ptr=noise,
            out_ptr=out,
            V=V,
            stride_cb=logits.stride(0),
            stride_cv=logits.stride(1),
            stride_ub=stride_ub,
            stride_uv=stride_uv,
            cfg_scale=cfg_scale,
            inv_t=1.0 if greedy else inv_temperature,
            top_k=top_k,
            top_p=top_p,
            DO_TOP_K=(not greedy) and 0 < top_k < V,
            DO_TOP_P=(not greedy) and top_p < 1.0,
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 1024 else 4,
            enable_fp_fusion=False,  # an FMA would round differently from the reference's separate ops
        )
    return out


def sampling_weights(
    logits: torch.Tensor,
    uncond: torch.Tensor | None,
    row_max: torch.Tensor,
    *,
    cfg_scale: float,
    inv_temperature: float,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's mixed logits z (fp32), keys (int32) and weights (int64), each [B, V], given the fp32 row max
    [B] of z: the numbers every decision of ``sample_tokens_fwd`` is made from (for tests against the reference)."""
    B, V = logits.shape
    z = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    key = torch.empty(B, V, dtype=torch.int32, device=logits.device)
    w = torch.empty(B, V, dtype=torch.int64, device=logits.device)
    if B == 0:
        return z, key, w
    stride_ub, stride_uv = _uncond_strides(uncond)
    BLOCK_V = triton.next_power_of_2(block_v) if block_v is not None else default_block_v(V)
    with on_device(logits.device):
        _sample_tokens_weights_kernel[(B, triton.cdiv(V, BLOCK_V))](
            cond_ptr=logits,
            uncond_ptr=uncond,
            max_ptr=row_max.to(torch.float32).contiguous(),
            z_ptr=z,
            key_ptr=key,
            w_ptr=w,
            V=V,
            stride_cb=logits.stride(0),
            stride_cv=logits.stride(1),
            stride_ub=stride_ub,
            stride_uv=stride_uv,
            cfg_scale=cfg_scale,
            inv_t=inv_temperature,
            BLOCK_V=BLOCK_V,
            enable_fp_fusion=False,
        )
    return z, key, w
