"""Helpers every kernel file's launchers share (torch and triton only, like the kernels)."""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl


def interpreted() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``: tests on small shapes)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(device: torch.device):
    """Launch on the tensor's GPU (Triton launches on the current CUDA device); nothing to do for CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def acc_types(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The accumulation dtype for inputs of ``dtype``, as (torch dtype, triton dtype): float64 for float64, else
    float32 (half-precision inputs accumulate in float32)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)
