"""``python -m silmm_fast.train`` on user errors: a message naming the file or setting and an exit status (2 for
usage errors), never a traceback, and nothing written that a corrected command would trip over."""

import os

import pytest
import torch

from silmm_fast.loop.train import store
from silmm_fast.loop.train.__main__ import main


def run_main(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_malformed_yaml_config_is_a_usage_error_naming_the_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: [1e-4\n")
    code, err = run_main(["--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.startswith(f"error: config: {path} is not a valid YAML file")
    assert not (tmp_path / "run").exists()


def test_yaml_config_that_is_not_text_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    code, err = run_main(["--config", str(path)], capsys)
    assert code == 2 and f"{path} is not a valid YAML file" in err


@pytest.mark.parametrize("under_file", [False, True])
def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys, under_file):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory\n")
    out = blocker / "run" if under_file else blocker
    code, err = run_main(["--model.tiny", "true", "--out", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: out: expected a writable directory, got {str(out)!r}")
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, err = run_main(["--model.tiny", "true", "--out", str(out)], capsys)
    finally:
        out.chmod(0o700)
    assert code == 2 and "out: expected a writable directory" in err and "Permission denied" in err


def test_damaged_state_file_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text('{"done": ["iter0/ev')
    code, err = run_main(["--model.tiny", "true", "--out", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: {out / 'state.json'}: not a valid JSON file")


def test_json_lines_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": 0}\n{"id": 1, "prom\n')
    with pytest.raises(ValueError, match=rf"^{path}, line 2: not valid JSON"):
        store.read_jsonl(path)


def test_truncated_tensor_file_is_named(tmp_path):
    path = tmp_path / "candidates.pt"
    store.write_tensors(path, {"tokens": torch.arange(1000)})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"^{path}: not a readable tensor file"):
        store.read_tensors(path)


@pytest.mark.parametrize(
    "error, code",
    [(FloatingPointError("iteration 1, train step 1 (epoch 0): the loss is nan"), 1), (OSError(28, "No space"), 1)],
)
def test_run_failures_are_messages(monkeypatch, capsys, error, code):
    import silmm_fast.loop.train

    def fail(cfg):
        raise error

    monkeypatch.setattr(silmm_fast.loop.train, "run", fail)
    got, err = run_main(["--model.tiny", "true", "--out", "unused"], capsys)
    assert got == code and err == f"error: {error}\n"


def test_unwritable_out_is_a_usage_error_even_for_root(tmp_path, capsys, monkeypatch):
    # the read-only case as root sees it: the write check's file cannot be created
    from silmm_fast.loop.train import rundir

    def refuse(dir, prefix, suffix):
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr(rundir.tempfile, "mkstemp", refuse)
    out = tmp_path / "ro"
    code, err = run_main(["--model.tiny", "true", "--out", str(out)], capsys)
    assert code == 2 and err == f"error: out: expected a writable directory, got {str(out)!r} (Permission denied)\n"


def test_run_files_get_the_umask_mode_and_orphan_temporaries_are_removed(tmp_path):
    from silmm_fast.loop.train.config import from_dict
    from silmm_fast.loop.train.distributed import Dist
    from silmm_fast.loop.train.rundir import RunDir

    store.write_json(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    run_dir = tmp_path / "run"
    (run_dir / "iter1").mkdir(parents=True)
    orphan = run_dir / "iter1" / ".scores.jsonl.k2j3h4.tmp"  # left by a write interrupted by a crash
    orphan.write_text("half")
    keep = run_dir / "iter1" / "notes.tmp"  # not one of ours: no leading dot
    keep.write_text("mine")
    RunDir(from_dict({"out": str(run_dir)}).validate(), Dist())._prepare()
    assert not orphan.exists() and keep.exists()
