"""FusedLinearDPOLoss: equal to dpo_loss over reference sequence log-probs of materialized logits (values and
gradients, every loss type), zero margin at initialization, an MLP head fused at its last Linear, frozen head, errors.
"""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from silmm_fast import DPOOutput, FusedLinearDPOLoss, dpo_loss, use_backend
from silmm_fast.reference.fused_linear_logprobs import fused_linear_logprobs as reference_logprobs

PAIRS, T, H, V = 2, 5, 24, 70
BACKENDS = ("torch", "triton", "reference")


def make_batch(device, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * PAIRS, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=gen)
    labels[:, :2] = -100  # prompt positions are context, not scored
    ref_logps = torch.randn(2, PAIRS, generator=gen, dtype=torch.float64) - 20.0
    to = lambda x: x.to(device=device, dtype=dtype)
    return to(hidden), to(weight), to(bias), labels.to(device), to(ref_logps[0]), to(ref_logps[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss_type, smoothing, reduction",
    [("sigmoid", 0.0, "sum"), ("sigmoid", 0.1, "mean"), ("robust", 0.2, "sum"), ("ipo", 0.0, "mean"),
     ("hinge", 0.0, "sum")],
)  # fmt: skip
def test_matches_dpo_over_reference_logprobs(device, backend, loss_type, smoothing, reduction):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(device)
    module = FusedLinearDPOLoss(beta=0.5, loss_type=loss_type, label_smoothing=smoothing, reduction=reduction)
    h, w, b = (x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias))
    with use_backend(backend):
        out = module(h, w, labels, ref_c, ref_r, bias=b)
    assert isinstance(out, DPOOutput) and out.losses.shape == (PAIRS,)
    out.loss.backward()

    rh, rw, rb = (x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias))
    logps = reference_logprobs(rh, rw, labels, bias=rb, reduction=reduction)
    expected = dpo_loss(
        logps[:PAIRS], logps[PAIRS:], ref_c, ref_r, beta=0.5, loss_type=loss_type, label_smoothing=smoothing
    )
    expected.loss.backward()
    for got, want in zip(out, expected):
        assert_close(got, want, torch.float64)
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_nll_weight_adds_the_chosen_per_token_nll(device, backend, reduction):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(device)
    labels[0, 2] = -100  # rows score different numbers of tokens
    module = FusedLinearDPOLoss(beta=0.5, reduction=reduction, nll_weight=0.7)
    h, w = (x.detach().clone().requires_grad_(True) for x in (hidden, weight))
    with use_backend(backend):
        out = module(h, w, labels, ref_c, ref_r, bias=bias)
    out.loss.backward()

    # reference: materialized logits, per-token NLL of each chosen row written out by hand
    rh, rw = (x.detach().clone().requires_grad_(True) for x in (hidden, weight))
    logp = torch.log_softmax(rh @ rw.T + bias, dim=-1)
    scored = labels != -100
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * scored
    seq = token.sum(-1) if reduction == "sum" else token.sum(-1) / scored.sum(-1)
    plain = dpo_loss(seq[:PAIRS], seq[PAIRS:], ref_c, ref_r, beta=0.5)
    nll = -token[:PAIRS].sum(-1) / scored[:PAIRS].sum(-1)
    expected = plain.losses + 0.7 * nll
    expected.mean().backward()
    assert_close(out.losses, expected, torch.float64)
    assert_close(out.loss, expected.mean(), torch.float64)
    assert_close(out.chosen_rewards, plain.chosen_rewards, torch.float64)  # rewards stay DPO's
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad)):
        assert_close(got, want, torch.float64)


def test_nll_weight_on_a_chosen_row_with_nothing_scored_adds_nothing():
    hidden, weight, bias, labels, ref_c, ref_r = make_batch("cpu")
    labels[0] = -100  # the first chosen image has no scored token
    plain = FusedLinearDPOLoss(beta=0.5)(hidden, weight, labels, ref_c, ref_r, bias=bias)
    out = FusedLinearDPOLoss(beta=0.5, nll_weight=0.7)(hidden, weight, labels, ref_c, ref_r, bias=bias)
    assert torch.equal(out.losses[0], plain.losses[0]) and torch.isfinite(out.losses).all()
    assert out.losses[1] > plain.losses[1]  # a scored row's NLL is positive


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_is_exactly_zero_at_initialization(device, backend):
    """Policy == reference: the reference log-probs come through the same fp32 path, so rewards are exactly 0 and the
    sigmoid loss is exactly log 2, for a trainable and for a frozen head."""
    hidden, weight, bias, labels, _, _ = make_batch(device, torch.float32)
    module = FusedLinearDPOLoss(beta=0.1)
    with use_backend(backend):
        ref_c, ref_r = module.reference_logps(hidden, weight, labels, bias)
        assert not ref_c.requires_grad and ref_c.dtype == torch.float32
        for head_grad in (True, False):
            h = hidden.clone().requires_grad_(True)
            w = weight.clone().requires_grad_(head_grad)
            out = module(h, w, labels, ref_c, ref_r, bias=bias)
            assert torch.equal(out.chosen_rewards, torch.zeros_like(out.chosen_rewards))
            assert torch.equal(out.rejected_rewards, torch.zeros_like(out.rejected_rewards))
            assert torch.equal(out.losses, torch.full_like(out.losses, F.softplus(torch.tensor(0.0)).item()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mlp_head_fused_at_its_last_linear(device, backend):
    """A Janus-style head (Linear → GELU → Linear): the module gets the activations entering the last Linear, and
    gradients reach the first Linear and the trunk's hidden states through them."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(H, 32), torch.nn.GELU(), torch.nn.Linear(32, V)).double().to(device)
    hidden, _, _, labels, ref_c, ref_r = make_batch(device)
    trunk = hidden.clone().requires_grad_(True)
    module = FusedLinearDPOLoss(beta=0.3)
    with use_backend(backend):
        act = head[1](head[0](trunk))
        out = module(act, head[2].weight, labels, ref_c, ref_r, bias=head[2].bias)
    out.loss.backward()
    grads = [trunk.grad] + [p.grad for p in head.parameters()]

    head.zero_grad()
    trunk_ref = hidden.clone().requires_grad_(True)
    logits = head(trunk_ref)  # [2B, T, V], materialized
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (logp * (labels != -100)).sum(-1)
    expected = dpo_loss(logps[:PAIRS], logps[PAIRS:], ref_c, ref_r, beta=0.3)
    expected.loss.backward()
    assert_close(out.loss, expected.loss, torch.float64)
    for got, want in zip(grads, [trunk_ref.grad] + [p.grad for p in head.parameters()]):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_leaves_weight_without_gradient(device, backend):
    hidden, weight, _, labels, ref_c, ref_r = make_batch(device)
    h = hidden.clone().requires_grad_(True)
    with use_backend(backend):
        out = FusedLinearDPOLoss(beta=0.2, loss_type="ipo")(h, weight, labels, ref_c, ref_r)
    out.loss.backward()
    assert weight.grad is None
    rh = hidden.clone().requires_grad_(True)
    logps = reference_logprobs(rh, weight, labels)
    dpo_loss(logps[:PAIRS], logps[PAIRS:], ref_c, ref_r, beta=0.2, loss_type="ipo").loss.backward()
    assert_close(h.grad, rh.grad, torch.float64)


def test_bad_input():
    hidden, weight, bias, labels, ref_c, ref_r = make_batch("cpu")
    module = FusedLinearDPOLoss()
    with pytest.raises(ValueError, match="hidden"):
        module(hidden[:3], weight, labels[:3], ref_c, ref_r)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        module(hidden, weight, labels, ref_c[:1], ref_r)
    with pytest.raises(TypeError, match="ref_rejected_logps"):
        module(hidden, weight, labels, ref_c, ref_r.long())
    with pytest.raises(ValueError, match="labels"):
        module(hidden, weight, labels + V, ref_c, ref_r)
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearDPOLoss(reduction="none")
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="kto")
    with pytest.raises(TypeError, match="ignore_index"):
        FusedLinearDPOLoss(ignore_index="-100")
    assert "reduction='sum'" in repr(module) and "nll_weight=0.0" in repr(module)
    for bad in (-0.1, True, "1", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="nll_weight: expected a finite number >= 0"):
            FusedLinearDPOLoss(nll_weight=bad)


# --- gradients in the forward, per chunk of whole pairs ----------------------------------------------------------
def reference_losses(hidden, weight, bias, labels, ref_c, ref_r, *, reduction="sum", nll_weight=0.0, **config):
    """Per-pair losses over materialized logits, written out: dpo_loss + nll_weight × the chosen per-token NLL."""
    logps = reference_logprobs(hidden, weight, labels, bias=bias, reduction=reduction)
    pairs = logps.shape[0] // 2
    losses = dpo_loss(logps[:pairs], logps[pairs:], ref_c, ref_r, **config).losses
    scored = (labels[:pairs] != -100).sum(-1).clamp(min=1)
    per_token = logps[:pairs] if reduction == "mean" else logps[:pairs] / scored
    return losses - nll_weight * per_token


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


# chunk budgets in bytes of a float64 slab (V = 70 columns: 560 bytes a token): every pair in one chunk, about one
# pair per chunk (boundaries between pairs), and less than one pair (the two-pass fallback)
CHUNKS = {"one_chunk": None, "pair_per_chunk": 560 * 12, "fallback": 560 * 4}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunks_of_pairs_match_the_reference(device, backend, chunk, reduction, monkeypatch):
    from silmm_fast.ops import fused_linear_dpo as dpo_module

    monkeypatch.setattr(dpo_module, "_fallback_warned", False)
    gen = torch.Generator().manual_seed(3)
    pairs = 3
    hidden = torch.randn(2 * pairs, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (2 * pairs, T), generator=gen)
    labels[:, :2] = -100
    labels[pairs + 1] = -100  # a rejected sequence with nothing scored
    ref_c, ref_r = torch.randn(2, pairs, generator=gen, dtype=torch.float64) - 20.0
    config = dict(beta=0.4, loss_type="sigmoid", label_smoothing=0.1)
    module = FusedLinearDPOLoss(**config, reduction=reduction, nll_weight=0.3, chunk_bytes=CHUNKS[chunk])
    h, w, b = leaves(hidden, weight, bias)
    to = lambda x: x.to(device)
    if chunk == "fallback":
        with pytest.warns(UserWarning, match="two-pass path"):
            with use_backend(backend):
                out = module(to(h), to(w), to(labels), to(ref_c), to(ref_r), bias=to(b))
    else:
        with use_backend(backend):
            out = module(to(h), to(w), to(labels), to(ref_c), to(ref_r), bias=to(b))
    upstream = 1.7  # a loss scaled before backward (gradient accumulation, loss scaling)
    (out.loss * upstream).backward()

    rh, rw, rb = leaves(hidden, weight, bias)
    expected = reference_losses(rh, rw, rb, labels, ref_c, ref_r, reduction=reduction, nll_weight=0.3, **config)
    (expected.mean() * upstream).backward()
    assert_close(out.losses.cpu(), expected, torch.float64)
    assert_close(out.loss.cpu(), expected.mean(), torch.float64)
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_pair(device, backend):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(device)
    rows = [0, PAIRS]  # the first pair alone: B = 1
    hidden, labels = hidden[rows], labels[rows]
    h, w = leaves(hidden, weight)
    with use_backend(backend):
        out = FusedLinearDPOLoss(beta=0.2, loss_type="robust", label_smoothing=0.1)(
            h, w, labels, ref_c[:1], ref_r[:1], bias=bias
        )
    out.loss.backward()
    rh, rw = leaves(hidden, weight)
    expected = reference_losses(rh, rw, bias, labels, ref_c[:1], ref_r[:1], beta=0.2, loss_type="robust",
                                label_smoothing=0.1)  # fmt: skip
    expected.mean().backward()
    assert_close(out.loss, expected.mean(), torch.float64)
    assert_close(h.grad, rh.grad, torch.float64)
    assert_close(w.grad, rw.grad, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_through_weighted_losses_and_reference_logps(device, backend):
    """A gradient through ``losses`` with unequal per-pair weights (and through ``loss`` as well) cannot be a rescale
    of the stored gradients: that backward recomputes, and must still equal autograd. Reference log-probs that
    require a gradient get theirs too."""
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(device)
    h, w, b, rc, rr = leaves(hidden, weight, bias, ref_c, ref_r)
    weights = torch.tensor([0.3, -1.2], dtype=torch.float64, device=device)
    with use_backend(backend):
        out = FusedLinearDPOLoss(beta=0.5, nll_weight=0.2)(h, w, labels, rc, rr, bias=b)
    ((out.losses * weights).sum() + 0.5 * out.loss).backward()
    eh, ew, eb, erc, err = leaves(hidden, weight, bias, ref_c, ref_r)
    expected = reference_losses(eh, ew, eb, labels, erc, err, beta=0.5, nll_weight=0.2)
    ((expected * weights).sum() + 0.5 * expected.mean()).backward()
    for got, want in zip((h, w, b, rc, rr), (eh, ew, eb, erc, err)):
        assert_close(got.grad, want.grad, torch.float64)


def test_stored_gradients_serve_one_backward():
    hidden, weight, bias, labels, ref_c, ref_r = make_batch("cpu")
    h = hidden.clone().requires_grad_(True)
    out = FusedLinearDPOLoss()(h, weight, labels, ref_c, ref_r)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_forward_matches_the_grad_forward(device, backend):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(device)
    module = FusedLinearDPOLoss(beta=0.3, nll_weight=0.5)
    with use_backend(backend):
        with torch.no_grad():
            plain = module(hidden, weight, labels, ref_c, ref_r, bias=bias)
        out = module(hidden.clone().requires_grad_(True), weight, labels, ref_c, ref_r, bias=bias)
    for got, want in zip(out, plain):
        assert_close(got.detach(), want, torch.float64)


def test_no_logit_sized_tensor_is_saved_for_backward():
    """Beyond the gradients the backward returns (dh [2B·T, H], dW [V, H], db [V]), what the forward keeps is O(B·T):
    no saved tensor has the logits' B·T·V elements."""
    hidden, weight, bias, labels, ref_c, ref_r = make_batch("cpu", torch.float32)
    h, w, b = leaves(hidden, weight, bias)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = FusedLinearDPOLoss()(h, w, labels, ref_c, ref_r, bias=b)
    out.loss.backward()
    kept = [x.numel() for x in saved if not any(x is i for i in (h, w, b))]  # inputs are kept by reference
    assert kept and max(kept) < hidden.shape[0] * T * V


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("head", ["trainable", "frozen", "weight_only"])
def test_matrix_flops_are_six_or_four_nhv(backend, head):
    """One forward + backward does 6·N·H·V matrix FLOPs with a trainable head (logits, dh, dW once each), 4 with a
    frozen one and 4 when only the head trains (N = scored tokens), counted at the dispatch level over every mm /
    addmm / bmm variant; the products go through torch on both backends."""
    from matmul_flops import count_matmul_flops

    gen = torch.Generator().manual_seed(0)
    pairs, t, hid, vocab = 3, 9, 16, 40
    hidden = torch.randn(2 * pairs, t, hid, generator=gen)
    weight = torch.randn(vocab, hid, generator=gen) / 4
    labels = torch.randint(0, vocab, (2 * pairs, t), generator=gen)
    labels[:, :3] = -100
    ref_c, ref_r = torch.randn(2, pairs, generator=gen) - 30
    h = hidden.requires_grad_(head != "weight_only")
    w = weight.requires_grad_(head != "frozen")
    n = int((labels != -100).sum())
    with use_backend(backend), count_matmul_flops() as counter:
        out = FusedLinearDPOLoss(chunk_bytes=4 * vocab * 2 * 6)(h, w, labels, ref_c, ref_r)  # two pairs a chunk
        out.loss.backward()
    products = 6 if head == "trainable" else 4
    assert counter.flops == pytest.approx(products * n * hid * vocab, rel=0.01), counter.calls


def test_bad_chunk_bytes():
    for bad in (0, -5, 1.5, True, "64"):
        with pytest.raises(ValueError, match="chunk_bytes"):
            FusedLinearDPOLoss(chunk_bytes=bad)
    assert "chunk_bytes=None" in repr(FusedLinearDPOLoss())


def test_chunk_plan():
    """Pairs (kept tokens each) grouped under the budget and spread evenly; a pair above the budget alone in its
    chunk while under the limit; None past the limit."""
    from silmm_fast.ops.fused_linear_dpo import _plan, default_budget

    assert _plan([10, 10, 10, 10], 1, budget=25, limit=25) == [(0, 2), (2, 4)]
    assert _plan([10, 10, 10, 10, 10], 1, budget=40, limit=40) == [(0, 3), (3, 5)]  # 2 chunks: 3 + 2 pairs
    assert _plan([10, 50, 10], 1, budget=25, limit=60) == [(0, 1), (1, 2), (2, 3)]
    assert _plan([10, 70, 10], 1, budget=25, limit=60) is None
    assert _plan([4, 4], 8, budget=64, limit=64) == [(0, 2)]  # bytes per token scale the token counts
    group, limit = default_budget("cpu")
    assert group == 96 * 2**20 and limit == 512 * 2**20


def test_meta_tensors_give_shapes():
    hidden, weight, bias, labels, ref_c, ref_r = (x.to("meta") for x in make_batch("cpu"))
    module = FusedLinearDPOLoss()
    out = module(hidden, weight, labels, ref_c, ref_r, bias=bias)
    assert [tuple(x.shape) for x in out] == [(), (PAIRS,), (PAIRS,), (PAIRS,)] and out.loss.is_meta
    chosen, rejected = module.reference_logps(hidden, weight, labels, bias)
    assert chosen.shape == rejected.shape == (PAIRS,) and chosen.is_meta


# --- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("head_grad", [True, False], ids=["trainable-head", "frozen-head"])
def test_gpu_bf16_janus_like(head_grad):
    """bf16 at a Janus-like shape (two pairs of 576 image tokens, H = 2048, V = 16,384): cuBLAS products (fp32 logit
    slab where torch can write one), the Triton row kernels, dz in bf16 for the gradient products; against float64."""
    gen = torch.Generator().manual_seed(0)
    pairs, t, hid, vocab = 2, 576, 2048, 16384
    hidden = torch.randn(2 * pairs, t, hid, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hid, generator=gen, dtype=torch.float64) / hid**0.5
    labels = torch.randint(0, vocab, (2 * pairs, t), generator=gen)
    labels = labels.cuda()
    h = hidden.to("cuda", torch.bfloat16).requires_grad_(True)
    w = weight.to("cuda", torch.bfloat16).requires_grad_(head_grad)
    # the float64 reference (on the GPU) sees the bf16-rounded inputs; reference log-probs near the policy's
    rh, rw = leaves(h.detach().double(), w.detach().double())
    rw.requires_grad_(head_grad)
    with torch.no_grad():
        noise = torch.randn(2, pairs, generator=gen, dtype=torch.float64).cuda()
        ref_c, ref_r = reference_logprobs(rh, rw, labels).view(2, pairs) + noise
    out = FusedLinearDPOLoss(beta=0.1)(h, w, labels, ref_c, ref_r)
    out.loss.backward()
    expected = reference_losses(rh, rw, None, labels, ref_c, ref_r, beta=0.1)
    expected.mean().backward()
    torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=1.6e-2, atol=2e-2)
    grads = [(h.grad, rh.grad)] + ([(w.grad, rw.grad)] if head_grad else [])
    for got, want in grads:
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=2e-2 * scale)


def test_functional_checks_its_arguments_and_equals_the_module():
    from silmm_fast.ops.fused_linear_dpo import fused_linear_dpo, sequence_logps

    hidden, weight, bias, labels, ref_c, ref_r = make_batch("cpu")
    cases = [
        (ValueError, "hidden", lambda: fused_linear_dpo(hidden[:3], weight, labels[:3], ref_c, ref_r)),
        (ValueError, "ref_rejected_logps", lambda: fused_linear_dpo(hidden, weight, labels, ref_c, ref_r[:1])),
        (ValueError, "labels", lambda: fused_linear_dpo(hidden, weight, labels + V, ref_c, ref_r)),
        (TypeError, "bias", lambda: fused_linear_dpo(hidden, weight, labels, ref_c, ref_r, bias=bias.float())),
        (ValueError, "beta", lambda: fused_linear_dpo(hidden, weight, labels, ref_c, ref_r, beta=0.0)),
        (ValueError, "nll_weight", lambda: fused_linear_dpo(hidden, weight, labels, ref_c, ref_r, nll_weight=-1)),
        (ValueError, "reduction", lambda: fused_linear_dpo(hidden, weight, labels, ref_c, ref_r, reduction="none")),
        (ValueError, "chunk_bytes", lambda: sequence_logps(hidden, weight, labels, chunk_bytes=0)),
        (ValueError, "hidden", lambda: sequence_logps(hidden[:1], weight, labels[:1])),
    ]
    for err, match, call in cases:
        with pytest.raises(err, match=match):
            call()
    out = fused_linear_dpo(hidden, weight, labels, ref_c, ref_r, bias=bias, beta=0.5, nll_weight=0.2)
    module = FusedLinearDPOLoss(beta=0.5, nll_weight=0.2)
    assert torch.equal(out.losses, module(hidden, weight, labels, ref_c, ref_r, bias=bias).losses)
    logps = sequence_logps(hidden, weight, labels, bias=bias)
    chosen, rejected = module.reference_logps(hidden, weight, labels, bias)
    assert torch.equal(logps, torch.cat([chosen, rejected]))
