"""Benchmark the KC-DPO distance computation: policy + reference features ([B, 2, L, D]) against all 2K candidates of
their prompt ([B, 2K, L, D]) -> [B, 2, 2K], the single ``pairwise_distance`` call ``kc_dpo_loss`` makes, and the whole
KC-DPO loss around it.

Providers: ``reference`` (eager ``silmm_fast.reference.pairwise_distance``), ``torch_compile`` (the same function
through ``torch.compile``; skipped with a printed reason if compiling fails here), ``silmm``
(``silmm_fast.pairwise_distance``: Triton on CUDA, the torch path on CPU). No peer library computes these pooled
kernel distances with a backward, so there is none to compare against.
Modes: ``forward`` (no autograd) and ``full`` (forward + backward into the [B, 2, L, D] side) of the distances;
``kc_dpo``: the KC-DPO loss forward + backward into the policy features, as in training (K = 2K/2 winners and
losers per prompt): eager is the loss written over the reference distances (``_kc_dpo_eager``), ``torch_compile``
that function compiled, ``silmm`` ``silmm_fast.kc_dpo_loss`` (on CUDA one kernel launch each way). The command line
runs every mode unless told; ``run`` (the suite) the two distance modes. ``--device cuda`` without options measures
KC-DPO's speed floor against eager: every provider and mode at the DreamLLM shapes.
Each row also carries ``min_ms`` (the fastest repeat: on a shared CPU the median drifts with other load),
``traced_peak_bytes`` (storage bytes the call allocates at its peak, traced per op: eager providers only) and the
minimal cost (``cost``: ``min_bytes`` and ``flops``) with the GB/s it implies, to compare with the device's memory
bandwidth (the suite's measured copy ceiling).

    python bench/bench_kernel_similarity.py --device cpu --shapes cpu-small
    python bench/bench_kernel_similarity.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    FEATURE_SHAPES,
    Cost,
    FeatureShape,
    case_label,
    environment,
    measure,
    note_skip,
    print_table,
    rotation_copies,
    row,
    write_rows,
)

OP = "kernel_similarity"
SHAPES = FEATURE_SHAPES  # the registry the suite runner picks --shapes names from
PROVIDERS = ("reference", "torch_compile", "silmm")
MODES = ("forward", "full")  # what run() measures unless told (the suite's rows)
ALL_MODES = (*MODES, "kc_dpo")  # what the command line measures unless told


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by the ops run inside (freed storages are subtracted). Exact for eager
    code on any device, unlike the process RSS, which does not move when the allocator reuses freed pages; blind to
    compiled code (inductor kernels do not pass through the dispatcher), so torch_compile rows report None."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def _traced_peak_bytes(call) -> int:
    with _LiveBytes() as tracker:
        call()
    return tracker.peak


def _kc_dpo_eager(policy, reference, chosen, rejected, *, kernel: str, pool: str, sigma: float) -> torch.Tensor:
    """The KC-DPO loss (γ = 1) as plain autograd code writes it over the reference distances."""
    from silmm_fast.reference.pairwise_distance import pairwise_distance as distance

    x = torch.stack((policy, reference.detach()), dim=1)
    dist = distance(x, torch.cat((chosen, rejected), dim=1), kernel=kernel, pool=pool, sigma=sigma)
    k = chosen.shape[1]
    chosen_terms = dist[:, 1, :k] - dist[:, 0, :k]
    rejected_terms = dist[:, 1, k:] - dist[:, 0, k:]
    return -torch.nn.functional.logsigmoid(chosen_terms.unsqueeze(2) - rejected_terms.unsqueeze(1)).mean()


def _kc_dpo_silmm(policy, reference, chosen, rejected, *, kernel: str, pool: str, sigma: float) -> torch.Tensor:
    from silmm_fast import kc_dpo_loss

    return kc_dpo_loss(policy, reference, chosen, rejected, kernel=kernel, pool=pool, sigma=sigma).loss


def _provider_fn(provider: str, mode: str):
    from silmm_fast import pairwise_distance
    from silmm_fast.reference.pairwise_distance import pairwise_distance as reference

    eager = _kc_dpo_eager if mode == "kc_dpo" else reference
    if provider == "reference":
        return eager
    if provider == "torch_compile":
        return torch.compile(eager, dynamic=False)
    if provider == "silmm":
        return _kc_dpo_silmm if mode == "kc_dpo" else pairwise_distance
    raise ValueError(f"providers: unknown provider {provider!r}; expected some of {PROVIDERS}")


def cost(shape: FeatureShape, mode: str, dtype: torch.dtype) -> Cost:
    """Minimal cost of one case: bytes = x [B, 2, L, D] and y [B, N, L, D] read once (plus the gradient of x written,
    for ``full``, or of the policy's half of x, for ``kc_dpo``); the [B, 2, N] output is negligible. FLOPs: the
    pooled Gram products, 2·B·2·N·D forward, the same again for the gradient; pooling, the distance epilogue and the
    loss are elementwise and not counted."""
    elem = torch.finfo(dtype).bits // 8
    x, y = shape.prompts * 2 * shape.tokens * shape.dim, shape.prompts * shape.candidates * shape.tokens * shape.dim
    gram = 2 * shape.prompts * 2 * shape.candidates * shape.dim
    if mode == "full":
        return Cost((2 * x + y) * elem, 2 * gram)
    if mode == "kc_dpo":
        return Cost((x + x // 2 + y) * elem, 2 * gram)
    return Cost((x + y) * elem, gram)


def _case(fn, shape: FeatureShape, mode: str, device: torch.device, dtype: torch.dtype, kw: dict):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.prompts, 2, shape.tokens, shape.dim, generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(shape.prompts, shape.candidates, shape.tokens, shape.dim, generator=gen).to(device, dtype)
    if mode == "forward":

        def call():
            with torch.no_grad():
                return fn(x, y, **kw)

    elif mode == "kc_dpo":
        k = shape.candidates // 2  # winners first, losers after: K each (an odd count gives the losers one more)
        policy, reference = x[:, 0].clone().requires_grad_(), x[:, 1].clone()
        chosen, rejected = y[:, :k].clone(), y[:, k:].clone()

        def call():
            policy.grad = None
            fn(policy, reference, chosen, rejected, **kw).backward()

    else:
        x.requires_grad_()

        def call():
            x.grad = None
            fn(x, y, **kw).sum().backward()

    return call


def run(
    shapes: list[str | FeatureShape],
    device: torch.device | str,
    providers: list[str] | None = None,
    modes: list[str] | None = None,
    *,
    kernel: str = "cosine",
    pool: str = "mean",
    dtype: torch.dtype | None = None,
    repeats: int | None = 5,
) -> list[dict]:
    """Time and measure every (shape, provider, mode); returns result rows (bench.common.row schema)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    kw = dict(kernel=kernel, pool=pool, sigma=1.0)
    rows = []
    for shape in shapes:
        shape = FEATURE_SHAPES[shape] if isinstance(shape, str) else shape
        input_bytes = shape.prompts * (2 + shape.candidates) * shape.tokens * shape.dim * dtype.itemsize
        for provider in providers or PROVIDERS:
            fns = {}  # one function (one torch.compile) for the distance modes, one for the loss
            for mode in modes or MODES:
                if (mode == "kc_dpo") not in fns:
                    fns[mode == "kc_dpo"] = _provider_fn(provider, mode)
                fn = fns[mode == "kc_dpo"]
                calls = [_case(fn, shape, mode, device, dtype, kw) for _ in range(rotation_copies(input_bytes, device))]
                label = case_label(OP, provider, shape.name, mode)
                try:
                    m = measure(calls, device, warmup=2, repeats=repeats, label=label)
                except Exception as err:  # noqa: BLE001 - torch.compile failing here must not stop the suite
                    note_skip(OP, provider, f"{mode} failed with {type(err).__name__}: {err}", "failed")
                    continue
                shape_doc = dict(name=shape.name, B=shape.prompts, M=2, N=shape.candidates, L=shape.tokens, D=shape.dim)
                traced = None if provider == "torch_compile" else _traced_peak_bytes(calls[0])
                extra = dict(
                    kernel=kernel, pool=pool, dtype=str(dtype).removeprefix("torch."), traced_peak_bytes=traced
                )
                rows.append(row(OP, provider, mode, shape_doc, m, env, cost=cost(shape, mode, dtype), **extra))
                del calls
    return rows


def default_shapes(device_type: str) -> list[str]:
    """The shapes a run measures unless told: on CUDA the DreamLLM shapes (where KC-DPO's speed floor against eager
    is measured) and the wide pooled row; on CPU two small ones."""
    if device_type == "cuda":
        return ["dreamllm-1k", "dreamllm-1k-k1", "dreamllm-4k", "dreamllm-4k-k8", "wide-64k"]
    return ["cpu-small", "cpu-kc"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"names from {sorted(FEATURE_SHAPES)}")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(ALL_MODES), choices=ALL_MODES, help="default: all")
    parser.add_argument("--kernel", default="cosine", choices=("cosine", "euclidean", "sqeuclidean", "rbf"))
    parser.add_argument("--pool", default="mean", choices=("mean", "max", "none"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or default_shapes(device.type)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    options = dict(kernel=args.kernel, pool=args.pool, dtype=dtype, repeats=args.repeats)
    rows = run(shapes, device, args.providers, args.modes, **options)
    print_table(rows)
    path = write_rows(rows, f"{OP}-{device.type}", args.out)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
