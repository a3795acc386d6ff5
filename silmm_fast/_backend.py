"""The one place that decides which implementation serves an op call.

Implementations, in the order `auto` prefers them:
- ``triton``: the fused Triton kernels in ``silmm_fast.kernels`` (for the fused heads: vendor-BLAS products with
  Triton row kernels). Used for CUDA tensors when Triton is importable; for CPU tensors only under
  ``TRITON_INTERPRET=1`` (how the test suite exercises the kernel code without a GPU).
- ``triton_gemm``: ``fused_linear_logprobs`` with the whole product in Triton tiles; never chosen by ``auto`` (cuBLAS
  products were faster where measured), kept selectable to re-measure.
- ``cpp``: the compiled extension ``silmm_fast._C`` (ops that have one, e.g. ``diverse_select``).
- ``torch``: a vectorized, memory-lean PyTorch path (chunked where the naive form would materialize large tensors).
- ``reference``: the readable pure-PyTorch reference in ``silmm_fast.reference``.

``SILMM_FAST_BACKEND=auto|triton|triton_gemm|cpp|torch|reference`` (or the ``use_backend`` context manager, which wins
over the variable) forces a choice. A forced backend that an op does not have falls back to that op's ``auto``
choice; a forced backend that the op has but that cannot run on the tensor's device raises, so a forced choice is
never silently ignored.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "triton_gemm", "cpp", "torch", "reference")
ENV_VAR = "SILMM_FAST_BACKEND"

# op name -> implementations it offers, in auto's order of preference
OPS: dict[str, tuple[str, ...]] = {
    "gather_logprobs": ("triton", "torch", "reference"),
    "sequence_logprobs": ("triton", "torch", "reference"),
    "fused_linear_logprobs": ("triton", "torch", "reference", "triton_gemm"),
    "fused_linear_dpo": ("triton", "torch", "reference"),
    "pairwise_distance": ("triton", "torch", "reference"),
    "diverse_select": ("cpp", "reference"),
    "sample_tokens": ("triton", "torch", "reference"),
}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("silmm_fast_backend", default=None)


def requested_backend() -> str:
    """The backend asked for by ``use_backend`` or ``SILMM_FAST_BACKEND`` (``auto`` if neither)."""
    value = _override.get() or os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; expected one of {BACKENDS}")
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op call inside the block (thread- and task-local)."""
    if name not in BACKENDS:
        raise ValueError(f"name: expected one of {BACKENDS}, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return None
    return triton.__version__


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device``, and why not."""
    if triton_version() is None:
        return False, "triton is not importable"
    if device.type == "cuda":
        if interpreter_enabled():
            return False, "TRITON_INTERPRET=1 runs kernels on the CPU only"
        return True, ""
    if device.type == "cpu":
        if interpreter_enabled():
            return True, ""
        return False, "CPU tensors need TRITON_INTERPRET=1 for Triton (the interpreter; tests only)"
    return False, f"no Triton support for device type {device.type!r}"


def cpp_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the C++ extension is loaded (or loadable) for tensors of ``device``."""
    from silmm_fast import _ext

    return _ext.usable(device)


_CHECKS: dict[str, Callable[[torch.device], tuple[bool, str]]] = {
    "triton": triton_usable,
    "triton_gemm": triton_usable,
    "cpp": cpp_usable,
    "torch": lambda device: (True, ""),
    "reference": lambda device: (True, ""),
}


def choose(op: str, device: torch.device | str) -> str:
    """The implementation that serves ``op`` for tensors on ``device``."""
    if op not in OPS:
        raise KeyError(f"op: unknown op {op!r}; known: {sorted(OPS)}")
    device = torch.device(device)
    offered = OPS[op]
    requested = requested_backend()
    if requested != "auto" and requested in offered:
        ok, why = _CHECKS[requested](device)
        if not ok:
            raise RuntimeError(f"{op}: backend {requested!r} was forced but cannot run on {device}: {why}")
        return requested
    for name in offered:
        if name == "triton_gemm" or (name == "triton" and device.type == "cpu"):
            continue  # auto never picks the interpreter: it is a correctness tool, ~1000x slower than torch
        if _CHECKS[name](device)[0]:
            return name
    return offered[-1]


def describe(device: torch.device | str) -> dict[str, str]:
    """Per op, the implementation ``choose`` picks for ``device`` right now. Never compiles the C++ extension: an
    op whose choice depends on a build not tried yet in this process reads "cpp (built on first use)"."""
    from silmm_fast import _ext

    out = {}
    for op in OPS:
        if "cpp" in OPS[op] and not _ext.tried() and requested_backend() in ("auto", "cpp"):
            out[op] = "cpp (built on first use; reference if the build fails)"
            continue
        try:
            out[op] = choose(op, device)
        except RuntimeError as err:
            out[op] = f"error: {err}"
    return out
