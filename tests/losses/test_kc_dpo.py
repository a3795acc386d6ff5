"""kc_dpo_loss / KCDPOLoss: hand-derived values, the Gaussian-DPO derivation, K × K pairing, gradients, bad input."""

import math
from collections import Counter

import pytest
import torch
from conftest import backend_device
from tolerances import assert_close
from triton.runtime.jit import KernelInterface

from silmm_fast import KCDPOLoss, kc_dpo_loss, use_backend
from silmm_fast.losses import DPOOutput, dpo_loss
from silmm_fast.reference.pairwise_distance import pairwise_distance as reference_distance

BACKENDS = ("reference", "torch", "triton")
KERNELS = ("cosine", "euclidean", "sqeuclidean", "rbf")


def _features(B, L, D, K=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, L, D) if K is None else (B, K, L, D)
    policy = torch.randn(B, L, D, generator=gen, dtype=dtype, requires_grad=True)
    ref = torch.randn(B, L, D, generator=gen, dtype=dtype)
    chosen = torch.randn(*shape, generator=gen, dtype=dtype)
    rejected = torch.randn(*shape, generator=gen, dtype=dtype)
    return policy, ref, chosen, rejected


def _loop_loss(policy, ref, chosen, rejected, gamma, **kw):
    """KC-DPO written out pair by pair with the reference distance on single feature matrices."""

    def k(a, b):
        return reference_distance(a[None, None], b[None, None], **kw)[0, 0, 0]

    losses, cws, rls = [], [], []
    for b in range(policy.shape[0]):
        ws = chosen[b] if chosen.dim() == 4 else chosen[b][None]
        ls = rejected[b] if rejected.dim() == 4 else rejected[b][None]
        cw = [gamma * (k(ref[b], w) - k(policy[b], w)) for w in ws]
        rl = [gamma * (k(ref[b], l) - k(policy[b], l)) for l in ls]
        terms = [-torch.nn.functional.logsigmoid(c - r) for c in cw for r in rl]
        losses.append(torch.stack(terms).mean())
        cws.append(torch.stack(cw).mean())
        rls.append(torch.stack(rl).mean())
    return torch.stack(losses), torch.stack(cws), torch.stack(rls)


# H = (1, 0), Hr = (0, 1), Hw = (2, 0), Hl = (0, 2), L = 1: the distances k(H,Hw), k(Hr,Hw), k(H,Hl), k(Hr,Hl) are
# cosine 0, 1, 1, 0 | sqeuclidean 1, 5, 5, 1 | euclidean 1, √5, √5, 1 | rbf (σ=1) 2−2e^{−1/2}, 2−2e^{−5/2}, ... , ...
HAND = {
    "cosine": (0.0, 1.0, 1.0, 0.0),
    "sqeuclidean": (1.0, 5.0, 5.0, 1.0),
    "euclidean": (1.0, math.sqrt(5.0), math.sqrt(5.0), 1.0),
    "rbf": (2 - 2 * math.exp(-0.5), 2 - 2 * math.exp(-2.5), 2 - 2 * math.exp(-2.5), 2 - 2 * math.exp(-0.5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_hand_derived_values(kernel, backend):
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    gamma = 0.3
    k_hw, kr_hw, k_hl, kr_hl = HAND[kernel]
    margin = gamma * (-k_hw + kr_hw + k_hl - kr_hl)
    with use_backend(backend):
        out = kc_dpo_loss(t([1.0, 0.0]), t([0.0, 1.0]), t([2.0, 0.0]), t([0.0, 2.0]), gamma=gamma, kernel=kernel)
    assert isinstance(out, DPOOutput)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-margin)), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(gamma * (kr_hw - k_hw), abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(gamma * (kr_hl - k_hl), abs=1e-12)
    assert out.losses.shape == (1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_dpo_derivation(backend):
    # sqeuclidean, pool "none" (per-token, averaged over L) and γ = L·β/(2σ²) is DPO with isotropic Gaussian policies
    # N(H, σ²I) and N(Hr, σ²I) over the whole feature matrices
    B, L, D, beta, sigma = 3, 4, 5, 0.1, 0.7
    policy, ref, chosen, rejected = _features(B, L, D, seed=1)

    def logp(mean, sample):
        return torch.distributions.Normal(mean, sigma).log_prob(sample).sum(dim=(-2, -1))

    dpo = dpo_loss(logp(policy, chosen), logp(policy, rejected), logp(ref, chosen), logp(ref, rejected), beta=beta)
    with use_backend(backend):
        kc = kc_dpo_loss(
            policy, ref, chosen, rejected, gamma=L * beta / (2 * sigma**2), kernel="sqeuclidean", pool="none"
        )
    for got, want in zip(kc, dpo):
        assert_close(got, want, torch.float64, scale=100.0)
    (g_kc,) = torch.autograd.grad(kc.loss, policy)
    (g_dpo,) = torch.autograd.grad(dpo.loss, policy)
    assert_close(g_kc, g_dpo, torch.float64, scale=100.0)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pool", ("mean", "max", "none"))
def test_k_by_k_pairs_match_explicit_loop(pool, kernel, backend):
    # K = 3 winners × 3 losers, D = 40 (wider than one interpreter tile, not a power of two)
    policy, ref, chosen, rejected = _features(2, 3, 40, K=3, seed=2)
    chosen.requires_grad_()
    kw = dict(kernel=kernel, pool=pool, sigma=3.0)
    with use_backend(backend):
        out = kc_dpo_loss(policy, ref, chosen, rejected, gamma=0.5, **kw)
    losses, cw, rl = _loop_loss(policy, ref, chosen, rejected, 0.5, **kw)
    assert out.losses.shape == (2,) and out.chosen_rewards.shape == (2,)
    assert_close(out.losses, losses, torch.float64, scale=100.0)
    assert_close(out.loss, losses.mean(), torch.float64, scale=100.0)
    assert_close(out.chosen_rewards, cw, torch.float64, scale=100.0)
    assert_close(out.rejected_rewards, rl, torch.float64, scale=100.0)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    got = torch.autograd.grad(out.loss, (policy, chosen))
    want = torch.autograd.grad(losses.mean(), (policy, chosen))
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, scale=100.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_candidate_forms_agree(backend):
    # [B, L, D] and [B, 1, L, D] mean the same; uneven Kw, Kl are paired all-to-all too; L = 1
    policy, ref, chosen, rejected = _features(2, 1, 6, seed=3)
    with use_backend(backend):
        a = kc_dpo_loss(policy, ref, chosen, rejected)
        b = kc_dpo_loss(policy, ref, chosen[:, None], rejected[:, None])
        c = kc_dpo_loss(policy, ref, torch.stack((chosen, chosen), 1), rejected)
    for x, y in zip(a, b):
        assert_close(x, y, torch.float64)
    for x, y in zip(a, c):
        assert_close(x, y, torch.float64, scale=10.0)
    losses, _, _ = _loop_loss(policy, ref, torch.stack((chosen, rejected), 1), rejected[:, None], 1.0)
    with use_backend(backend):
        uneven = kc_dpo_loss(policy, ref, torch.stack((chosen, rejected), 1), rejected)
    assert_close(uneven.losses, losses, torch.float64, scale=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_gets_no_gradient_and_identical_policy_gives_log2(backend):
    policy, _, chosen, rejected = _features(2, 2, 8, K=2, seed=4)
    ref = policy.detach().clone().requires_grad_()
    with use_backend(backend):
        out = kc_dpo_loss(policy, ref, chosen, rejected, kernel="euclidean")
    # policy == reference: every margin is 0, every pair loss log 2, rewards 0
    assert_close(out.losses, torch.full((2,), math.log(2.0), dtype=torch.float64), torch.float64, scale=1e5)
    out.loss.backward()
    assert ref.grad is None
    assert policy.grad is not None and torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_gradcheck_policy(backend):
    policy, ref, chosen, rejected = _features(1, 2, 3, K=2, seed=5)
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda p: kc_dpo_loss(p, ref, chosen, rejected, gamma=2.0, kernel="rbf", sigma=1.5).loss, (policy,)
        )


def test_float32_and_module():
    policy, ref, chosen, rejected = _features(2, 3, 16, K=2, seed=6, dtype=torch.float32)
    module = KCDPOLoss(gamma=2.0, kernel="cosine", pool="max")
    assert "gamma=2.0" in repr(module) and "'max'" in repr(module)
    out = module(policy, ref, chosen, rejected)
    want = kc_dpo_loss(policy.double(), ref.double(), chosen.double(), rejected.double(), gamma=2.0, pool="max")
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, want.loss, torch.float32, scale=10.0)
    out.loss.backward()
    assert policy.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "args, kw, error, match",
    [
        (((2, 3, 4), (2, 3, 4), (2, 3, 5), (2, 3, 4)), {}, ValueError, "chosen: expected shape"),
        (((2, 3, 4), (2, 3, 4), (2, 3, 4), (3, 3, 4)), {}, ValueError, "rejected: expected shape"),
        (((2, 3, 4), (2, 3, 5), (2, 3, 4), (2, 3, 4)), {}, ValueError, "reference: expected shape"),
        (((2, 3, 4), (2, 3, 4), (2, 0, 3, 4), (2, 3, 4)), {}, ValueError, "chosen: expected at least one"),
        (((2, 3), (2, 3), (2, 3), (2, 3)), {}, ValueError, "policy: expected shape"),
        (((2, 3, 4),) * 4, {"gamma": 0.0}, ValueError, "gamma"),
        (((2, 3, 4),) * 4, {"sigma": -1.0}, ValueError, "sigma"),
        (((2, 3, 4),) * 4, {"kernel": "manhattan"}, ValueError, "kernel"),
        (((2, 3, 4),) * 4, {"pool": "median"}, ValueError, "pool"),
    ],
)
def test_bad_input(args, kw, error, match):
    tensors = [torch.randn(*s) for s in args]
    with pytest.raises(error, match=match):
        kc_dpo_loss(*tensors, **kw)


def test_bad_dtype_and_device():
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="policy: expected a floating"):
        kc_dpo_loss(x.long(), x, x, x)
    with pytest.raises(TypeError, match="chosen: expected dtype"):
        kc_dpo_loss(x, x, x.double(), x)
    with pytest.raises(ValueError, match="rejected: expected a tensor on"):
        kc_dpo_loss(x, x, x, torch.randn(2, 3, 4, device="meta"))
    with pytest.raises(ValueError, match="gamma"):
        KCDPOLoss(gamma=-1.0)


class _Launches:
    """Counts Triton kernel launches (``kernel[grid](...)``, compiled or interpreted) by kernel name."""

    def __init__(self, monkeypatch):
        self.counts = Counter()
        launch = KernelInterface.__getitem__

        def counting(fn, grid):
            self.counts[fn.fn.__name__] += 1
            return launch(fn, grid)

        monkeypatch.setattr(KernelInterface, "__getitem__", counting)


def _near_identical(B, K, L, D, seed):
    """[B, L, D] policy and reference, [B, K, L, D] winners and losers, float64, far from the origin (norm ~8e3):
    the policy and the candidates lie within ~1e-2 of the reference (where the Gram expansion cancels), except the
    candidates after the first in prompts 1.. which are ordinary O(1) points (where it does not)."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(B, 1, 1, D, generator=gen, dtype=torch.float64)
    centre = 8e3 * centre / centre.norm(dim=-1, keepdim=True)

    def around(k):
        return centre + 3e-3 * torch.randn(B, k, L, D, generator=gen, dtype=torch.float64)

    def candidates():
        ordinary = torch.randn(B, K - 1, L, D, generator=gen, dtype=torch.float64)
        return torch.cat((around(1), torch.where(torch.arange(B).view(B, 1, 1, 1) == 0, around(K - 1), ordinary)), 1)

    policy, ref = around(1)[:, 0], around(1)[:, 0]
    return policy.requires_grad_(), ref, candidates().requires_grad_(), candidates()


@pytest.mark.parametrize("pool", ("mean", "max", "none"))
@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_one_launch_each_way_matches_reference(kernel, pool, monkeypatch):
    # the whole loss on the Triton backend: one forward kernel launch and one backward launch (gradients to the
    # policy and the winners together), K = 3 winners and losers with near-identical rows, equal to the explicit
    # float64 loop over single matrices in values and gradients
    policy, ref, chosen, rejected = _near_identical(2, 3, 2, 40, seed=7)
    gamma, kw = 100.0, dict(kernel=kernel, pool=pool, sigma=0.05)  # rbf: sq / (2σ²) ~ 0.1 at the near pairs
    launches = _Launches(monkeypatch)
    dev = backend_device("triton")  # CUDA on a GPU machine; the gradients land on the CPU leaves
    with use_backend("triton"):
        out = kc_dpo_loss(policy.to(dev), ref.to(dev), chosen.to(dev), rejected.to(dev), gamma=gamma, **kw)
        assert launches.counts == {"_pd_fwd_kernel": 1}
        got = torch.autograd.grad(out.loss, (policy, chosen))
    assert launches.counts == {"_pd_fwd_kernel": 1, "_pd_bwd_kernel": 1}
    out = type(out)(*(t.cpu() for t in out))
    losses, cw, rl = _loop_loss(policy, ref, chosen, rejected, gamma, **kw)
    want = torch.autograd.grad(losses.mean(), (policy, chosen))
    # Per prompt, an error floor sized to γ times that prompt's largest distance (at least 1: cosine's error is ~ε
    # absolute) or gradient entry: prompt 0 holds only near-identical rows, distances ~1e-3 that the cancelled
    # expansion would miss by far more than this floor; the others mix in distances of ~8e3.
    dist = reference_distance(torch.stack((policy, ref), 1), torch.cat((chosen, rejected), 1), **kw).detach()
    floor = 1e-12 * gamma * dist.abs().amax(dim=(1, 2)).clamp_min(1.0)
    for a, b in ((out.losses, losses), (out.chosen_rewards, cw), (out.rejected_rewards, rl)):
        assert ((a - b).abs() <= 1e-9 * b.abs() + floor).all(), (a, b)
    # gradients: the expanded form a·Σw − Σ w·c rounds at ε times γ·‖features‖ (~1e3 per entry here), and entries
    # of a prompt share its largest one's relative error
    grad_floor = 1e-12 * gamma * max(t.detach().abs().max().item() for t in (policy, ref, chosen, rejected))
    for a, b in zip(got, want):
        big = b.abs().flatten(1).amax(1).view(-1, *[1] * (b.dim() - 1))
        assert ((a - b).abs() <= 1e-9 * big + grad_floor).all()


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_non_contiguous_features(backend):
    # strided views (every other feature of a wider buffer; a [B, L, K, D] buffer seen as [B, K, L, D]), made where
    # the backend runs, give the loss and gradients of the explicit loop over their values (the loss stacks them
    # into the distance call's inputs; strided inputs of the kernels are tested in test_pairwise_distance.py)
    _, ref, chosen, rejected = _features(2, 3, 12, K=2, seed=8)
    wide = torch.randn(2, 3, 24, dtype=torch.float64).requires_grad_()
    chosen = chosen.requires_grad_()
    dev = backend_device(backend)
    policy_view = wide.to(dev)[..., ::2]
    chosen_view = chosen.to(dev).transpose(1, 2).contiguous().transpose(1, 2)
    assert not policy_view.is_contiguous() and not chosen_view.is_contiguous()
    kw = dict(kernel="rbf", pool="max", sigma=3.0)
    with use_backend(backend):
        out = kc_dpo_loss(policy_view, ref.to(dev), chosen_view, rejected.to(dev), **kw)
        got = torch.autograd.grad(out.loss, (wide, chosen))
    losses, _, _ = _loop_loss(wide[..., ::2], ref, chosen, rejected, 1.0, **kw)
    want = torch.autograd.grad(losses.mean(), (wide, chosen))
    assert_close(out.losses.cpu(), losses, torch.float64, scale=10.0)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, scale=10.0)
