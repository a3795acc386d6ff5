"""Fused pairwise distances between pooled feature matrices: x[B, M, L, D] against y[B, N, L, D] -> [B, M, N].

Memory traffic first: at KC-DPO shapes M and N are tiny (policy + reference against 2K candidates) while D is large
(10^3 .. 10^5), so the op is bound by reading x and y once. The forward therefore pools over the L tokens while
loading (mean / max, or per token for pool "none"), accumulates only three small statistics per pair and row
(Gram g = a·c through ``tl.dot``, squared norms ‖a‖², ‖c‖²) and applies the distance epilogue to those; no pooled
vector and no per-token [M, N, L, D] intermediate ever reaches memory. The statistics ([B, M, N, L'] with L' = L for
pool "none", else 1) are kept for backward, which re-reads x and y once, recomputes the pooling and writes the
gradients. With a distance f(g, ‖a‖², ‖c‖²) (symmetric in a and c) and upstream gradient G:

    ∂/∂a_i = Σ_j G_ij · (2·P_ij·a_i + Q_ij·c_j),   P = ∂f/∂‖a‖²,  Q = ∂f/∂g
    sq = max(‖a‖² + ‖c‖² − 2g, 0)        (the matmul expansion can round slightly below zero)
    cosine 1 − g/(ra·rc), ra = max(‖a‖, eps) | euclidean √sq | sqeuclidean sq | rbf 2 − 2·exp(−sq/(2σ²))

Conventions (shared with the torch path and the reference): euclidean has gradient 0 where the distance is exactly
0; cosine divides by norms clamped at ``eps`` (a zero vector has distance 1 to everything), and a norm below ``eps``
passes no gradient through the norm; max pooling routes the gradient to the first maximal token. Mean pooling
accumulates in fp32 (fp64 for fp64 inputs); the dots run in full precision (``input_precision="ieee"``, no TF32).
Wide rows with few pairs split D across programs ("split-D"); a second small kernel sums the partial statistics
in a fixed order (deterministic) and applies the epilogue.

Near-coincident points far from the origin: the expansion's rounding error is about ε·(‖a‖² + ‖c‖²), so two points
of norm 8e3 at distance 8e-3 would come out at distance 0 (or ~4) in fp32. For the distance kernels (euclidean,
sqeuclidean, rbf) a third kernel (``_pd_exact_kernel``, the epilogue of those kernels) therefore flags every pair
with sq < EXACT_RATIO·(‖a‖² + ‖c‖²), where the expansion keeps fewer than ~17 correct bits, and recomputes the
tiles holding one from the differences, sq = Σ_d (a_d − c_d)² (a second read of those tiles' rows); tiles without
a flagged pair cost only a read of their statistics. Backward then uses that squared distance and, for flagged
pairs only, the difference form of the gradient, ∂/∂a_i = Σ_j 2·G_ij·P_ij·(a_i − c_j), which does not cancel
either. Cosine needs no such path: its error is absolute (~ε on a distance in [0, 2]) whatever the norms.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

KERNELS = {"cosine": 0, "euclidean": 1, "sqeuclidean": 2, "rbf": 3}
POOLS = {"mean": 0, "max": 1, "none": 2}
COSINE_EPS = 1e-8
# A pair is recomputed from differences when sq < EXACT_RATIO·(‖a‖² + ‖c‖²): 2^17·ε of the accumulation dtype, so
# the expansion's relative error elsewhere stays below ~2^-17 (times the small growth of length-D sums).
EXACT_RATIO = {torch.float32: 2.0**-6, torch.float64: 2.0**-35}


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
def _distance(g, na, nc, KERNEL: tl.constexpr, inv_two_sigma2, EPS: tl.constexpr):
    # g [BM, BN], na [BM], nc [BN] -> distance [BM, BN]
    if KERNEL == 0:
        eps = tl.full((), EPS, na.dtype)  # a bare constexpr float would enter fp64 math as fp32
        ra = tl.maximum(tl.sqrt(na), eps)
        rc = tl.maximum(tl.sqrt(nc), eps)
        dist = 1.0 - g / (ra[:, None] * rc[None, :])
    else:
        dist = _distance_of_sq(_expanded_sq(g, na, nc), KERNEL, inv_two_sigma2)
    return dist


@triton.jit
def _coefficients(g, na, nc, KERNEL: tl.constexpr, inv_two_sigma2, EPS: tl.constexpr):
    # P = ∂f/∂‖a‖² and Q = ∂f/∂g, both [BM, BN]. For the distance kernels (KERNEL 1..3) ``g`` holds the squared
    # distance itself (the statistic ``_pd_exact_kernel`` keeps), and Q = −2P.
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
def _pd_stats_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    g_ptr,
    na_ptr,
    nc_ptr,
    M,
    N,
    L,
    D,
    D_SPLIT,
    inv_ptr,
    sxb,
    sxm,
    sxl,
    sxd,
    syb,
    syn,
    syl,
    syd,
    sgs,
    sgb,
    sgm,
    sgn,
    sgl,
    sas,
    sab,
    sam,
    sal,
    scs,
    scb,
    scn,
    scl,
    sob,
    som,
    son,
    KERNEL: tl.constexpr,
    POOL: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    inv_two_sigma2 = tl.load(inv_ptr)
    pid_mn = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_m = ((pid_mn // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = ((pid_mn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_mn = mask_m[:, None] & mask_n[None, :]
    d_start = pid_s * D_SPLIT
    d_end = tl.minimum(d_start + D_SPLIT, D)
    x_rows = x_ptr + pid_b * sxb + offs_m[:, None] * sxm
    y_rows = y_ptr + pid_b * syb + offs_n[:, None] * syn
    g_tile = g_ptr + pid_s * sgs + pid_b * sgb + offs_m[:, None] * sgm + offs_n[None, :] * sgn
    na_row = na_ptr + pid_s * sas + pid_b * sab + offs_m * sam
    nc_row = nc_ptr + pid_s * scs + pid_b * scb + offs_n * scn
    if POOL == 2:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for l in range(0, L):
            g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            na = tl.zeros((BLOCK_M,), dtype=ACC)
            nc = tl.zeros((BLOCK_N,), dtype=ACC)
            for d0 in range(d_start, d_end, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                mask_d = offs_d < d_end
                a = tl.load(
                    x_rows + l * sxl + offs_d[None, :] * sxd, mask=mask_m[:, None] & mask_d[None, :], other=0.0
                ).to(ACC)
                c = tl.load(
                    y_rows + l * syl + offs_d[None, :] * syd, mask=mask_n[:, None] & mask_d[None, :], other=0.0
                ).to(ACC)
                g += tl.dot(a, tl.trans(c), input_precision="ieee")
                na += tl.sum(a * a, axis=1)
                nc += tl.sum(c * c, axis=1)
            tl.store(g_tile + l * sgl, g, mask=mask_mn)
            tl.store(na_row + l * sal, na, mask=mask_m)
            tl.store(nc_row + l * scl, nc, mask=mask_n)
            if EPILOGUE:
                total += _distance(g, na, nc, KERNEL, inv_two_sigma2, EPS)
        if EPILOGUE:
            out = out_ptr + pid_b * sob + offs_m[:, None] * som + offs_n[None, :] * son
            tl.store(out, total / L, mask=mask_mn)
    else:
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        na = tl.zeros((BLOCK_M,), dtype=ACC)
        nc = tl.zeros((BLOCK_N,), dtype=ACC)
        for d0 in range(d_start, d_end, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < d_end
            a = _load_pooled(x_rows + offs_d[None, :] * sxd, sxl, L, mask_m[:, None] & mask_d[None, :], POOL, ACC)
            c = _load_pooled(y_rows + offs_d[None, :] * syd, syl, L, mask_n[:, None] & mask_d[None, :], POOL, ACC)
            g += tl.dot(a, tl.trans(c), input_precision="ieee")
            na += tl.sum(a * a, axis=1)
            nc += tl.sum(c * c, axis=1)
        tl.store(g_tile, g, mask=mask_mn)
        tl.store(na_row, na, mask=mask_m)
        tl.store(nc_row, nc, mask=mask_n)
        if EPILOGUE:
            out = out_ptr + pid_b * sob + offs_m[:, None] * som + offs_n[None, :] * son
            tl.store(out, _distance(g, na, nc, KERNEL, inv_two_sigma2, EPS), mask=mask_mn)


@triton.jit
def _pair_tile(pid_b, M, N, LP, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (M, N) tile of batch entry ``pid_b``: row and column offsets, their masks, and the offsets of
    its statistics in the contiguous [B, M, N, LP] / [B, M, LP] / [B, N, LP] buffers."""
    pid_mn = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_m = ((pid_mn // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = ((pid_mn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_mn = mask_m[:, None] & mask_n[None, :]
    g_off = ((pid_b * M + offs_m[:, None]) * N + offs_n[None, :]) * LP
    na_off = (pid_b * M + offs_m) * LP
    nc_off = (pid_b * N + offs_n) * LP
    return offs_m, offs_n, mask_m, mask_n, mask_mn, g_off, na_off, nc_off


@triton.jit
def _pd_epilogue_kernel(
    gp_ptr,
    nap_ptr,
    ncp_ptr,
    g_ptr,
    na_ptr,
    nc_ptr,
    out_ptr,
    M,
    N,
    LP,
    S,
    inv_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KERNEL: tl.constexpr,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
):
    # sums S split-D partial statistics (contiguous [S, B, M, N, LP], [S, B, M, LP], [S, B, N, LP]) in order
    pid_b = tl.program_id(0).to(tl.int64)
    inv_two_sigma2 = tl.load(inv_ptr)
    B = tl.num_programs(0)
    offs_m, offs_n, mask_m, mask_n, mask_mn, g_off, na_off, nc_off = _pair_tile(pid_b, M, N, LP, BLOCK_M, BLOCK_N)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for l in range(0, LP):
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        na = tl.zeros((BLOCK_M,), dtype=ACC)
        nc = tl.zeros((BLOCK_N,), dtype=ACC)
        for s in range(0, S):
            g += tl.load(gp_ptr + s * B * M * N * LP + g_off + l, mask=mask_mn, other=0.0)
            na += tl.load(nap_ptr + s * B * M * LP + na_off + l, mask=mask_m, other=0.0)
            nc += tl.load(ncp_ptr + s * B * N * LP + nc_off + l, mask=mask_n, other=0.0)
        tl.store(g_ptr + g_off + l, g, mask=mask_mn)
        tl.store(na_ptr + na_off + l, na, mask=mask_m)
        tl.store(nc_ptr + nc_off + l, nc, mask=mask_n)
        total += _distance(g, na, nc, KERNEL, inv_two_sigma2, EPS)
    tl.store(out_ptr + (pid_b * M + offs_m[:, None]) * N + offs_n[None, :], total / LP, mask=mask_mn)


@triton.jit
def _pd_exact_kernel(
    x_ptr,
    y_ptr,
    g_ptr,
    na_ptr,
    nc_ptr,
    sq_ptr,
    out_ptr,
    M,
    N,
    L,
    D,
    LP,
    inv_ptr,
    sxb,
    sxm,
    sxl,
    sxd,
    syb,
    syn,
    syl,
    syd,
    KERNEL: tl.constexpr,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Epilogue of the distance kernels: from the summed statistics (contiguous [B, M, N, LP], [B, M, LP], [B, N, LP])
    # the squared distance of every pair, recomputed from differences in a tile that holds a pair where the
    # expansion cancels (sq < RATIO·(‖a‖² + ‖c‖²)); writes it ([B, M, N, LP], for backward) and the distance.
    pid_b = tl.program_id(0).to(tl.int64)
    inv_two_sigma2 = tl.load(inv_ptr)
    offs_m, offs_n, mask_m, mask_n, mask_mn, g_off, na_off, nc_off = _pair_tile(pid_b, M, N, LP, BLOCK_M, BLOCK_N)
    x_rows = x_ptr + pid_b * sxb + offs_m[:, None] * sxm
    y_rows = y_ptr + pid_b * syb + offs_n[:, None] * syn
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for l in range(0, LP):
        g = tl.load(g_ptr + g_off + l, mask=mask_mn, other=0.0)
        na = tl.load(na_ptr + na_off + l, mask=mask_m, other=0.0)
        nc = tl.load(nc_ptr + nc_off + l, mask=mask_n, other=0.0)
        sq = _expanded_sq(g, na, nc)
        flag = (sq < RATIO * (na[:, None] + nc[None, :])) & mask_mn
        if tl.max(flag.to(tl.int32)) > 0:
            exact = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                mask_d = offs_d < D
                if POOL == 2:
                    a = tl.load(
                        x_rows + l * sxl + offs_d[None, :] * sxd, mask=mask_m[:, None] & mask_d[None, :], other=0.0
                    ).to(ACC)
                    c = tl.load(
                        y_rows + l * syl + offs_d[None, :] * syd, mask=mask_n[:, None] & mask_d[None, :], other=0.0
                    ).to(ACC)
                else:
                    a = _load_pooled(
                        x_rows + offs_d[None, :] * sxd, sxl, L, mask_m[:, None] & mask_d[None, :], POOL, ACC
                    )
                    c = _load_pooled(
                        y_rows + offs_d[None, :] * syd, syl, L, mask_n[:, None] & mask_d[None, :], POOL, ACC
                    )
                diff = a[:, None, :] - c[None, :, :]
                exact += tl.sum(diff * diff, axis=2)
            sq = tl.where(flag, exact, sq)
        tl.store(sq_ptr + g_off + l, sq, mask=mask_mn)
        total += _distance_of_sq(sq, KERNEL, inv_two_sigma2)
    tl.store(out_ptr + (pid_b * M + offs_m[:, None]) * N + offs_n[None, :], total / LP, mask=mask_mn)


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
def _pd_bwd_kernel(
    r_ptr,
    c_ptr,
    go_ptr,
    g_ptr,
    nr_ptr,
    nc_ptr,
    grad_ptr,
    R,
    C,
    L,
    D,
    inv_ptr,
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
    sgb,
    sgr,
    sgc,
    sgl,
    snrb,
    snrr,
    snrl,
    sncb,
    sncc,
    sncl,
    sdb,
    sdr,
    sdl,
    sdd,
    KERNEL: tl.constexpr,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # gradient for the "rows" operand (x, or y with the statistics transposed): one program per (b, row block, D block)
    pid_b = tl.program_id(0).to(tl.int64)
    inv_two_sigma2 = tl.load(inv_ptr)
    offs_r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_d = (tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask_r = offs_r < R
    mask_d = offs_d < D
    mask_rd = mask_r[:, None] & mask_d[None, :]
    r_tile = r_ptr + pid_b * srb + offs_r[:, None] * srr + offs_d[None, :] * srd
    grad_tile = grad_ptr + pid_b * sdb + offs_r[:, None] * sdr + offs_d[None, :] * sdd
    c_cols = c_ptr + pid_b * scb + offs_d * scd  # + column · scc (+ token · scl)
    if POOL == 2:
        for l in range(0, L):
            rv = tl.load(r_tile + l * srl, mask=mask_rd, other=0.0).to(ACC)
            rowcoef = tl.zeros((BLOCK_R,), dtype=ACC)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
            nr = tl.load(nr_ptr + pid_b * snrb + offs_r * snrr + l * snrl, mask=mask_r, other=0.0)
            for c0 in range(0, C, BLOCK_C):
                offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
                mask_c = offs_c < C
                mask_rc = mask_r[:, None] & mask_c[None, :]
                go = tl.load(
                    go_ptr + pid_b * sob + offs_r[:, None] * sor + offs_c[None, :] * soc, mask=mask_rc, other=0.0
                ).to(ACC)
                g = tl.load(
                    g_ptr + pid_b * sgb + offs_r[:, None] * sgr + offs_c[None, :] * sgc + l * sgl,
                    mask=mask_rc,
                    other=0.0,
                )
                nc = tl.load(nc_ptr + pid_b * sncb + offs_c * sncc + l * sncl, mask=mask_c, other=0.0)
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
            tl.store(grad_tile + l * sdl, grad, mask=mask_rd)
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
        nr = tl.load(nr_ptr + pid_b * snrb + offs_r * snrr, mask=mask_r, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask_c = offs_c < C
            mask_rc = mask_r[:, None] & mask_c[None, :]
            go = tl.load(
                go_ptr + pid_b * sob + offs_r[:, None] * sor + offs_c[None, :] * soc, mask=mask_rc, other=0.0
            ).to(ACC)
            g = tl.load(g_ptr + pid_b * sgb + offs_r[:, None] * sgr + offs_c[None, :] * sgc, mask=mask_rc, other=0.0)
            nc = tl.load(nc_ptr + pid_b * sncb + offs_c * sncc, mask=mask_c, other=0.0)
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
                tl.store(grad_tile + l * sdl, grad, mask=mask_rd)
        else:
            grad = 2.0 * rowcoef[:, None] * rv + acc
            for l in range(0, L):
                tl.store(grad_tile + l * sdl, tl.where(arg == l, grad, 0.0), mask=mask_rd)


# --- launchers ----------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _inv_two_sigma2(sigma: float, like: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # passed by pointer: a Python float argument would reach the kernel as fp32 even when it computes in fp64
    return torch.full((1,), 1.0 / (2.0 * float(sigma) ** 2), device=like.device, dtype=acc)


def pairwise_distance_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str,
    pool: str,
    sigma: float,
    *,
    block_d: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distances [B, M, N] plus the statistics backward needs: [B, M, N, L'] (cosine: the Gram a·c; the distance
    kernels: the squared distance, exact where the expansion cancels), ‖x‖² [B, M, L'], ‖y‖² [B, N, L'] (L' = L for
    pool "none", else 1), all in fp32 (fp64 for fp64 inputs). ``block_d`` / ``splits`` override the D tile and the
    number of split-D programs (tests use them to exercise every path on tiny shapes)."""
    B, M, L, D = x.shape
    N = y.shape[1]
    acc_t, acc_tl = _acc_dtype(x.dtype)
    LP = L if pool == "none" else 1
    BLOCK_M = _block(M, 16, 32)
    BLOCK_N = _block(N, 16, 32)
    if block_d is None:
        block_d = 32 if _interpreted(x) else 128
    n_mn = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    if splits is None:
        splits = 1
        if not _interpreted(x):
            # few pairs, wide rows: spread D over ~2 programs per SM; each split streams at least 16 token-tiles
            want = triton.cdiv(2 * _sm_count(x.device), B * n_mn)
            splits = max(1, min(want, triton.cdiv(D, block_d) // triton.cdiv(16, L)))
    d_split = triton.cdiv(triton.cdiv(D, splits), block_d) * block_d
    splits = triton.cdiv(D, d_split)
    out = torch.empty((B, M, N), device=x.device, dtype=acc_t)
    g = torch.empty((splits, B, M, N, LP), device=x.device, dtype=acc_t)
    na = torch.empty((splits, B, M, LP), device=x.device, dtype=acc_t)
    nc = torch.empty((splits, B, N, LP), device=x.device, dtype=acc_t)
    inv = _inv_two_sigma2(sigma, x, acc_t)
    meta = dict(KERNEL=KERNELS[kernel], ACC=acc_tl, EPS=COSINE_EPS)
    with _launch_device(x):
        _pd_stats_kernel[(B, n_mn, splits)](
            x,
            y,
            out,
            g,
            na,
            nc,
            M,
            N,
            L,
            D,
            d_split,
            inv,
            *x.stride(),
            *y.stride(),
            *g.stride(),
            *na.stride(),
            *nc.stride(),
            *out.stride(),
            POOL=POOLS[pool],
            EPILOGUE=splits == 1 and kernel == "cosine",
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=block_d,
            **meta,
        )
        if splits == 1:
            if kernel == "cosine":
                return out, g[0], na[0], nc[0]
            return out, _exact(x, y, g[0], na[0], nc[0], out, kernel, pool, inv, BLOCK_M, BLOCK_N), na[0], nc[0]
        g_sum = torch.empty(g.shape[1:], device=x.device, dtype=acc_t)
        na_sum = torch.empty(na.shape[1:], device=x.device, dtype=acc_t)
        nc_sum = torch.empty(nc.shape[1:], device=x.device, dtype=acc_t)
        _pd_epilogue_kernel[(B, n_mn)](
            g,
            na,
            nc,
            g_sum,
            na_sum,
            nc_sum,
            out,
            M,
            N,
            LP,
            splits,
            inv,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            **meta,
        )
        if kernel != "cosine":
            g_sum = _exact(x, y, g_sum, na_sum, nc_sum, out, kernel, pool, inv, BLOCK_M, BLOCK_N)
    return out, g_sum, na_sum, nc_sum


def _exact(x, y, g, na, nc, out, kernel, pool, inv, BLOCK_M, BLOCK_N) -> torch.Tensor:
    """Squared distances [B, M, N, L'] (exact where the expansion cancels) from the summed statistics; writes the
    distances into ``out``. Launched on x's device by the caller."""
    B, M, L, D = x.shape
    N = y.shape[1]
    sq = torch.empty_like(g)
    acc_t, acc_tl = _acc_dtype(x.dtype)
    # the [BLOCK_M, BLOCK_N, BLOCK_D] difference tile lives in registers on a GPU: a narrow D tile
    block_d = 32 if _interpreted(x) else 8
    _pd_exact_kernel[(B, triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N))](
        x,
        y,
        g,
        na,
        nc,
        sq,
        out,
        M,
        N,
        L,
        D,
        g.shape[-1],
        inv,
        *x.stride(),
        *y.stride(),
        KERNEL=KERNELS[kernel],
        POOL=POOLS[pool],
        ACC=acc_tl,
        RATIO=EXACT_RATIO[acc_t],
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d,
    )
    return sq


def _bwd_rows(rows, cols, grad_out_rc, g_rc, n_rows, n_cols, kernel, pool, sigma, block_d):
    B, R, L, D = rows.shape
    C = cols.shape[1]
    grad = torch.empty(rows.shape, device=rows.device, dtype=rows.dtype)
    _, acc_tl = _acc_dtype(rows.dtype)
    BLOCK_R = _block(R, 16, 32)
    BLOCK_C = _block(C, 16, 32)
    grid = (B, triton.cdiv(R, BLOCK_R), triton.cdiv(D, block_d))
    _pd_bwd_kernel[grid](
        rows,
        cols,
        grad_out_rc,
        g_rc,
        n_rows,
        n_cols,
        grad,
        R,
        C,
        L,
        D,
        _inv_two_sigma2(sigma, rows, _acc_dtype(rows.dtype)[0]),
        *rows.stride(),
        *cols.stride(),
        *grad_out_rc.stride(),
        *g_rc.stride(),
        *n_rows.stride(),
        *n_cols.stride(),
        *grad.stride(),
        KERNEL=KERNELS[kernel],
        POOL=POOLS[pool],
        ACC=acc_tl,
        EPS=COSINE_EPS,
        RATIO=EXACT_RATIO[_acc_dtype(rows.dtype)[0]],
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
        BLOCK_D=block_d,
    )
    return grad


def pairwise_distance_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    na: torch.Tensor,
    nc: torch.Tensor,
    kernel: str,
    pool: str,
    sigma: float,
    needs_x: bool = True,
    needs_y: bool = True,
    *,
    block_d: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of Σ grad_out·distance with respect to x and y (in their dtypes), from the forward statistics."""
    if block_d is None:
        block_d = 32 if _interpreted(x) else 128
    gx = gy = None
    with _launch_device(x):
        if needs_x:
            gx = _bwd_rows(x, y, grad_out, g, na, nc, kernel, pool, sigma, block_d)
        if needs_y:
            gy = _bwd_rows(y, x, grad_out.transpose(1, 2), g.transpose(1, 2), nc, na, kernel, pool, sigma, block_d)
    return gx, gy
