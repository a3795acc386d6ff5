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


# --- the core library apart from the SILMM testbed (silmm_fast.loop) -------------------------------------------------

CORE_DEPENDENCIES = {"torch", "numpy", "triton", "silmm_fast"}
# parts that are not the core: the testbed and trainer integrations (behind their extras); the package facade's only
# reference to the testbed is the lazily loaded, standard-library-only ``decompose_prompt``
NOT_CORE = ("silmm_fast/loop/", "silmm_fast/integrations/")


def _core_modules() -> list[Path]:
    files = sorted((ROOT / "silmm_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return [f for f in files if not any(f.relative_to(ROOT).as_posix().startswith(p) for p in NOT_CORE)]


def _imports(path: Path) -> list[str]:
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


def test_core_modules_import_neither_the_testbed_nor_optional_dependencies():
    assert len(_core_modules()) > 20
    bad = []
    for path in _core_modules():
        rel = path.relative_to(ROOT).as_posix()
        for name in _imports(path):
            root = name.split(".")[0]
            testbed = name == "silmm_fast.loop" or name.startswith("silmm_fast.loop.")
            if testbed and not (rel == "silmm_fast/__init__.py" and name == "silmm_fast.loop.decompose"):
                bad.append(f"{rel}: imports the testbed ({name})")
            elif not testbed and root not in CORE_DEPENDENCIES and root not in sys.stdlib_module_names:
                bad.append(f"{rel}: imports {name}, which the core install does not have")
    assert not bad, "\n".join(bad)


def test_the_check_above_sees_a_testbed_import(tmp_path):
    # the scan must not pass vacuously: a file importing the testbed is reported
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom silmm_fast.loop.world import scene\nif True:\n    import transformers\n")
    assert _imports(probe) == ["os", "silmm_fast.loop.world", "transformers"]


def test_importing_the_core_loads_nothing_from_the_testbed():
    result = _run_at_root(
        "import sys, silmm_fast, silmm_fast.ops, silmm_fast.losses, silmm_fast.reference, silmm_fast.dropdiv\n"
        "print(sorted(m for m in sys.modules if m.startswith('silmm_fast.loop')))\n"
        "silmm_fast.decompose_prompt('a red cube')\n"
        "print(sorted(m for m in sys.modules if m.startswith('silmm_fast.loop'))[:1])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "['silmm_fast.loop']"]


def test_old_module_paths_give_the_moved_modules_with_a_future_warning():
    result = _run_at_root(
        "import warnings\n"
        "warnings.simplefilter('error', FutureWarning)\n"
        "import silmm_fast.train, silmm_fast.loop.train as new\n"  # the command's name stays, silently
        "print(silmm_fast.train is new)\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    from silmm_fast.world.scene import Scene\n"
        "from silmm_fast.loop.world.scene import Scene as Moved\n"
        "print(Scene is Moved, [str(w.message).split(';')[0] for w in seen if w.category is FutureWarning])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "True",
        "True ['silmm_fast.world moved to silmm_fast.loop.world', "
        "'silmm_fast.world.scene moved to silmm_fast.loop.world.scene']",
    ]


def test_the_loop_command_keeps_its_name():
    for module in ("silmm_fast.train", "silmm_fast.loop"):
        result = subprocess.run(
            [sys.executable, "-W", "error::FutureWarning", "-m", module, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: python -m silmm_fast.train")
