"""``python -m silmm_fast.bench [args]``: run the benchmark suite of the checkout this package was imported from.

The benchmarks are not installed: they live in the repository's ``bench/`` folder, beside the ``silmm_fast/``
package (``bench/suite.py`` documents the arguments, the outputs and the result rows). This launcher finds that folder
from the package's own location and runs ``python -m bench`` there in a child process, with the checkout put first
on the child's ``PYTHONPATH`` and the caller's working directory kept (relative ``--out`` / ``--readme`` paths mean
what they say). A package installed without a checkout has no ``bench/`` beside it: that is a clear error.

Standard library only, so importing this module costs nothing and changes nothing in the importing process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def checkout() -> Path | None:
    """The repository root holding ``bench/suite.py`` beside this package, or None (installed without a checkout)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "bench" / "suite.py").is_file() else None


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m bench *argv`` from the checkout; returns its exit status (2 without a checkout)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    root = checkout()
    if root is None:
        print(
            f"silmm_fast.bench: no bench/suite.py next to the package at {Path(__file__).resolve().parent}: the "
            "benchmarks are not installed with the package; run this from a clone of the repository "
            "(pip install -e . there), or run `python -m bench` in the clone",
            file=sys.stderr,
        )
        return 2
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(root) + (os.pathsep + path if path else "")}
    return subprocess.call([sys.executable, "-m", "bench", *argv], env=env)


if __name__ == "__main__":
    raise SystemExit(main())
