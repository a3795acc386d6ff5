"""Old import paths of the modules that moved into ``silmm_fast.loop``, kept working.

The SILMM loop and its world lived at ``silmm_fast.train``, ``silmm_fast.adapters``, ``silmm_fast.models``,
``silmm_fast.world`` and ``silmm_fast.decompose`` before they moved under ``silmm_fast.loop``. A finder on
``sys.meta_path`` answers those names (and their submodules) with the moved module itself, so objects keep one
identity whichever path imported them. ``silmm_fast.train`` stays a permanent name (it is the loop's command,
``python -m silmm_fast.train``); the others give one ``FutureWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

MOVED = ("train", "adapters", "models", "world", "decompose")
_OLD = "silmm_fast."
_NEW = "silmm_fast.loop."
_PERMANENT = "silmm_fast.train"


def new_name(fullname: str) -> str | None:
    """The ``silmm_fast.loop`` name of an old module path, or None when ``fullname`` did not move."""
    if not fullname.startswith(_OLD):
        return None
    head = fullname[len(_OLD) :].split(".", 1)[0]
    return _NEW + fullname[len(_OLD) :] if head in MOVED else None


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the module at its new name (the same object), and gives ``python -m`` its code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        old = spec.name
        if old != _PERMANENT and not old.startswith(_PERMANENT + "."):
            warnings.warn(
                f"{old} moved to {self.target}; import it from there (the old path will be removed)",
                FutureWarning,
                stacklevel=2,
            )
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target module ran when it was imported
        pass

    def get_code(self, fullname: str):  # runpy: python -m silmm_fast.train
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        found = importlib.util.find_spec(new)
        if found is None:
            return None
        return importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(new), is_package=found.submodule_search_locations is not None
        )


def install() -> None:
    """Answer the old paths from now on in this process (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
