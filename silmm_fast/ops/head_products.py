"""What the fused heads (``fused_linear_logprobs``, ``fused_linear_dpo``) share: products through the vendor BLAS over
a slab of logits, and the two row epilogues that BLAS cannot fuse, written once for torch and once for Triton.

- Products: ``torch.mm`` / ``addmm`` (MKL / oneDNN on CPU, cuBLAS on CUDA). fp32 and fp64 inputs multiply in their
  own precision (CPU products of half-precision inputs run in fp32). On CUDA, half-precision operands feed the tensor
  cores, and the logits land in an fp32 slab where the installed torch can write one from the product
  (``torch.mm(..., out_dtype=torch.float32)``), so log-probs keep fp32 accuracy; dz then goes to its own slab in the
  operands' dtype for the gradient products, and the weight gradient accumulates in fp32.
- Epilogues, per row of a logit block z with target y: ``row_stats`` gives logp = (z_y − m) − r, m = max z and
  r = log Σ exp(z − m); ``write_dz`` gives dz = c · (onehot(y) − exp(z − m − r)). The ``torch`` epilogue runs in place
  (z becomes exp(z − m), then dz); the ``triton`` one is ``silmm_fast.kernels.logprobs``'s pair of kernels, which read
  z once per pass and may write dz over z itself.
"""

from __future__ import annotations

import torch

from silmm_fast.ops._common import acc_dtype

# The torch epilogue skips the max shift when every row maximum lies within ±UNSHIFTED_MAX: exp(±40) stays far inside
# fp32's range (±88), and log Σ exp(z) then loses at most |m|·2⁻²⁴ ≈ 2.4e-6 against the shifted form.
UNSHIFTED_MAX = 40.0
_FP32_OUT_MM: dict[torch.device, str | None] = {}


def _fp32_out_kind(device: torch.device) -> str | None:
    """How half-precision products with fp32 outputs run on ``device``: "out" (``mm`` / ``addmm`` write an fp32
    ``out=`` tensor, accumulation in place included), "copy" (only a new fp32 result), or None (neither: CPU builds).
    Probed once per device on small random matrices against an fp32 product."""
    if device not in _FP32_OUT_MM:
        gen = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(8, 8, generator=gen).to(device) for _ in range(3))
        ah, bh = a.bfloat16(), b.bfloat16()
        want = c + ah.float() @ bh.float()
        kind = None
        try:
            if torch.allclose(torch.mm(ah, bh, out_dtype=torch.float32), want - c, atol=1e-3):
                kind = "copy"
                acc = c.clone()
                torch.ops.aten.addmm.dtype_out(acc, ah, bh, torch.float32, out=acc)
                out = torch.empty_like(c)
                torch.ops.aten.mm.dtype_out(ah, bh, torch.float32, out=out)
                if torch.allclose(acc, want, atol=1e-3) and torch.allclose(out, want - c, atol=1e-3):
                    kind = "out"
        except (RuntimeError, TypeError, NotImplementedError):
            pass
        _FP32_OUT_MM[device] = kind
    return _FP32_OUT_MM[device]


def fp32_out_mm(device: torch.device) -> bool:
    """Whether ``torch.mm(half, half, out_dtype=torch.float32)`` runs on ``device`` (CUDA builds of recent torch)."""
    return _fp32_out_kind(device) is not None


def dtypes(dtype: torch.dtype, device: torch.device, epilogue: str) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(operand dtype of the products, slab dtype, accumulation dtype) for inputs of ``dtype``."""
    acc = acc_dtype(dtype)
    if dtype in (torch.float16, torch.bfloat16) and epilogue == "triton" and device.type == "cuda":
        return dtype, acc if fp32_out_mm(device) else dtype, acc
    return acc, acc, acc  # CPU products and the interpreter run in fp32 (its half-precision products are wrong)


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` into ``out``; half-precision operands into an fp32 ``out`` use the fp32-output GEMM."""
    if out.dtype == a.dtype:
        return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    if _fp32_out_kind(a.device) == "out":
        torch.ops.aten.mm.dtype_out(a, b, out.dtype, out=out)
    else:
        out.copy_(torch.mm(a, b, out_dtype=out.dtype))
    return out if bias is None else out.add_(bias)


def accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 / fp64 whatever the operands' dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _fp32_out_kind(a.device) == "out":
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    elif _fp32_out_kind(a.device) == "copy":
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def row_stats(epilogue: str, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, m, r) per row of the logit block ``z`` [n, V] for targets ``y`` [n] (all scored); the torch epilogue
    leaves exp(z − m) in ``z``."""
    if epilogue == "triton":
        from silmm_fast.kernels import logprobs as kernels

        return kernels.logprobs_fwd(z, y, ignore_index=-1)
    target = z.gather(1, y.unsqueeze(1)).squeeze(1)
    m = z.amax(1)
    if bool((m.abs() <= UNSHIFTED_MAX).all()):
        # every row's maximum is moderate: exp(z) neither overflows nor loses the maximum, so the shift is 0 and the
        # in-place pass that subtracts m is saved (m returned as 0; p = exp(z − 0 − r) all the same)
        m.zero_()
        total = z.exp_().sum(1)
    else:
        total = z.sub_(m.unsqueeze(1)).exp_().sum(1)
    r = total.log_()
    return (target - m) - r, m, r


def write_dz(epilogue, z, y, m, r, c, out) -> torch.Tensor:
    """dz = c · (onehot(y) − p) over the block ``z`` as ``row_stats`` left it (torch: in place over ``z``; triton:
    into ``out``, which may be ``z``), p = exp(z − m − r), ``c`` per row."""
    if epilogue == "triton":
        from silmm_fast.kernels import logprobs as kernels

        return kernels.logprobs_bwd(z, y, m, r, c, ignore_index=-1, out=out)
    # z holds exp(z − m); p = that · exp(−r)
    z.mul_((-c * torch.exp(-r)).unsqueeze(1)).scatter_add_(1, y.unsqueeze(1), c.unsqueeze(1))
    return z


def recompute_dz(epilogue, z, y, m, r, c, out) -> torch.Tensor:
    """``write_dz`` for a block whose logits were just recomputed into ``z`` (raw z, not yet exp(z − m))."""
    if epilogue == "torch":
        if bool((m != 0).any()):  # rows the forward took unshifted (row_stats) have m = 0: nothing to subtract
            z.sub_(m.unsqueeze(1))
        z.exp_()
    return write_dz(epilogue, z, y, m, r, c, out)
