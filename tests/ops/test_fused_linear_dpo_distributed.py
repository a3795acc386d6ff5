"""FusedLinearDPOLoss under real torchrun (two CPU processes, gloo): its gradients, formed in the forward and
returned by plain autograd Functions, reach DDP's and FSDP2's gradient reduction, so two processes train exactly like
one (float64; only the order of the gradient sums differs). Launches tests/ops/fused_dpo_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "fused_dpo_worker.py"


def torchrun(nproc: int, strategy: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), strategy, str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return torchrun(1, "ddp", tmp_path_factory.mktemp("one") / "state.pt")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_like_one(tmp_path, one_process, strategy):
    two = torchrun(2, strategy, tmp_path / "two.pt")
    assert one_process.keys() == two.keys()
    for name in one_process:
        torch.testing.assert_close(two[name], one_process[name], rtol=0, atol=1e-12, msg=name)


def test_worker_trains_away_from_the_initial_weights(one_process):
    """The comparison above is not vacuous: the steps move every parameter."""
    sys.path.insert(0, str(WORKER.parent))
    import fused_dpo_worker as worker

    torch.manual_seed(0)
    initial = worker.Policy().double().state_dict()
    for name, value in initial.items():
        assert (one_process[name] - value).abs().max() > 1e-3, name
