"""The loop's structure: ``RunDir.step`` (skip a done step by loading its result, save and mark a new one, use a
value computed here without reading it back), and a loop that reaches models only through the adapter protocol and
the factory (no concrete adapter, no method looked up by name, no side channel)."""

import ast
import json
import time
from pathlib import Path

import pytest

from silmm_fast.loop.train import store
from silmm_fast.loop.train.config import from_dict
from silmm_fast.loop.train.distributed import Dist
from silmm_fast.loop.train.rundir import RunDir

TRAIN = Path(__file__).resolve().parents[3] / "silmm_fast" / "loop" / "train"


def open_run(path) -> RunDir:
    return RunDir(from_dict({"out": str(path)}).validate(), Dist()).open(n_heldout=240)


def unreachable():
    raise AssertionError("must not be called")


def test_step_computes_saves_marks_and_returns_the_value_in_memory(tmp_path):
    rd = open_run(tmp_path / "run")
    value = {"rows": [1, 2, 3]}
    saved = []

    def save(v):
        saved.append(v)
        store.write_json(rd.iter_dir(1) / "thing.json", v)

    out = rd.step(1, "thing", lambda: value, save, unreachable)  # load is never called for a value computed here
    assert out is value and saved == [value]
    state = json.loads((rd.path / "state.json").read_text())
    assert state["done"] == ["iter1/thing"]
    assert list(state["files"]["iter1/thing"]) == ["iter1/thing.json"]  # its checksum, for a later resume
    assert "thing" in store.read_json(rd.iter_dir(1) / "timings.json")


def test_step_done_loads_the_saved_result_without_computing(tmp_path):
    rd = open_run(tmp_path / "run")
    rd.step(1, "thing", lambda: [1, 2], lambda v: store.write_json(rd.iter_dir(1) / "thing.json", v), unreachable)
    again = open_run(tmp_path / "run")  # a rerun of the same command
    loaded = again.step(1, "thing", unreachable, unreachable, lambda: store.read_json(again.iter_dir(1) / "thing.json"))
    assert loaded == [1, 2]


def test_step_that_fails_is_not_marked_and_runs_again(tmp_path):
    rd = open_run(tmp_path / "run")

    def crash():
        raise RuntimeError("killed mid-step")

    with pytest.raises(RuntimeError):
        rd.step(1, "thing", crash, unreachable, unreachable)
    assert not rd.is_done(1, "thing") and not (rd.path / "state.json").exists()
    assert open_run(tmp_path / "run").step(1, "thing", lambda: 7, lambda v: None, unreachable) == 7


def test_step_done_on_rank_0_reaches_the_other_ranks_by_broadcast(tmp_path):
    """A rank other than 0 never reads the directory: it gets rank 0's loaded value through the collective."""
    open_run(tmp_path / "run").step(1, "thing", lambda: 5, lambda v: None, unreachable)

    class Rank1(Dist):
        def broadcast(self, obj):
            assert obj == (None, None)  # rank 1 passes nothing: it did not load
            return (None, "rank 0's value")  # rank 0's (error message, value)

    rd = RunDir(from_dict({"out": str(tmp_path / "run")}).validate(), Rank1(rank=1, world_size=2))
    rd.state = store.RunState(rd.path, done=["iter1/thing"], persist=False)
    assert rd.step(1, "thing", unreachable, unreachable, unreachable) == "rank 0's value"


# --- the loop names no concrete model -------------------------------------------------------------------------------
CONCRETE = {"JanusAdapter", "ShapesAdapter", "ShapesLMM", "ShapesLMMConfig", "bootstrap", "recipe", "random_janus"}


def _tree(name: str) -> ast.Module:
    return ast.parse((TRAIN / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in TRAIN.glob("*.py")))
def test_train_modules_import_no_concrete_adapter_or_model(name):
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert not module.startswith(("silmm_fast.loop.adapters.janus", "silmm_fast.loop.adapters.shapes")), name
            assert not module.startswith("silmm_fast.loop.models.shapes_lmm"), name
            imported = {a.name for a in node.names}
            assert not imported & CONCRETE, f"{name} imports {imported & CONCRETE} from {module}"
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("silmm_fast.loop.models") for a in node.names), name


@pytest.mark.parametrize("name", ["loop.py", "phases.py", "rundir.py", "distributed.py"])
def test_loop_calls_no_method_by_name_and_reads_no_side_channel(name):
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("getattr", "setattr"), f"{name}, line {node.lineno}: {node.func.id}"
        if isinstance(node, ast.Attribute):
            assert node.attr != "last_sources", f"{name}, line {node.lineno}"


# --- rank 0's failures reach every rank -----------------------------------------------------------------------------
def _from_main_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two real gloo processes: rank 0's ``fn`` fails; each rank writes what it raised."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    d = Dist(rank=rank, world_size=2)

    def fn():
        raise OSError("No space left on device")

    try:
        d.from_main(fn)
        outcome = "returned"
    except Exception as err:  # noqa: BLE001 - what each rank raised is the test's result
        outcome = f"{type(err).__name__}: {err}"
    assert d.from_main(lambda: "next") == "next"  # the group is still usable afterwards
    Path(out_dir, f"rank{rank}").write_text(outcome)
    tdist.barrier()
    tdist.destroy_process_group()


def test_a_failure_on_rank_0_stops_every_rank_instead_of_leaving_them_waiting(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _from_main_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):  # False until every process has exited (it returns as each one does)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank is still waiting after rank 0 failed")
    assert (tmp_path / "rank0").read_text() == "OSError: No space left on device"
    assert (tmp_path / "rank1").read_text() == (
        "RuntimeError: rank 0 failed (OSError: No space left on device); this rank stops with it"
    )


def test_step_on_another_rank_raises_when_rank_0_could_not_load(tmp_path):
    open_run(tmp_path / "run").step(1, "thing", lambda: 5, lambda v: None, unreachable)

    class Rank1(Dist):
        def broadcast(self, obj):
            return ("FileNotFoundError: metrics.jsonl", None)  # what rank 0 sends when its load failed

    rd = RunDir(from_dict({"out": str(tmp_path / "run")}).validate(), Rank1(rank=1, world_size=2))
    rd.state = store.RunState(rd.path, done=["iter1/thing"], persist=False)
    with pytest.raises(RuntimeError, match=r"rank 0 failed \(FileNotFoundError: metrics.jsonl\)"):
        rd.step(1, "thing", unreachable, unreachable, unreachable)
