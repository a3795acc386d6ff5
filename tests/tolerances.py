"""The one tolerance table for comparisons against float64 references (STYLE.md). Widening an entry at a call site
needs a comment saying why."""

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """rtol/atol for results computed from ``dtype`` inputs; ``scale`` multiplies atol for outputs that are sums
    over many terms (the floor is sized to the output, STYLE.md)."""
    t = dict(TOLERANCES[dtype])
    t["atol"] *= scale
    return t


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype, scale))
