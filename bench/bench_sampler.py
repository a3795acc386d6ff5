"""Benchmark ``sample_tokens``: one image token per row from classifier-free-guided logits, the per-step sampling of
Janus-style generation (batch = prompts × samples, a conditional and an unconditional logit row each).

Providers:
- ``naive``: what generation loops write today: mix, ``softmax(z / T)`` in fp32, top-k by ``topk`` + mask, top-p by
  ``sort`` + ``softmax`` + ``cumsum`` + scatter (the logits-processor recipe), ``torch.multinomial``.
- ``reference``: ``silmm_fast.reference.sampling.sample_tokens`` (sort-based, exact rules).
- ``torch_compile``: the reference through ``torch.compile`` (skipped with a printed reason if compiling fails).
- ``silmm``: ``silmm_fast.sample_tokens`` (Triton on CUDA, the vectorized torch path on CPU).
Modes (sampling settings, CFG scale 5 on guided shapes): ``plain`` (T = 1, Janus' default), ``top_k`` (k = 100),
``top_p`` (p = 0.9), ``greedy`` (T = 0).
Every provider draws with its own seeded generator. On CUDA the inputs rotate over enough copies to exceed twice the
L2 cache, so each call reads its logits from HBM as it would in a generation loop. ``min_bytes`` is the traffic an
ideal sampler needs: every logit read once, one int64 written per row.

    python bench/bench_sampler.py --device cpu --shapes cpu-small
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Cost,
    case_label,
    environment,
    measure,
    note_skip,
    print_table,
    rotation_copies,
    row,
    tensor_bytes,
    write_rows,
)


@dataclass(frozen=True)
class SamplerShape:
    """``rows`` logit rows (prompts × samples) over a ``vocab``-way image head; ``guided``: each row also has an
    unconditional logit row (classifier-free guidance reads 2 × rows rows)."""

    name: str
    rows: int
    vocab: int
    guided: bool = True
    note: str = ""


SHAPES = {
    "janus-cfg": SamplerShape("janus-cfg", 64, 16384, True, "issue #7: Janus 16,384-way head, 2×64 logit rows"),
    "janus-cfg-b256": SamplerShape("janus-cfg-b256", 256, 16384, True, "Janus, 256 samples per step"),
    "cpu-small": SamplerShape("cpu-small", 16, 16384, True, "CPU: 16 guided rows of the Janus head"),
    "tiny": SamplerShape("tiny", 4, 96, True, "test registry"),
}
DEFAULT_SHAPES = {"cuda": ["janus-cfg", "janus-cfg-b256"], "cpu": ["cpu-small"]}
PROVIDERS = ("naive", "reference", "torch_compile", "silmm")
MODES = {
    "plain": dict(temperature=1.0),
    "top_k": dict(temperature=1.0, top_k=100),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "greedy": dict(temperature=0.0),
}
CFG_SCALE = 5.0


def naive_sample(
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    cfg_scale: float,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The usual generation-loop code: every step materializes [B, V] fp32 tensors and sorts for top-p."""
    z = cond if uncond is None else uncond + cfg_scale * (cond - uncond)
    z = z.float()
    if temperature == 0:
        return z.argmax(-1)
    z = z / temperature
    if top_k > 0:
        kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1)
        cum = sorted_z.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False
        z = z.scatter(-1, order, sorted_z.masked_fill(remove, float("-inf")))
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _provider_fn(provider: str) -> Callable:
    """(cond, uncond, generator, **setting) -> tokens."""
    from silmm_fast import sample_tokens
    from silmm_fast.reference.sampling import sample_tokens as reference

    if provider == "naive":
        return lambda c, u, g, **kw: naive_sample(c, u, cfg_scale=CFG_SCALE, generator=g, **kw)
    if provider == "reference":
        return lambda c, u, g, **kw: reference(c, u, cfg_scale=CFG_SCALE, generator=g, **kw)
    if provider == "silmm":
        return lambda c, u, g, **kw: sample_tokens(c, u, cfg_scale=CFG_SCALE, generator=g, **kw)
    if provider == "torch_compile":
        compiled = {}

        def call(c, u, g, **kw):
            key = tuple(sorted(kw.items()))
            if key not in compiled:  # one graph per setting: the scalars are constants of the graph
                compiled[key] = torch.compile(functools.partial(reference, cfg_scale=CFG_SCALE, **kw), dynamic=False)
            # the uniforms are drawn outside the graph (a generator argument does not trace)
            noise = torch.rand(c.shape[0], generator=g, device=c.device, dtype=torch.float64)
            return compiled[key](c, u, noise=noise)

        return call
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def _inputs(shape: SamplerShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cond = (3 * torch.randn(shape.rows, shape.vocab, generator=gen)).to(device, dtype)
    uncond = (3 * torch.randn(shape.rows, shape.vocab, generator=gen)).to(device, dtype) if shape.guided else None
    return cond, uncond


def cost(shape: SamplerShape, dtype: torch.dtype) -> Cost:
    """An ideal sampler reads every logit once (cond, and uncond when guided) and writes one int64 per row."""
    element = torch.finfo(dtype).bits // 8
    return Cost(shape.rows * shape.vocab * element * (2 if shape.guided else 1) + 8 * shape.rows)


def run(
    shapes: list[str | SamplerShape] | None,
    device: torch.device | str,
    providers: list[str] | None = None,
    modes: list[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    warmup: int = 1,
    repeats: int | None = 5,
    rounds: int = 1,
) -> list[dict]:
    """Time every (shape, provider, mode); returns result rows (bench.common.row schema) with the sampling setting,
    ``backend`` for silmm and the cost model. ``rounds`` > 1 repeats the sweep (``print_ratios`` takes each case's
    fastest round: interference only ever adds time)."""
    from silmm_fast import _backend

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    rows: list[dict] = []
    failed: set[str] = set()
    for rnd in range(rounds):
        for shape in shapes or DEFAULT_SHAPES.get(device.type, ["cpu-small"]):
            shape = SHAPES[shape] if isinstance(shape, str) else shape
            copies = [_inputs(shape, device, dtype)]
            copies += [
                _inputs(shape, device, dtype, seed=i + 1)
                for i in range(rotation_copies(tensor_bytes(copies[0]), device) - 1)
            ]
            for provider in providers or PROVIDERS:
                if provider in failed:
                    continue
                fn = _provider_fn(provider)
                for mode in modes or list(MODES):
                    setting = MODES[mode]
                    gen = torch.Generator(device=device).manual_seed(0)
                    calls = [functools.partial(fn, c, u, gen, **setting) for c, u in copies]
                    label = case_label("sample_tokens", provider, shape.name, mode)
                    try:
                        m = measure(calls, device, warmup=warmup, repeats=repeats, label=label)
                    except Exception as err:  # noqa: BLE001 - a failing provider (torch.compile) must not stop the suite
                        note_skip(
                            "sample_tokens", provider, f"{mode} failed with {type(err).__name__}: {err}", "failed"
                        )
                        if provider == "torch_compile":
                            failed.add(provider)
                            break
                        continue
                    shape_doc = dict(name=shape.name, B=shape.rows, V=shape.vocab)
                    extra = dict(dtype=str(dtype).removeprefix("torch."), round=rnd, guided=shape.guided)
                    extra.update(cfg_scale=CFG_SCALE, **setting)
                    if provider == "silmm":
                        extra["backend"] = _backend.choose("sample_tokens", device)
                    rows.append(
                        row("sample_tokens", provider, mode, shape_doc, m, env, cost=cost(shape, dtype), **extra)
                    )
            del copies
    return rows


def print_ratios(
    rows: list[dict], provider: str = "silmm", baselines: tuple[str, ...] = ("naive", "reference")
) -> None:
    """Time of ``provider`` over each baseline per (shape, mode), each case from its fastest round."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["shape"]["name"], r["mode"], r["provider"])
        if key not in best or r["time_ms"] < best[key]["time_ms"]:
            best[key] = r
    for base in baselines:
        print(f"\n{provider} / {base} (time ratio; < 1 is faster):")
        for (shape, mode, prov), r in best.items():
            other = best.get((shape, mode, base))
            if prov == provider and other is not None:
                print(
                    f"  {shape:<16} {mode:<8} {r['time_ms']:9.3f} ms vs {other['time_ms']:9.3f} ms  "
                    f"ratio {r['time_ms'] / other['time_ms']:.3f}"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"names from {sorted(SHAPES)}")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep (shared machines)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    rows = run(
        args.shapes,
        device,
        args.providers,
        args.modes,
        dtype=dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        rounds=args.rounds,
    )
    print_table(rows)
    print_ratios(rows)
    path = write_rows(rows, f"sampler-{device.type}", args.out)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
