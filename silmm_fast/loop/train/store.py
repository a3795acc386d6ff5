"""The run directory: atomic writes and the record of completed steps that makes a run resumable.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed over the target, so a
reader (or a resumed run) sees the old file or the new one, never half of one. ``state.json`` lists the completed
steps; a step is marked only after all its files are written, so a crash at any point costs at most the step that
was running, and a resumed run redoes exactly that step (with the same random stream, hence the same result).
The state also holds the sha256 of every file a done step wrote; a resumed run redoes a step whose files changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

TMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (mkstemp's files are 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    note(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, _file_mode())  # the run's files readable like the folders around them
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_bytes(Path(path), text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON file ({err}); the run directory is damaged") from None


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-empty line of ``path``; ValueError naming the file and line for a bad line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({err}); the run directory is damaged"
                ) from None
    return rows


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, buf)
    _atomic_bytes(Path(path), buf.getvalue())


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors saved by ``write_tensors``; ValueError naming the file when it cannot be read back."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a readable tensor file ({err}); the run directory is damaged") from None


def write_png(path: Path, image: Any) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    _atomic_bytes(Path(path), buf.getvalue())


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that writes interrupted by a crash left under
    ``run_dir``; returns them. Call only while no other process writes the run directory."""
    orphans = [p for p in Path(run_dir).rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in orphans:
        p.unlink(missing_ok=True)
    return orphans


_recording: list[set[Path]] = []  # the open ``recording()`` blocks, innermost last


class recording:
    """``with recording() as written:`` collects the paths this process writes (or ``note``s) inside the block."""

    def __enter__(self) -> set[Path]:
        _recording.append(set())
        return _recording[-1]

    def __exit__(self, *exc: object) -> None:
        _recording.pop()


def note(path: Path) -> None:
    """Count ``path`` (a file or a folder, e.g. a checkpoint written by a model's own save) as written."""
    for written in _recording:
        written.add(Path(path))


def digest(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files (their relative names and contents, in name order); None when it
    does not exist."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    elif path.is_file():
        h.update(path.read_bytes())
    else:
        return None
    return h.hexdigest()


class RunState:
    """Completed steps of a run, persisted in ``state.json`` (keys like ``"iter1/generate"``), with the checksums
    of the files each step wrote (``files``: step -> {path relative to the run directory: sha256}).

    On several processes only rank 0 reads and writes the file (``persist``); the others are handed rank 0's list
    (``done``) and keep theirs in step in memory.
    """

    def __init__(self, run_dir: Path, done: list[str] | None = None, persist: bool = True) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / "state.json"
        self.persist = persist
        self.files: dict[str, dict[str, str]] = {}
        if done is None:
            saved = read_json(self.path) if self.path.exists() else {"done": []}
            done, self.files = saved["done"], saved.get("files", {})
        self.done: list[str] = list(done)

    def is_done(self, step: str) -> bool:
        return step in self.done

    def record(self, step: str, written: set[Path]) -> None:
        """Remember the checksums of the files ``step`` wrote; saved when the step is marked done."""
        self.files[step] = {
            str(p.relative_to(self.dir)): digest(p) for p in sorted(written) if p.is_relative_to(self.dir)
        }

    def mark(self, step: str) -> None:
        if step not in self.done:
            self.done.append(step)
            if self.persist:
                write_json(
                    self.path, {"done": self.done, "files": {k: v for k, v in self.files.items() if k in self.done}}
                )

    def damaged(self) -> tuple[str, str] | None:
        """The first done step (in the order they were done) one of whose recorded files is missing or changed,
        and that file; None when all match. Steps done before checksums were recorded are not checked."""
        for step in self.done:
            for name, sha in self.files.get(step, {}).items():
                if digest(self.dir / name) != sha:
                    return step, name
        return None

    def undo_from(self, step: str) -> None:
        """Forget ``step`` and every step done after it (they may have read its files), so that they run again."""
        self.done = self.done[: self.done.index(step)]
        self.files = {k: v for k, v in self.files.items() if k in self.done}
        if self.persist:
            write_json(self.path, {"done": self.done, "files": self.files})
