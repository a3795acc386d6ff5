"""Package layout: the top-level folders `kernels/` (Triton kernels) and `csrc/` (C++ sources, compiled on first
use or by `python -m silmm_fast.build_ext`) install as `silmm_fast.kernels` and `silmm_fast.csrc`, so no top-level
`kernels` package collides with the PyPI package of that name. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["silmm_fast", "silmm_fast.*"]) + ["silmm_fast.kernels", "silmm_fast.csrc"],
    package_dir={"silmm_fast.kernels": "kernels", "silmm_fast.csrc": "csrc"},
    package_data={"silmm_fast.csrc": ["*.cpp", "*/*.h", "*/*.cpp", "*/*.cu"], "silmm_fast": ["py.typed"]},
    include_package_data=False,
)
