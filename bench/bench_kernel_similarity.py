"""Benchmark the KC-DPO distance computation: policy + reference features ([B, 2, L, D]) against all 2K candidates of
their prompt ([B, 2K, L, D]) -> [B, 2, 2K], the single ``pairwise_distance`` launch ``kc_dpo_loss`` makes.

Providers: ``reference`` (eager ``silmm_fast.reference.pairwise_distance``), ``torch_compile`` (the same function
through ``torch.compile``), ``silmm`` (``silmm_fast.pairwise_distance``: Triton on CUDA, the torch path on CPU).
Modes: ``forward`` (no autograd) and ``full`` (forward + backward into the [B, 2, L, D] side, as in training).
Each row also carries ``min_ms`` (the fastest repeat: on a shared CPU the median drifts with other load),
``traced_peak_bytes`` (storage bytes the call allocates at its peak, traced per op: eager providers only) and
``min_bytes`` (inputs read once; plus the gradient written, for ``full``) and the GB/s that
implies, to compare with the HBM floor of ANCHORS.md.

    python bench/bench_kernel_similarity.py --device cpu --shapes cpu-small dreamllm-1k-k1
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

from bench.common import FEATURE_SHAPES, FeatureShape, environment, measure, print_table, row, write_rows  # noqa: E402

OP = "kernel_similarity"
PROVIDERS = ("reference", "torch_compile", "silmm")
MODES = ("forward", "full")


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


def _provider_fn(provider: str):
    from silmm_fast import pairwise_distance
    from silmm_fast.reference.pairwise_distance import pairwise_distance as reference

    if provider == "reference":
        return reference
    if provider == "torch_compile":
        return torch.compile(reference, dynamic=False)
    if provider == "silmm":
        return pairwise_distance
    raise ValueError(f"providers: unknown provider {provider!r}; expected some of {PROVIDERS}")


def _case(shape: FeatureShape, provider: str, mode: str, device: torch.device, dtype: torch.dtype, kw: dict):
    fn = _provider_fn(provider)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.prompts, 2, shape.tokens, shape.dim, generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(shape.prompts, shape.candidates, shape.tokens, shape.dim, generator=gen).to(device, dtype)
    if mode == "forward":

        def call():
            with torch.no_grad():
                return fn(x, y, **kw)

    else:
        x.requires_grad_()

        def call():
            x.grad = None
            fn(x, y, **kw).sum().backward()

    elem = torch.finfo(dtype).bits // 8
    min_bytes = (x.numel() + y.numel()) * elem + (x.numel() * elem if mode == "full" else 0)
    return call, min_bytes


def run(
    shapes: list[str | FeatureShape],
    device: torch.device | str,
    providers: list[str] | None = None,
    modes: list[str] | None = None,
    *,
    kernel: str = "cosine",
    pool: str = "mean",
    dtype: torch.dtype | None = None,
    repeats: int = 5,
) -> list[dict]:
    """Time and measure every (shape, provider, mode); returns result rows (bench.common.row schema)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    kw = dict(kernel=kernel, pool=pool, sigma=1.0)
    rows = []
    for shape in shapes:
        shape = FEATURE_SHAPES[shape] if isinstance(shape, str) else shape
        for provider in providers or PROVIDERS:
            for mode in modes or MODES:
                call, min_bytes = _case(shape, provider, mode, device, dtype, kw)
                m = measure(call, device, warmup=2, repeats=repeats)
                shape_doc = dict(name=shape.name, B=shape.prompts, M=2, N=shape.candidates, L=shape.tokens, D=shape.dim)
                rows.append(
                    row(
                        OP, provider, mode, shape_doc, m, env,
                        kernel=kernel, pool=pool, dtype=str(dtype).removeprefix("torch."),
                        min_bytes=min_bytes, gbps=round(min_bytes / (m.median_ms * 1e6), 2),
                        threads=torch.get_num_threads(), min_ms=round(min(m.times_ms), 4),
                        traced_peak_bytes=None if provider == "torch_compile" else _traced_peak_bytes(call),
                    )
                )  # fmt: skip
                del call
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"names from {sorted(FEATURE_SHAPES)}")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
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
    shapes = args.shapes or (
        ["dreamllm-1k-k1", "dreamllm-4k", "dreamllm-4k-k8", "wide-64k"]
        if device.type == "cuda"
        else ["cpu-small", "cpu-kc"]
    )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    rows = run(shapes, device, args.providers, args.modes, kernel=args.kernel, pool=args.pool, dtype=dtype,
               repeats=args.repeats)  # fmt: skip
    print_table(rows)
    path = write_rows(rows, f"{OP}-{device.type}", args.out)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
