"""Test configuration. Without a GPU, the Triton kernels run under the interpreter: TRITON_INTERPRET is read when
`@triton.jit` decorates, so it is set here, before any test imports silmm_fast.kernels."""

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run ("repeatable"), so a CI result can be reproduced; a bug one of
# them finds becomes an @example. HYPOTHESIS_PROFILE=explore draws fresh examples each run to hunt for new ones.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests choose backends explicitly; a developer's shell variable must not change what they test.
os.environ.pop("SILMM_FAST_BACKEND", None)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def backend_device(backend: str) -> torch.device:
    """Where a test puts the tensors it hands to ``backend``: CUDA for "triton" when present (there Triton cannot read
    CPU tensors), else the CPU (the Triton interpreter here; every other backend everywhere). Tests build inputs and
    float64 references on the CPU, move what the op reads with ``.to(backend_device(backend))`` (a no-op on the CPU)
    and bring results back with ``.cpu()`` to compare. Import it with ``from conftest import backend_device``."""
    return torch.device("cuda" if backend == "triton" and HAS_CUDA else "cpu")


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else CPU under the Triton interpreter."""
    return backend_device("triton")
