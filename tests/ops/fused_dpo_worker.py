"""What tests/ops/test_fused_linear_dpo_distributed.py launches under torchrun: a small policy (a trunk Linear, then a
Janus-style head Linear → GELU → Linear whose last Linear is fused by ``FusedLinearDPOLoss``) trained for a few SGD
steps on a fixed set of preference pairs, each rank on its contiguous share of the pairs, in two micro-batches per
step (gradient accumulation). Writes the final full state dict to the path given.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/ops/fused_dpo_worker.py STRATEGY OUT.pt

STRATEGY: ``ddp`` (DistributedDataParallel) or ``fsdp2`` (``torch.distributed.fsdp.fully_shard``). The chunk budget
holds one pair, so every micro-batch runs several chunks.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from silmm_fast import FusedLinearDPOLoss

PAIRS, T, H, V, STEPS, MICRO = 8, 6, 16, 40, 3, 2


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(H, H)
        self.head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, V))
        self.loss = FusedLinearDPOLoss(beta=0.5, nll_weight=0.1, chunk_bytes=2 * T * V * 8)

    def forward(self, x, labels, ref_chosen, ref_rejected):
        act = self.head[1](self.head[0](torch.tanh(self.trunk(x))))
        out = self.loss(act, self.head[2].weight, labels, ref_chosen, ref_rejected, bias=self.head[2].bias)
        return out.loss


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * PAIRS, T, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=gen)
    labels[:, :2] = -100
    refs = torch.randn(2, PAIRS, generator=gen, dtype=torch.float64) - 20
    return x, labels, refs[0], refs[1]


def main(strategy: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    policy = Policy().double()
    if strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(policy)
    else:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, labels, ref_c, ref_r = data()
    share = PAIRS // world
    mine = torch.arange(rank * share, (rank + 1) * share)
    for _ in range(STEPS):
        for part in mine.chunk(MICRO):
            rows = torch.cat([part, part + PAIRS])
            loss = model(x[rows], labels[rows], ref_c[part], ref_r[part]) / MICRO
            loss.backward()
        opt.step()
        opt.zero_grad()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in policy.state_dict().items()}
    if rank == 0:
        torch.save(state, out)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Everything is written and both ranks passed the barrier. Leave without tearing the process group down: gloo's
    # teardown once aborted a rank ("terminate called without an active exception") after an FSDP2 run on a loaded
    # 2-core machine, which says nothing about the gradients this test compares.
    sys.stdout.flush()
    os._exit(0)
