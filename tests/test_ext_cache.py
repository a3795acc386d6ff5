"""The C++ extension is neither built nor loaded from a cache folder that others can write (docs/trust.md)."""

import os
import warnings

import pytest

from silmm_fast import _ext

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def _fresh(monkeypatch, root):
    monkeypatch.setenv("SILMM_FAST_CACHE", str(root))
    monkeypatch.delenv("SILMM_FAST_NO_EXT", raising=False)
    monkeypatch.setattr(_ext, "_state", {"module": None, "error": None, "tried": False})


@pytest.mark.parametrize("mode, who", [(0o777, "others"), (0o770, "its group"), (0o703, "others")])
def test_writable_cache_root_is_refused_before_any_build(tmp_path, monkeypatch, mode, who):
    import torch.utils.cpp_extension as cpp_extension

    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(mode)
    _fresh(monkeypatch, root)

    def no_build(*args, **kwargs):
        raise AssertionError("the extension must not be built in an unsafe cache")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ext.load() is None
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    message = str(warning.message)
    assert f"{root} is writable by {who}" in message and "chmod go-w" in message
    assert "unsafe cache" in _ext.status()
    assert not (root / "ext").exists()


def test_writable_folder_below_the_root_and_library_are_refused(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path / "cache")
    out = _ext.build_dir(_ext.sources())
    assert _ext.unsafe_cache_path(out) is None  # nothing exists yet: nothing to refuse
    for folder in _ext._cache_folders(out):
        folder.mkdir(mode=0o700)
    assert _ext.unsafe_cache_path(out) is None
    (out.parent).chmod(0o777)
    assert f"{out.parent} is writable by others" in _ext.unsafe_cache_path(out)
    out.parent.chmod(0o700)
    library = out / "silmm_fast_C.so"
    library.write_bytes(b"")
    library.chmod(0o775)  # group-writable inside private folders: out of the group's reach
    assert _ext.unsafe_cache_path(out) is None
    library.chmod(0o757)
    assert f"{library} is writable by others" in _ext.unsafe_cache_path(out)


def test_missing_folders_are_created_private(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    root = tmp_path / "cache"
    _fresh(monkeypatch, root)
    old = os.umask(0o002)  # a umask that would leave new folders group-writable
    try:
        monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert _ext.load() is None
    finally:
        os.umask(old)
    out = _ext.build_dir(_ext.sources())
    assert [f.stat().st_mode & 0o777 for f in _ext._cache_folders(out)] == [0o700] * 3
