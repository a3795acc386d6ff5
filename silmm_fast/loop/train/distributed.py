"""The loop on several processes: ``torchrun --nproc_per_node N -m silmm_fast.train ...``.

What this module decides, and why:
- Who am I: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment (torchrun sets them). A process group is
  started only when ``WORLD_SIZE`` > 1 or the process was launched by torchrun (``TORCHELASTIC_RUN_ID``); a plain
  ``python -m silmm_fast.train`` stays a single process with no group. The backend follows the device: NCCL on CUDA
  (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.
- How work is shared: the loop cuts every list of prompts (or pairs) into fixed units that do not depend on the
  number of processes (``units``), gives each rank a contiguous run of units (``Dist.shard``) and gathers the results
  in unit order (``map_units``), so every rank ends with the full, identical set.
- How the policy trains: ``TrainModel`` wraps it in DDP (default) or shards it with FSDP2
  (``torch.distributed.fsdp.fully_shard``) for models whose parameters, gradients and optimizer state don't fit one
  device.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp2")
DEVICES = ("auto", "cpu", "cuda")
# Rank 0 may spend minutes alone (bootstrapping the base model on first use) while the others wait in a collective,
# longer than the default NCCL timeout (10 min) on a small CPU.
TIMEOUT = datetime.timedelta(minutes=60)


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (``torch.distributed.run``), whatever the world size."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from None


def resolve_device(choice: str, local_rank: int) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``cpu``; ``cuda`` (an error without it)."""
    if choice not in DEVICES:
        raise ValueError(f"config dist.device: expected one of {DEVICES}, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("config dist.device: 'cuda' requested, but this torch sees no CUDA device")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()} CUDA device(s); "
            "start at most that many processes per node (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@dataclass
class Dist:
    """This process's place in the run, and the few collectives the loop uses (identities on a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this object started the process group, so close() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether a process group is running (also true under torchrun with one process)."""
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.grouped:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 alone, its value on every rank. When ``fn`` raises there, rank 0 raises it and every
        other rank raises a RuntimeError naming it, instead of waiting for a value that will never come."""
        if self.world_size == 1:
            return fn()
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        message, value = self.broadcast((None if error is None else f"{type(error).__name__}: {error}", value))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 failed ({message}); this rank stops with it")
        return value

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def shard(self, n: int) -> range:
        """This rank's contiguous part of ``range(n)``: sizes differ by at most one, lower ranks take the extra."""
        return range(*shard_bounds(n, self.world_size, self.rank))

    def check_same_config(self, config: dict) -> None:
        """Raise ValueError on every rank when the ranks were started with different configurations, naming the
        ranks that differ from rank 0 and the fields they differ in."""
        if self.world_size == 1:
            return
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        gathered = self.all_gather((digest, config))
        ref_digest, ref = gathered[0]
        differing = {r: c for r, (d, c) in enumerate(gathered) if d != ref_digest}
        if differing:
            parts = [f"rank {r} in {sorted(_diff_keys(ref, c))}" for r, c in differing.items()]
            raise ValueError(
                f"config differs between ranks: ranks {sorted(differing)} differ from rank 0 ({'; '.join(parts)}); "
                "start every rank with the same command and config file"
            )

    def close(self) -> None:
        if self.owns_group and self.grouped:
            dist.destroy_process_group()
            self.owns_group = False


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous share of ``n`` items among ``world_size`` ranks."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def setup(device: str = "auto") -> Dist:
    """This process's ``Dist``: joins (or starts) the process group when launched by torchrun or WORLD_SIZE > 1.

    An already running group (a caller that started one itself) is used as it is and left running by ``close``.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        dev = resolve_device(device, local_rank)
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 and not launched_by_torchrun():
        return Dist(0, 1, 0, resolve_device(device, 0))
    if not dist.is_available():
        raise ValueError("torch.distributed is not available in this torch build; run a single process")
    dev = resolve_device(device, local_rank)
    kwargs: dict[str, Any] = {"backend": "nccl" if dev.type == "cuda" else "gloo", "timeout": TIMEOUT}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def check_strategy(strategy: str, d: Dist) -> None:
    """ValueError when ``strategy`` cannot run here (unknown name, FSDP2 missing from torch, or no process group)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"config dist.strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy != "fsdp2":
        return
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # noqa: F401
    except ImportError:
        raise ValueError(
            f"config dist.strategy: 'fsdp2' needs torch.distributed.fsdp.fully_shard, which torch {torch.__version__} "
            "does not have (torch >= 2.6 does); use dist.strategy ddp"
        ) from None
    if not d.grouped:
        raise ValueError(
            "config dist.strategy: 'fsdp2' shards the model over a process group; launch with torchrun "
            "(torchrun --nproc_per_node N -m silmm_fast.train ..., N = 1 works too) or use dist.strategy ddp"
        )


def units(n: int, size: int) -> list[slice]:
    """Slices of ``size`` covering range(n): the fixed units of work, whatever the number of processes."""
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def map_units(d: Dist, n: int, size: int, fn: Callable[[slice], Any], desc: str = "") -> list[Any]:
    """``fn(unit)`` for every unit of ``units(n, size)``, the units shared out contiguously among the ranks; returns
    every unit's result, in unit order, on every rank (a collective: every rank calls it). ``fn`` must return CPU
    data."""
    from tqdm.auto import tqdm

    parts = units(n, size)
    mine = [parts[i] for i in d.shard(len(parts))]
    local = []
    total = sum(u.stop - u.start for u in mine)
    with tqdm(total=total, desc=desc, leave=False, unit="it", dynamic_ncols=True, disable=not d.is_main) as bar:
        for u in mine:
            local.append(fn(u))
            bar.update(u.stop - u.start)
    return [r for rank_results in d.all_gather(local) for r in rank_results]


def _image_logprob_inputs(policy: Any, prompts: Any, tokens: torch.Tensor) -> Any:
    return policy.image_logprob_inputs(prompts, tokens)


def _feature_forward(policy: Any, prompts: Any) -> torch.Tensor:
    return policy.feature_forward(prompts)


class _Call(nn.Module):
    """Routes a call ``step(policy, *args)`` through ``forward``, which is the only entry DDP watches."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, step: Callable[..., Any], *args: Any) -> Any:
        return step(self.policy, *args)


class TrainModel:
    """The policy as the train step calls it: ``model.image_logprob_inputs(texts, tokens)`` or
    ``model.feature_forward(texts)``.

    - one process without a group: the policy itself;
    - ``ddp``: ``DistributedDataParallel`` (gradients averaged over ranks during backward; ``find_unused`` when the
      step leaves parameters unused, e.g. the LM head in continuous mode);
    - ``fsdp2``: every decoder layer (``LayeredAdapter.decoder_layers``) and then the whole policy
      ``fully_shard``-ed (parameters, gradients and AdamW state sharded over the ranks; each layer gathered for its
      forward and backward only), with the policy's step methods registered as forward methods so FSDP gathers the
      root parameters for them.
    """

    def __init__(self, policy: nn.Module, d: Dist, strategy: str, find_unused: bool = False) -> None:
        self.policy = policy
        self.strategy = strategy if d.grouped else "single"
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [d.device.index] if d.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(_Call(policy), device_ids=ids, find_unused_parameters=find_unused)
        elif self.strategy == "fsdp2":
            check_strategy("fsdp2", d)
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            from silmm_fast.loop.adapters.protocol import ContinuousAdapter, LayeredAdapter

            if not isinstance(policy, LayeredAdapter):
                raise ValueError(
                    f"config dist.strategy: 'fsdp2' shards a model's decoder blocks, and {type(policy).__name__} has "
                    "no decoder_layers(); use dist.strategy ddp"
                )
            for layer in policy.decoder_layers():
                fully_shard(layer)
            fully_shard(policy)
            # torch's API names the methods to wrap
            register_fsdp_forward_method(policy, "image_logprob_inputs")
            if isinstance(policy, ContinuousAdapter):
                register_fsdp_forward_method(policy, "feature_forward")

    def image_logprob_inputs(self, prompts: Any, tokens: torch.Tensor) -> Any:
        """The policy's ``image_logprob_inputs``, through DDP / FSDP2."""
        return self._call(_image_logprob_inputs, prompts, tokens)

    def feature_forward(self, prompts: Any) -> torch.Tensor:
        """The policy's ``feature_forward``, through DDP / FSDP2."""
        return self._call(_feature_forward, prompts)

    def _call(self, step: Callable[..., Any], *args: Any) -> Any:
        if self.strategy == "ddp":
            return self._ddp(step, *args)
        if self.strategy == "fsdp2":
            with warnings.catch_warnings():
                # FSDP2 warns that a returned view loses its backward hook under in-place ops; the loop's losses
                # only read the step methods' outputs (the hidden states are a slice of the last layer's output).
                warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
                return step(self.policy, *args)
        return step(self.policy, *args)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole policy's weights on the CPU (under FSDP2 a collective: every rank must call it)."""
        state = self.policy.state_dict()
        if self.strategy == "fsdp2":
            from torch.distributed.tensor import DTensor

            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
        return {k: v.detach().cpu() for k, v in state.items()}
