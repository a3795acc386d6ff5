"""Benchmark Janus image generation: the adapter's one batched CFG loop against ``generate`` called per prompt.

Providers:
- ``adapter``: ``JanusAdapter.generate_images(prompts, samples)``: prompts × samples × 2 (CFG) rows in one decoding
  loop over a preallocated ``StaticCache``, each step sampled by ``sample_tokens``.
- ``generate``: what a user writes with transformers alone: for each prompt,
  ``model.generate(ids, generation_mode="image", do_sample=True, num_return_sequences=samples, guidance_scale=...)``
  (transformers batches that prompt's samples and their CFG rows itself, one prompt per call).

Both sample with the same settings (CFG scale 5, temperature 1, top-p 0.95) on the same random-weight model; before
timing, greedy decoding is checked to give the same tokens on both paths. Reported: median wall time of the whole
batch of images and images per second, timed in turns (one call per provider per round) so load spikes on a shared
machine hit both alike.

Configs (``silmm_fast.loop.adapters.random_janus.PRESETS``): ``tiny`` (16 image tokens, width 32) and ``small`` (64
image tokens, width 256) for CPUs; ``janus-pro-1b`` (576 image tokens, width 2048, 24 layers, bf16) is GPU-only.

    python evals/janus_generate_throughput.py --device cpu --threads 1          # tiny and small
    python evals/janus_generate_throughput.py --device cuda --configs janus-pro-1b

Rows are appended to ``bench/results/janus_generate-<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Measurement, environment, print_table, row, write_rows  # noqa: E402
from silmm_fast.loop.adapters.random_janus import PRESETS, random_janus  # noqa: E402


@dataclass(frozen=True)
class GenerateCase:
    """``prompts`` × ``samples`` images from the random Janus ``preset``."""

    name: str
    preset: str
    prompts: int
    samples: int
    gpu_only: bool = False


CASES = {
    "tiny": GenerateCase("tiny", "tiny", 8, 4),
    "small": GenerateCase("small", "small", 4, 4),
    "janus-pro-1b": GenerateCase("janus-pro-1b", "janus-pro-1b", 4, 4, gpu_only=True),
}
CPU_CASES = ("tiny", "small")
PROVIDERS = ("adapter", "generate")
CFG_SCALE, TEMPERATURE, TOP_P = 5.0, 1.0, 0.95
PROMPT_POOL = (
    "a red circle to the left of a blue square",
    "two green stars",
    "a dotted hexagon above a plain triangle",
    "a striped yellow square",
    "three purple circles and one orange star",
    "a blue triangle below a red hexagon",
    "a plain green circle and a dotted red star",
    "four yellow squares",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _providers(adapter, prompts: list[str], samples: int) -> dict:
    model = adapter.model
    ids = [torch.tensor([adapter.prompt_ids(p)], device=adapter.device) for p in prompts]

    def batched():
        return adapter.generate_images(
            prompts, samples, top_p=TOP_P, temperature=TEMPERATURE, generator=torch.Generator().manual_seed(0)
        )

    def per_prompt():
        return [
            model.generate(
                x,
                attention_mask=torch.ones_like(x),
                generation_mode="image",
                do_sample=True,
                top_p=TOP_P,
                temperature=TEMPERATURE,
                num_return_sequences=samples,
                guidance_scale=CFG_SCALE,
            )
            for x in ids
        ]

    return {"adapter": batched, "generate": per_prompt}


def _check_greedy(adapter, prompt: str) -> None:
    x = torch.tensor([adapter.prompt_ids(prompt)], device=adapter.device)
    ref = adapter.model.generate(
        x, attention_mask=torch.ones_like(x), generation_mode="image", do_sample=False, guidance_scale=CFG_SCALE
    )[0]
    ours = adapter.generate_images([prompt], 1, temperature=0, cfg_scale=CFG_SCALE)[0, 0]
    if not torch.equal(ref, ours):
        raise AssertionError(
            "greedy tokens of the adapter differ from generate(); timings would compare different work"
        )


def _measure_interleaved(fns: dict, device: torch.device, rounds: int) -> dict[str, Measurement]:
    for fn in fns.values():  # warm-up (allocator, caches, first-call overheads)
        fn()
    out = {k: Measurement() for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out[k].times_ms.append((time.perf_counter() - t0) * 1e3)
    return out


def run(
    shapes: list[str] | None, device: torch.device | str, providers: list[str] | None = None, rounds: int = 3
) -> list[dict]:
    device = torch.device(device)
    providers = list(providers or PROVIDERS)
    env = environment(device)  # includes threads and the load average (other jobs on a shared machine)
    rows: list[dict] = []
    for name in shapes or (CPU_CASES if device.type == "cpu" else ("janus-pro-1b",)):
        case = CASES[name]
        if case.gpu_only and device.type != "cuda":
            print(f"skip {name}: GPU-only config (about 2B random parameters)")
            continue
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        adapter = random_janus(case.preset, device=device, dtype=dtype)
        adapter.options.cfg_scale = CFG_SCALE
        adapter.options.generation_rows = case.prompts * case.samples
        prompts = [PROMPT_POOL[i % len(PROMPT_POOL)] for i in range(case.prompts)]
        _check_greedy(adapter, prompts[0])
        fns = {k: v for k, v in _providers(adapter, prompts, case.samples).items() if k in providers}
        measured = _measure_interleaved(fns, device, rounds)
        p = PRESETS[case.preset]
        shape = {
            "name": name,
            "prompts": case.prompts,
            "samples": case.samples,
            "image_tokens": p.num_image_tokens,
            "hidden": p.hidden,
            "layers": p.layers,
            "codebook": p.codebook,
            "dtype": str(dtype).replace("torch.", ""),
        }
        images = case.prompts * case.samples
        case_rows = {}
        for k, m in measured.items():
            case_rows[k] = row(
                "janus_generate",
                k,
                "sample",
                shape,
                m,
                env,
                images_per_s=round(images / (m.median_ms / 1e3), 2),
                times_ms=[round(t, 2) for t in m.times_ms],
            )
        if "adapter" in measured and "generate" in measured:
            speedup = measured["generate"].median_ms / measured["adapter"].median_ms
            case_rows["adapter"]["speedup_vs_generate"] = round(speedup, 2)
        rows.extend(case_rows.values())
        del adapter
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="*", default=None, choices=sorted(CASES))
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per provider, taken in turns")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 avoids stalls when shared)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run(args.configs, device, args.providers, args.rounds)
    if not rows:
        return
    print_table(rows)
    for r in rows:
        if "speedup_vs_generate" in r:
            spread = statistics.pstdev(r["times_ms"]) / statistics.mean(r["times_ms"])
            print(
                f"{r['shape']['name']}: adapter {r['images_per_s']} images/s, "
                f"{r['speedup_vs_generate']}x generate() per prompt (adapter time spread {spread:.0%})"
            )
    path = write_rows(rows, f"janus_generate-{device.type}", args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
