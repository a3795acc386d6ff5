"""gather_logprobs / sequence_logprobs: every backend against the float64 reference, gradients, edge cases, errors."""

import math

import pytest
import torch
from conftest import backend_device
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close, tol

import silmm_fast.ops.logprobs as ops
from silmm_fast import use_backend
from silmm_fast.ops.logprobs import gather_logprobs, sequence_logprobs
from silmm_fast.reference import logprobs as reference

BACKENDS = ["triton", "torch", "reference"]
IGNORE = -100


# Rows of V = 37 span three Triton vocabulary blocks and the torch path works one row per chunk.
SMALL = dict(block_v=16, chunk_elements=64)


def gather(logits, labels, backend, *, ignore_index=IGNORE, **blocks):
    """``gather_logprobs`` on ``backend`` with small blocks (``blocks`` overrides them)."""
    return ops.gather_logprobs_on(backend, logits, labels, ignore_index, **(SMALL | blocks))


def sequence(logits, labels, backend, *, ignore_index=IGNORE, reduction="sum"):
    """``sequence_logprobs`` on ``backend`` with small blocks."""
    return ops.sequence_logprobs_on(backend, logits, labels, ignore_index, reduction, **SMALL)


def ref64(logits, labels, ignore_index=IGNORE):
    """The float64 reference, computed on (and returned on) the CPU whatever device the inputs are on."""
    return reference.gather_logprobs(logits.detach().cpu().double(), labels.cpu(), ignore_index=ignore_index)


def make(shape, V, dtype, seed=0, scale=3.0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    return logits, labels


def grads_vs_ref(logits, labels, upstream, backend, ignore_index=IGNORE):
    """(our gradient, float64 reference gradient) for sum(upstream * logp), both on the CPU. Ours is computed on
    ``backend``, on the device of ``logits`` (where the test put them for its backend), the reference on the CPU."""
    dev = logits.device
    x = logits.detach().clone().requires_grad_()
    (gather(x, labels.to(dev), backend, ignore_index=ignore_index) * upstream.to(dev)).sum().backward()
    x64 = logits.detach().cpu().double().requires_grad_()
    (reference.gather_logprobs(x64, labels.cpu(), ignore_index=ignore_index) * upstream.cpu().double()).sum().backward()
    return x.grad.cpu(), x64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_forward_and_grad_match_float64(backend, dtype):
    logits, labels = make((2, 5), 37, dtype)
    upstream = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    dev = backend_device(backend)
    out = gather(logits.to(dev), labels.to(dev), backend).cpu()
    grad, expected_grad = grads_vs_ref(logits.to(dev), labels, upstream, backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == labels.shape
    # math is fp32 whatever the storage dtype: the forward meets the fp32 (fp64) tolerance on the stored values
    assert_close(out, ref64(logits, labels), torch.float64 if dtype == torch.float64 else torch.float32)
    assert (out[labels == IGNORE] == 0).all()
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(grad, expected_grad, dtype)
    assert (grad[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logprobs_with_fully_masked_sequence(backend, reduction):
    logits, labels = make((3, 6), 37, torch.float32, seed=2)
    labels[1] = IGNORE  # no image token at all in sequence 1
    labels[2, 0] = 5  # at least one kept token in sequence 2
    x = logits.clone().requires_grad_()
    dev = backend_device(backend)
    out = sequence(x.to(dev), labels.to(dev), backend, reduction=reduction).cpu()
    out.sum().backward()  # x.grad lands on the CPU leaf x
    per_token = ref64(logits, labels)
    expected = per_token.sum(-1)
    if reduction == "mean":
        expected = expected / (labels != IGNORE).sum(-1).clamp(min=1)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out[1].item() == 0.0 and torch.isfinite(x.grad).all()
    assert (x.grad[1] == 0).all()
    assert_close(out, expected, torch.float32, scale=10)  # sums of 6 per-token terms


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_counts_only_kept_tokens(backend):
    logits, labels = make((1, 4), 11, torch.float64, seed=3, ignore_frac=0.0)
    labels[0, 1] = IGNORE
    logits, labels = logits.to(backend_device(backend)), labels.to(backend_device(backend))
    mean = sequence(logits, labels, backend, reduction="mean").cpu()
    total = sequence(logits, labels, backend, reduction="sum").cpu()
    assert_close(mean, total / 3, torch.float64)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "view",
    [
        lambda t: t[:, :-1],  # shifted model logits: rows read in place
        lambda t: t.transpose(0, 1),  # leading dims that do not merge
        lambda t: t[..., ::2],  # strided vocabulary: one documented copy
        lambda t: t.view(2, 1, 3, -1).expand(2, 2, 3, t.shape[-1])[:, :, :-1],  # 4-d with a broadcast dim
    ],
    ids=["shifted", "transposed", "strided-vocab", "4d-expanded"],
)
def test_non_contiguous_logits(backend, view):
    # the view is made where the backend runs: moving a strided view there would give a contiguous copy
    dev = backend_device(backend)
    base = torch.randn(2, 3, 74, generator=torch.Generator().manual_seed(4)).to(dev)
    logits = view(base)
    assert not logits.is_contiguous()
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
    labels.view(-1)[0] = IGNORE
    upstream = torch.randn(labels.shape, generator=g)
    out = gather(logits, labels.to(dev), backend).cpu()
    grad, expected_grad = grads_vs_ref(logits, labels, upstream, backend)
    assert_close(out, ref64(logits, labels), torch.float32)
    assert_close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_labels_and_expanded_upstream(backend):
    logits, _ = make((3, 4), 37, torch.float32, seed=6)
    labels = torch.randint(0, 37, (4, 3), generator=torch.Generator().manual_seed(7)).t()
    x = logits.clone().requires_grad_()
    dev = backend_device(backend)
    sequence(x.to(dev), labels.to(dev), backend).sum().backward()  # upstream gradient arrives expanded (stride 0)
    x64 = logits.double().requires_grad_()
    reference.sequence_logprobs(x64, labels).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite_and_correct(backend):
    V = 37
    logits = torch.full((5, V), -1e4)
    logits[0, 3] = 1e4  # target dominates: log p = 0
    logits[1, 3] = 1e4  # another class dominates: log p(target 5) = -2e4
    logits[2] = 1e4  # all equal and huge: log p = -log V
    logits[3] = torch.linspace(-1e4, 1e4, V)
    logits[3, 7] = float("-inf")  # a masked-out vocabulary entry
    logits[4] = 1e4  # ignored row: exp(z) would overflow if the row were not skipped
    labels = torch.tensor([3, 5, 9, 0, IGNORE])
    x = logits.clone().requires_grad_()
    dev = backend_device(backend)
    out = gather(x.to(dev), labels.to(dev), backend).cpu()
    out.sum().backward()  # x.grad lands on the CPU leaf x
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert out[0].item() == 0.0
    assert out[1].item() == pytest.approx(-2e4, rel=1e-6)
    assert out[2].item() == pytest.approx(-math.log(V), rel=1e-5)
    x64 = logits.double().requires_grad_()
    reference.gather_logprobs(x64, labels).sum().backward()
    assert_close(out, ref64(logits, labels), torch.float32)
    assert_close(x.grad, x64.grad, torch.float32)
    assert x.grad[3, 7].item() == 0.0
    assert out[4].item() == 0.0 and (x.grad[4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_safety_with_producer_that_saved_its_output(backend):
    """sigmoid saves its output for backward; our op must leave it intact so sigmoid's backward stays right."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 37, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (2, 3), generator=g)
    upstream = torch.randn(2, 3, generator=g)
    dev = backend_device(backend)
    probs = torch.sigmoid(x.to(dev))  # the saved output lives where the op reads it
    before = probs.detach().clone()
    (gather(probs, labels.to(dev), backend) * upstream.to(dev)).sum().backward()
    assert torch.equal(probs.detach(), before)
    x64 = x.detach().double().requires_grad_()
    (reference.gather_logprobs(torch.sigmoid(x64), labels) * upstream.double()).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradcheck_float64(backend):
    logits, labels = make((2, 3), 9, torch.float64, seed=9, ignore_frac=0.0)
    labels[0, 0] = IGNORE
    x = logits.to(backend_device(backend)).requires_grad_()
    labels = labels.to(backend_device(backend))
    blocks = dict(block_v=4, chunk_elements=9)  # V = 9: three Triton blocks, one row per torch chunk
    per_token = lambda t: ops.gather_logprobs_on(backend, t, labels, IGNORE, **blocks)
    per_sequence = lambda t: ops.sequence_logprobs_on(backend, t, labels, IGNORE, "mean", **blocks)
    assert torch.autograd.gradcheck(per_token, (x,), fast_mode=True)
    assert torch.autograd.gradcheck(per_sequence, (x,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_inside_vocabulary(backend):
    logits, _ = make((2, 4), 9, torch.float64, seed=10)
    labels = torch.tensor([[0, 3, 3, 8], [3, 3, 3, 3]])
    dev = backend_device(backend)
    out = gather(logits.to(dev), labels.to(dev), backend, ignore_index=3).cpu()
    seq = sequence(logits.to(dev), labels.to(dev), backend, ignore_index=3, reduction="mean").cpu()
    assert_close(out, ref64(logits, labels, ignore_index=3), torch.float64)
    assert (out[labels == 3] == 0).all() and seq[1].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_of_one_and_leading_shapes(backend):
    dev = backend_device(backend)
    with use_backend(backend):
        ones = gather_logprobs(torch.randn(3, 1).to(dev), torch.zeros(3, dtype=torch.long, device=dev))
        assert ones.abs().max().item() == 0.0
        assert gather_logprobs(torch.randn(37).to(dev), torch.tensor(4, device=dev)).shape == ()  # one row: 0-d labels
        empty = torch.randn(0, 5, 37, device=dev, requires_grad=True)
        empty = gather_logprobs(empty, torch.zeros(0, 5, dtype=torch.long, device=dev))
        assert empty.shape == (0, 5)
        one_row = torch.randn(37, dtype=torch.float64)
        got = gather_logprobs(one_row.to(dev), torch.tensor(4, device=dev)).cpu()
        assert_close(got, ref64(one_row, torch.tensor(4)), torch.float64)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_int32_labels_match_int64(backend):
    logits, labels = make((2, 4), 37, torch.float64, seed=11)
    logits, labels = logits.to(backend_device(backend)), labels.to(backend_device(backend))
    with use_backend(backend):
        a = gather_logprobs(logits, labels)
        b = gather_logprobs(logits, labels.int())
    assert torch.equal(a, b)


def test_triton_kernel_default_blocks_and_out_of_range_label_gives_nan():
    """The kernel's own heuristic block, and its guard for a label the caller did not validate."""
    from silmm_fast.kernels import logprobs as kernels

    logits, labels = make((3,), 300, torch.float32, seed=12, ignore_frac=0.0)
    dev = backend_device("triton")  # the launcher reads its tensors where Triton runs; results compared on the CPU
    stats = kernels.logprobs_fwd(logits.to(dev), labels.to(dev), ignore_index=IGNORE)
    logp, row_max, row_logsum = (t.cpu() for t in stats)
    assert_close(logp, ref64(logits, labels), torch.float32)
    assert_close(row_max + row_logsum, torch.logsumexp(logits.double(), -1), torch.float32)
    bad = torch.tensor([300, -7, 2])
    logp = kernels.logprobs_fwd(logits.to(dev), bad.to(dev), ignore_index=IGNORE, block_v=64)[0].cpu()
    assert torch.isnan(logp[:2]).all() and torch.isfinite(logp[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_errors_naming_the_argument(backend):
    logits = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    cases = [
        (TypeError, "logits", lambda: gather_logprobs(logits.long(), labels)),
        (TypeError, "logits", lambda: gather_logprobs(logits > 0, labels)),
        (TypeError, "logits", lambda: gather_logprobs(logits.tolist(), labels)),
        (TypeError, "labels", lambda: gather_logprobs(logits, labels.float())),
        (TypeError, "labels", lambda: gather_logprobs(logits, labels.bool())),
        (TypeError, "ignore_index", lambda: gather_logprobs(logits, labels, ignore_index=1.5)),
        (ValueError, "labels", lambda: gather_logprobs(logits, labels[:, :2])),
        (ValueError, "labels", lambda: gather_logprobs(logits, labels.view(6))),
        (ValueError, "logits", lambda: gather_logprobs(torch.tensor(1.0), labels)),
        (ValueError, "logits", lambda: gather_logprobs(torch.randn(2, 3, 0), labels)),
        (ValueError, r"labels.*\[0, 5\).*got 5", lambda: gather_logprobs(logits, labels + 5)),
        (ValueError, r"labels.*got -1", lambda: gather_logprobs(logits, labels - 1)),
        (ValueError, "labels", lambda: gather_logprobs(logits, labels.to("meta"))),
        (ValueError, "logits", lambda: sequence_logprobs(logits[0], labels[0])),
        (ValueError, "labels", lambda: sequence_logprobs(logits, labels[0])),
        (ValueError, "reduction", lambda: sequence_logprobs(logits, labels, reduction="none")),
        (ValueError, "labels", lambda: sequence_logprobs(logits, labels + 7, reduction="mean")),
    ]
    with use_backend(backend):
        for err, match, call in cases:
            with pytest.raises(err, match=match):
                call()


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 5),
    V=st.integers(1, 40),
    mask_p=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(["triton", "torch"]),
)
def test_property_random_shapes_and_masks(B, T, V, mask_p, seed, backend):
    logits, labels = make((B, T), V, torch.float32, seed=seed, ignore_frac=mask_p)
    dev = backend_device(backend)
    per_token = gather(logits.to(dev), labels.to(dev), backend).cpu()
    seq = sequence(logits.to(dev), labels.to(dev), backend, reduction="mean").cpu()
    expected = ref64(logits, labels)
    assert_close(per_token, expected, torch.float32)
    assert (per_token <= 1e-6).all() and torch.isfinite(seq).all()
    count = (labels != IGNORE).sum(-1).clamp(min=1)
    assert_close(seq, expected.sum(-1) / count, torch.float32, scale=10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_janus_sized_rows_match_float64(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(2, 576, 16384, device="cuda", generator=g)).to(dtype)
    labels = torch.randint(0, 16384, (2, 576), device="cuda", generator=g)
    labels[:, :40] = IGNORE
    x = logits.clone().requires_grad_()
    with use_backend("triton"):
        out = sequence_logprobs(x, labels)
        out.sum().backward()
    x64 = logits.double().requires_grad_()
    expected = reference.sequence_logprobs(x64, labels)
    expected.sum().backward()
    # per-token error is fp32-level; the sum over 536 tokens grows it by ~sqrt(536)
    torch.testing.assert_close(out.double(), expected.detach(), **tol(torch.float32, scale=1e3))
    assert_close(x.grad, x64.grad, dtype)
