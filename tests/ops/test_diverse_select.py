"""diverse_select: the C++ extension against the reference (exact indices), hand-made point sets with known answers,
independent brute-force definitions of both greedy rules, the fallback path, opcheck and bad input."""

import math
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import silmm_fast
from silmm_fast import _backend, _ext, use_backend
from silmm_fast.ops import diverse_select as ds_ops
from silmm_fast.reference import diverse_select as ref

diverse_select = silmm_fast.diverse_select


@pytest.fixture(scope="module")
def cpp():
    """The registered C++ op. Tests that need it fail when it cannot be built, unless the run disabled it."""
    op = ds_ops.cpp_op()
    if op is None:
        if os.environ.get("SILMM_FAST_NO_EXT") == "1":
            pytest.skip("SILMM_FAST_NO_EXT=1 disables the C++ extension in this run")
        pytest.fail(f"C++ extension unavailable: {_ext.status()}")
    return op


def _both(features, n, method, quality=None):
    with use_backend("cpp"):
        a = diverse_select(features, n, method=method, quality=quality)
    with use_backend("reference"):
        b = diverse_select(features, n, method=method, quality=quality)
    return a, b


def _circle(*degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)[None]  # [1, K, 2]


# --- hand-made point sets --------------------------------------------------------------------------------------------
# a = 0°, b = 10°, c = 90°, d = 180°. Row means of S: a .246, b .293, c .293, d −.246, so FPS starts at d (most
# atypical), then a (distance 2), then c (min distance 1 vs b's 0.015), then b. The DPP starts at index 0 (a), then
# c (residual 1 vs b's 0.030, d's 0); then the 2-D span is full: the gain vanishes and FPS from {a, c} picks d, b.
POINTS = _circle(0, 10, 90, 180)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_known_answers(cpp, backend):
    with use_backend(backend):
        assert diverse_select(POINTS, 4, method="fps").tolist() == [[3, 0, 2, 1]]
        assert diverse_select(POINTS, 4, method="dpp").tolist() == [[0, 2, 3, 1]]
        # quality 0.1 on a: the DPP starts at the first of the best singletons (b), then c (residual .970 vs d .030)
        q = torch.tensor([[0.1, 1.0, 1.0, 1.0]], dtype=torch.float64)
        assert diverse_select(POINTS, 2, method="dpp", quality=q).tolist() == [[1, 2]]
        # FPS weighted: start argmax q·(1 − mean) = d; then q·dist: a .2, b 1.985, c 1 → b
        assert diverse_select(POINTS, 2, method="fps", quality=q).tolist() == [[3, 1]]
        # n = 1
        assert diverse_select(POINTS, 1, method="dpp").tolist() == [[0]]
        assert diverse_select(POINTS, 1, method="fps").tolist() == [[3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["dpp", "fps"])
def test_duplicates_come_last(cpp, dtype, method):
    # three distinct directions (x, y, z) and two copies of x: every method covers x, y, z before any copy
    e = torch.eye(3, dtype=dtype)
    feats = (
        torch.stack([e[0], e[0], e[1], e[0], e[2]])[None]
        * torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0], dtype=dtype)[None, :, None]
    )
    a, b = _both(feats, 5, method)
    assert torch.equal(a, b)
    first = a[0, :3].tolist()
    assert sorted(first) in ([0, 2, 4], [1, 2, 4], [2, 3, 4])  # one copy of x, then y and z
    assert sorted(a[0].tolist()) == [0, 1, 2, 3, 4]


def test_dpp_stops_at_feature_rank(cpp):
    # 2-D features, 6 candidates, n = 6: after 2 DPP picks the gain vanishes and FPS fills deterministically
    feats = _circle(0, 30, 60, 90, 120, 150)
    for backend in ("cpp", "reference"):
        with use_backend(backend):
            out = diverse_select(feats, 6, method="dpp")[0].tolist()
        # DPP: 0°, then the residual 1 − cos² is largest at 90° (index 3); FPS from {0°, 90°}: 150° (min distance
        # 1 − cos 60°) ... then ties between 30° and 60°, 120° resolve to the lowest index
        assert out[:3] == [0, 3, 5]
        assert sorted(out) == list(range(6))


def test_zero_vectors_and_zero_quality(cpp):
    # an all-zero candidate has similarity 0 with everything (S_ii = 0): the DPP never gains from it, while for FPS
    # it sits at cosine distance 1 from every other candidate
    feats = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    a, b = _both(feats, 4, "dpp")
    assert torch.equal(a, b) and a.tolist() == [[1, 2, 0, 3]]
    a, b = _both(feats, 4, "fps")
    assert torch.equal(a, b) and a.tolist() == [[0, 1, 2, 3]]
    q = torch.zeros(1, 4)
    for method in ("dpp", "fps"):
        a, b = _both(feats, 3, method, quality=q)
        assert torch.equal(a, b)
        assert len(set(a[0].tolist())) == 3
    # all-zero features: nothing to diversify, lowest indices
    a, b = _both(torch.zeros(2, 5, 3), 3, "dpp")
    assert torch.equal(a, b) and a.tolist() == [[0, 1, 2]] * 2


# --- independent definitions (brute force) ---------------------------------------------------------------------------
def _brute_dpp(x, n, q):
    """Greedy argmax of log det(L_Y) one candidate at a time, with determinants from torch.linalg (no Cholesky
    bookkeeping), for full-rank data."""
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    L = q[:, None] * (xn @ xn.T) * q[None, :]
    chosen = []
    for _ in range(n):
        best, best_val = None, -math.inf
        for i in range(x.shape[0]):
            if i in chosen:
                continue
            idx = chosen + [i]
            val = torch.linalg.slogdet(L[idx][:, idx]).logabsdet.item()
            if val > best_val + 1e-9:
                best, best_val = i, val
        chosen.append(best)
    return chosen


def _brute_fps(x, n, q):
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    dist_all = 1 - xn @ xn.T
    chosen = []
    for _ in range(n):
        if chosen:
            dist = dist_all[:, chosen].min(dim=1).values
        else:
            dist = 1 - (xn @ xn.T).mean(dim=1)
        score = q * dist
        score[chosen] = -math.inf
        chosen.append(int(score.argmax()))
    return chosen


@pytest.mark.parametrize("with_quality", [False, True])
def test_matches_brute_force(cpp, with_quality):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 12, 16, dtype=torch.float64, generator=g)
    q = torch.rand(4, 12, dtype=torch.float64, generator=g) + 0.5 if with_quality else torch.ones(4, 12).double()
    quality = q if with_quality else None
    dpp = diverse_select(x, 6, method="dpp", quality=quality)
    fps = diverse_select(x, 6, method="fps", quality=quality)
    for b in range(4):
        assert dpp[b].tolist() == _brute_dpp(x[b], 6, q[b])
        assert fps[b].tolist() == _brute_fps(x[b], 6, q[b])


# --- C++ == reference on random batches ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_quality", [False, True])
@pytest.mark.parametrize("method", ["dpp", "fps"])
def test_random_batches_match_reference(cpp, dtype, with_quality, method):
    g = torch.Generator().manual_seed(7)
    for B, K, L, D, n in [(5, 17, 3, 9, 6), (3, 8, None, 40, 8), (7, 30, None, 5, 11), (2, 1, 2, 4, 1)]:
        shape = (B, K, D) if L is None else (B, K, L, D)
        feats = torch.randn(shape, dtype=dtype, generator=g)
        if K > 3:
            feats[:, 2] = feats[:, 0]  # a duplicate in every prompt
        quality = torch.rand(B, K, dtype=dtype, generator=g) if with_quality else None
        a, b = _both(feats, n, method, quality)
        assert torch.equal(a, b), (shape, n)
        assert a.dtype == torch.long and a.shape == (B, n)
        assert all(len(set(row)) == n for row in a.tolist())


@pytest.mark.parametrize("method", ["dpp", "fps"])
def test_public_op_runs_the_backend_it_chose(cpp, method, monkeypatch):
    """diverse_select validates, then hands its inputs to diverse_select_on with the backend ``use_backend`` forces;
    both backends pick what the reference module picks."""
    g = torch.Generator().manual_seed(21)
    x, q = torch.randn(5, 9, 3, 16, generator=g), torch.rand(5, 9, generator=g)
    expected = ref.diverse_select(x, 4, method=method, quality=q)
    chosen = []
    on = ds_ops.diverse_select_on
    monkeypatch.setattr(ds_ops, "diverse_select_on", lambda b, *args, **kw: chosen.append(b) or on(b, *args, **kw))
    for backend in ("cpp", "reference"):
        with use_backend(backend):
            assert torch.equal(diverse_select(x, 4, method=method, quality=q), expected), backend
        assert torch.equal(on(backend, x, 4, method=method, quality=q), expected), backend
    assert chosen == ["cpp", "reference"]


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    K=st.integers(1, 12),
    D=st.integers(1, 6),
    data=st.data(),
)
def test_property_cpp_equals_reference(B, K, D, data):
    if ds_ops.cpp_op() is None:
        pytest.skip(f"C++ extension unavailable: {_ext.status()}")
    n = data.draw(st.integers(1, K))
    method = data.draw(st.sampled_from(["dpp", "fps"]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # integer-valued features: many exact ties and duplicates, the hard case for equal tie breaking
    feats = torch.randint(-2, 3, (B, K, D), generator=g).float()
    quality = torch.randint(0, 3, (B, K), generator=g).float() if data.draw(st.booleans()) else None
    a, b = _both(feats, n, method, quality)
    assert torch.equal(a, b)
    assert all(len(set(row)) == n for row in a.tolist())


def test_k_equals_n_is_a_permutation(cpp):
    feats = torch.randn(3, 9, 4)
    for method in ("dpp", "fps"):
        a, b = _both(feats, 9, method)
        assert torch.equal(a, b)
        assert (a.sort(dim=1).values == torch.arange(9)).all()


def test_non_contiguous_and_low_precision(cpp):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, 10, 20, generator=g)
    feats = base.transpose(0, 1)  # [4, 10, 6, 20] view, non-contiguous
    assert not feats.is_contiguous()
    for method in ("dpp", "fps"):
        a, b = _both(feats, 5, method)
        assert torch.equal(a, b)
        assert torch.equal(a, diverse_select(feats.contiguous(), 5, method=method))
    # float16 / bfloat16 features select in float32, like their float32 upcast
    half = base[0].half()
    assert torch.equal(diverse_select(half, 4), diverse_select(half.float(), 4))
    bf = base[0].bfloat16()
    assert torch.equal(diverse_select(bf, 4, method="fps"), diverse_select(bf.float(), 4, method="fps"))
    # the C++ op itself on a non-contiguous similarity and quality
    S = ref.cosine_similarity_matrix(torch.randn(3, 7, 5, dtype=torch.float64, generator=g))
    S_t = S.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major strides
    q = torch.rand(7, 3, dtype=torch.float64, generator=g).T
    G = ref.gram_matrix(torch.randn(3, 7, 5, generator=g))
    G_t = G.transpose(1, 2).contiguous().transpose(1, 2)
    c = ref.inverse_norms(G)
    c_t = c.T.contiguous().T
    for method in ("dpp", "fps"):
        expect = ref.select_from_similarity(S, None, q, 4, method, 1e-10)
        assert torch.equal(cpp(S_t, None, q, 4, method, 1e-10), expect)
        expect = ref.select_from_similarity(G, c, q, 4, method, 1e-5)
        assert torch.equal(cpp(G_t, c_t, q, 4, method, 1e-5), expect)


def test_empty_batch(cpp):
    for backend in ("cpp", "reference"):
        with use_backend(backend):
            out = diverse_select(torch.randn(0, 5, 3), 2)
        assert out.shape == (0, 2) and out.dtype == torch.long


def test_pybind_entry_matches_dispatcher(cpp):
    G = ref.gram_matrix(torch.randn(4, 9, 6))
    module = _ext.load()
    assert module.has_cuda() in (True, False)
    c = ref.inverse_norms(G)
    for method in ("dpp", "fps"):
        direct = module.diverse_select(G, c, None, 5, method, 1e-5)
        assert torch.equal(direct, cpp(G, c, None, 5, method, 1e-5))


# --- registration ----------------------------------------------------------------------------------------------------
def test_opcheck(cpp):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        G = ref.gram_matrix(torch.randn(3, 6, 4, dtype=dtype, generator=g))
        q = torch.rand(3, 6, dtype=dtype, generator=g)
        c = ref.inverse_norms(G)
        torch.library.opcheck(cpp, (G, c, q, 4, "dpp", ref.DPP_EPS[dtype]))
        torch.library.opcheck(cpp, (G, c, None, 2, "fps", 0.0))
    S = ref.cosine_similarity_matrix(torch.randn(2, 5, 3, generator=g))
    torch.library.opcheck(cpp, (S, None, None, 3, "dpp", 1e-10))


def test_cpp_op_rejects_bad_arguments(cpp):
    S = ref.cosine_similarity_matrix(torch.randn(2, 5, 3))
    with pytest.raises(RuntimeError, match="n must be in"):
        cpp(S, None, None, 6, "dpp", 1e-5)
    with pytest.raises(RuntimeError, match="method must be"):
        cpp(S, None, None, 2, "greedy", 1e-5)
    with pytest.raises(RuntimeError, match="shape \\[B, K, K\\]"):
        cpp(S[:, :, :4], None, None, 2, "dpp", 1e-5)
    with pytest.raises(RuntimeError, match="quality must have shape"):
        cpp(S, None, torch.ones(2, 4), 2, "dpp", 1e-5)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        cpp(S, torch.ones(2, 5, 1), None, 2, "dpp", 1e-5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpp(S.half(), None, None, 2, "dpp", 1e-5)
    with pytest.raises(RuntimeError, match="eps must be"):
        cpp(S, None, None, 2, "dpp", -1.0)


# --- fallback path ---------------------------------------------------------------------------------------------------
def test_failed_build_falls_back_with_one_warning(cpp, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    expected = diverse_select(POINTS, 4, method="fps")

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'silmm_fast_C'")

    monkeypatch.setattr(_ext, "_state", {"module": None, "error": None, "tried": False})
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = diverse_select(POINTS, 4, method="fps")
        out2 = diverse_select(POINTS, 4, method="dpp")
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and "could not be built" in str(runtime[0].message)
    assert torch.equal(out1, expected) and out2.tolist() == [[0, 2, 3, 1]]
    assert _backend.choose("diverse_select", "cpu") == "reference"
    assert "Error building extension" in _ext.status()
    with use_backend("cpp"), pytest.raises(RuntimeError, match="forced but cannot run"):
        diverse_select(POINTS, 2)


def test_disabled_extension_uses_reference_silently(cpp, monkeypatch):
    monkeypatch.setattr(_ext, "_state", {"module": None, "error": None, "tried": False})
    monkeypatch.setenv("SILMM_FAST_NO_EXT", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = diverse_select(POINTS, 4, method="dpp")
    assert out.tolist() == [[0, 2, 3, 1]]
    assert _backend.choose("diverse_select", "cpu") == "reference"
    assert "SILMM_FAST_NO_EXT" in _ext.status()


def test_build_ext_command(cpp, capsys):
    from silmm_fast import build_ext

    assert build_ext.main([]) == 0
    assert "extension ready" in capsys.readouterr().out


# --- bad input -------------------------------------------------------------------------------------------------------
def test_bad_input():
    x = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="features"):
        diverse_select(x.tolist(), 2)
    with pytest.raises(TypeError, match="features"):
        diverse_select(x.long(), 2)
    with pytest.raises(ValueError, match="features: expected shape"):
        diverse_select(x[0], 2)
    with pytest.raises(ValueError, match="features"):
        diverse_select(torch.randn(2, 5, 0), 2)
    with pytest.raises(ValueError, match="features"):
        diverse_select(torch.randn(2, 5, 0, 3), 2)
    with pytest.raises(ValueError, match="n: expected 1 <= n <= K"):
        diverse_select(x, 6)
    with pytest.raises(ValueError, match="n: expected 1 <= n <= K"):
        diverse_select(x, 0)
    with pytest.raises(TypeError, match="n: expected an int"):
        diverse_select(x, 2.0)
    with pytest.raises(TypeError, match="n: expected an int"):
        diverse_select(x, True)
    with pytest.raises(ValueError, match="method"):
        diverse_select(x, 2, method="kmeans")
    with pytest.raises(ValueError, match="quality: expected shape"):
        diverse_select(x, 2, quality=torch.ones(2, 4))
    with pytest.raises(TypeError, match="quality"):
        diverse_select(x, 2, quality=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="quality: expected non-negative"):
        diverse_select(x, 2, quality=-torch.ones(2, 5))
    with pytest.raises(ValueError, match="quality: contains NaN"):
        diverse_select(x, 2, quality=torch.full((2, 5), float("nan")))
    bad = x.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="features: contains NaN or Inf"):
        diverse_select(bad, 2)
    bad[1, 3, 2] = float("inf")
    with pytest.raises(ValueError, match="features: contains NaN or Inf"):
        diverse_select(bad, 2)
    bad4 = torch.randn(2, 5, 3, 4)
    bad4[0, 0, 1, 0] = float("-inf")
    with pytest.raises(ValueError, match="features: contains NaN or Inf"):
        diverse_select(bad4, 2, method="fps")
    with pytest.raises(ValueError, match="features: squared norms overflow"):
        diverse_select(torch.full((1, 3, 4), 1e30), 2)


# --- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dpp", "fps"])
def test_cuda_matches_cpu(method):
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(64, 40, 8, 48, generator=g)
    feats[:, 5] = feats[:, 1]
    quality = torch.rand(64, 40, generator=g)
    # same similarity on the GPU for both backends (a CPU Gram could round differently)
    a, b = _both(feats.cuda(), 12, method, quality.cuda())
    assert a.is_cuda and b.is_cuda
    assert torch.equal(a, b)


# --- benchmark module ------------------------------------------------------------------------------------------------
def test_bench_runs_and_its_naive_loop_agrees(cpp):
    from bench import bench_diverse_select as bench

    rows = bench.run(["tiny"], "cpu", providers=["silmm", "reference", "naive", "torch.bmm"], modes=["dpp", "fps"])
    assert {(r["provider"], r["mode"]) for r in rows} == {
        ("torch.bmm", "gram"),
        *((p, m) for p in ("silmm", "reference", "naive") for m in ("dpp", "fps")),
    }
    assert all(r["time_ms"] >= 0 for r in rows)
    # the per-prompt loop a user would write (Chen et al.'s sqrt form, F.normalize) picks the same on generic data;
    # distinct qualities fix the first DPP pick (its diag(xn·xnᵀ) is 1 ± rounding, ours exactly 1)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 20, 32, dtype=torch.float64, generator=g)
    q = torch.rand(6, 20, dtype=torch.float64, generator=g) + 0.5
    assert torch.equal(bench.naive_select(x, 8, "dpp", q), diverse_select(x, 8, method="dpp", quality=q))
    assert torch.equal(bench.naive_select(x, 8, "fps"), diverse_select(x, 8, method="fps"))


# --- FPS straight from the features (CPU) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpp_fps(cpp):
    return ds_ops.cpp_op("diverse_select_fps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fps_op_equals_its_reference_bit_for_bit(cpp_fps, dtype):
    # D not a multiple of the 16 lanes, K not a multiple of the 4-row groups, a duplicate, an all-zero candidate
    g = torch.Generator().manual_seed(11)
    for B, K, D, n in [(6, 13, 37, 9), (3, 4, 16, 4), (2, 1, 3, 1), (4, 70, 200, 20)]:
        x = torch.randn(B, K, D, dtype=dtype, generator=g)
        if K > 3:
            x[:, 3] = x[:, 1]
            x[:, 2] = 0
        for quality in (None, torch.rand(B, K, dtype=dtype, generator=g)):
            assert torch.equal(cpp_fps(x, quality, n), ref.fps_from_features(x, quality, n)), (B, K, D, n)


def test_fps_op_follows_the_similarity_rule(cpp_fps):
    # the Gram-free route and the similarity route are the same rule: on well-separated float64 points they agree
    g = torch.Generator().manual_seed(12)
    x = torch.randn(8, 24, 10, dtype=torch.float64, generator=g)
    gram = ref.gram_matrix(x)
    via_similarity = ref.select_from_similarity(gram, ref.inverse_norms(gram), None, 12, "fps", 0.0)
    assert torch.equal(cpp_fps(x, None, 12), via_similarity)


def test_fps_op_strided_input(cpp_fps):
    x = torch.randn(3, 20, 2, 9)[:, :, 1, :]  # non-contiguous rows
    y = torch.randn(3, 9, 20).transpose(1, 2)  # feature stride != 1
    for t in (x, y):
        assert torch.equal(cpp_fps(t, None, 7), cpp_fps(t.contiguous(), None, 7))


def test_fps_op_registration_and_non_finite(cpp_fps):
    g = torch.Generator().manual_seed(13)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 6, 5, dtype=dtype, generator=g)
        torch.library.opcheck(cpp_fps, (x, torch.rand(3, 6, dtype=dtype, generator=g), 4))
        torch.library.opcheck(cpp_fps, (x, None, 1))
    bad = torch.randn(2, 5, 4)
    bad[1, 2, 3] = float("nan")
    assert cpp_fps(bad, None, 2)[1].tolist() == [-1, -1] and (cpp_fps(bad, None, 2)[0] >= 0).all()
    for backend in ("cpp", "reference"):
        with use_backend(backend), pytest.raises(ValueError, match="features: contains NaN or Inf"):
            diverse_select(bad, 2, method="fps")
    # a non-finite row in the short last 4-row group, or an overflowing norm, stops only its own prompt: the prompts
    # after it (same thread, same workspace) still match the reference
    x = torch.randn(6, 5, 7, generator=g)
    x[1, 4, 0] = float("inf")
    x[3, 0, :] = 3e38  # finite values whose squared norm overflows float32
    out = cpp_fps(x, None, 3)
    assert out[1].tolist() == [-1] * 3 and out[3].tolist() == [-1] * 3
    good = [0, 2, 4, 5]
    assert torch.equal(out[good], ref.fps_from_features(x[good], None, 3))
    with pytest.raises(RuntimeError, match="shape \\[B, K, D\\]"):
        cpp_fps(torch.randn(2, 5), None, 1)
    with pytest.raises(RuntimeError, match="n must be in"):
        cpp_fps(torch.randn(2, 5, 3), None, 6)
    with pytest.raises(RuntimeError, match="quality must have shape"):
        cpp_fps(torch.randn(2, 5, 3), torch.ones(2, 4), 2)
