"""``python -m silmm_fast.bench`` — run every op's benchmark from the repository's ``bench/`` folder and collect the
rows: JSON lines under ``bench/results/`` (one file per run, named by device), a markdown table, and one PNG per op
(median time per provider and shape).

    python -m silmm_fast.bench --device cpu                    # CPU-sized shapes, all ops
    python -m silmm_fast.bench --device cuda --ops logprobs    # realistic shapes on a GPU

Each op keeps its own script (``bench/bench_<op>.py``, also runnable alone); this runner only chooses shapes per
device, calls each script's ``run``, and writes the combined outputs. The benchmarks live in the source checkout (they
are not installed), so this command runs from a clone of the repository.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

# op -> (bench module, CPU shapes, GPU shapes); None lets the script use its own defaults
SUITE: dict[str, tuple[str, list[str] | None, list[str] | None]] = {
    "logprobs": ("bench_logprobs", ["cpu-small"], ["janus", "seed-llama", "lumina"]),
    "kernel_similarity": (
        "bench_kernel_similarity",
        ["cpu-small", "cpu-kc"],
        ["dreamllm-1k", "dreamllm-4k-k8", "wide-64k"],
    ),
    "diverse_select": ("bench_diverse_select", None, None),
}


def bench_dir() -> Path:
    root = Path(__file__).resolve().parents[1]
    path = root / "bench"
    if not (path / "common.py").is_file():
        raise FileNotFoundError(
            f"bench: no benchmark folder at {path}; run `python -m silmm_fast.bench` from a clone of the repository"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return path


def markdown_table(rows: list[dict]) -> str:
    lines = ["| op | provider | mode | shape | time ms | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        mem = "-" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['op']} | {r['provider']} | {r['mode']} | {shape} | {r['time_ms']:.3f} | {mem} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Median time per provider (bars, log scale) for each (op, shape, mode) case of one benchmark script."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def case(r: dict) -> tuple[str, str, str]:
        return r["op"], ",".join(f"{k}={v}" for k, v in sorted(r["shape"].items()) if k != "name"), r["mode"]

    cases = sorted({case(r) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(cases) * max(1, len(providers))), 4.5), dpi=100)
    width = 0.8 / max(1, len(providers))
    for j, prov in enumerate(providers):
        times = {case(r): r["time_ms"] for r in rows if r["provider"] == prov}
        ax.bar([i + j * width for i in range(len(cases))], [times.get(c, 0.0) for c in cases], width, label=prov)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{op}\n{mode} #{i}" for i, (op, _, mode) in enumerate(cases)], fontsize=6, rotation=30)
    ax.set_ylabel("median time (ms)")
    ax.set_yscale("log")
    ax.set_title(title + " (case shapes: see the .md table)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m silmm_fast.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", nargs="+", default=None, help="registry names (default: per device, per op)")
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="only these providers (e.g. reference silmm; default: every provider each op has)",
    )
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    folder = bench_dir()
    out = Path(args.out) if args.out else folder / "results"
    out.mkdir(parents=True, exist_ok=True)
    from bench.common import write_rows

    device = torch.device(args.device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    all_rows: list[dict] = []
    for op in args.ops:
        module_name, cpu_shapes, gpu_shapes = SUITE[op]
        shapes = args.shapes or (gpu_shapes if device.type == "cuda" else cpu_shapes)
        print(f"[bench] {op} on {device} ({', '.join(shapes) if shapes else 'default shapes'})", flush=True)
        module = importlib.import_module(f"bench.{module_name}")
        rows = module.run(shapes, device, args.providers)
        all_rows.extend(rows)
        if rows:
            plot(rows, out / f"suite-{device.type}-{op}.png", f"{op} on {rows[0]['device']}")
    path = write_rows(all_rows, f"suite-{device.type}-{stamp}", out)
    (out / f"suite-{device.type}-{stamp}.md").write_text(markdown_table(all_rows))
    print(markdown_table(all_rows))
    print(f"[bench] {len(all_rows)} rows -> {path} (+ .md table, suite-{device.type}-<op>.png plots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
