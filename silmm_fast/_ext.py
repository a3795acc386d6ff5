"""The C++ extension ``silmm_fast._C``: built at install time where the build environment has torch (setup.py; a
wheel carries it, with ``_C_build.json`` saying which torch and whether CUDA kernels are in), else compiled on first
use (or by ``python -m silmm_fast.build_ext``) into a cache folder keyed by the torch version and a hash of the
sources, so a new torch or an edited source rebuilds and an unchanged one loads in about a second. The installed
library is used when it was built against this torch (and has the CUDA kernels where they are wanted); otherwise the
build on first use. A failed build leaves the package working through the reference path, with one warning.

Cache root: ``$SILMM_FAST_CACHE`` or ``~/.cache/silmm_fast``. ``SILMM_FAST_NO_EXT=1`` disables the extension.

Loading a shared library runs its code: whoever can write into the cache can run code in this process. So the
extension is neither built nor loaded from a cache whose folders (the cache root down to the build folder) are
writable by group or others, whose library is writable by others, or where either belongs to another user; the
package then works through the reference path, with one warning naming the path (docs/trust.md). Missing folders
are created private (0700).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import stat
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "error": None, "tried": False}


def source_dir() -> Path:
    import silmm_fast.csrc as csrc

    return Path(csrc.__file__).parent


def sources(with_cuda: bool | None = None) -> list[Path]:
    """C++ sources (and CUDA sources where a CUDA build of torch can compile them)."""
    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and torch.cuda.is_available()
    root = source_dir()
    files = sorted(root.glob("**/*.cpp"))
    if with_cuda:
        files += sorted(root.glob("**/*.cu"))
    return files


def cache_root() -> Path:
    return Path(os.environ.get("SILMM_FAST_CACHE", Path.home() / ".cache" / "silmm_fast"))


def build_dir(files: list[Path]) -> Path:
    digest = hashlib.sha256()
    for f in sorted(source_dir().glob("**/*")):
        if f.is_file() and f.suffix in (".cpp", ".h", ".cu"):
            digest.update(f.relative_to(source_dir()).as_posix().encode())
            digest.update(f.read_bytes())
    digest.update(" ".join(sorted(p.suffix for p in files)).encode())
    tag = f"torch-{torch.__version__}-{digest.hexdigest()[:16]}"
    return cache_root() / "ext" / tag


def unsafe_cache_path(out: Path) -> str | None:
    """Why the build folder ``out`` (under ``cache_root()``) is not safe to load compiled code from, or None.

    Every existing folder from the cache root down to ``out`` must belong to the current user and be writable by
    no one else; a built library there must belong to the user and not be writable by others (a group-writable file
    in a private folder is out of the group's reach). POSIX only (elsewhere: None)."""
    if os.name != "posix":
        return None
    folders = _cache_folders(out)
    libraries = sorted(out.glob("*.so")) if out.is_dir() else []
    for path in [*folders, *libraries]:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_mode & (stat.S_IWOTH if path in libraries else stat.S_IWGRP | stat.S_IWOTH):
            return (
                f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run 'chmod go-w {path}' or set SILMM_FAST_CACHE to a "
                "private folder"
            )
        if st.st_uid != os.getuid():
            return f"{path} belongs to another user (uid {st.st_uid}); set SILMM_FAST_CACHE to a folder of your own"
    return None


def _cache_folders(out: Path) -> list[Path]:
    """The cache root and every folder below it down to ``out``, outermost first."""
    root = cache_root()
    return [root, *(p for p in reversed(out.parents) if root in p.parents), out]


def load_installed(files: list[Path]) -> ModuleType | None:
    """``silmm_fast._C`` as installed with the package (setup.py), when its ``_C_build.json`` matches this torch
    and it has CUDA kernels if ``files`` has CUDA sources; None otherwise (then the build on first use serves)."""
    info_path = Path(__file__).with_name("_C_build.json")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    if info.get("torch") != torch.__version__:
        return None
    if any(f.suffix == ".cu" for f in files) and not info.get("cuda"):
        return None
    try:
        return importlib.import_module("silmm_fast._C")
    except ImportError:
        return None


def load(verbose: bool = False) -> ModuleType | None:
    """Build (if needed) and load the extension; None (with one warning) when it cannot be built."""
    with _lock:
        if _state["tried"]:
            return _state["module"]  # type: ignore[return-value]
        _state["tried"] = True
        if os.environ.get("SILMM_FAST_NO_EXT") == "1":
            _state["error"] = "disabled by SILMM_FAST_NO_EXT=1"
            return None
        files = sources()
        if not files:
            _state["error"] = f"no C++ sources under {source_dir()}"
            return None
        installed = load_installed(files)
        if installed is not None:
            _state["module"] = installed
            return installed
        try:
            out = build_dir(files)
            unsafe = unsafe_cache_path(out)
        except OSError as err:  # sources or cache unreadable: degrade like a failed build
            out, unsafe = None, f"{type(err).__name__}: {err}"
        if unsafe is not None:
            _state["error"] = f"unsafe cache: {unsafe}" if out is not None else unsafe
            warnings.warn(
                f"silmm_fast: the C++ extension is not loaded ({_state['error']}); "
                "falling back to the pure-PyTorch reference implementations.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        try:
            from torch.utils.cpp_extension import load as cpp_load

            cache_root().parent.mkdir(parents=True, exist_ok=True)  # above the cache root: the user's own folders
            for folder in _cache_folders(out):
                folder.mkdir(mode=0o700, exist_ok=True)
            cuda = any(f.suffix == ".cu" for f in files)
            module = cpp_load(
                name="silmm_fast_C",
                sources=[str(f) for f in files],
                build_directory=str(out),
                # -ffp-contract=off / --fmad=false: no fused multiply-add, so the kernels round exactly like the
                # pure-PyTorch references (diverse_select must pick the same indices on every path)
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"] + (["-DSILMM_WITH_CUDA"] if cuda else []),
                extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=["-O3", "--fmad=false"],
                with_cuda=cuda,
                verbose=verbose,
            )
        except Exception as err:  # noqa: BLE001 - any build failure degrades to the reference path
            _state["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}"
            warnings.warn(
                f"silmm_fast: the C++ extension could not be built ({_state['error']}); "
                "falling back to the pure-PyTorch reference implementations.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        _state["module"] = module
        return module


def usable(device: torch.device) -> tuple[bool, str]:
    if device.type not in ("cpu", "cuda"):
        return False, f"no C++ kernels for device type {device.type!r}"
    if load() is None:
        return False, str(_state["error"])
    if device.type == "cuda" and not any(f.suffix == ".cu" for f in sources()):
        return False, "extension built without CUDA sources"
    return True, ""


def tried() -> bool:
    """Whether this process has already tried to load (or build) the extension."""
    return bool(_state["tried"])


def status() -> str:
    """One line for env_report; never triggers a build."""
    if _state["module"] is not None:
        return f"loaded ({_state['module'].__file__})"
    if _state["error"] is not None:
        return f"unavailable: {_state['error']}"
    return f"not built in this process yet (cache: {cache_root() / 'ext'})"
