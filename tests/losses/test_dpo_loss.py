"""dpo_loss / DPOLoss: hand-derived numbers for every loss type, stability, gradients, rewards, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from silmm_fast import use_backend
from silmm_fast.losses import DPOLoss, DPOOutput, dpo_loss
from silmm_fast.reference import logprobs as reference


def softplus(x: float) -> float:
    """-log(sigmoid(-x)) = log(1 + e^x), written out by hand."""
    return math.log1p(math.exp(x))


# one pair, by hand: policy chosen -10, rejected -12; reference chosen -11, rejected -11.5; beta 0.1
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5
H = (PC - RC) - (PR - RR)  # 1.0 - (-0.5) = 1.5
BETA = 0.1


def pair(dtype=torch.float64, requires_grad=False):
    return [torch.tensor([v], dtype=dtype, requires_grad=requires_grad) for v in (PC, PR, RC, RR)]


@pytest.mark.parametrize(
    "loss_type, eps, expected",
    [
        ("sigmoid", 0.0, -math.log(1 / (1 + math.exp(-0.15)))),  # -log σ(0.1 · 1.5)
        ("sigmoid", 0.2, 0.8 * softplus(-0.15) + 0.2 * softplus(0.15)),  # conservative DPO
        ("robust", 0.0, softplus(-0.15)),
        ("robust", 0.2, (0.8 * softplus(-0.15) - 0.2 * softplus(0.15)) / 0.6),
        ("ipo", 0.0, (1.5 - 1 / (2 * 0.1)) ** 2),  # (1.5 - 5)^2 = 12.25
        ("hinge", 0.0, 1 - 0.15),
    ],
)
def test_hand_derived_values(loss_type, eps, expected):
    out = dpo_loss(*pair(), beta=BETA, loss_type=loss_type, label_smoothing=eps)
    assert isinstance(out, DPOOutput)
    assert out.losses.shape == (1,) and out.loss.shape == ()
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(BETA * (PC - RC), rel=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(BETA * (PR - RR), rel=1e-12)


def test_hinge_is_zero_past_the_margin_and_ipo_at_its_target():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (0.0, -2.0, 0.0, 0.0))  # h = 2
    assert dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge").loss.item() == 0.0
    assert dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo").loss.item() == 0.0  # h = 1/(2·0.25)


def test_hand_derived_gradient_of_sigmoid_loss():
    pc, pr, rc, rr = pair(requires_grad=True)
    dpo_loss(pc, pr, rc, rr, beta=BETA).loss.backward()
    # d/dh of -log σ(βh) is -β σ(-βh); h rises with the policy's chosen log-prob and falls with its rejected one
    slope = BETA / (1 + math.exp(0.15))
    assert pc.grad.item() == pytest.approx(-slope, rel=1e-12)
    assert pr.grad.item() == pytest.approx(slope, rel=1e-12)
    assert rc.grad.item() == pytest.approx(slope, rel=1e-12)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.3), ("ipo", 0.0)])
def test_gradcheck(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(
        lambda *t: dpo_loss(*t, beta=0.7, loss_type=loss_type, label_smoothing=eps).loss, inputs
    )


def test_hinge_gradient_away_from_the_kink():
    pc, pr, rc, rr = pair(requires_grad=True)
    dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="hinge").loss.backward()
    assert pc.grad.item() == pytest.approx(-BETA) and pr.grad.item() == pytest.approx(BETA)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge"])
def test_policy_equal_to_reference_gives_margin_exactly_zero(loss_type):
    logps = torch.tensor([-123.456, -7.25, -1e3])
    rejected = logps - 3.0
    out = dpo_loss(logps, rejected, logps.clone(), rejected.clone(), beta=0.5, loss_type=loss_type)
    assert torch.equal(out.chosen_rewards, torch.zeros(3)) and torch.equal(out.rejected_rewards, torch.zeros(3))
    at_zero = {"sigmoid": math.log(2), "robust": math.log(2), "ipo": 1.0, "hinge": 1.0}[loss_type]
    assert torch.equal(out.losses, torch.full((3,), at_zero, dtype=torch.float32))


@pytest.mark.parametrize("beta_h", [1e4, -1e4, 80.0, -80.0])
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2)])
def test_extreme_margins_stay_finite(beta_h, loss_type, eps):
    pc = torch.tensor([beta_h], requires_grad=True)
    zero = torch.zeros(1)
    out = dpo_loss(pc, zero, zero, zero, beta=1.0, loss_type=loss_type, label_smoothing=eps)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pc.grad)
    if loss_type == "sigmoid" and eps == 0.0:
        assert out.loss.item() == pytest.approx(max(-beta_h, 0.0) + math.log1p(math.exp(-abs(beta_h))), rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(h=st.floats(-50, 50), eps=st.floats(0.0, 0.45), beta=st.floats(0.01, 5.0))
def test_robust_loss_is_unbiased_under_label_flips(h, eps, beta):
    """Chowdhury et al.: averaging the robust loss over labels flipped with rate ε recovers the clean DPO loss."""
    t = torch.tensor([h], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    robust = lambda margin: dpo_loss(margin, zero, zero, zero, beta=beta, loss_type="robust", label_smoothing=eps)
    expected_under_noise = (1 - eps) * robust(t).loss + eps * robust(-t).loss
    clean = dpo_loss(t, zero, zero, zero, beta=beta).loss
    torch.testing.assert_close(expected_under_noise, clean, rtol=1e-9, atol=1e-9)


def test_robust_without_smoothing_equals_sigmoid():
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(6, generator=g) for _ in range(4)]
    assert torch.equal(dpo_loss(*inputs, loss_type="robust").losses, dpo_loss(*inputs).losses)


def test_loss_is_mean_of_losses_rewards_detached_and_dtypes():
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(4, 3, generator=g).half().requires_grad_() for _ in range(4)]
    out = dpo_loss(*inputs, beta=0.3)
    assert out.losses.shape == (4, 3) and out.losses.dtype == torch.float32
    assert out.loss.item() == pytest.approx(out.losses.mean().item())
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.loss.backward()
    assert inputs[0].grad.dtype == torch.float16 and inputs[2].grad is not None
    double = dpo_loss(*(t.detach().double() for t in inputs), beta=0.3)
    assert double.loss.dtype == torch.float64


def test_module_matches_functional_and_validates_at_construction():
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(5, generator=g) for _ in range(4)]
    module = DPOLoss(beta=0.2, loss_type="robust", label_smoothing=0.1)
    expected = dpo_loss(*inputs, beta=0.2, loss_type="robust", label_smoothing=0.1)
    for got, want in zip(module(*inputs), expected):
        assert torch.equal(got, want)
    assert "robust" in repr(module)
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0.0)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_from_logits(backend, reduction):
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 3, 37
    policy_c = torch.randn(B, T, V, generator=g, requires_grad=True)
    policy_r = torch.randn(B, T, V, generator=g, requires_grad=True)
    ref_c = torch.randn(B, T, V, generator=g, requires_grad=True)  # must get no gradient
    ref_r = torch.randn(B, T, V, generator=g)
    lab_c = torch.randint(0, V, (B, T), generator=g)
    lab_r = torch.randint(0, V, (B, T), generator=g)
    lab_c[0, 0] = -100
    module = DPOLoss(beta=0.5)
    with use_backend(backend):
        out = module.from_logits(policy_c, policy_r, ref_c, ref_r, lab_c, lab_r, reduction=reduction)
        out.loss.backward()
        same = module.from_logits(policy_c, policy_r, policy_c, policy_r, lab_c, lab_r, reduction=reduction)
    seq = lambda x, y: reference.sequence_logprobs(x.detach().double(), y, reduction=reduction)
    expected = dpo_loss(seq(policy_c, lab_c), seq(policy_r, lab_r), seq(ref_c, lab_c), seq(ref_r, lab_r), beta=0.5)
    assert_close(out.losses, expected.losses, torch.float32, scale=10)  # sums of a few fp32 per-token terms
    assert policy_c.grad is not None and ref_c.grad is None
    # same fp32 path for policy and reference: the margin at initialization is exactly 0
    assert torch.equal(same.chosen_rewards, torch.zeros(B)) and torch.equal(same.rejected_rewards, torch.zeros(B))


def test_bad_inputs_raise_errors_naming_the_argument():
    x = torch.zeros(3)
    cases = [
        (TypeError, "policy_chosen_logps", lambda: dpo_loss([0.0], x, x, x)),
        (TypeError, "ref_rejected_logps", lambda: dpo_loss(x, x, x, x.long())),
        (ValueError, "policy_rejected_logps", lambda: dpo_loss(x, torch.zeros(2), x, x)),
        (ValueError, "ref_chosen_logps", lambda: dpo_loss(x, x, torch.zeros(3, 1), x)),
        (ValueError, "ref_chosen_logps", lambda: dpo_loss(x, x, x.to("meta"), x)),
        (ValueError, "policy_chosen_logps", lambda: dpo_loss(*[torch.zeros(0)] * 4)),
        (ValueError, "beta", lambda: dpo_loss(x, x, x, x, beta=0.0)),
        (ValueError, "beta", lambda: dpo_loss(x, x, x, x, beta=-1)),
        (ValueError, "beta", lambda: dpo_loss(x, x, x, x, beta=True)),
        (ValueError, "loss_type", lambda: dpo_loss(x, x, x, x, loss_type="dpo")),
        (ValueError, "label_smoothing", lambda: dpo_loss(x, x, x, x, label_smoothing=0.5)),
        (ValueError, "label_smoothing", lambda: dpo_loss(x, x, x, x, label_smoothing=-0.1)),
        (ValueError, "label_smoothing", lambda: dpo_loss(x, x, x, x, label_smoothing="0.1")),
        (ValueError, "label_smoothing", lambda: dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)),
        (ValueError, "label_smoothing", lambda: dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)),
    ]
    for err, match, call in cases:
        with pytest.raises(err, match=match):
            call()
