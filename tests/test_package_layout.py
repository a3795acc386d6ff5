"""The top-level ``kernels/`` folder installs as ``silmm_fast.kernels`` and must never shadow the PyPI package
``kernels`` (a transformers dependency) when Python runs from the checkout's root, as ``make run`` and pytest do."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, like `python -m silmm_fast.train` from the root
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_top_level_kernels_is_the_installed_package_not_our_folder():
    pytest.importorskip("kernels", reason="the PyPI package `kernels` is not installed")
    result = _run_at_root(
        "import kernels, silmm_fast.kernels.sampling as s, transformers.activations\n"
        "print(kernels.__file__); print(s.__file__)"
    )
    assert result.returncode == 0, result.stderr
    top, ours = result.stdout.split()
    assert Path(top).resolve().parent != ROOT / "kernels"
    assert Path(ours).resolve() == ROOT / "kernels" / "sampling.py"


def test_top_level_kernels_absent_is_a_clean_import_error():
    # hide the installed package: our folder must then fail like a missing module, not import itself as `kernels`
    result = _run_at_root(
        "import sys\n"
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
        "print('kernels' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["missing", "kernels", "False"]
