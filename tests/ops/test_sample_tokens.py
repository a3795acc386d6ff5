"""sample_tokens: every backend gives the reference's tokens exactly (fixed noise, greedy, ties, extreme and masked
logits, dtypes, strides), the kernel's numbers equal the reference's bit for bit, the draws follow the textbook
distribution, seeded generators reproduce, hand-derived answers, and bad input."""

import math

import pytest
import torch
from conftest import backend_device
from hypothesis import given, settings
from hypothesis import strategies as st

import silmm_fast
import silmm_fast.ops.sampling as ops
from silmm_fast import use_backend
from silmm_fast.ops.torch_backend import sampling as torch_backend
from silmm_fast.reference import sampling as reference

sample_tokens = silmm_fast.sample_tokens
# The Triton interpreter evaluates both sides of a tl.where with numpy, so masked logits (−inf − −inf) and unusable
# rows make numpy warn about the NaNs and overflows that the kernel then discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
FAST = ["triton", "torch"]
BLOCK = 64  # with V = 150 the kernel loops over three vocabulary blocks
CHUNK = 600  # logits per torch chunk: a few rows of V = 150

# Sampling settings covering each code path: plain, top-k, top-p, both, the degenerate ends, greedy.
SETTINGS = {
    "plain": dict(),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.6),
    "top_k_top_p": dict(top_k=20, top_p=0.9),
    "top_k_1": dict(top_k=1),
    "top_p_tiny": dict(top_p=1e-7),
    "top_p_1_top_k_above_V": dict(top_p=1.0, top_k=1000),
    "hot": dict(temperature=3.0, top_p=0.95),
    "greedy": dict(temperature=0.0),
}


def rows(B, V, seed=0, scale=2.0, dtype=torch.float32):
    """(cond, uncond, noise) with awkward rows up front: ties at the max, a constant row, masked tokens, a row where
    one token dominates by 1e4, a row of ±1e4 logits, ties straddling block boundaries."""
    g = torch.Generator().manual_seed(seed)
    cond = scale * torch.randn(B, V, generator=g, dtype=torch.float64)
    uncond = scale * torch.randn(B, V, generator=g, dtype=torch.float64)
    cond[0, :12] = cond[0].max() + 1  # twelve-way tie at the top
    cond[1], uncond[1] = 0.0, 0.0  # every token tied
    cond[2, ::3] = float("-inf")  # masked tokens (in the conditional branch)
    uncond[2, 1::3] = float("-inf")  # and in the unconditional one
    cond[3, 7] = 1e4  # one token dominates
    cond[4], uncond[4] = 1e4 * torch.sign(cond[4]), -1e4 * torch.sign(cond[4])  # extreme logits, huge gaps
    cond[5, [10, V - 3]] = 50.0  # a tie at the max across blocks
    cond[5, [63, 64, 128]] = 49.999  # near-ties on block edges
    noise = torch.rand(B, generator=g, dtype=torch.float64)
    noise[0] = 0.0  # the first kept token
    noise[1] = 1 - 2**-24  # the last one (the largest float32 below 1)
    return cond.to(dtype), uncond.to(dtype), noise


def run(backend, *args, block_v=BLOCK, chunk_elements=CHUNK, **kwargs):
    """The tokens ``backend`` samples, on the CPU: the public op's checks and uniforms, then that backend with small
    blocks (rows of V = 150 span three Triton blocks; the torch path works on chunks of a few rows; None: the
    backend's own rule). CPU tensor arguments (logits, noise) go where the backend runs (backend_device: CUDA for
    Triton on a GPU machine); tensors a test put on a device stay there."""
    dev = backend_device(backend)
    move = lambda v: v.to(dev) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v  # noqa: E731
    inputs = ops._checked_inputs(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
    return ops.sample_tokens_on(backend, **inputs, block_v=block_v, chunk_elements=chunk_elements).cpu()


# --- exact agreement ------------------------------------------------------------------------------------------------
CASES = [(name, True) for name in SETTINGS] + [(name, False) for name in ("plain", "top_k_top_p", "greedy")]


@pytest.mark.parametrize("setting, guided", CASES, ids=[f"{n}-{'cfg' if g else 'cond'}" for n, g in CASES])
def test_every_backend_gives_the_reference_tokens(setting, guided):
    cond, uncond, noise = rows(6, 150, seed=1)
    uncond = uncond if guided else None
    kwargs = dict(cfg_scale=1.5, noise=noise, **SETTINGS[setting])
    expected = reference.sample_tokens(cond, uncond, **kwargs)
    assert expected.dtype == torch.int64 and expected.shape == (6,)
    assert ((expected >= 0) & (expected < 150)).all()
    for backend in FAST:
        assert torch.equal(run(backend, cond, uncond, **kwargs), expected), backend
    # more rows on the cheap path: many noise values, many distinct distributions
    cond, uncond, noise = rows(300, 150, seed=2, scale=1.0)
    kwargs["noise"] = noise
    uncond = uncond if guided else None
    assert torch.equal(run("torch", cond, uncond, **kwargs), reference.sample_tokens(cond, uncond, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", FAST)
def test_low_and_high_precision_inputs(dtype, backend):
    cond, uncond, noise = rows(6, 150, seed=3, dtype=dtype)
    for kwargs in (dict(top_k=3, top_p=0.7, temperature=0.5), dict(temperature=0.0)):
        expected = reference.sample_tokens(cond, uncond, cfg_scale=2.0, noise=noise, **kwargs)
        assert torch.equal(run(backend, cond, uncond, cfg_scale=2.0, noise=noise, **kwargs), expected)
    # cond and uncond in different dtypes, noise in float32
    mixed = dict(cfg_scale=3.0, noise=noise.float(), top_k=10)
    got = run(backend, cond, uncond.float(), **mixed)
    assert torch.equal(got, reference.sample_tokens(cond, uncond.float(), **mixed))


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_inputs(backend):
    # the views are made where the backend runs (moving a strided view there would give a contiguous copy); the
    # reference reads CPU copies
    dev = backend_device(backend)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    g = torch.Generator().manual_seed(4)
    base = torch.randn(150, 2, 4, generator=g).to(dev)  # rows strided, vocabulary strided: read in place
    cond, uncond = base[:, 0].t(), base[:, 1].t()
    wide = torch.randn(4, 300, generator=g).to(dev)[:, ::2]  # vocabulary stride 2
    noise = torch.rand(4, 2, generator=g, dtype=torch.float64).to(dev)[:, 1]
    assert not (cond.is_contiguous() or wide.is_contiguous() or noise.is_contiguous())
    for c, u in ((cond, uncond), (wide, cond), (cond, None)):
        kwargs = dict(cfg_scale=1.25, noise=noise, top_p=0.8, temperature=0.9)
        expected = reference.sample_tokens(cpu(c).contiguous(), cpu(u), **{**kwargs, "noise": cpu(noise)})
        assert torch.equal(run(backend, c, u, **kwargs), expected)
    greedy = run(backend, wide, cond, temperature=0.0, cfg_scale=1.25)
    assert torch.equal(greedy, reference.sample_tokens(cpu(wide), cpu(cond), temperature=0.0, cfg_scale=1.25))


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_greedy_ties_go_to_the_smallest_index(backend):
    z = torch.zeros(4, 150)
    z[0, [90, 3, 140]] = 1.0  # three-way tie, across blocks
    z[1, [70, 130]] = 2.0  # both in later blocks
    z[2, 149] = 1.0  # last column
    z[3, :] = -5.0  # all tied: index 0
    got = run(backend, z, temperature=0.0)
    assert got.tolist() == [3, 70, 149, 0]
    # top_k = 1 keeps the whole tie; the draw then walks it in index order
    noise = torch.tensor([0.0, 0.99, 0.5, 0.999], dtype=torch.float64)
    assert run(backend, z, top_k=1, noise=noise, temperature=1e-3).tolist() == [3, 130, 149, 149]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_hand_derived_tokens(backend):
    # probabilities 1/2, 1/4, 1/8, 1/8 (index order = probability order here)
    z = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    u = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    # all kept: the CDF is .5, .75, .875, 1
    assert [run(backend, z, noise=u(x)).item() for x in (0.0, 0.49, 0.51, 0.8, 0.9)] == [0, 0, 1, 2, 3]
    # top_p = 0.7: {0, 1} (mass .75), renormalized CDF 2/3, 1
    assert [run(backend, z, top_p=0.7, noise=u(x)).item() for x in (0.6, 0.7, 0.99)] == [0, 1, 1]
    # top_p = 0.8 needs a third token: 2 and 3 tie at 1/8, so both are kept and all four remain
    assert run(backend, z, top_p=0.8, noise=u(0.9)).item() == 3
    # top_k = 3: the third place is a tie, so four tokens again; top_k = 2 keeps {0, 1}
    assert run(backend, z, top_k=3, noise=u(0.9)).item() == 3
    assert run(backend, z, top_k=2, noise=u(0.9)).item() == 1
    # guidance: z = u + s·(c − u); s = 3 turns [0, 1] / [1, 0] into [−2, 3]; s = 0 gives the unconditional logits
    c, unc = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert run(backend, c, unc, cfg_scale=3.0, temperature=0).item() == 1
    assert run(backend, c, unc, cfg_scale=0.0, temperature=0).item() == 0
    # temperature 2 on log-probs [.8, .2]: probabilities ∝ sqrt → 2/3, 1/3
    z2 = torch.tensor([[0.8, 0.2]]).log()
    assert [run(backend, z2, temperature=2.0, noise=u(x)).item() for x in (0.66, 0.67)] == [0, 1]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_unusable_rows_give_minus_one(backend):
    z = torch.randn(8, 150, generator=torch.Generator().manual_seed(5))
    unc = torch.zeros(8, 150)
    z[0, 17] = float("nan")
    unc[1, 100] = float("nan")
    z[2] = float("-inf")  # nothing to sample
    z[3, 40] = float("inf")
    z[4, :] = float("-inf")
    unc[4, 0] = float("-inf")
    z[5, 149] = 3e38  # finite, but s·(c − u) overflows to +inf
    unc[6, 3] = float("inf")
    z[7, 5], unc[7, 5] = float("nan"), float("-inf")  # a NaN counts even where the other branch masks the token
    noise = torch.full((8,), 0.5, dtype=torch.float64)
    for kwargs in (dict(noise=noise), dict(noise=noise, top_k=4, top_p=0.5), dict(temperature=0.0)):
        assert run(backend, z, unc, cfg_scale=2.0, **kwargs).tolist() == [-1] * 8
    # without guidance: NaN, +inf or nothing finite in the logits themselves
    assert run(backend, z[[0, 2, 3]], noise=noise[:3]).tolist() == [-1] * 3
    assert run(backend, z[[0, 2, 3]], temperature=0.0).tolist() == [-1] * 3
    # one finite token left: always that token, even when the others are masked in the other branch
    z = torch.full((2, 150), float("-inf"))
    z[:, 77] = 1e4
    unc = torch.zeros(2, 150)
    unc[1, 77] = -1e4
    got = run(backend, z, unc, cfg_scale=7.0, noise=torch.tensor([0.0, 0.999], dtype=torch.float64), top_p=0.3)
    assert got.tolist() == [77, 77]


def test_kernel_guards_noise_outside_the_unit_interval():
    """On CUDA the noise range is not checked on the host (no sync): the kernel turns a bad uniform into −1."""
    from silmm_fast.kernels import sampling as kernels

    z = torch.randn(4, 150, generator=torch.Generator().manual_seed(6))
    noise = torch.tensor([float("nan"), -0.1, 1.0, 0.3], dtype=torch.float64)
    dev = backend_device("triton")  # the launcher reads its tensors where Triton runs
    out = kernels.sample_tokens_fwd(
        z.to(dev), None, noise.to(dev), cfg_scale=1.0, inv_temperature=1.0, top_k=0, top_p=1.0, block_v=64
    ).cpu()
    assert out[:3].tolist() == [-1, -1, -1] and 0 <= out[3] < 150
    assert reference.sample_tokens(z, noise=noise)[:3].tolist() == [-1, -1, -1]


# 600 consecutive float32 gaps around the weight cut-off a·log2 e = 40 (a ≈ 27.73)
EDGE_GAPS = (
    torch.tensor(40 / reference.LOG2E, dtype=torch.float32).view(torch.int32)
    + torch.arange(-300, 300, dtype=torch.int32)
).view(torch.float32)


def test_kernel_numbers_equal_the_reference_bit_for_bit():
    """The mixed logits, sort keys and integer weights every decision is made from, with the kernel's default block
    heuristic; plus the constants the two modules each hold."""
    from silmm_fast.kernels import sampling as kernels

    assert kernels.LOG2E == reference.LOG2E and kernels.EXP2_COEFFS == reference.EXP2_COEFFS
    assert kernels.WEIGHT_BITS == reference.WEIGHT_BITS
    dev = backend_device("triton")  # the launcher reads its tensors where Triton runs; results compared on the CPU
    cond, uncond, _ = rows(8, 150, seed=7, scale=4.0)
    for s, temperature in ((1.0, 1.0), (5.0, 0.7), (-0.5, 13.0), (1e3, 1e-30)):
        s32, inv_t = reference.fp32(s), reference.inverse_temperature(temperature)
        for unc in (uncond, None):
            z, _ = reference.mix(cond, unc, s32)
            a = reference.gaps(z, inv_t)
            key, w = reference.weights(a)
            kz, kkey, kw = kernels.sampling_weights(
                cond.to(dev),
                None if unc is None else unc.to(dev),
                z.max(-1).values.to(dev),
                cfg_scale=s32,
                inv_temperature=inv_t,
            )
            assert torch.equal(kz.cpu(), z) and torch.equal(kkey.cpu(), key) and torch.equal(kw.cpu(), w)
    # gaps on consecutive floats around the weight cut-off (a·log2 e = 40): logits −a below a max of 0 give gap a
    edge = EDGE_GAPS.view(2, -1)
    cond = torch.cat([torch.zeros(2, 1), -edge], dim=1)
    _, key, w = kernels.sampling_weights(
        cond.to(dev), None, torch.zeros(2, device=dev), cfg_scale=1.0, inv_temperature=1.0
    )
    key, w = key.cpu(), w.cpu()
    ref_key, ref_w = reference.weights(cond.neg().add(0.0))
    assert torch.equal(key, ref_key) and torch.equal(w, ref_w) and (w[:, 1:] == 0).any() and (w[:, 1:] > 0).any()


def test_torch_path_weights_equal_the_reference():
    """The torch path clamps instead of masking and works in place: the same integers, including past the cut-off."""
    g = torch.Generator().manual_seed(14)
    special = torch.tensor([0.0, 27.8, 28.4, 28.5, 1e4, float("inf")])
    a = torch.cat([special, EDGE_GAPS, 30 * torch.rand(5000, generator=g)])
    x = a * reference.LOG2E
    assert (x == 40).any() and ((x > 40) & (x < 40.001)).any()  # both sides of the cut-off are hit
    assert torch.equal(torch_backend.weights(a), reference.weights(a)[1])


def test_weights_approximate_softmax():
    g = torch.Generator().manual_seed(8)
    a = torch.cat([torch.zeros(1), 28 * torch.rand(20000, generator=g)])
    _, w = reference.weights(a)
    exact = torch.exp(-a.double()) * 2.0**40
    assert w[0].item() == 2**40 and (w[a > 40 * math.log(2) + 1e-4] == 0).all()
    # relative error ≤ 1.4e-6 (half an fp32 ulp of a·log2 e ≤ 40, times ln 2) plus the floor's absolute error below 1
    assert ((w.double() - exact).abs() <= 1.4e-6 * exact + 1).all()
    order = torch.argsort(a)
    assert (w[order].diff() <= 0).all()  # monotone in the gap


# --- distribution ---------------------------------------------------------------------------------------------------
COND = torch.tensor([[1.3, -0.2, 0.4, 2.1, -1.5, 0.9, 0.0, 1.7, -0.7, 0.55]])
UNCOND = torch.tensor([[0.2, 0.1, -0.3, 1.0, 0.4, -0.2, 0.3, 0.9, 0.0, 0.1]])
DIST_SETTINGS = [dict(), dict(top_k=4), dict(top_p=0.8), dict(top_k=6, top_p=0.7), dict(temperature=0.5, top_p=0.9)]


def textbook(cond, uncond, cfg_scale=1.8, temperature=0.8, top_k=0, top_p=1.0):
    """Float64 probabilities the way a logits processor writes them (softmax, top-k, sorted cumulative top-p)."""
    z = (uncond.double() + cfg_scale * (cond.double() - uncond.double()))[0] / temperature
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    kept = probs * keep
    kept = kept / kept.sum()
    cum = kept[order].cumsum(0)
    n = int((cum < top_p).sum()) + 1  # smallest prefix reaching top_p
    assert top_p == 1.0 or (cum - top_p).abs().min() > 1e-3  # no threshold near a boundary: the test is unambiguous
    final = torch.zeros_like(kept)
    final[order[:n]] = kept[order[:n]]
    return final / final.sum()


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kw", DIST_SETTINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "plain")
def test_stratified_draws_match_the_probabilities(backend, kw):
    """With noise on the grid (i + ½)/N the inverse-CDF draw is deterministic: each token's frequency is within 1/N of
    its probability (plus the ~1e-6 weight and fp32 rounding error)."""
    N = 20000
    noise = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    kwargs = dict(cfg_scale=1.8, temperature=kw.get("temperature", 0.8), top_k=kw.get("top_k", 0))
    kwargs["top_p"] = kw.get("top_p", 1.0)
    tokens = run(backend, COND.expand(N, -1), UNCOND.expand(N, -1), noise=noise, chunk_elements=None, **kwargs)
    freq = torch.bincount(tokens, minlength=10).double() / N
    expected = textbook(COND, UNCOND, **kwargs)
    assert (freq - expected).abs().max() <= 1 / N + 1e-5


# 99.9 % quantiles of chi-square with df degrees of freedom
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877}


@pytest.mark.parametrize("kw", DIST_SETTINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "plain")
def test_random_draws_pass_a_chi_square_test(kw):
    """20k seeded draws from the generator: Pearson's statistic over the kept tokens stays below its 99.9 % quantile
    (the seed is fixed, so the test is deterministic; a biased sampler at this N fails by orders of magnitude)."""
    N = 20000
    kwargs = dict(cfg_scale=1.8, temperature=kw.get("temperature", 0.8), top_k=kw.get("top_k", 0))
    kwargs["top_p"] = kw.get("top_p", 1.0)
    g = torch.Generator().manual_seed(9)
    tokens = run("torch", COND.expand(N, -1), UNCOND.expand(N, -1), generator=g, chunk_elements=None, **kwargs)
    counts = torch.bincount(tokens, minlength=10).double()
    expected = textbook(COND, UNCOND, **kwargs) * N
    kept = expected > 0
    assert (counts[~kept] == 0).all()
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    assert chi2 < CHI2_999[int(kept.sum()) - 1], chi2


def test_seeded_generator_reproduces_on_every_backend():
    cond, uncond, _ = rows(8, 150, seed=10, scale=1.0)
    kwargs = dict(cfg_scale=2.0, top_p=0.9)
    # every backend draws from a generator on the same device, the one Triton runs on: a CUDA generator's stream
    # differs from a CPU one's, and a CPU generator cannot drive sampling from CUDA logits
    dev = backend_device("triton")
    dcond, duncond = cond.to(dev), uncond.to(dev)
    seeded = lambda seed: torch.Generator(device=dev).manual_seed(seed)  # noqa: E731
    draws = {b: run(b, dcond, duncond, generator=seeded(11), **kwargs) for b in ("triton", "torch", "reference")}
    assert torch.equal(draws["triton"], draws["torch"]) and torch.equal(draws["torch"], draws["reference"])
    again = run("torch", dcond, duncond, generator=seeded(11), **kwargs)
    assert torch.equal(again, draws["torch"])
    other = run("torch", dcond, duncond, generator=seeded(12), **kwargs)
    assert not torch.equal(other, draws["torch"])
    # the default generator follows torch.manual_seed; greedy draws nothing
    torch.manual_seed(13)
    first = sample_tokens(cond, uncond, **kwargs)
    torch.manual_seed(13)
    sample_tokens(cond, uncond, temperature=0.0)
    assert torch.equal(sample_tokens(cond, uncond, **kwargs), first)


# --- shapes, dispatch, errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_empty_batch_and_single_token_vocabulary(backend):
    assert run(backend, torch.randn(0, 7)).shape == (0,)
    assert run(backend, torch.randn(0, 7), temperature=0).shape == (0,)
    assert run(backend, torch.randn(5, 1), torch.randn(5, 1), cfg_scale=4.0, top_p=0.1).tolist() == [0] * 5


def test_auto_backend_on_cpu_is_torch_and_inputs_are_left_alone():
    assert silmm_fast._backend.choose("sample_tokens", "cpu") == "torch"
    cond = torch.randn(3, 40, requires_grad=True)
    before = cond.detach().clone()
    for backend in ("torch", "reference", "triton"):
        x = cond.to(backend_device(backend))  # the very tensor the op reads (cond itself on the CPU)
        for uncond in (x * 0.5, None):
            out = run(backend, x, uncond, cfg_scale=2.0, top_k=4, top_p=0.9, temperature=0.7)
            assert not out.requires_grad and out.dtype == torch.int64
            assert torch.equal(x.detach().cpu(), before), backend


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_public_op_runs_the_backend_it_chose(backend, monkeypatch):
    """sample_tokens checks, draws and hands its inputs to the backend ``use_backend`` forces, with that backend's own
    block rule: the tokens of ``sample_tokens_on`` on it."""
    cond, uncond, noise = rows(6, 150, seed=15)
    kwargs = dict(cfg_scale=1.5, top_k=20, top_p=0.9)
    dev = backend_device(backend)
    chosen = []
    on = ops.sample_tokens_on
    monkeypatch.setattr(ops, "sample_tokens_on", lambda b, **inputs: chosen.append(b) or on(b, **inputs))
    with use_backend(backend):
        got = sample_tokens(cond.to(dev), uncond.to(dev), noise=noise.to(dev), **kwargs).cpu()
    assert chosen == [backend]
    expected = reference.sample_tokens(cond, uncond, noise=noise, **kwargs)
    assert torch.equal(got, expected) and torch.equal(run(backend, cond, uncond, noise=noise, **kwargs), expected)


def test_bad_inputs_raise_errors_naming_the_argument():
    z = torch.randn(2, 5)
    cases = [
        (TypeError, "logits", lambda: sample_tokens(z.long())),
        (TypeError, "logits", lambda: sample_tokens(z.tolist())),
        (ValueError, "logits", lambda: sample_tokens(z[0])),
        (ValueError, "logits", lambda: sample_tokens(z[None])),
        (ValueError, "logits", lambda: sample_tokens(torch.randn(2, 0))),
        (TypeError, "uncond_logits", lambda: sample_tokens(z, z.int())),
        (ValueError, "uncond_logits", lambda: sample_tokens(z, z[:, :4])),
        (ValueError, "uncond_logits", lambda: sample_tokens(z, z.to("meta"))),
        (TypeError, "cfg_scale", lambda: sample_tokens(z, z, cfg_scale="5")),
        (ValueError, "cfg_scale", lambda: sample_tokens(z, z, cfg_scale=float("nan"))),
        (ValueError, "cfg_scale", lambda: sample_tokens(z, z, cfg_scale=1e39)),
        (ValueError, "temperature", lambda: sample_tokens(z, temperature=-0.1)),
        (ValueError, "temperature", lambda: sample_tokens(z, temperature=float("inf"))),
        (ValueError, "temperature", lambda: sample_tokens(z, temperature=1e300)),
        (TypeError, "temperature", lambda: sample_tokens(z, temperature=None)),
        (TypeError, "top_k", lambda: sample_tokens(z, top_k=2.0)),
        (TypeError, "top_k", lambda: sample_tokens(z, top_k=True)),
        (ValueError, "top_k", lambda: sample_tokens(z, top_k=-1)),
        (ValueError, "top_p", lambda: sample_tokens(z, top_p=0.0)),
        (ValueError, "top_p", lambda: sample_tokens(z, top_p=1.5)),
        (ValueError, "top_p", lambda: sample_tokens(z, top_p=float("nan"))),
        (TypeError, "generator", lambda: sample_tokens(z, generator=0)),
        (TypeError, "noise", lambda: sample_tokens(z, noise=torch.zeros(2, dtype=torch.long))),
        (ValueError, "noise", lambda: sample_tokens(z, noise=torch.zeros(3))),
        (ValueError, "noise", lambda: sample_tokens(z, noise=torch.zeros(2, 1))),
        (ValueError, "noise", lambda: sample_tokens(z, noise=torch.zeros(2, device="meta"))),
        (ValueError, r"noise.*\[0, 1\)", lambda: sample_tokens(z, noise=torch.tensor([0.5, 1.0]))),
        (ValueError, r"noise.*\[0, 1\)", lambda: sample_tokens(z, noise=torch.tensor([-0.5, 0.0]))),
        (ValueError, r"noise.*\[0, 1\)", lambda: sample_tokens(z, noise=torch.tensor([0.5, float("nan")]))),
    ]
    for err, match, call in cases:
        with pytest.raises(err, match=match):
            call()


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 4),
    V=st.integers(1, 70),
    top_k=st.integers(0, 12),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.05]),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
    distinct=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_ties(B, V, top_k, top_p, temperature, distinct, seed):
    """Logits drawn from a few distinct values (many ties) over random shapes: torch and triton equal the reference."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randn(distinct, generator=g) * 3
    cond = levels[torch.randint(0, distinct, (B, V), generator=g)]
    uncond = levels[torch.randint(0, distinct, (B, V), generator=g)]
    noise = torch.rand(B, generator=g, dtype=torch.float64)
    kwargs = dict(cfg_scale=1.5, temperature=temperature, top_k=top_k, top_p=top_p, noise=noise)
    expected = reference.sample_tokens(cond, uncond, **kwargs)
    for backend in FAST:
        assert torch.equal(run(backend, cond, uncond, block_v=32, **kwargs), expected), backend


@pytest.mark.gpu
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_gpu_janus_batch_matches_reference(setting):
    """The issue's shape: 64 rows of a 16384-way image head, cond and uncond in bf16, CFG 5."""
    g = torch.Generator(device="cuda").manual_seed(0)
    cond = (3 * torch.randn(64, 16384, device="cuda", generator=g)).bfloat16()
    uncond = (3 * torch.randn(64, 16384, device="cuda", generator=g)).bfloat16()
    cond[0, :100] = cond[0].max()  # ties
    noise = torch.rand(64, device="cuda", generator=g, dtype=torch.float64)
    kwargs = dict(cfg_scale=5.0, noise=noise, **SETTINGS[setting])
    assert silmm_fast._backend.choose("sample_tokens", "cuda") == "triton"
    with pytest.raises(ValueError, match="generator"):
        sample_tokens(cond, uncond, generator=torch.Generator())  # a CPU generator for CUDA logits
    got = sample_tokens(cond, uncond, **kwargs)
    assert torch.equal(got, reference.sample_tokens(cond, uncond, **kwargs))
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    assert torch.equal(got.cpu(), reference.sample_tokens(cond.cpu(), uncond.cpu(), **cpu))


@pytest.mark.gpu
def test_gpu_kernel_numbers_equal_the_reference_bit_for_bit():
    from silmm_fast.kernels import sampling as kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    cond = 4 * torch.randn(16, 16384, device="cuda", generator=g)
    uncond = 4 * torch.randn(16, 16384, device="cuda", generator=g)
    s32, inv_t = reference.fp32(5.0), reference.inverse_temperature(0.9)
    z, _ = reference.mix(cond.cpu(), uncond.cpu(), s32)
    key, w = reference.weights(reference.gaps(z, inv_t))
    kz, kkey, kw = kernels.sampling_weights(cond, uncond, z.max(-1).values.cuda(), cfg_scale=s32, inv_temperature=inv_t)
    assert torch.equal(kz.cpu(), z) and torch.equal(kkey.cpu(), key) and torch.equal(kw.cpu(), w)
