"""fused_linear_logprobs: every backend against the float64 reference (forward and gradients), the frozen-head path,
masking, layouts, extreme logits, gradcheck and input errors. Triton runs under the interpreter without a GPU, with
tiles shrunk so the small shapes still cover several token, vocabulary and hidden tiles."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from silmm_fast.kernels.fused_linear_logprobs import Tiles
from tolerances import assert_close, tol

from silmm_fast import fused_linear_logprobs, use_backend
from silmm_fast.ops import fused_linear_logprobs as op_module
from silmm_fast.ops.torch_backend import fused_linear_logprobs as torch_backend
from silmm_fast.reference.fused_linear_logprobs import fused_linear_logprobs as reference

BACKENDS = ("torch", "triton", "triton_gemm", "reference")
# 3·7 = 21 tokens over token tiles of 16 (two tiles), V = 100 over vocabulary tiles of 32 (four, the last partial),
# H = 40 over hidden tiles of 16 (three, the last partial); triton slabs of 16 rows (two), torch chunks of 4 rows (six).
B, T, H, V = 3, 7, 40, 100


SMALL_TILES = {"triton_gemm": dict(chunk_rows=16, tiles=Tiles(16, 32, 16, 4, 2))}
SMALL_CHUNKS = dict(chunk_rows=4)


def flp(backend, hidden, weight, labels, **kwargs):
    """``fused_linear_logprobs`` on ``backend`` with the small tiles and chunks above (``kwargs`` override them)."""
    sizes = SMALL_TILES.get(backend, SMALL_CHUNKS)
    return op_module.fused_linear_logprobs_on(backend, hidden, weight, labels, **(sizes | kwargs))


def make_inputs(device, dtype=torch.float64, *, b=B, t=T, h=H, v=V, seed=0, scale=1.0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5
    bias_t = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (b, t), generator=gen)
    if b >= 2 and t >= 3:
        labels[0, 2] = -100
        labels[1, :3] = -100  # prompt-like prefix
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    return cast(hidden), cast(weight), cast(bias_t), labels.to(device)


def run(backend, hidden, weight, labels, bias=None, *, grad_out_seed=1, small=True, **kwargs):
    """Output and the gradients of <output, random upstream gradient> for the leaves that require grad; with the
    small tiles (``small``), else through the public op with the backend's own tiles."""
    if small:
        out = flp(backend, hidden, weight, labels, bias=bias, **kwargs)
    else:
        with use_backend(backend):
            out = fused_linear_logprobs(hidden, weight, labels, bias=bias, **kwargs)
    gen = torch.Generator().manual_seed(grad_out_seed)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    leaves = [x for x in (hidden, weight, bias) if x is not None and x.requires_grad]
    grads = torch.autograd.grad((out * upstream).sum(), leaves) if leaves else ()
    return out, grads


def leaves(hidden, weight, bias, *, head_grad=True):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(head_grad)
    bias = None if bias is None else bias.detach().clone().requires_grad_(head_grad)
    return hidden, weight, bias


def graph_names(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


# --- equality with the reference -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("head_grad", [True, False], ids=["trainable", "frozen"])
def test_matches_reference_float64(device, backend, reduction, head_grad):
    hidden, weight, bias, labels = make_inputs(device)
    args = leaves(hidden, weight, bias, head_grad=head_grad)
    out, grads = run(backend, *args[:2], labels, args[2], reduction=reduction)
    ref_args = leaves(hidden, weight, bias, head_grad=head_grad)
    ref_out, ref_grads = run("reference", *ref_args[:2], labels, ref_args[2], reduction=reduction)
    assert out.dtype == torch.float64 and out.shape == ((B, T) if reduction == "none" else (B,))
    assert_close(out, ref_out, torch.float64)
    assert len(grads) == len(ref_grads) == (3 if head_grad else 1)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_without_bias_and_single_token_tile(device, backend):
    hidden, weight, _, labels = make_inputs(device, b=2, t=5, v=33, bias=False)
    out, grads = run(backend, *leaves(hidden, weight, None)[:2], labels)
    ref_out, ref_grads = run("reference", *leaves(hidden, weight, None)[:2], labels)
    assert_close(out, ref_out, torch.float64)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(device, backend, dtype):
    if dtype != torch.float32 and device.type == "cuda":
        pytest.skip("on CUDA half inputs use tensor-core products; covered by test_gpu_bf16_janus_like")
    hidden, weight, bias, labels = make_inputs(device, dtype)
    h, w, b = leaves(hidden, weight, bias)
    out, grads = run(backend, h, w, labels, b)
    # the reference sees exactly the rounded inputs, upcast: what is left is fp32 accumulation error
    exact = leaves(hidden.double(), weight.double(), bias.double())
    ref_out, ref_grads = run("reference", *exact[:2], labels, exact[2])
    assert out.dtype == torch.float32
    assert_close(out, ref_out, torch.float32, scale=T)  # a sum of T per-token values
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        # gradients are stored in the input dtype: compare at that dtype's rounding
        assert_close(g, rg, dtype if dtype != torch.float32 else torch.float32, scale=10)


def test_torch_chunk_rule():
    cpu = torch.device("cpu")
    assert torch_backend.default_chunk_rows(16384, cpu) == 512  # 32 MiB fp32 slab
    assert torch_backend.default_chunk_rows(184622, cpu) == torch_backend.MIN_ROWS
    assert torch_backend.default_chunk_rows(8, cpu) == torch_backend.MAX_ROWS
    assert torch_backend.default_chunk_rows(16384, torch.device("cuda")) == 4096  # 256 MiB fp32 slab


# --- frozen head and partial gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_frozen_head_takes_fast_path(device, backend, monkeypatch):
    hidden, weight, bias, labels = make_inputs(device)
    h, w, b = leaves(hidden, weight, bias, head_grad=False)
    out = flp(backend, h, w, labels, bias=b)
    names = graph_names(out)
    assert "_FrozenHeadLinearLogprobsBackward" in names and "_FusedLinearLogprobsBackward" not in names

    # the backward must be a rescale only: any recomputation would call one of these
    def fail(*args, **kwargs):
        raise AssertionError("frozen-head backward recomputed the logits")

    from silmm_fast.kernels import fused_linear_logprobs as kernels

    monkeypatch.setattr(torch_backend, "fused_linear_logprobs_bwd", fail)
    monkeypatch.setattr(kernels, "fused_linear_logprobs_bwd", fail)
    monkeypatch.setattr(kernels, "_fused_linear_logprobs_fwd_kernel", None)
    monkeypatch.setattr(kernels, "_fused_linear_logprobs_bwd_kernel", None)
    upstream = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    (out * upstream).sum().backward()
    assert w.grad is None and b.grad is None
    ref_h = hidden.detach().clone().requires_grad_(True)
    ((reference(ref_h, weight, labels, bias=bias) * upstream).sum()).backward()
    assert_close(h.grad, ref_h.grad, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_trainable_head_uses_recompute_path(device, backend):
    hidden, weight, bias, labels = make_inputs(device)
    out = flp(backend, *leaves(hidden, weight, bias)[:2], labels, bias=leaves(hidden, weight, bias)[2])
    names = graph_names(out)
    assert "_FusedLinearLogprobsBackward" in names and "_FrozenHeadLinearLogprobsBackward" not in names


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_bias_only_gradient_skips_weight_work(device, backend, monkeypatch):
    hidden, weight, bias, labels = make_inputs(device)
    calls = []
    if backend == "triton_gemm":
        from silmm_fast.kernels import fused_linear_logprobs as target
    else:
        target = torch_backend
    real = target.fused_linear_logprobs_bwd

    def spy(*args, **kwargs):
        calls.append((kwargs["need_hidden"], kwargs["need_weight"], kwargs["need_bias"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, "fused_linear_logprobs_bwd", spy)
    h = hidden.detach().clone()  # no input gradient either
    w = weight.detach().clone()
    b = bias.detach().clone().requires_grad_(True)
    out, (db,) = run(backend, h, w, labels, b)
    assert calls == [(False, False, True)]
    rb = bias.detach().clone().requires_grad_(True)
    _, (ref_db,) = run("reference", h, w, labels, rb)
    assert_close(db, ref_db, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_weight_only_gradient(device, backend):
    hidden, weight, bias, labels = make_inputs(device)
    w = weight.detach().clone().requires_grad_(True)
    out, (dw,) = run(backend, hidden, w, labels, bias)
    _, (ref_dw,) = run("reference", hidden, weight.detach().clone().requires_grad_(True), labels, bias)
    assert_close(dw, ref_dw, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_no_grad_forward_equals_grad_forward_bitwise(device, backend):
    """Reference log-probs come from no_grad calls: they must be bit-identical to the policy's forward."""
    hidden, weight, bias, labels = make_inputs(device, torch.float32)
    with torch.no_grad():
        plain = flp(backend, hidden, weight, labels, bias=bias)
    trainable = flp(backend, *leaves(hidden, weight, bias)[:2], labels, bias=bias.clone())
    h, w, b = leaves(hidden, weight, bias, head_grad=False)
    frozen = flp(backend, h, w, labels, bias=b)
    assert torch.equal(plain, trainable.detach()) and torch.equal(plain, frozen.detach())


# --- masking, layouts, values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_sequence_is_zero_with_zero_gradient(device, backend):
    hidden, weight, bias, labels = make_inputs(device)
    labels[2] = -100
    for reduction in ("sum", "mean"):
        h, w, b = leaves(hidden, weight, bias)
        out, (dh, dw, db) = run(backend, h, w, labels, b, reduction=reduction)
        assert out[2].item() == 0.0 and torch.isfinite(out).all()
        assert torch.count_nonzero(dh[2]) == 0 and torch.isfinite(dh).all()
        ref_out, ref_grads = run("reference", *leaves(hidden, weight, bias)[:2], labels, bias, reduction=reduction)
        assert_close(out, ref_out, torch.float64)
        assert_close(dh, ref_grads[0], torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_masked_and_custom_ignore_index(device, backend):
    hidden, weight, bias, labels = make_inputs(device)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    out, _ = run(backend, *leaves(hidden, weight, bias)[:2], labels, bias, ignore_index=7)
    ref_out, _ = run("reference", *leaves(hidden, weight, bias)[:2], labels, bias, ignore_index=7)
    assert_close(out, ref_out, torch.float64)
    all_masked = torch.full_like(labels, -1)
    h, w, b = leaves(hidden, weight, bias)
    out, grads = run(backend, h, w, all_masked, b, ignore_index=-1, reduction="mean")
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_non_contiguous_inputs(device, backend):
    hidden, weight, bias, labels = make_inputs(device)
    # hidden as every other position of a longer sequence, weight as the transpose of an [H, V] matrix
    wide = torch.randn(B, 2 * T, H, dtype=torch.float64, device=device)
    wide[:, ::2] = hidden
    strided_hidden = wide[:, ::2]
    strided_weight = weight.t().contiguous().t()
    strided_labels = torch.stack([labels, labels], -1)[..., 0]
    assert not strided_hidden.is_contiguous() and not strided_weight.is_contiguous()
    assert not strided_labels.is_contiguous()
    h = strided_hidden.detach().requires_grad_(True)
    w = strided_weight.detach().requires_grad_(True)
    out, grads = run(backend, h, w, strided_labels, bias)
    ref_out, ref_grads = run("reference", *leaves(hidden, weight, None)[:2], labels, bias)
    assert_close(out, ref_out, torch.float64)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_input_saved_by_previous_op_is_not_written(device, backend):
    """tanh saves its output for backward: if the op wrote into hidden, the tanh gradient would be wrong."""
    x = torch.randn(B, T, H, dtype=torch.float64, device=device, requires_grad=True)
    _, weight, bias, labels = make_inputs(device)
    hidden = torch.tanh(x)
    before = hidden.detach().clone()
    out = flp(backend, hidden, weight, labels, bias=bias)
    out.sum().backward()
    assert torch.equal(hidden.detach(), before)
    x_ref = x.detach().clone().requires_grad_(True)
    reference(torch.tanh(x_ref), weight, labels, bias=bias).sum().backward()
    assert_close(x.grad, x_ref.grad, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_stay_finite_and_exact(device, backend, dtype):
    """Logits of magnitude ~1e4, built from small integers so that even fp32 products are exact: only the softmax
    arithmetic is tested, and it must keep fp32 accuracy (m and r stored apart, no -inf - -inf)."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randint(-1, 2, (B, T, H), generator=gen).to(torch.float64) * 4
    weight = torch.randint(-80, 81, (V, H), generator=gen).to(torch.float64)
    weight[5] = 2000.0  # one dominant row: logits up to ±1e4-ish, the rest far below
    bias = torch.randint(-100, 100, (V,), generator=gen).to(torch.float64)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, 0] = 5
    z = hidden @ weight.T + bias
    assert z.abs().max() > 1e4 and z.abs().max() < 2**24
    to = lambda x: x.to(device=device, dtype=dtype)
    h, w, b = leaves(to(hidden), to(weight), to(bias))
    out, grads = run(backend, h, w, labels.to(device), b, reduction="none")
    ref_out, ref_grads = run("reference", *leaves(hidden, weight, bias)[:2], labels, leaves(hidden, weight, bias)[2],
                             reduction="none")  # fmt: skip
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(out.cpu(), ref_out, dtype)
    for g, rg in zip(grads, ref_grads):
        assert_close(g.cpu(), rg, dtype, scale=1e3)  # gradients are sums of terms of size |W| ~ 2e3


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_deterministic(device, backend):
    hidden, weight, bias, labels = make_inputs(device, torch.float32)
    first = run(backend, *leaves(hidden, weight, bias)[:2], labels, leaves(hidden, weight, bias)[2])
    second = run(backend, *leaves(hidden, weight, bias)[:2], labels, leaves(hidden, weight, bias)[2])
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(device, backend):
    hidden, weight, bias, _ = make_inputs(device, b=0)
    labels = torch.zeros(0, T, dtype=torch.long, device=device)
    with use_backend(backend):  # the public op, with the backend's own tiles
        out = fused_linear_logprobs(hidden, weight, labels, bias=bias)
    assert out.shape == (0,)
    for head_grad in (True, False):  # both backward paths: recompute (trainable head) and rescale (frozen head)
        h, w, b = leaves(hidden, weight, bias, head_grad=head_grad)
        flp(backend, h, w, labels, bias=b).sum().backward()
        assert h.grad.shape == hidden.shape
        if head_grad:
            assert torch.equal(w.grad, torch.zeros_like(weight)) and torch.equal(b.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_gemm"])
def test_gradcheck(device, backend):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(7, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(7, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.tensor([[0, 6, -100], [3, 3, 1]], device=device)
    fn = lambda h, w, b: flp(backend, h, w, labels, bias=b, reduction="none")
    assert torch.autograd.gradcheck(fn, (h, w, b), fast_mode=backend == "triton")
    # frozen head: only the input gradient, through the rescale path
    assert torch.autograd.gradcheck(lambda h: fn(h, w.detach(), b.detach()), (h,), fast_mode=backend == "triton")


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 6),
    h=st.integers(1, 9),
    v=st.integers(1, 40),
    mask_rate=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_torch_backend_property(b, t, h, v, mask_rate, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < mask_rate] = -100
    out, grads = run("torch", *leaves(hidden, weight, None)[:2], labels, reduction="mean", chunk_rows=2)
    ref_out, ref_grads = run("reference", *leaves(hidden, weight, None)[:2], labels, reduction="mean")
    assert_close(out, ref_out, torch.float64)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float64)


# --- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels_value=V), ValueError, "labels"),
        (dict(labels_value=-3), ValueError, "labels"),
        (dict(hidden=torch.zeros(B * T, H)), ValueError, "hidden"),
        (dict(weight=torch.zeros(V, H + 1)), ValueError, "weight"),
        (dict(weight=torch.zeros(0, H)), ValueError, "weight"),
        (dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "labels"),
        (dict(bias=torch.zeros(V + 1)), ValueError, "bias"),
        (dict(weight=torch.zeros(V, H, dtype=torch.float64)), TypeError, "weight"),
        (dict(bias=torch.zeros(V, dtype=torch.float16)), TypeError, "bias"),
        (dict(hidden=torch.zeros(B, T, H, dtype=torch.long)), TypeError, "hidden"),
        (dict(labels=torch.zeros(B, T)), TypeError, "labels"),
        (dict(hidden=[[0.0]]), TypeError, "hidden"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(weight=torch.zeros(V, H, device="meta")), ValueError, "weight"),
    ],
)
def test_bad_input(change, error, match):
    hidden, weight, bias, labels = make_inputs("cpu", torch.float32)
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias, reduction="sum", ignore_index=-100)
    if "labels_value" in change:
        labels = labels.clone()
        labels[1, 4] = change.pop("labels_value")
        args["labels"] = labels
    args.update(change)
    with pytest.raises(error, match=match):
        fused_linear_logprobs(
            args["hidden"],
            args["weight"],
            args["labels"],
            bias=args["bias"],
            reduction=args["reduction"],
            ignore_index=args["ignore_index"],
        )


# --- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_gemm"])
@pytest.mark.parametrize("head_grad", [True, False], ids=["trainable-head", "frozen-head"])
def test_gpu_bf16_janus_like(head_grad, backend):
    """bf16 tensor-core products at a Janus-like shape (two sequences of 576 tokens, H=2048, V=16384). The frozen head
    takes the forward kernel's input-gradient path, whose first form Triton 3.6 failed to compile at these tiles."""
    hidden, weight, bias, labels = make_inputs("cuda", torch.bfloat16, b=2, t=576, h=2048, v=16384, bias=False)
    h, w, _ = leaves(hidden, weight, None, head_grad=head_grad)
    out, grads = run(backend, h, w, labels, reduction="mean", small=False)
    exact = leaves(hidden.double(), weight.double(), None, head_grad=head_grad)
    ref_out, ref_grads = run("reference", *exact[:2], labels, reduction="mean")
    assert len(grads) == len(ref_grads) == (2 if head_grad else 1)
    torch.testing.assert_close(out.double(), ref_out, **tol(torch.bfloat16))
    for g, rg in zip(grads, ref_grads):
        scale = rg.abs().max().item()
        torch.testing.assert_close(g.double(), rg, rtol=tol(torch.bfloat16)["rtol"], atol=2e-2 * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_gemm"])
def test_gpu_fp32_default_tiles(backend):
    hidden, weight, bias, labels = make_inputs("cuda", torch.float32, b=4, t=300, h=520, v=3000)
    h, w, b = leaves(hidden, weight, bias)
    out, grads = run(backend, h, w, labels, b, small=False)
    exact = leaves(hidden.double(), weight.double(), bias.double())
    ref_out, ref_grads = run("reference", *exact[:2], labels, exact[2])
    assert_close(out, ref_out, torch.float32, scale=300)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float32, scale=10)


# --- keep_logits: the forward's slab serves the backward --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_keep_logits_matches_the_reference(device, backend, with_bias):
    hidden, weight, bias, labels = make_inputs(device)
    bias = bias if with_bias else None
    h, w, b = leaves(hidden, weight, bias)
    upstream = torch.randn(B, dtype=torch.float64, device=device)
    out = flp(backend, h, w, labels, bias=b, keep_logits=True)
    assert "_KeptLogitsLinearLogprobsBackward" in graph_names(out)
    (out * upstream).sum().backward()
    rh, rw, rb = leaves(hidden, weight, bias)
    ((reference(rh, rw, labels, bias=rb) * upstream).sum()).backward()
    assert_close(out, reference(hidden, weight, labels, bias=bias), torch.float64)
    for got, want in ((h, rh), (w, rw), (b, rb)):
        if got is not None:
            assert_close(got.grad, want.grad, torch.float64)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        again = flp(backend, *leaves(hidden, weight, None)[:2], labels, keep_logits=True).sum()
        again.backward(retain_graph=True)
        again.backward()


@pytest.mark.parametrize("keep", [False, True])
def test_trainable_head_matrix_flops(keep):
    """A trainable head: 8·N·H·V matrix FLOPs when the backward recomputes the logits, 6 when they are kept."""
    from matmul_flops import count_matmul_flops

    hidden, weight, bias, labels = make_inputs("cpu", torch.float32)
    h, w, b = leaves(hidden, weight, bias)
    n = int((labels != -100).sum())
    with count_matmul_flops() as counter:
        flp("torch", h, w, labels, bias=b, keep_logits=keep).sum().backward()
    assert counter.flops == pytest.approx((6 if keep else 8) * n * H * V, rel=0.01), counter.calls


def test_keep_logits_must_be_a_bool():
    hidden, weight, bias, labels = make_inputs("cpu")
    with pytest.raises(ValueError, match="keep_logits"):
        fused_linear_logprobs(hidden, weight, labels, keep_logits="yes")
