"""Fused pairwise distances between pooled feature matrices: x[B, M, L, D] against y[B, N, L, D] -> [B, M, N].

One launch forward, one launch backward, whatever the kernel, pool and width (KC-DPO's whole batch: policy and
reference against every winner and loser). At KC-DPO shapes M and N are tiny while D is large (10^3 .. 10^5), so
the op is bound by reading x and y once. The forward pools over the L tokens while loading (mean / max, or per
token for pool "none"), accumulates three small statistics per pair and token (Gram g = a·c through ``tl.dot``,
squared norms ‖a‖², ‖c‖²) and applies the distance epilogue to them in the same program; no pooled vector and no
per-token [M, N, L, D] intermediate reaches memory. Backward re-reads x and y once, recomputes the pooling and
writes both gradients from one grid (row blocks of x, then row blocks of y). With a distance f(g, ‖a‖², ‖c‖²)
(symmetric in a and c) and upstream gradient G:

    ∂/∂a_i = Σ_j G_ij · (2·P_ij·a_i + Q_ij·c_j),   P = ∂f/∂‖a‖²,  Q = ∂f/∂g
    sq = max(‖a‖² + ‖c‖² − 2g, 0)        (the matmul expansion can round slightly below zero)
    cosine 1 − g/(ra·rc), ra = max(‖a‖, eps) | euclidean √sq | sqeuclidean sq | rbf 2 − 2·exp(−sq/(2σ²))

Conventions (shared with the torch backend and the reference): euclidean has gradient 0 where the distance is
exactly 0; cosine divides by norms clamped at ``eps`` (a zero vector has distance 1 to everything), and a norm below
``eps`` passes no gradient through the norm; max pooling routes the gradient to the first maximal token. Mean pooling
accumulates in fp32 (fp64 for fp64 inputs); the dots run in full precision (``input_precision="ieee"``, no TF32).

Wide rows with few pairs split D across the programs of the same launch ("split-D"): each writes partial statistics,
then takes a ticket from a per-tile counter; the program that takes the last ticket sums the partials in split order
(deterministic) and runs the epilogue. Only that program touches the tile's outputs, so no second launch is needed;
the launcher zero-fills the [B, tiles] counters (a fill of a few bytes) before such a launch.

Near-coincident points far from the origin: the expansion's rounding error is about ε·(‖a‖² + ‖c‖²), so two points
of norm 8e3 at distance 8e-3 would come out at distance 0 (or ~4) in fp32. The epilogue of the distance kernels
(euclidean, sqeuclidean, rbf) therefore flags every pair with sq < RATIO·(‖a‖² + ‖c‖²), where the expansion keeps
fewer than ~17 correct bits, and, in a tile holding one, recomputes sq = Σ_d (a_d − c_d)² from the differences (a
second read of that tile's rows, in the same program); tiles without a flagged pair pay nothing more. The squared
distance is what backward keeps, and for flagged pairs it uses the difference form of the gradient,
∂/∂a_i = Σ_j 2·G_ij·P_ij·(a_i − c_j), which does not cancel either. Cosine needs no such path: its error is absolute
(~ε on a distance in [0, 2]) whatever the norms.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from silmm_fast.kernels._common import acc_types, interpreted, on_device

KERNELS = {"cosine": 0, "euclidean": 1, "sqeuclidean": 2, "rbf": 3}
POOLS = {"mean": 0, "max": 1, "none": 2}
COSINE_EPS = 1e-8
# A pair is recomputed from differences when sq < EXACT_RATIO·(‖a‖² + ‖c‖²): 2^17·ε of the accumulation dtype, so
# the expansion's relative error elsewhere stays below ~2^-17 (times the small growth of length-D sums).
EXACT_RATIO = {torch.float32: 2.0**-6, torch.float64: 2.0**-35}


# --- shared pieces -------------------------------------------------------------------------------------------------
@triton.jit
def _expanded_sq(g, na, nc):
    # ‖a‖² + ‖c‖² − 2g, clamped at 0 (the expansion can round slightly below zero); NaN stays NaN
    return tl.maximum(na[:, None] + nc[None, :] - 2.0 * g, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _distance_of_sq(sq, KERNEL: tl.constexpr, inv_two_sigma2):
    # the distance kernels (KERNEL 1..3) as functions of the squared distance
    if KERNEL == 1:
        dist = tl.sqrt(sq)
    elif KERNEL == 2:
        dist = sq
    else:
        dist = 2.0 - 2.0 * tl.exp(-sq * inv_two_sigma2)
    return dist


@triton.jit
def _cosine_distance(g, na, nc, EPS: tl.constexpr):
    # g [BM, BN], na [BM], nc [BN] -> 1 − g / (max(‖a‖, eps)·max(‖c‖, eps))
    eps = tl.full((), EPS, na.dtype)  # a bare constexpr float would enter fp64 math as fp32
    ra = tl.maximum(tl.sqrt(na), eps)
    rc = tl.maximum(tl.sqrt(nc), eps)
    return 1.0 - g / (ra[:, None] * rc[None, :])


@triton.jit
def _coefficients(g, na, nc, KERNEL: tl.constexpr, inv_two_sigma2, EPS: tl.constexpr):
    # P = ∂f/∂‖a‖² and Q = ∂f/∂g, both [BM, BN]. For the distance kernels (KERNEL 1..3) ``g`` holds the squared
    # distance itself (the statistic the forward keeps), and Q = −2P.
    if KERNEL == 0:
        eps = tl.full((), EPS, na.dtype)
        norm_a = tl.sqrt(na)
        ra = tl.maximum(norm_a, eps)
        rc = tl.maximum(tl.sqrt(nc), eps)
        q = -1.0 / (ra[:, None] * rc[None, :])
        p = g / (2.0 * (ra * ra * ra)[:, None] * rc[None, :])
        p = tl.where((norm_a > eps)[:, None], p, 0.0)
    else:
        sq = g
        if KERNEL == 1:
            d = tl.sqrt(sq)
            inv = 1.0 / tl.where(d == 0.0, 1.0, d)  # no division by zero even in the untaken branch
            p = tl.where(d == 0.0, 0.0, 0.5 * inv)  # gradient 0 at distance 0; NaN stays NaN
        elif KERNEL == 2:
            p = sq * 0.0 + 1.0
        else:
            p = 2.0 * inv_two_sigma2 * tl.exp(-sq * inv_two_sigma2)
        q = -2.0 * p
    return p, q


@triton.jit
def _load_pooled(base, offs_l_stride, L, mask, POOL: tl.constexpr, ACC: tl.constexpr):
    # pool over the L tokens of a [rows, BLOCK_D] tile while loading it; masked entries read 0 for every token
    v = tl.load(base, mask=mask, other=0.0).to(ACC)
    for l in range(1, L):
        t = tl.load(base + l * offs_l_stride, mask=mask, other=0.0).to(ACC)
        if POOL == 0:
            v += t
        else:
            v = tl.maximum(v, t, propagate_nan=tl.PropagateNan.ALL)  # a NaN token must not vanish
    if POOL == 0:
        v = v / L
    return v


@triton.jit
def _load_rows(rows, l, sl, L, mask, POOL: tl.constexpr, ACC: tl.constexpr):
    # a [rows, BLOCK_D] tile: token l itself for pool "none", else pooled over the L tokens
    if POOL == 2:
        v = tl.load(rows + l * sl, mask=mask, other=0.0).to(ACC)
    else:
        v = _load_pooled(rows, sl, L, mask, POOL, ACC)
    return v


@triton.jit
def _from_bits(bits, ACC: tl.constexpr):
    # the float64 whose bits the launcher passed as an integer, in the accumulation dtype
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)


# --- forward ---------------------------------------------------------------------------------------------------------
@triton.jit
def _row_statistics(
    x_rows,
    y_rows,
    l,
    d_start,
    d_end,
    mask_m,
    mask_n,
    L,
    sxl,
    sxd,
    syl,
    syd,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Gram g [BM, BN] and squared norms [BM], [BN] of token l (or the pooled rows) over features [d_start, d_end)
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    na = tl.zeros((BLOCK_M,), dtype=ACC)
    nc = tl.zeros((BLOCK_N,), dtype=ACC)
    for d0 in range(d_start, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < d_end
        a = _load_rows(x_rows + offs_d[None, :] * sxd, l, sxl, L, mask_m[:, None] & mask_d[None, :], POOL, ACC)
        c = _load_rows(y_rows + offs_d[None, :] * syd, l, syl, L, mask_n[:, None] & mask_d[None, :], POOL, ACC)
        g += tl.dot(a, tl.trans(c), input_precision="ieee")
        na += tl.sum(a * a, axis=1)
        nc += tl.sum(c * c, axis=1)
    return g, na, nc


@triton.jit
def _epilogue(
    g,
    na,
    nc,
    l,
    x_rows,
    y_rows,
    mask_m,
    mask_n,
    L,
    D,
    sxl,
    sxd,
    syl,
    syd,
    inv_two_sigma2,
    KERNEL: tl.constexpr,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EXACT_BLOCK_D: tl.constexpr,
):
    # From token l's summed statistics: (the statistic backward keeps, the distance), both [BM, BN]. Cosine keeps
    # the Gram; the distance kernels keep the squared distance, recomputed from differences over all D features
    # in a tile that holds a pair where the expansion cancels (see the module docstring).
    if KERNEL == 0:
        stat = g
        dist = _cosine_distance(g, na, nc, EPS)
    else:
        sq = _expanded_sq(g, na, nc)
        flag = (sq < RATIO * (na[:, None] + nc[None, :])) & mask_m[:, None] & mask_n[None, :]
        if tl.max(flag.to(tl.int32)) > 0:
            exact = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for d0 in range(0, D, EXACT_BLOCK_D):
                offs_d = d0 + tl.arange(0, EXACT_BLOCK_D).to(tl.int64)
                mask_d = offs_d < D
                a = _load_rows(x_rows + offs_d[None, :] * sxd, l, sxl, L, mask_m[:, None] & mask_d[None, :], POOL, ACC)
                c = _load_rows(y_rows + offs_d[None, :] * syd, l, syl, L, mask_n[:, None] & mask_d[None, :], POOL, ACC)
                diff = a[:, None, :] - c[None, :, :]
                exact += tl.sum(diff * diff, axis=2)
            sq = tl.where(flag, exact, sq)
        stat = sq
        dist = _distance_of_sq(sq, KERNEL, inv_two_sigma2)
    return stat, dist


@triton.jit
def _pd_fwd_kernel(
    # pointers: inputs, outputs, the split-D scratch (None without split-D)
    x_ptr,
    y_ptr,
    out_ptr,
    stat_ptr,
    na_ptr,
    nc_ptr,
    part_g_ptr,
    part_na_ptr,
    part_nc_ptr,
    tickets_ptr,
    # shapes: LP = L for pool "none" else 1; S programs split D into slices of D_SPLIT features
    M,
    N,
    L,
    D,
    LP,
    S,
    D_SPLIT,
    # 1/(2σ²), the bits of a float64
    INV_BITS,
    # strides of x and y
    sxb,
    sxm,
    sxl,
    sxd,
    syb,
    syn,
    syl,
    syd,
    # constants
    KERNEL: tl.constexpr,
    POOL: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EXACT_BLOCK_D: tl.constexpr,
):
    # One program per (batch entry, [BM, BN] pair tile, D slice). Outputs are contiguous: out [B, M, N], the kept
    # statistic [B, M, N, LP], ‖x‖² [B, M, LP], ‖y‖² [B, N, LP]; partials [S, ...] of the last three.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_mn = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    B = tl.num_programs(0).to(tl.int64)
    inv_two_sigma2 = _from_bits(INV_BITS, ACC)
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_m = (pid_mn // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = (pid_mn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_mn = mask_m[:, None] & mask_n[None, :]
    g_off = ((pid_b * M + offs_m[:, None]) * N + offs_n[None, :]) * LP
    na_off = (pid_b * M + offs_m) * LP
    nc_off = (pid_b * N + offs_n) * LP
    x_rows = x_ptr + pid_b * sxb + offs_m[:, None] * sxm
    y_rows = y_ptr + pid_b * syb + offs_n[:, None] * syn
    last = True  # without split-D every program finishes its own tile
    if SPLIT:
        d_start = pid_s * D_SPLIT
        d_end = tl.minimum(d_start + D_SPLIT, D)
        for l in range(0, LP):
            g, na, nc = _row_statistics(
                x_rows,
                y_rows,
                l,
                d_start,
                d_end,
                mask_m,
                mask_n,
                L,
                sxl,
                sxd,
                syl,
                syd,
                POOL,
                ACC,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
            tl.store(part_g_ptr + pid_s * B * M * N * LP + g_off + l, g, mask=mask_mn)
            tl.store(part_na_ptr + pid_s * B * M * LP + na_off + l, na, mask=mask_m)
            tl.store(part_nc_ptr + pid_s * B * N * LP + nc_off + l, nc, mask=mask_n)
        # every thread's partial stores happen before the ticket (release); the last ticket's holder reads them all
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets_ptr + pid_b * tl.num_programs(1) + pid_mn, 1, sem="acq_rel")
        last = ticket == S - 1
    if last:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for l in range(0, LP):
            if SPLIT:  # the partials of all S slices, summed in slice order
                g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
                na = tl.zeros((BLOCK_M,), dtype=ACC)
                nc = tl.zeros((BLOCK_N,), dtype=ACC)
                for s in range(0, S):
                    g += tl.load(
                        part_g_ptr + B * s * M * N * LP + g_off + l, mask=mask_mn, other=0.0, cache_modifier=".cg"
                    )
                    na += tl.load(
                        part_na_ptr + B * s * M * LP + na_off + l, mask=mask_m, other=0.0, cache_modifier=".cg"
                    )
                    nc += tl.load(
                        part_nc_ptr + B * s * N * LP + nc_off + l, mask=mask_n, other=0.0, cache_modifier=".cg"
                    )
            else:
                g, na, nc = _row_statistics(
                    x_rows,
                    y_rows,
                    l,
                    0,
                    D,
                    mask_m,
                    mask_n,
                    L,
                    sxl,
                    sxd,
                    syl,
                    syd,
                    POOL,
                    ACC,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                )
            stat, dist = _epilogue(
                g,
                na,
                nc,
                l,
                x_rows,
                y_rows,
                mask_m,
                mask_n,
                L,
                D,
                sxl,
                sxd,
                syl,
                syd,
                inv_two_sigma2,
                KERNEL,
                POOL,
                ACC,
                EPS,
                RATIO,
                BLOCK_M,
                BLOCK_N,
                EXACT_BLOCK_D,
            )
            tl.store(stat_ptr + g_off + l, stat, mask=mask_mn)
            tl.store(na_ptr + na_off + l, na, mask=mask_m)
            tl.store(nc_ptr + nc_off + l, nc, mask=mask_n)
            total += dist
        tl.store(out_ptr + (pid_b * M + offs_m[:, None]) * N + offs_n[None, :], total / LP, mask=mask_mn)


# --- backward --------------------------------------------------------------------------------------------------------
@triton.jit
def _exact_pairs(
    acc,
    go,
    p,
    q,
    sq,
    nr,
    nc,
    mask_rc,
    rv,
    c_cols,
    scc,
    scl,
    L,
    c0,
    C,
    mask_d,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Distance kernels: the pairs of this [rows, columns] tile where the expansion cancels (see the module docstring)
    # leave the expansion (their P and Q are zeroed) and add 2·G·P·(a_i − c_j) to acc from differences, one column
    # at a time; rv is the rows' pooled [BLOCK_R, BLOCK_D] tile, c_cols points at column 0's D tile.
    flag = (sq < RATIO * (nr[:, None] + nc[None, :])) & mask_rc
    if tl.max(flag.to(tl.int32)) > 0:
        w = tl.where(flag, 2.0 * go * p, 0.0)
        cols = tl.arange(0, BLOCK_C)
        for j in range(0, BLOCK_C):
            m = mask_d & (c0 + j < C)
            col = c_cols + (c0 + j) * scc
            if POOL == 2:
                cj = tl.load(col, mask=m, other=0.0).to(ACC)
            else:
                cj = _load_pooled(col, scl, L, m, POOL, ACC)
            wj = tl.sum(tl.where(cols[None, :] == j, w, 0.0), axis=1)
            acc += wj[:, None] * (rv - cj[None, :])
        p = tl.where(flag, 0.0, p)
        q = tl.where(flag, 0.0, q)
    return p, q, acc


@triton.jit
def _bwd_rows(
    pid_b,
    pid_r,
    pid_d,
    # pointers: the rows' operand and its gradient, the columns' operand, G, the forward's statistics; 1/(2σ²)
    r_ptr,
    grad_ptr,
    c_ptr,
    go_ptr,
    stat_ptr,
    nr_ptr,
    nc_ptr,
    inv_two_sigma2,
    # shapes
    R,
    C,
    L,
    D,
    LP,
    # strides: rows, columns, G along (batch, row, column), the statistic along (row, column)
    srb,
    srr,
    srl,
    srd,
    scb,
    scc,
    scl,
    scd,
    sob,
    sor,
    soc,
    sgr,
    sgc,
    KERNEL: tl.constexpr,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The gradient of one [BLOCK_R rows, BLOCK_D features] tile of the "rows" operand (x against y, or y against x
    # with G and the statistic transposed through their strides); the gradient buffer is contiguous [B, R, L, D].
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_r = offs_r < R
    mask_d = offs_d < D
    mask_rd = mask_r[:, None] & mask_d[None, :]
    r_tile = r_ptr + pid_b * srb + offs_r[:, None] * srr + offs_d[None, :] * srd
    grad_tile = grad_ptr + (pid_b * R + offs_r[:, None]) * L * D + offs_d[None, :]
    c_cols = c_ptr + pid_b * scb + offs_d * scd  # + column · scc (+ token · scl)
    stat_rows = stat_ptr + pid_b * R * C * LP + offs_r[:, None] * sgr
    nr_rows = nr_ptr + (pid_b * R + offs_r) * LP
    go_rows = go_ptr + pid_b * sob + offs_r[:, None] * sor
    if POOL == 2:
        for l in range(0, L):
            rv = tl.load(r_tile + l * srl, mask=mask_rd, other=0.0).to(ACC)
            rowcoef = tl.zeros((BLOCK_R,), dtype=ACC)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
            nr = tl.load(nr_rows + l, mask=mask_r, other=0.0)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
                mask_c = offs_c < C
                mask_rc = mask_r[:, None] & mask_c[None, :]
                go = tl.load(go_rows + offs_c[None, :] * soc, mask=mask_rc, other=0.0).to(ACC)
                g = tl.load(stat_rows + offs_c[None, :] * sgc + l, mask=mask_rc, other=0.0)
                nc = tl.load(nc_ptr + (pid_b * C + offs_c) * LP + l, mask=mask_c, other=0.0)
                p, q = _coefficients(g, nr, nc, KERNEL, inv_two_sigma2, EPS)
                if KERNEL != 0:
                    p, q, acc = _exact_pairs(
                        acc,
                        go,
                        p,
                        q,
                        g,
                        nr,
                        nc,
                        mask_rc,
                        rv,
                        c_cols + l * scl,
                        scc,
                        scl,
                        L,
                        c0,
                        C,
                        mask_d,
                        POOL,
                        ACC,
                        RATIO,
                        BLOCK_C,
                    )
                rowcoef += tl.sum(go * p, axis=1)
                cv = tl.load(
                    c_cols[None, :] + offs_c[:, None] * scc + l * scl, mask=mask_c[:, None] & mask_d[None, :], other=0.0
                ).to(ACC)
                acc += tl.dot(go * q, cv, input_precision="ieee")
            grad = (2.0 * rowcoef[:, None] * rv + acc) / L
            tl.store(grad_tile + l * D, grad, mask=mask_rd)
    else:
        if POOL == 0:
            rv = _load_pooled(r_tile, srl, L, mask_rd, POOL, ACC)
            arg = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.int32)
        else:
            # recompute the max and its first argmax token; the pooled gradient is routed there
            rv = tl.load(r_tile, mask=mask_rd, other=0.0).to(ACC)
            arg = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.int32)
            for l in range(1, L):
                t = tl.load(r_tile + l * srl, mask=mask_rd, other=0.0).to(ACC)
                take = t > rv
                rv = tl.where(take, t, rv)
                arg = tl.where(take, l, arg)
        rowcoef = tl.zeros((BLOCK_R,), dtype=ACC)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
        nr = tl.load(nr_rows, mask=mask_r, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask_c = offs_c < C
            mask_rc = mask_r[:, None] & mask_c[None, :]
            go = tl.load(go_rows + offs_c[None, :] * soc, mask=mask_rc, other=0.0).to(ACC)
            g = tl.load(stat_rows + offs_c[None, :] * sgc, mask=mask_rc, other=0.0)
            nc = tl.load(nc_ptr + (pid_b * C + offs_c) * LP, mask=mask_c, other=0.0)
            p, q = _coefficients(g, nr, nc, KERNEL, inv_two_sigma2, EPS)
            if KERNEL != 0:
                p, q, acc = _exact_pairs(
                    acc, go, p, q, g, nr, nc, mask_rc, rv, c_cols, scc, scl, L, c0, C, mask_d, POOL, ACC, RATIO, BLOCK_C
                )
            rowcoef += tl.sum(go * p, axis=1)
            cv = _load_pooled(
                c_cols[None, :] + offs_c[:, None] * scc, scl, L, mask_c[:, None] & mask_d[None, :], POOL, ACC
            )
            acc += tl.dot(go * q, cv, input_precision="ieee")
        if POOL == 0:
            grad = (2.0 * rowcoef[:, None] * rv + acc) / L
            for l in range(0, L):
                tl.store(grad_tile + l * D, grad, mask=mask_rd)
        else:
            grad = 2.0 * rowcoef[:, None] * rv + acc
            for l in range(0, L):
                tl.store(grad_tile + l * D, tl.where(arg == l, grad, 0.0), mask=mask_rd)


@triton.jit
def _pd_bwd_kernel(
    # pointers: inputs, G, the forward's statistics (contiguous [B, M, N, LP], [B, M, LP], [B, N, LP]), the
    # gradients (contiguous like x and y; None for one that is not needed)
    x_ptr,
    y_ptr,
    go_ptr,
    stat_ptr,
    na_ptr,
    nc_ptr,
    gx_ptr,
    gy_ptr,
    # shapes: X_BLOCKS row blocks of x come first along grid axis 1, then the row blocks of y
    M,
    N,
    L,
    D,
    LP,
    X_BLOCKS,
    # 1/(2σ²), the bits of a float64
    INV_BITS,
    # strides of x, y and G
    sxb,
    sxm,
    sxl,
    sxd,
    syb,
    syn,
    syl,
    syd,
    sob,
    som,
    son,
    # constants
    KERNEL: tl.constexpr,
    POOL: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (batch entry, row block of x or of y, D block): both gradients from one grid.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    inv_two_sigma2 = _from_bits(INV_BITS, ACC)
    if NEED_X:
        if pid_r < X_BLOCKS:
            _bwd_rows(
                pid_b,
                pid_r,
                pid_d,
                x_ptr,
                gx_ptr,
                y_ptr,
                go_ptr,
                stat_ptr,
                na_ptr,
                nc_ptr,
                inv_two_sigma2,
                M,
                N,
                L,
                D,
                LP,
                sxb,
                sxm,
                sxl,
                sxd,
                syb,
                syn,
                syl,
                syd,
                sob,
                som,
                son,
                N * LP,
                LP,
                KERNEL,
                POOL,
                ACC,
                EPS,
                RATIO,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
    if NEED_Y:
        if pid_r >= X_BLOCKS:
            _bwd_rows(
                pid_b,
                pid_r - X_BLOCKS,
                pid_d,
                y_ptr,
                gy_ptr,
                x_ptr,
                go_ptr,
                stat_ptr,
                nc_ptr,
                na_ptr,
                inv_two_sigma2,
                N,
                M,
                L,
                D,
                LP,
                syb,
                syn,
                syl,
                syd,
                sxb,
                sxm,
                sxl,
                sxd,
                sob,
                son,
                som,
                LP,
                N * LP,
                KERNEL,
                POOL,
                ACC,
                EPS,
                RATIO,
                BLOCK_N,
                BLOCK_M,
                BLOCK_D,
            )


# --- launchers ---------------------------------------------------------------------------------------------------
def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _inv_two_sigma2_bits(sigma: float) -> int:
    """1/(2σ²) as the bits of a float64: a Python float argument would reach the kernel as fp32 even when it
    computes in fp64, and a one-element tensor would cost a fill before every launch."""
    return struct.unpack("<q", struct.pack("<d", 1.0 / (2.0 * float(sigma) ** 2)))[0]


class Tiles(NamedTuple):
    """Tile sizes of one call, passed to both launchers: ``block_d`` the D tile of the main loops, ``exact_block_d``
    the D tile of the exact-pair recomputation, ``splits`` how many programs share one pair tile's D in the forward
    (rounded so that each gets a whole number of ``block_d`` tiles)."""

    block_d: int
    exact_block_d: int
    splits: int


def default_tiles(x: torch.Tensor, y: torch.Tensor) -> Tiles:
    """Narrow tiles and no split under the interpreter (small test shapes). On a GPU: 128-feature tiles, an
    8-feature exact tile (its [BLOCK_M, BLOCK_N, BLOCK_D] difference tile lives in registers), and, with few pairs
    and wide rows, enough D splits to give each SM ~2 programs, each still streaming at least 16 token-tiles."""
    if interpreted() or x.device.type != "cuda":
        return Tiles(block_d=32, exact_block_d=32, splits=1)
    B, M, L, D = x.shape
    block_d = 128
    n_programs = B * triton.cdiv(M, _block(M, 16, 32)) * triton.cdiv(y.shape[1], _block(y.shape[1], 16, 32))
    want = triton.cdiv(2 * torch.cuda.get_device_properties(x.device).multi_processor_count, n_programs)
    splits = max(1, min(want, triton.cdiv(D, block_d) // triton.cdiv(16, L)))
    return Tiles(block_d=block_d, exact_block_d=8, splits=splits)


def pairwise_distance_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str,
    pool: str,
    sigma: float,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: distances [B, M, N] plus the statistics backward needs: [B, M, N, L'] (cosine: the Gram a·c; the
    distance kernels: the squared distance, exact where the expansion cancels), ‖x‖² [B, M, L'], ‖y‖² [B, N, L']
    (L' = L for pool "none", else 1), all in fp32 (fp64 for fp64 inputs)."""
    B, M, L, D = x.shape
    N = y.shape[1]
    acc_t, acc_tl = acc_types(x.dtype)
    LP = L if pool == "none" else 1
    BLOCK_M = _block(M, 16, 32)
    BLOCK_N = _block(N, 16, 32)
    n_mn = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    d_split = triton.cdiv(triton.cdiv(D, max(1, tiles.splits)), tiles.block_d) * tiles.block_d
    splits = triton.cdiv(D, d_split)
    new = dict(device=x.device, dtype=acc_t)
    out = torch.empty((B, M, N), **new)
    stat = torch.empty((B, M, N, LP), **new)
    na = torch.empty((B, M, LP), **new)
    nc = torch.empty((B, N, LP), **new)
    if splits > 1:
        scratch = dict(
            part_g_ptr=torch.empty((splits, B, M, N, LP), **new),
            part_na_ptr=torch.empty((splits, B, M, LP), **new),
            part_nc_ptr=torch.empty((splits, B, N, LP), **new),
            tickets_ptr=torch.zeros((B, n_mn), device=x.device, dtype=torch.int32),
        )
    else:
        scratch = dict(part_g_ptr=None, part_na_ptr=None, part_nc_ptr=None, tickets_ptr=None)
    pointers = dict(x_ptr=x, y_ptr=y, out_ptr=out, stat_ptr=stat, na_ptr=na, nc_ptr=nc, **scratch)
    shapes = dict(M=M, N=N, L=L, D=D, LP=LP, S=splits, D_SPLIT=d_split)
    strides = dict(zip(("sxb", "sxm", "sxl", "sxd", "syb", "syn", "syl", "syd"), (*x.stride(), *y.stride())))
    constants = dict(KERNEL=KERNELS[kernel], POOL=POOLS[pool], SPLIT=splits > 1, ACC=acc_tl, EPS=COSINE_EPS)
    constants.update(RATIO=EXACT_RATIO[acc_t], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=tiles.block_d)
    constants.update(EXACT_BLOCK_D=tiles.exact_block_d)
    with on_device(x.device):
        _pd_fwd_kernel[(B, n_mn, splits)](
            **pointers, INV_BITS=_inv_two_sigma2_bits(sigma), **shapes, **strides, **constants
        )
    return out, stat, na, nc


def pairwise_distance_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    stat: torch.Tensor,
    na: torch.Tensor,
    nc: torch.Tensor,
    kernel: str,
    pool: str,
    sigma: float,
    tiles: Tiles,
    *,
    needs_x: bool,
    needs_y: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One launch: the gradients of Σ grad_out·distance with respect to x and y (those asked for, contiguous, in
    their dtypes), from the forward's statistics; one program per ``tiles.block_d`` features of a row block."""
    B, M, L, D = x.shape
    N = y.shape[1]
    acc_t, acc_tl = acc_types(x.dtype)
    BLOCK_M = _block(M, 16, 32)
    BLOCK_N = _block(N, 16, 32)
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if needs_x else None
    gy = torch.empty(y.shape, device=y.device, dtype=y.dtype) if needs_y else None
    x_blocks = triton.cdiv(M, BLOCK_M) if needs_x else 0
    y_blocks = triton.cdiv(N, BLOCK_N) if needs_y else 0
    if x_blocks + y_blocks == 0:
        return gx, gy
    pointers = dict(x_ptr=x, y_ptr=y, go_ptr=grad_out, stat_ptr=stat, na_ptr=na, nc_ptr=nc, gx_ptr=gx, gy_ptr=gy)
    shapes = dict(M=M, N=N, L=L, D=D, LP=stat.shape[-1], X_BLOCKS=x_blocks)
    names = ("sxb", "sxm", "sxl", "sxd", "syb", "syn", "syl", "syd", "sob", "som", "son")
    strides = dict(zip(names, (*x.stride(), *y.stride(), *grad_out.stride())))
    constants = dict(KERNEL=KERNELS[kernel], POOL=POOLS[pool], NEED_X=needs_x, NEED_Y=needs_y, ACC=acc_tl)
    constants.update(EPS=COSINE_EPS, RATIO=EXACT_RATIO[acc_t], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=tiles.block_d)
    with on_device(x.device):
        _pd_bwd_kernel[(B, x_blocks + y_blocks, triton.cdiv(D, tiles.block_d))](
            **pointers, INV_BITS=_inv_two_sigma2_bits(sigma), **shapes, **strides, **constants
        )
    return gx, gy
