"""pairwise_distance: the Triton kernels (interpreter on CPU) and the torch path against the float64 reference."""

from collections import Counter

import pytest
import torch
from conftest import backend_device
from hypothesis import given, settings
from hypothesis import strategies as st
from silmm_fast.kernels import pairwise_distance as kern
from tolerances import TOLERANCES, assert_close
from triton.runtime.jit import KernelInterface

from silmm_fast import pairwise_distance, use_backend
from silmm_fast.ops.pairwise_distance import _TritonPairwiseDistance
from silmm_fast.reference.pairwise_distance import pairwise_distance as reference

KERNELS = ("cosine", "euclidean", "sqeuclidean", "rbf")
POOLS = ("mean", "max", "none")
FAST = ("torch", "triton")
SIGMA = 3.0  # with D ~ 40 random features, ‖a − c‖² ~ 80: keeps the RBF away from its flat tail


def _inputs(B, M, N, L, D, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, L, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randn(B, N, L, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    go = torch.randn(B, M, N, generator=gen, dtype=torch.float64).to(device)
    return x.requires_grad_(), y.requires_grad_(), go


def _run(backend, x, y, go, **kw):
    """Output and gradients of the op under ``backend``, back on x's device. CPU inputs run where the backend does
    (backend_device: CUDA for Triton on a GPU machine), differentiated with respect to the caller's leaves x, y;
    inputs a test put on a device stay there."""
    dev = backend_device(backend) if x.device.type == "cpu" else x.device
    with use_backend(backend):
        out = pairwise_distance(x.to(dev), y.to(dev), **kw)
    gx, gy = torch.autograd.grad(out, (x, y), go.to(out.device, out.dtype))
    return out.to(x.device), gx, gy


def _expected(x, y, go, **kw):
    xr = x.detach().double().requires_grad_()
    yr = y.detach().double().requires_grad_()
    return _run("reference", xr, yr, go, **kw)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference_float64(kernel, pool, backend):
    # D = 40: not a power of two and wider than the interpreter's 32-feature tile
    x, y, go = _inputs(2, 2, 3, 3, 40)
    kw = dict(kernel=kernel, pool=pool, sigma=SIGMA)
    out, gx, gy = _run(backend, x, y, go, **kw)
    ref, rgx, rgy = _expected(x, y, go, **kw)
    assert out.shape == (2, 2, 3) and out.dtype == torch.float64
    assert_close(out, ref, torch.float64, scale=100.0)  # sums of 40 squares of O(1) values: atol sized to the output
    assert_close(gx, rgx, torch.float64, scale=100.0)
    assert_close(gy, rgy, torch.float64, scale=100.0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(kernel, pool, backend):
    x, y, _ = _inputs(1, 2, 2, 2, 3, seed=1, device=backend_device(backend))
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b: pairwise_distance(a, b, kernel=kernel, pool=pool, sigma=1.5), (x, y), eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_and_many_pairs(kernel, backend):
    # M, N above one 16/32-row tile; L = 1; fp32 compared to the float64 reference with the fp32 tolerances
    x, y, go = _inputs(1, 3, 33, 1, 8, dtype=torch.float32, seed=2)
    for pool in POOLS:
        kw = dict(kernel=kernel, pool=pool, sigma=2.0)
        out, gx, gy = _run(backend, x, y, go, **kw)
        ref, rgx, rgy = _expected(x, y, go, **kw)
        assert out.dtype == torch.float32 and gx.dtype == torch.float32
        assert_close(out, ref, torch.float32, scale=10.0)  # Gram-expansion rounding ~ ε·‖a‖², ‖a‖² ~ 8
        assert_close(gx, rgx, torch.float32, scale=10.0)
        assert_close(gy, rgy, torch.float32, scale=10.0)


@pytest.mark.parametrize("pool", POOLS)
def test_split_d_partial_statistics(pool):
    # split-D: several programs of the one launch share each pair tile's D; the last to finish sums the partial
    # statistics (in split order) and runs the epilogue. Same statistics as one program per tile, same gradients.
    x, y, go = _inputs(2, 3, 17, 2, 100, seed=3)
    xd, yd = (t.detach().to(backend_device("triton")) for t in (x, y))  # the launcher reads them where Triton runs
    for kernel in KERNELS:
        results = {}
        for splits in (1, 3):
            tiles = kern.Tiles(block_d=16, exact_block_d=8, splits=splits)
            stats = [t.cpu() for t in kern.pairwise_distance_fwd(xd, yd, kernel, pool, SIGMA, tiles)]
            results[splits] = (*_run_tiles(x, y, go, kernel, pool, SIGMA, tiles), *stats)
        ref, rgx, rgy = _expected(x, y, go, kernel=kernel, pool=pool, sigma=SIGMA)
        for got, want in zip(results[3][:3], (ref, rgx, rgy)):
            assert_close(got, want, torch.float64, 1e3)
        for part, full in zip(results[3], results[1]):
            assert part.shape == full.shape
            assert_close(part, full, torch.float64, 1e3)


def _run_tiles(x, y, go, kernel, pool, sigma, tiles):
    """The Triton autograd Function with explicit tiles: output and gradients in x and y, on the CPU."""
    dev = backend_device("triton")
    out = _TritonPairwiseDistance.apply(x.to(dev), y.to(dev), kernel, pool, sigma, tiles)
    gx, gy = torch.autograd.grad(out, (x, y), go.to(out.device, out.dtype))
    return out.cpu(), gx, gy


class _Launches:
    """Counts Triton kernel launches (``kernel[grid](...)``, compiled or interpreted) by kernel name."""

    def __init__(self, monkeypatch):
        self.counts = Counter()
        launch = KernelInterface.__getitem__

        def counting(fn, grid):
            self.counts[fn.fn.__name__] += 1
            return launch(fn, grid)

        monkeypatch.setattr(KernelInterface, "__getitem__", counting)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_one_launch_each_way(kernel, pool, monkeypatch):
    # one forward launch and one backward launch for both gradients, with and without split-D, with pairs that
    # need the exact recomputation (near-coincident points far from the origin) beside pairs that do not
    x, y, go = _far_cluster(torch.float64, 2)
    launches = _Launches(monkeypatch)
    for splits in (1, 3):
        tiles = kern.Tiles(block_d=16, exact_block_d=8, splits=splits)
        launches.counts.clear()
        dev = backend_device("triton")
        out = _TritonPairwiseDistance.apply(x.to(dev), y.to(dev), kernel, pool, 0.01, tiles)
        assert launches.counts == {"_pd_fwd_kernel": 1}
        gx, gy = torch.autograd.grad(out, (x, y), go.to(out.device))
        assert launches.counts == {"_pd_fwd_kernel": 1, "_pd_bwd_kernel": 1}
        ref, rgx, rgy = _expected(x, y, go, kernel=kernel, pool=pool, sigma=0.01)
        assert_close(out.cpu(), ref, torch.float64, 10.0)
        for got, want in ((gx, rgx), (gy, rgy)):
            floor = TOLERANCES[torch.float64]["atol"] * max(1.0, want.abs().max().item())
            torch.testing.assert_close(got, want, rtol=TOLERANCES[torch.float64]["rtol"] * 10, atol=floor)


@pytest.mark.parametrize("wanted", ("x", "y"))
def test_backward_for_one_operand(wanted, monkeypatch):
    # the backward grid holds only the row blocks of the operand that needs a gradient (M, N above one row tile)
    x, y, go = _inputs(1, 3, 35, 2, 20, seed=12)
    x, y = x.detach().requires_grad_(wanted == "x"), y.detach().requires_grad_(wanted == "y")
    leaf = x if wanted == "x" else y
    launches = _Launches(monkeypatch)
    for pool in POOLS:
        dev = backend_device("triton")
        with use_backend("triton"):
            out = pairwise_distance(x.to(dev), y.to(dev), kernel="rbf", pool=pool, sigma=SIGMA)
        (got,) = torch.autograd.grad(out, (leaf,), go.to(out.device))
        ref = reference(x, y, kernel="rbf", pool=pool, sigma=SIGMA)
        (want,) = torch.autograd.grad(ref, (leaf,), go)
        assert_close(got, want, torch.float64, 100.0)
    assert launches.counts == {"_pd_fwd_kernel": 3, "_pd_bwd_kernel": 3}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("pool", POOLS)
def test_half_precision_inputs(pool, backend):
    # bf16 / fp16 inputs: fp32 accumulation and output, gradients in the input dtype
    for dtype in (torch.bfloat16, torch.float16):
        x, y, go = _inputs(1, 2, 3, 2, 24, dtype=dtype, seed=4)
        kw = dict(kernel="cosine", pool=pool)
        out, gx, gy = _run(backend, x, y, go, **kw)
        ref, rgx, rgy = _expected(x, y, go, **kw)
        assert out.dtype == torch.float32 and gx.dtype == dtype and gy.dtype == dtype
        assert_close(out, ref, torch.float32, scale=10.0)  # inputs are exact in fp32: only accumulation rounding
        assert_close(gx, rgx, dtype)
        assert_close(gy, rgy, dtype)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_inputs(backend):
    x, y, go = _inputs(2, 3, 2, 2, 20, seed=5)
    # the views are made where the backend runs: moving a strided view there would give a contiguous copy
    x, y = (t.detach().to(backend_device(backend)) for t in (x, y))
    xt = x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # strides of a [B, L, M, D] buffer
    yt = y.repeat_interleave(2, dim=-1)[..., ::2].requires_grad_()  # stride 2 along D
    kw = dict(kernel="euclidean", pool="max")
    out, gx, gy = (t.cpu() for t in _run(backend, xt, yt, go, **kw))
    ref, rgx, rgy = _expected(xt.cpu(), yt.cpu(), go, **kw)
    assert not xt.is_contiguous() and not yt.is_contiguous()
    assert_close(out, ref, torch.float64, 100.0)
    assert_close(gx, rgx, torch.float64, 100.0)
    assert_close(gy, rgy, torch.float64, 100.0)


@pytest.mark.parametrize("backend", (*FAST, "reference"))
@pytest.mark.parametrize("kernel", KERNELS)
def test_identical_inputs_zero_distance(kernel, backend):
    x, _, go = _inputs(2, 2, 2, 3, 12, seed=6)
    y = x.detach().clone().requires_grad_()
    for pool in POOLS:
        out, gx, gy = _run(backend, x, y, go, kernel=kernel, pool=pool)
        diag = torch.diagonal(out, dim1=1, dim2=2)
        # coincident points are where the expansion cancels: the distance kernels recompute them from differences
        # (exactly 0); cosine keeps the expansion, ~ε
        bound = 1e-12 if kernel == "cosine" else 0.0
        assert diag.abs().max() <= bound, (pool, diag)
        assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
        ref, rgx, rgy = _expected(x, y, go, kernel=kernel, pool=pool)
        assert_close(gx, rgx, torch.float64, scale=100.0)
        assert_close(gy, rgy, torch.float64, scale=100.0)


def _far_cluster(dtype, L, seed=11):
    """x [1, 2, L, 40], y [1, 3, L, 40]: x0, y0, y1 within ~8e-3 of one point of norm 8e3 (where the Gram expansion
    cancels: it would give distance 0 in fp32), x1 and y2 ordinary O(1) points (where it does not). ``dtype`` values,
    returned as float64 leaves so the reference sees the very same numbers."""
    gen = torch.Generator().manual_seed(seed)
    D = 40
    centre = torch.randn(D, generator=gen, dtype=torch.float64)
    centre = 8e3 * centre / centre.norm()
    step = torch.randn(D, generator=gen, dtype=torch.float64)
    step = 7.9e-3 * step / step.norm()
    tokens = 1e-3 * torch.randn(L, D, generator=gen, dtype=torch.float64)  # per-token spread (pool "none" / "max")
    x = torch.stack([centre + tokens, torch.randn(L, D, generator=gen, dtype=torch.float64)])[None]
    y = torch.stack([centre + step + tokens, centre - 0.5 * step + tokens.flip(0), torch.randn(L, D, generator=gen)])
    x, y = x.to(dtype).double(), y[None].to(dtype).double()
    go = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    return x.requires_grad_(), y.requires_grad_(), go


@pytest.mark.parametrize("backend", (*FAST, "reference"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("kernel", ("euclidean", "sqeuclidean", "rbf"))
def test_near_coincident_points_far_from_the_origin(kernel, dtype, backend):
    # fp32 mean pooling over several tokens would round the pooled points by ~ε·8e3 itself: one token there
    pools = (("mean", 1), ("max", 3), ("none", 3)) if dtype == torch.float32 else (("mean", 3), ("none", 2))
    for pool, L in pools:
        x, y, go = _far_cluster(dtype, L)
        kw = dict(kernel=kernel, pool=pool, sigma=0.01)  # rbf: sq / (2σ²) ~ 0.3 at distance 8e-3
        out, gx, gy = _run(backend, x.to(dtype), y.to(dtype), go, **kw)
        ref, rgx, rgy = _expected(x, y, go, **kw)
        assert out[0, 0, 0] > 0 and out[0, 0, 1] > 0, (pool, out)  # the expansion alone gives exactly 0 here
        assert_close(out, ref, dtype, scale=10.0)
        # gradients mix unit-size directions (a − c)/d with 2·(a − c) of size 1.6e4 (sqeuclidean) or 1/σ² (rbf):
        # relative tolerance, atol floor sized to the largest entry
        for got, want in ((gx, rgx), (gy, rgy)):
            floor = TOLERANCES[dtype]["atol"] * max(1.0, want.abs().max().item())
            torch.testing.assert_close(got.double(), want, rtol=TOLERANCES[dtype]["rtol"] * 10, atol=floor)


@pytest.mark.parametrize("pool", POOLS)
def test_near_coincident_points_split_d(pool):
    # the split-D forward sums partial statistics before the exact epilogue recomputes the cancelled pairs
    x, y, _ = _far_cluster(torch.float64, 2)
    xd, yd = (t.detach().to(backend_device("triton")) for t in (x, y))
    tiles = kern.Tiles(block_d=16, exact_block_d=8, splits=3)
    for kernel in ("euclidean", "sqeuclidean", "rbf"):
        out, sq, _, _ = kern.pairwise_distance_fwd(xd, yd, kernel, pool, 0.01, tiles)
        want = reference(x.detach(), y.detach(), kernel=kernel, pool=pool, sigma=0.01)
        assert_close(out.cpu(), want, torch.float64, 10.0)
        assert sq.shape == (1, 2, 3, 2 if pool == "none" else 1)


@pytest.mark.parametrize("backend", (*FAST, "reference"))
def test_zero_vectors(backend):
    x, y, go = _inputs(1, 2, 2, 2, 6, seed=7)
    x = x.detach().clone()
    y = y.detach().clone()
    x[0, 0] = 0.0
    y[0, 1] = 0.0
    x.requires_grad_()
    y.requires_grad_()
    for kernel in KERNELS:
        out, gx, gy = _run(backend, x, y, go, kernel=kernel, pool="mean")
        assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
        if kernel == "cosine":
            # a zero vector is at distance 1 from everything
            torch.testing.assert_close(out[0, 0], torch.ones(2, dtype=out.dtype))
            torch.testing.assert_close(out[0, :, 1], torch.ones(2, dtype=out.dtype))
        ref, rgx, rgy = _expected(x, y, go, kernel=kernel, pool="mean")
        assert_close(out, ref, torch.float64, 100.0)
        # gradients toward a zero vector are scaled by 1/eps (finite, large): compare relatively
        torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-12 * max(1.0, rgx.abs().max().item()))
        torch.testing.assert_close(gy, rgy, rtol=1e-9, atol=1e-12 * max(1.0, rgy.abs().max().item()))


@pytest.mark.parametrize("backend", (*FAST, "reference"))
def test_hand_computed_values(backend):
    # a = (3, 4), c = (0, 4) (L = 1): ‖a − c‖ = 3, a·c = 16, ‖a‖ = 5, ‖c‖ = 4
    x = torch.tensor([[[[3.0, 4.0]]]], dtype=torch.float64)
    y = torch.tensor([[[[0.0, 4.0]]]], dtype=torch.float64)
    expected = {
        "cosine": 1 - 16 / 20,
        "euclidean": 3.0,
        "sqeuclidean": 9.0,
        "rbf": 2 - 2 * torch.exp(torch.tensor(-9.0 / 8.0, dtype=torch.float64)).item(),  # σ = 2
    }
    dev = backend_device(backend)
    x, y = x.to(dev), y.to(dev)
    with use_backend(backend):
        for kernel, value in expected.items():
            out = pairwise_distance(x, y, kernel=kernel, pool="max", sigma=2.0)
            assert out.shape == (1, 1, 1)
            assert abs(out.item() - value) < 1e-12, kernel
    # pool "none" averages per-token distances; "mean" pools first: tokens (1, 0), (−1, 0) against (0, 0), (0, 0)
    x2 = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0]]]], dtype=torch.float64)
    y2 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    x2, y2 = x2.to(dev), y2.to(dev)
    with use_backend(backend):
        assert pairwise_distance(x2, y2, kernel="sqeuclidean", pool="none").item() == pytest.approx(1.0, abs=1e-14)
        assert pairwise_distance(x2, y2, kernel="sqeuclidean", pool="mean").item() == pytest.approx(0.0, abs=1e-14)
        assert pairwise_distance(x2, y2, kernel="sqeuclidean", pool="max").item() == pytest.approx(1.0, abs=1e-14)


def test_max_pool_routes_gradient_to_argmax():
    x = torch.tensor([[[[1.0, 5.0], [2.0, -1.0], [0.0, 3.0]]]], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    for backend in FAST:
        dev = backend_device(backend)
        with use_backend(backend):
            out = pairwise_distance(x.to(dev), y.to(dev), kernel="sqeuclidean", pool="max")
            (gx,) = torch.autograd.grad(out.sum(), (x,))  # back on the CPU leaf x
        # pooled a = (2, 5): d‖a‖²/da = (4, 10), routed to token 1 for feature 0 and token 0 for feature 1
        expected = torch.tensor([[[[0.0, 10.0], [4.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
        torch.testing.assert_close(gx, expected)


@settings(max_examples=30, deadline=None)
@given(
    dims=st.tuples(*[st.integers(1, 4)] * 4, st.integers(1, 9)),
    kernel=st.sampled_from(KERNELS),
    pool=st.sampled_from(POOLS),
    seed=st.integers(0, 2**16),
)
def test_torch_path_any_shape(dims, kernel, pool, seed):
    x, y, go = _inputs(*dims, seed=seed)
    out, gx, gy = _run("torch", x, y, go, kernel=kernel, pool=pool, sigma=SIGMA)
    ref, rgx, rgy = _expected(x, y, go, kernel=kernel, pool=pool, sigma=SIGMA)
    assert_close(out, ref, torch.float64, 100.0)
    # euclidean gradients scale with 1/distance: random points can land close together in tiny dimensions
    scale = 1e4 if kernel == "euclidean" else 100.0
    assert_close(gx, rgx, torch.float64, scale)
    assert_close(gy, rgy, torch.float64, scale)


@pytest.mark.parametrize("backend", (*FAST, "reference"))
def test_nan_propagates(backend):
    # not checked up front (a host sync on CUDA): a NaN feature must show up in every distance of its row
    x, y, _ = _inputs(1, 2, 2, 3, 20, seed=8)
    x = x.detach().clone()
    x[0, 0, 1, 5] = float("nan")
    dev = backend_device(backend)
    with use_backend(backend):
        for pool in POOLS:
            out = pairwise_distance(x.to(dev), y.detach().to(dev), kernel="euclidean", pool=pool).cpu()
            assert out[0, 0].isnan().all() and not out[0, 1].isnan().any(), pool


@pytest.mark.parametrize("backend", FAST)
def test_empty_batch(backend):
    x = torch.randn(0, 2, 3, 4).to(backend_device(backend))
    y = torch.randn(0, 5, 3, 4).to(backend_device(backend))
    with use_backend(backend):
        out = pairwise_distance(x, y)
    assert out.shape == (0, 2, 5)


def test_backends_share_the_constants():
    # the Triton kernels and the torch backend flag the same pairs for exact recomputation and clamp the same norms
    from silmm_fast.ops.torch_backend import pairwise_distance as torch_backend

    assert kern.EXACT_RATIO == torch_backend.EXACT_RATIO
    assert kern.COSINE_EPS == torch_backend.COSINE_EPS == 1e-8


def test_auto_picks_torch_on_cpu():
    from silmm_fast import _backend

    assert _backend.choose("pairwise_distance", "cpu") == "torch"


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), {}), ValueError, "y: expected shape"),
        (lambda: (torch.randn(2, 2, 3, 4), torch.randn(1, 2, 3, 4), {}), ValueError, "y: expected shape"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 2, 3, 4), {}), ValueError, "x: expected shape"),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4, device="meta"), {}), ValueError, "y: expected a "),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), {"kernel": "l1"}), ValueError, "kernel"),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), {"pool": "sum"}), ValueError, "pool"),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), {"sigma": 0.0}), ValueError, "sigma"),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), {"sigma": -1.0}), ValueError, "sigma"),
        (lambda: (torch.ones(1, 2, 3, 4, dtype=torch.long), torch.randn(1, 2, 3, 4), {}), TypeError, "x: expected a f"),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).double(), {}), TypeError, "y: expected dtype"),
        (lambda: ([[1.0]], torch.randn(1, 2, 3, 4), {}), TypeError, "x: expected a torch.Tensor"),
        (lambda: (torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 4), {}), ValueError, "at least one token"),
    ],
)
def test_bad_input(make, error, match):
    x, y, kw = make()
    with pytest.raises(error, match=match):
        pairwise_distance(x, y, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_dreamllm_shape_bf16(kernel, pool):
    # DreamLLM-like: 32 prompts, policy + reference against 8 candidates, 64 tokens × 1024 features
    x, y, go = _inputs(32, 2, 8, 64, 1024, dtype=torch.bfloat16, device="cuda")
    kw = dict(kernel=kernel, pool=pool, sigma=40.0)
    out, gx, gy = _run("triton", x, y, go, **kw)
    ref, rgx, rgy = _expected(x, y, go, **kw)
    assert_close(out, ref, torch.float32, scale=1e3)  # fp32 accumulation over 1024 features
    assert_close(gx, rgx, torch.bfloat16)
    assert_close(gy, rgy, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_wide_split_d_float32():
    x, y, go = _inputs(32, 1, 8, 1, 65536, dtype=torch.float32, device="cuda")
    out, gx, gy = _run("triton", x, y, go, kernel="rbf", pool="mean", sigma=300.0)
    ref, rgx, rgy = _expected(x, y, go, kernel="rbf", pool="mean", sigma=300.0)
    assert_close(out, ref, torch.float32, scale=100.0)
    assert_close(gx, rgx, torch.float32, scale=100.0)
    assert_close(gy, rgy, torch.float32, scale=100.0)
