"""`env_report()`: which implementation serves each op here, library versions and devices."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from silmm_fast import _backend


def env_report(print_report: bool = True) -> dict:
    """Describe this environment: versions, devices, and per op the backend ``auto`` picks for CPU and CUDA tensors.

    Returns the report as a dict; prints it as text unless ``print_report`` is False.
    """
    try:  # the installed version, read without importing it (transformers is not a core dependency)
        transformers_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers_version = None
    from silmm_fast import _ext

    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _backend.triton_version(),
        "triton_interpret": _backend.interpreter_enabled(),
        "transformers": transformers_version,
        "requested_backend": _backend.requested_backend(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpp_extension": _ext.status(),
        "ops": {"cpu": _backend.describe("cpu")},
    }
    if torch.cuda.is_available():
        report["ops"]["cuda"] = _backend.describe("cuda")
    if print_report:
        print(format_report(report))
    return report


def format_report(report: dict) -> str:
    """``env_report``'s dict as the text it prints: one line per version or device, then each op's backend."""
    lines = ["silmm_fast environment"]
    for key in (
        "python",
        "platform",
        "torch",
        "torch_cuda",
        "triton",
        "triton_interpret",
        "transformers",
        "requested_backend",
        "cuda_device",
        "cpp_extension",
    ):
        lines.append(f"  {key:<18} {report[key]}")
    for device, ops in report["ops"].items():
        lines.append(f"  backends for {device} tensors:")
        lines.extend(f"    {op:<24} {impl}" for op, impl in ops.items())
    return "\n".join(lines)
