"""Package layout: the top-level folders `kernels/` (Triton kernels) and `csrc/` (C++ sources) install as
`silmm_fast.kernels` and `silmm_fast.csrc`, so no top-level `kernels` package collides with the PyPI package of that
name. Everything else is in pyproject.toml.

The C++ extension `silmm_fast._C` is compiled here when torch is importable in the build environment: a wheel built
with `pip wheel --no-build-isolation .` (or `pip install --no-build-isolation .`) carries it, built against the
installed torch, with the CUDA kernels where that torch is a CUDA build and nvcc is found. pip's default isolated
build has no torch (declaring one there would pull a second, possibly CUDA, torch of another ABI), so such installs,
and editable ones, build the extension on first use instead (`silmm_fast._ext`, `python -m silmm_fast.build_ext`).
The extension is optional: a failed compile leaves a pure-Python install. `SILMM_FAST_BUILD_EXT=0` skips it.
"""

import json
import os
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup


def extension() -> dict:
    """``ext_modules`` / ``cmdclass`` for silmm_fast._C, or nothing when torch is not importable here."""
    if os.environ.get("SILMM_FAST_BUILD_EXT", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}
    cpp = sorted(glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob("csrc/**/*.cu", recursive=True))
    cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None
    # the flags of silmm_fast._ext's build on first use: no fused multiply-add, so the kernels round like the
    # PyTorch references
    flags = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"] + (["-DSILMM_WITH_CUDA"] if cuda else [])}
    if cuda:
        flags["nvcc"] = ["-O3", "--fmad=false", "-DSILMM_WITH_CUDA"]
    make = CUDAExtension if cuda else CppExtension
    ext = make(
        "silmm_fast._C",
        cpp + (cu if cuda else []),
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
        optional=True,
    )

    class BuildExt(BuildExtension):
        def build_extension(self, ext):
            super().build_extension(ext)
            # what the library was built against: silmm_fast._ext loads it only for this torch version (and only
            # where CUDA kernels are wanted if it has them); otherwise it builds on first use
            info = Path(self.get_ext_fullpath(ext.name)).with_name("_C_build.json")
            info.write_text(json.dumps({"torch": torch.__version__, "cuda": cuda}))

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt}}


setup(
    packages=find_packages(include=["silmm_fast", "silmm_fast.*"]) + ["silmm_fast.kernels", "silmm_fast.csrc"],
    package_dir={"silmm_fast.kernels": "kernels", "silmm_fast.csrc": "csrc"},
    package_data={"silmm_fast.csrc": ["*.cpp", "*/*.h", "*/*.cpp", "*/*.cu"], "silmm_fast": ["py.typed"]},
    include_package_data=False,
    **extension(),
)
