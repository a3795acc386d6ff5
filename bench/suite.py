"""The benchmark suite: run every op's benchmark in this folder and collect the rows: JSON lines under
``bench/results/`` (one file per run, named by device and time), a markdown table, and one PNG per op (time and peak
memory against problem size per provider; bars where only one size was measured). From a checkout:

    python -m bench --device cpu                        # CPU-sized shapes, all ops
    python -m bench --device cuda --ops logprobs        # realistic shapes on a GPU
    python -m bench --device cpu --profile              # plus a Chrome trace per case in results/traces/
    python -m bench --device cpu --threads 1            # steady CPU timings on a machine others share
    python -m bench --readme                            # README's Performance section from bench/results/

``python -m silmm_fast.bench`` runs the same (silmm_fast/bench.py launches this module from the checkout the package
was imported from), and so does ``python bench/suite.py``.

Each op keeps its own script (``bench/bench_<op>.py``, also runnable alone); this runner measures the device's
ceilings, chooses shapes per device, calls each script's ``run(shapes, device, providers)``, adds the roofline
fraction to every row and writes the combined outputs. The benchmarks live in the source checkout (they are not
installed). Adding an op: write ``bench/bench_<op>.py`` with that ``run`` (its shape registry as ``SHAPES``,
holding a ``tiny`` entry for the tests; its provider names in ``PROVIDERS``), add one line to ``SUITE`` and map its
public name in ``PUBLIC_OPS``. An entry whose script is not in the checkout yet
is skipped with a printed reason.

Providers: ``reference`` (``silmm_fast.reference``), ``torch_compile`` (the reference through ``torch.compile``),
``silmm`` (the public op), ``naive`` (what a user writes today) where the script has one, and peers when installed
(``liger_kernel``, ``cut_cross_entropy``, ``trl``, ``fpsample``, ``torch-fps``). A provider that is missing, fails
or has no such op is skipped with a printed reason, and the reason is kept as a row (below).

Result rows (JSON lines, ``schema`` 2; rows without ``schema`` are the first version, which lacked the cost,
roofline, ``copies``, ``mem_metric`` and skip fields):

- identity: ``op`` (the benchmarked computation), ``provider``, ``mode`` (``forward`` / ``backward`` / ``full`` =
  forward + backward, or a method such as ``dpp`` / ``fps`` / ``gram``), ``shape`` (registry ``name`` plus its
  dimensions), op-specific tags (``head``, ``dtype``, ``kernel``, ``pool``, ``round``, ``backend``).
- metrics: ``time_ms`` (median), ``min_ms``, ``clock`` (how calls were timed: ``wall`` or ``process`` CPU time on a
  CPU, ``cuda_events``), ``repeats``, ``copies`` (inputs rotated among), ``peak_mem_bytes`` and
  ``mem_metric`` (how it was taken: bench/common.py), ``min_bytes`` and ``flops`` (the script's cost model), ``gbps``
  and ``tflops`` (achieved on that cost), ``roofline`` (fraction of the ceiling-bound time, ``roofline_bound``
  memory or compute) with ``ceiling_gbps`` / ``ceiling_tflops`` / ``ceiling_matmul_dtype`` (measured at the start
  of the run; absent when a script runs alone), op-specific extras (``traced_peak_bytes``, ``speedup_vs_*``).
- environment: ``device`` (name), ``device_type``, ``cpu_model`` and ``threads`` (CPU), ``load_average_1min`` (other
  work competing for the machine), ``torch``, ``triton``, ``git`` (revision), ``timestamp`` (UTC, one per script
  run), ``schema``.
- skip rows: ``op``, ``provider``, ``skipped`` (the reason), ``skip_kind`` (``unavailable`` / ``failed`` /
  ``not_run`` / ``unsupported``) and the environment fields; no metrics.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/suite.py): make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    """One suite entry: the script ``bench/<module>.py`` and the registry names it runs on CPU and on CUDA (None: the
    script's own defaults)."""

    module: str
    cpu: tuple[str, ...] | None = None
    cuda: tuple[str, ...] | None = None

    def shapes(self, device_type: str) -> list[str] | None:
        names = self.cuda if device_type == "cuda" else self.cpu
        return None if names is None else list(names)


# suite name -> entry; a new op's benchmark is one more line here
SUITE: dict[str, Bench] = {
    # CPU: a size sweep that runs in minutes on 2 cores; the issue's floor shape: --ops logprobs --shapes cpu-floor
    "logprobs": Bench("bench_logprobs", ("cpu-xs", "cpu-small"), ("janus", "seed-llama", "lumina")),
    "kernel_similarity": Bench(
        "bench_kernel_similarity", ("cpu-small", "cpu-kc"), ("dreamllm-1k", "dreamllm-4k-k8", "wide-64k")
    ),
    "diverse_select": Bench("bench_diverse_select"),
    "sampler": Bench("bench_sampler"),  # silmm_fast.sample_tokens; the script's own default shapes
}

# public op (silmm_fast.__all__) -> (SUITE entry, the benchmarked computation: a row's ``op``) that measures it
PUBLIC_OPS: dict[str, tuple[str, str]] = {
    "gather_logprobs": ("logprobs", "gather_logprobs"),
    "sequence_logprobs": ("logprobs", "sequence_logprobs"),
    "fused_linear_logprobs": ("logprobs", "fused_linear_logprobs"),
    "dpo_loss": ("logprobs", "fused_linear_dpo"),  # DPO as trainers call it: on the fused head's sequence log-probs
    "pairwise_distance": ("kernel_similarity", "kernel_similarity"),
    "kc_dpo_loss": ("kernel_similarity", "kernel_similarity"),  # its one pairwise_distance launch is the work
    "diverse_select": ("diverse_select", "diverse_select"),
    "sample_tokens": ("sampler", "sample_tokens"),
}

# public functions that are not fast ops, and why they have no entry
NOT_BENCHMARKED: dict[str, str] = {
    "decompose_prompt": "rule-based text parsing; its coverage is measured by evals/decompose_coverage.py",
    "dropdiv": "switches dropout on inside a model: costs the model's own forward",
    "env_report": "reports the environment",
    "use_backend": "chooses implementations",
}


def script_exists(name: str) -> bool:
    """Whether the script of SUITE entry ``name`` is in the checkout."""
    return (BENCH_DIR / f"{SUITE[name].module}.py").is_file()


def measured(rows: list[dict]) -> list[dict]:
    """The rows that carry measurements (skip rows left out)."""
    return [r for r in rows if "skipped" not in r and r.get("time_ms") is not None]


def case(r: dict) -> str:
    """A row's case within its op: the mode, plus the head for the fused-head ops."""
    head = r.get("head")
    return r["mode"] if head in (None, "-") else f"{r['mode']}, {head} head"


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "name")


def size_bytes(r: dict) -> float:
    """Problem size for the sweep plots: the minimal bytes the case moves, else the product of the shape's sizes."""
    if r.get("min_bytes"):
        return float(r["min_bytes"])
    size = 1.0
    for k, v in r["shape"].items():
        if k != "name" and isinstance(v, int):
            size *= v
    return size


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| op | provider | case | shape | time ms | peak MiB | GB/s | TFLOP/s | roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in measured(rows):
        mem = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20
        lines.append(
            f"| {r['op']} | {r['provider']} | {case(r)} | {r['shape']['name']}: {shape_text(r['shape'])} "
            f"| {r['time_ms']:.3f} | {_fmt(mem, '.1f')} | {_fmt(r.get('gbps'), '.2f')} "
            f"| {_fmt(r.get('tflops'), '.4f')} | {_fmt(r.get('roofline'), '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def notes(rows: list[dict], ceilings: dict | None) -> str:
    """The ceilings and the skipped providers, for the markdown file."""
    out = []
    if ceilings:
        out.append(
            f"Ceilings measured on this device: copy {ceilings['ceiling_gbps']} GB/s (read + write), "
            f"{ceilings['ceiling_matmul_dtype']} matmul {ceilings['ceiling_tflops']} TFLOP/s."
        )
    skips = [r for r in rows if "skipped" in r]
    if skips:
        out.append("Skipped:")
        out += [f"- {s['provider']} for {s['op']} ({s['skip_kind']}): {s['skipped']}" for s in skips]
    return "\n".join(out) + ("\n" if out else "")


def _best(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(provider, shape name, case) -> the row of its fastest round (interference only ever adds time)."""
    best: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["provider"], r["shape"]["name"], case(r))
        if key not in best or r["time_ms"] < best[key]["time_ms"]:
            best[key] = r
    return best


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Time and peak memory per provider for one op's rows. With several sizes: one row of panels per case, lines
    over problem size (log-log, x = the case's minimal bytes, ticks named by shape). With one size: bars per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = measured(rows)
    best = _best(rows)
    cases = list(dict.fromkeys(case(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    sweep = len({r["shape"]["name"] for r in rows}) >= 2
    panels = len(cases) if sweep else 1
    fig, axes = plt.subplots(panels, 2, figsize=(12, 0.6 + 3.0 * panels), dpi=90, squeeze=False)
    for i, c in enumerate(cases if sweep else [None]):
        ax_t, ax_m = axes[i]
        if sweep:
            ticks: dict[float, list[str]] = {}
            for prov in providers:
                pts = sorted(
                    ((size_bytes(r), r) for (p, _, rc), r in best.items() if p == prov and rc == c), key=lambda t: t[0]
                )
                if not pts:
                    continue
                xs = [x / 2**20 for x, _ in pts]
                for x, r in pts:
                    ticks.setdefault(x / 2**20, []).append(r["shape"]["name"])
                ax_t.plot(xs, [r["time_ms"] for _, r in pts], marker="o", label=prov)
                mem = [(x, r["peak_mem_bytes"] / 2**20) for x, (_, r) in zip(xs, pts) if r.get("peak_mem_bytes")]
                if mem:
                    ax_m.plot(*zip(*mem), marker="o", label=prov)
            for ax in (ax_t, ax_m):
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks(list(ticks), ["/".join(dict.fromkeys(v)) for v in ticks.values()], fontsize=6)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_xlabel("minimal bytes moved (MiB; ticks: shape names)", fontsize=7)
            ax_t.set_title(f"{c}: median time", fontsize=8)
            ax_m.set_title(f"{c}: peak memory added", fontsize=8)
        else:
            width = 0.8 / max(1, len(providers))
            for j, prov in enumerate(providers):
                pick = {rc: r for (p, _, rc), r in best.items() if p == prov}
                xs = [k + j * width for k in range(len(cases))]
                ax_t.bar(xs, [pick[c].get("time_ms", 0) if c in pick else 0 for c in cases], width, label=prov)
                mem = [(pick[c].get("peak_mem_bytes") or 0) / 2**20 if c in pick else 0 for c in cases]
                ax_m.bar(xs, mem, width, label=prov)
            for ax in (ax_t, ax_m):
                ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))], cases, fontsize=7, rotation=20)
            ax_t.set_yscale("log")
            shape = rows[0]["shape"]
            ax_t.set_title(f"median time, {shape['name']}: {shape_text(shape)}", fontsize=8)
            ax_m.set_title("peak memory added", fontsize=8)
        ax_t.set_ylabel("ms", fontsize=7)
        ax_m.set_ylabel("MiB", fontsize=7)
        if not ax_m.has_data() or (not sweep and not any(p.get_height() for p in ax_m.patches)):
            ax_m.text(0.5, 0.5, "no peak above 0 measured", ha="center", transform=ax_m.transAxes, fontsize=8)
        ax_t.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path)
    plt.close(fig)


def _warn_if_shared(device) -> None:
    """CPU timings with several threads are distorted when other work competes for the cores (a descheduled thread
    stalls every parallel region: a chunked op measured 10x slower with 2 threads on 2 busy cores than with 1)."""
    import os

    import torch

    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return
    load, cores, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    if threads > 1 and load > 0.5 * cores:
        print(
            f"[bench] load average {load:.1f} on {cores} cores with {threads} torch threads: other work competes "
            "for the cores and will distort the timings; --threads 1 keeps them stable",
            flush=True,
        )


def _providers_for(module, requested: list[str] | None) -> list[str] | None:
    if requested is None:
        return None
    return [p for p in requested if p in getattr(module, "PROVIDERS", requested)]


def write_outputs(rows: list[dict], ceilings: dict | None, out: Path, kind: str, stamp: str) -> tuple[Path, str]:
    """A suite run's files in ``out``: the rows as ``suite-<kind>-<stamp>.jsonl`` (first: they are the result, the
    rest only shows them), its markdown table beside it, and one ``suite-<kind>-<op>.png`` plot per op.
    Returns (rows file, table text)."""
    from bench import common

    path = common.write_rows(rows, f"suite-{kind}-{stamp}", out)
    for row_op in dict.fromkeys(r["op"] for r in measured(rows)):
        op_rows = [r for r in measured(rows) if r["op"] == row_op]
        plot(op_rows, out / f"suite-{kind}-{row_op}.png", f"{row_op} on {op_rows[0]['device']}")
    table = markdown_table(rows) + "\n" + notes(rows, ceilings)
    (out / f"suite-{kind}-{stamp}.md").write_text(table)
    return path, table


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
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
    parser.add_argument("--profile", action="store_true", help="also write a torch.profiler trace per case")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 keeps CPU timings stable on a machine other work shares",
    )
    parser.add_argument(
        "--readme",
        nargs="?",
        const="README.md",
        default=None,
        metavar="PATH",
        help="regenerate the Performance section of the README (default README.md) from the results; runs nothing",
    )
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else BENCH_DIR / "results"
    if args.readme is not None:
        from bench.readme_table import update_readme

        readme = Path(args.readme)
        readme = readme if readme.is_absolute() or readme.exists() else BENCH_DIR.parent / readme
        update_readme(readme, out)
        print(f"[bench] Performance section of {readme} regenerated from {out}/*.jsonl")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    from bench import common

    device = torch.device(args.device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    _warn_if_shared(device)
    if args.profile:
        common.trace_into(out / "traces")
    first_ceilings = common.measure_ceilings(device)
    print(f"[bench] ceilings on {common.device_name(device)}: {first_ceilings}", flush=True)
    common.take_skips()
    all_rows: list[dict] = []
    try:
        for op in args.ops:
            entry = SUITE[op]
            if not script_exists(op) and f"bench.{entry.module}" not in sys.modules:
                print(f"[bench] {op}: skipped, bench/{entry.module}.py is not in this checkout", flush=True)
                continue
            module = importlib.import_module(f"bench.{entry.module}")
            shapes = entry.shapes(device.type)
            if args.shapes:
                shapes = [s for s in args.shapes if s in getattr(module, "SHAPES", args.shapes)]
            providers = _providers_for(module, args.providers)
            if providers == [] or shapes == []:
                print(f"[bench] {op}: none of the providers {args.providers} / shapes {args.shapes} is its own")
                continue
            print(f"[bench] {op} on {device} ({', '.join(shapes) if shapes else 'default shapes'})", flush=True)
            rows = module.run(shapes, device, providers)
            env = common.environment(device)
            all_rows.extend(rows)
            all_rows.extend({**env, **skip} for skip in common.take_skips())
    finally:
        common.trace_into(None)
    # measured again at the end, the higher kept: other work on a shared machine only ever lowers a measurement
    ceilings = common.best_ceilings(first_ceilings, common.measure_ceilings(device))
    common.attach_roofline(measured(all_rows), ceilings)
    path, table = write_outputs(all_rows, ceilings, out, device.type, stamp)
    print(table)
    traces = f", traces in {out / 'traces'}" if args.profile else ""
    print(f"[bench] {len(measured(all_rows))} rows -> {path} (+ .md table, suite-{device.type}-<op>.png plots{traces})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
