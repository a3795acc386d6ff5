"""Optional parts of silmm_fast and the extras that install them.

The core (every public op and loss in ``silmm_fast``) needs torch, numpy and triton only. The SILMM loop and its
built-in world (``silmm_fast.loop.train``, ``models``, ``adapters``, ``world``) need the ``[loop]`` extra; the TRL
integration (``silmm_fast.integrations.trl``) needs ``[trl]``. Importing a loop package without its extra raises an
``ImportError`` that names the extra and the missing distributions, instead of a bare "No module named 'yaml'" from
somewhere inside it: ``install_loop_guard`` puts a finder on ``sys.meta_path`` that only looks at those four package
names, checks the extra's modules are findable, and otherwise lets the normal import machinery do the work.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

# import name -> distribution name, for the [loop] extra
LOOP_MODULES: dict[str, str] = {
    "transformers": "transformers",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
}
LOOP_PACKAGES = ("silmm_fast.loop.train", "silmm_fast.loop.models", "silmm_fast.loop.adapters", "silmm_fast.loop.world")
TRL_MODULES: dict[str, str] = {"trl": "trl", "transformers": "transformers", "datasets": "datasets"}


def missing(modules: dict[str, str]) -> list[str]:
    """Distribution names of the ``modules`` (import name -> distribution) that cannot be imported here."""
    out = []
    for name, dist in modules.items():
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(dist)
    return out


def require(extra: str, modules: dict[str, str], what: str) -> None:
    """Raise ``ImportError`` naming ``extra`` when any of ``modules`` is missing; ``what`` says what needs them."""
    absent = missing(modules)
    if absent:
        raise ImportError(
            f"{what} needs the [{extra}] extra (missing: {', '.join(absent)}); "
            f"install it with: pip install 'silmm_fast[{extra}]'",
            name=what,
        )


class _LoopExtraFinder(importlib.abc.MetaPathFinder):
    """Checks the [loop] extra before one of ``LOOP_PACKAGES`` is imported; finds nothing itself."""

    def find_spec(self, fullname, path, target=None):  # noqa: D401 - importlib protocol
        if fullname in LOOP_PACKAGES:
            require("loop", LOOP_MODULES, fullname)
        return None


def install_loop_guard() -> None:
    """Put the [loop] check in front of the import machinery once per process (idempotent)."""
    if not any(isinstance(f, _LoopExtraFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LoopExtraFinder())
