"""Linear head + per-token log-probability without the [N, V] logits in memory: logit tiles live in registers, and
only a bounded slab of rows (at most ``SLAB_BYTES``) is ever written, whatever N.

Per token n with hidden row h (length H), head W [V, H], bias b, target y, upstream gradient g:
    z_v = h · W_v + b_v    m = max_v z_v    r = log Σ_v exp(z_v − m)    logp = (z_y − m) − r
    p = exp((z − m) − r)   dz = g · (onehot(y) − p)   dh = dz @ W    dW = dzᵀ @ h    db = Σ_n dz
(m and r are kept apart: at |z| ~ 1e4 their fp32 sum would round off the log-prob.)

Two Triton kernels, each on a grid of (token tile × vocabulary tile) programs that compute their logit tile with the
full hidden reduction in registers (``_logit_tile``: a plain tiled matrix product, pipelined over the hidden
dimension), then an epilogue:
- ``_fused_linear_logprobs_fwd_kernel``: the tile's row maximum, its Σ exp(z − tile max) and, in the tile that holds
  the label, z_y. A few hundred bytes per token; the torch combine of these partials gives m, r and logp. This is the
  whole forward (2·N·H·V FLOPs, O(N·V/BLOCK_V) floats of partials).
- ``_fused_linear_logprobs_bwd_kernel``: dz for its tile, written in the product dtype into a slab of at most
  ``chunk_rows`` tokens; dh = dz @ W and dW += dzᵀ @ h are then two cuBLAS products per slab. The backward recomputes
  the logits once: 6·N·H·V FLOPs (4 without a weight gradient), deterministic (no atomics), extra memory one slab
  (plus dW when the head trains).
Every tile is independent, so the grid fills the GPU whatever N (a 16 × 576-token Janus batch is 9,216 programs).

Frozen head (only dh wanted): the forward kernel also writes the fp32 logit tiles of each slab, then the backward
kernel reads them back instead of recomputing, with g = 1, and one product gives u = d logp / d hidden =
(onehot − p) @ W; the op's backward is g · u. 4·N·H·V FLOPs in all, like autograd over materialized logits, in
O(slab) memory.

Matrix products accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use IEEE products (no TF32 rounding).
Half-precision inputs feed the tensor cores directly, with dz rounded to the input dtype for the second products;
under the Triton interpreter every tile is upcast first (its bf16 products are wrong). Ignored tokens
(label == ignore_index) get logp 0 and gradient 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from silmm_fast.kernels._common import acc_types, interpreted, on_device


@triton.jit
def _logit_tile(
    h_rows,
    w_cols,
    b_ptr,
    cols,
    row_ok,
    col_ok,
    H,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """z[rows, cols] = h[rows] @ W[cols]ᵀ + b[cols], with -inf in the columns past V. ``h_rows`` [BLOCK_N, 1] and
    ``w_cols`` [1, BLOCK_V] point at the first hidden element of each row of h and W."""
    z = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_cols + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        z = tl.dot(a.to(DOT), wt.to(DOT), z, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _fused_linear_logprobs_fwd_kernel(
    # pointers: hidden [N, H], weight [V, H], bias [V] or None, labels [N]; outputs: per-tile partials [N, n_vtiles],
    # target logits [N], and the fp32 logit slab [row1 - row0, V] or None
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    part_max_ptr,
    part_sum_ptr,
    target_ptr,
    z_ptr,
    # shapes: the rows [row0, row1) of this launch
    row0,
    row1,
    V,
    H,
    n_vtiles,
    # strides
    stride_hn,
    stride_wv,
    # constants
    ignore_index,
    HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = row0 + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row1
    tile = tl.program_id(1)
    cols = tile.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_cols = w_ptr + cols[None, :] * stride_wv
    z = _logit_tile(
        h_rows, w_cols, b_ptr, cols, row_ok, col_ok, H, HAS_BIAS, ACC, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H
    )
    if STORE_Z:
        slab = (rows - row0)[:, None] * V + cols[None, :]
        tl.store(z_ptr + slab, z, mask=row_ok[:, None] & col_ok[None, :])
    # every tile holds at least one column < V, so its maximum is finite
    tile_max = tl.max(z, 1)
    tile_sum = tl.sum(tl.exp(z - tile_max[:, None]), 1)
    tl.store(part_max_ptr + rows * n_vtiles + tile, tile_max, mask=row_ok)
    tl.store(part_sum_ptr + rows * n_vtiles + tile, tile_sum, mask=row_ok)
    target = tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
    tl.store(target_ptr + rows, target, mask=valid & (labels // BLOCK_V == tile))


@triton.jit
def _fused_linear_logprobs_bwd_kernel(
    # pointers: hidden, weight, bias (or None), labels as in the forward; per-token m, r and upstream gradient [N];
    # output: the dz slab [row1 - row0, V]; input: the forward's fp32 logit slab, or None to recompute the logits
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    max_ptr,
    logsum_ptr,
    grad_ptr,
    dz_ptr,
    z_ptr,
    # shapes: the rows [row0, row1) of this launch
    row0,
    row1,
    V,
    H,
    # strides
    stride_hn,
    stride_wv,
    # constants
    ignore_index,
    HAS_BIAS: tl.constexpr,
    LOAD_Z: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = row0 + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row1
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)
    slab = (rows - row0)[:, None] * V + cols[None, :]
    slab_ok = row_ok[:, None] & col_ok[None, :]
    if LOAD_Z:
        z = tl.load(z_ptr + slab, mask=slab_ok, other=float("-inf"))
    else:
        h_rows = h_ptr + rows[:, None] * stride_hn
        w_cols = w_ptr + cols[None, :] * stride_wv
        z = _logit_tile(
            h_rows, w_cols, b_ptr, cols, row_ok, col_ok, H, HAS_BIAS, ACC, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H
        )
    m = tl.load(max_ptr + rows, mask=row_ok, other=float("inf"))  # rows past the end: p = 0
    r = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0)
    g = tl.where(valid, tl.load(grad_ptr + rows, mask=row_ok, other=0.0), 0.0)
    p = tl.exp((z - m[:, None]) - r[:, None])
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    tl.store(dz_ptr + slab, (g[:, None] * (onehot - p)).to(DOT), mask=slab_ok)


# --- launchers ------------------------------------------------------------------------------------------------------
class Tiles(NamedTuple):
    """Token rows, vocabulary columns and hidden step of a program's tile, with its warps and pipeline stages."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# GPU tiles per input dtype. Half precision: 128 × 128 tensor-core tiles with a 3-stage pipeline over the hidden
# dimension (96 KiB of shared memory); fp32 (IEEE) and fp64 products run on the CUDA cores with smaller tiles. The
# interpreter's cost is per tile step, not per value, so it gets the same tiles (tests pass small ones to cover
# several tiles). tools/gpu/tune_fused_head.py measures the alternatives.
GPU_TILES = {
    torch.float16: Tiles(128, 128, 64, 8, 3),
    torch.bfloat16: Tiles(128, 128, 64, 8, 3),
    torch.float32: Tiles(64, 64, 32, 4, 2),
    torch.float64: Tiles(64, 64, 32, 4, 2),
}
# Tokens per slab: SLAB_BYTES / (4 · V), a multiple of the token tile. 256 MiB is 4,096 tokens at V = 16,384: the
# products over a slab are large enough for full cuBLAS throughput, and the slab is a fixed cost, not O(N·V).
SLAB_BYTES = 256 * 2**20


def _types(dtype: torch.dtype):
    """(accumulator dtype, product operand dtype, input precision) for inputs of ``dtype``."""
    acc = acc_types(dtype)[1]
    if dtype in (torch.float32, torch.float64) or interpreted():
        return acc, acc, "ieee"
    return acc, (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


def _slab_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of dz slabs (the product operand dtype)."""
    torch_of = {tl.float64: torch.float64, tl.float32: torch.float32, tl.bfloat16: torch.bfloat16}
    return torch_of.get(_types(dtype)[1], torch.float16)


def default_chunk_rows(vocab: int, block_n: int) -> int:
    """Tokens per slab for a vocabulary of ``vocab``: ``SLAB_BYTES`` of fp32 logits, a multiple of ``block_n``."""
    return max(block_n, SLAB_BYTES // (4 * vocab) // block_n * block_n)


class _Plan:
    """Tiles, launch options and slab height for one call over ``hidden`` [N, H] and ``weight`` [V, H]: ``tiles``
    (None: ``GPU_TILES`` of the dtype; block sizes rounded up to powers of two, at least 16) and ``chunk_rows``
    (None: ``default_chunk_rows``)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, *, tiles: Tiles | None, chunk_rows: int | None):
        tiles = GPU_TILES[hidden.dtype] if tiles is None else tiles
        block = lambda size: max(16, triton.next_power_of_2(size))
        self.bn, self.bv, self.bh = block(tiles.block_n), block(tiles.block_v), block(tiles.block_h)
        self.warps, self.stages = tiles.num_warps, tiles.num_stages
        self.N, self.H = hidden.shape
        self.V = weight.shape[0]
        self.n_vtiles = triton.cdiv(self.V, self.bv)
        self.acc = acc_types(hidden.dtype)[0]
        self.slab_dtype = _slab_dtype(hidden.dtype)
        self.ACC, self.DOT, self.PRECISION = _types(hidden.dtype)
        self.chunk = max(1, default_chunk_rows(self.V, self.bn) if chunk_rows is None else chunk_rows)

    def chunks(self) -> list[tuple[int, int]]:
        """(first row, end row) of each slab."""
        return [(r0, min(r0 + self.chunk, self.N)) for r0 in range(0, self.N, self.chunk)]

    def _constants(self) -> dict:
        return dict(
            ACC=self.ACC,
            DOT=self.DOT,
            PRECISION=self.PRECISION,
            BLOCK_N=self.bn,
            BLOCK_V=self.bv,
            BLOCK_H=self.bh,
            num_warps=self.warps,
            num_stages=self.stages,
        )

    def launch_fwd(self, hidden, weight, bias, labels, *, rows, ignore_index, part_max, part_sum, target, z=None):
        """The forward kernel over the rows ``rows = (row0, row1)``: per-tile partials into ``part_max`` /
        ``part_sum`` [N, n_vtiles] and label logits into ``target`` [N]; the logits also into the slab ``z`` if given.
        """
        row0, row1 = rows
        with on_device(hidden.device):
            _fused_linear_logprobs_fwd_kernel[(triton.cdiv(row1 - row0, self.bn), self.n_vtiles)](
                # pointers
                h_ptr=hidden,
                w_ptr=weight,
                b_ptr=bias,
                labels_ptr=labels,
                part_max_ptr=part_max,
                part_sum_ptr=part_sum,
                target_ptr=target,
                z_ptr=z,
                # shapes
                row0=row0,
                row1=row1,
                V=self.V,
                H=self.H,
                n_vtiles=self.n_vtiles,
                # strides
                stride_hn=hidden.stride(0),
                stride_wv=weight.stride(0),
                # constants
                ignore_index=ignore_index,
                HAS_BIAS=bias is not None,
                STORE_Z=z is not None,
                **self._constants(),
            )

    def launch_bwd(self, hidden, weight, bias, labels, *, rows, ignore_index, row_max, row_logsum, grad, dz, z=None):
        """The backward kernel over the rows ``rows = (row0, row1)``: dz = g · (onehot − p) into the slab ``dz``, the
        logits recomputed, or read from the forward's slab ``z`` if given."""
        row0, row1 = rows
        with on_device(hidden.device):
            _fused_linear_logprobs_bwd_kernel[(triton.cdiv(row1 - row0, self.bn), self.n_vtiles)](
                # pointers
                h_ptr=hidden,
                w_ptr=weight,
                b_ptr=bias,
                labels_ptr=labels,
                max_ptr=row_max,
                logsum_ptr=row_logsum,
                grad_ptr=grad,
                dz_ptr=dz,
                z_ptr=z,
                # shapes
                row0=row0,
                row1=row1,
                V=self.V,
                H=self.H,
                # strides
                stride_hn=hidden.stride(0),
                stride_wv=weight.stride(0),
                # constants
                ignore_index=ignore_index,
                HAS_BIAS=bias is not None,
                LOAD_Z=z is not None,
                **self._constants(),
            )


def _as_rows(hidden: torch.Tensor) -> torch.Tensor:
    return hidden if hidden.stride(-1) == 1 else hidden.contiguous()


def _combine(part_max, part_sum, target, labels, ignore_index, rows=slice(None)):
    """(logp, m, r) of ``rows`` from the per-tile partials."""
    tile_max, tile_sum = part_max[rows], part_sum[rows]
    m = tile_max.amax(1)
    r = torch.log((tile_sum * torch.exp(tile_max - m[:, None])).sum(1))
    logp = torch.where(labels[rows] != ignore_index, (target[rows] - m) - r, 0.0)
    return logp, m, r


def fused_linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    input_grad: bool = False,
    tiles: Tiles | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per token ``(logp, row_max, row_logsum, u)`` for ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``.

    ``logp``, ``row_max`` (m) and ``row_logsum`` (r) are [N]; ``u = d logp / d hidden`` [N, H] (the frozen-head input
    gradient before scaling by the upstream gradient) is computed when ``input_grad``, else None. Outputs are float32
    (float64 for float64 inputs). ``hidden`` and ``weight`` need a contiguous last dimension (else one copy is made).
    ``tiles`` / ``chunk_rows``: the program tiles and the slab height (None: ``GPU_TILES``, ``default_chunk_rows``).
    """
    plan = _Plan(hidden, weight, tiles=tiles, chunk_rows=chunk_rows)
    N, dev, acc = plan.N, hidden.device, plan.acc
    if N == 0:
        u = torch.zeros(0, plan.H, dtype=acc, device=dev) if input_grad else None
        return *(torch.empty(0, dtype=acc, device=dev) for _ in range(3)), u
    hidden, weight = _as_rows(hidden), _as_rows(weight)
    labels = labels.reshape(-1).contiguous()
    stats = dict(
        part_max=torch.empty(N, plan.n_vtiles, dtype=acc, device=dev),
        part_sum=torch.empty(N, plan.n_vtiles, dtype=acc, device=dev),
        target=torch.zeros(N, dtype=acc, device=dev),
    )
    if not input_grad:
        plan.launch_fwd(hidden, weight, bias, labels, rows=(0, N), ignore_index=ignore_index, **stats)
        return (*_combine(*stats.values(), labels, ignore_index), None)
    # frozen head: per slab, the logits are written once, reduced, and read back for u = (onehot − p) @ W
    logp = torch.empty(N, dtype=acc, device=dev)
    m = torch.empty(N, dtype=acc, device=dev)
    r = torch.empty(N, dtype=acc, device=dev)
    u = torch.empty(N, plan.H, dtype=acc, device=dev)
    ones = (labels != ignore_index).to(acc)
    rows_max = min(plan.chunk, N)
    z = torch.empty(rows_max, plan.V, dtype=acc, device=dev)
    dz = torch.empty(rows_max, plan.V, dtype=plan.slab_dtype, device=dev)
    w = weight.to(plan.slab_dtype)
    for row0, row1 in plan.chunks():
        rows = (row0, row1)
        plan.launch_fwd(hidden, weight, bias, labels, rows=rows, ignore_index=ignore_index, z=z, **stats)
        logp[row0:row1], m[row0:row1], r[row0:row1] = _combine(*stats.values(), labels, ignore_index, slice(row0, row1))
        grad = dict(row_max=m, row_logsum=r, grad=ones, dz=dz)
        plan.launch_bwd(hidden, weight, bias, labels, rows=rows, ignore_index=ignore_index, z=z, **grad)
        u[row0:row1] = torch.mm(dz[: row1 - row0], w)
    return logp, m, r, u


def fused_linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    tiles: Tiles | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d hidden [N, H], d weight [V, H], d bias [V])`` of Σ_n grad_logp[n]·logp[n], each only if asked.

    ``row_max`` / ``row_logsum`` come from ``fused_linear_logprobs_fwd``. Returned in the accumulator dtype (float32,
    float64 for float64 inputs); the caller casts to the input dtype. ``tiles`` / ``chunk_rows`` as in the forward.
    """
    plan = _Plan(hidden, weight, tiles=tiles, chunk_rows=chunk_rows)
    N, H, V, dev, acc = plan.N, plan.H, plan.V, hidden.device, plan.acc
    dh = torch.empty(N, H, dtype=acc, device=dev) if need_hidden else None
    dw = torch.zeros(V, H, dtype=acc, device=dev) if need_weight else None
    db = torch.zeros(V, dtype=acc, device=dev) if need_bias else None
    if N == 0:
        return dh, dw, db
    hidden, weight = _as_rows(hidden), _as_rows(weight)
    labels = labels.reshape(-1).contiguous()
    grad_logp = grad_logp.reshape(-1).to(acc).contiguous()
    dz = torch.empty(min(plan.chunk, N), V, dtype=plan.slab_dtype, device=dev)
    grad = dict(row_max=row_max, row_logsum=row_logsum, grad=grad_logp, dz=dz)
    w = weight.to(plan.slab_dtype) if need_hidden else None
    for row0, row1 in plan.chunks():
        plan.launch_bwd(hidden, weight, bias, labels, rows=(row0, row1), ignore_index=ignore_index, **grad)
        slab = dz[: row1 - row0]
        if need_hidden:
            dh[row0:row1] = torch.mm(slab, w)
        if need_weight:
            dw += torch.mm(slab.t(), hidden[row0:row1].to(plan.slab_dtype))
        if need_bias:
            db += slab.sum(0, dtype=acc)
    return dh, dw, db
