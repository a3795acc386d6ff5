"""Regenerate the README's Performance section from the result rows under ``bench/results/``.

    python -m silmm_fast.bench --readme          (or: python bench/readme_table.py [README.md] [results folder])

The section lies between ``<!-- perf:begin -->`` and ``<!-- perf:end -->``; everything else in the README is left
as it is. What the section shows, so that it says only what the rows show:

- One table per device, the device named as the rows name it, with the runs (git revision, date), torch version,
  threads and the measured ceilings the figures come from.
- Per op, the cases of ``README_MODES`` (fwd+bwd where an op has a backward) at the shapes of ``HEADLINE_SHAPES``
  that were measured (else at the largest shape measured).
- A case's figures come from the latest run that measured ``silmm`` and its baseline side by side (``naive`` where the
  script has one, else ``reference``); within that run each provider's fastest round (interference from other work
  only ever adds time). Ratios are silmm ÷ the other provider: below 1, silmm is faster or smaller. Peak memory is
  ``peak_mem_bytes``; where it is zero or missing for either side, ``traced_peak_bytes`` (marked "traced").
- A closing line on what was not measured: no GPU figures while no CUDA rows exist, and providers skipped as
  unavailable, failed or not run (unless a later run measured them).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"

# op -> the modes the README shows (others: every mode measured)
README_MODES = {
    "gather_logprobs": ("full",),
    "sequence_logprobs": ("full",),
    "fused_linear_logprobs": ("full",),
    "fused_linear_dpo": ("full",),
    "kernel_similarity": ("full",),
    "diverse_select": ("dpp", "fps"),
}
# op -> registry shapes the README prefers, in order (the issue floors first, then realistic GPU shapes)
HEADLINE_SHAPES = {
    "gather_logprobs": ("cpu-floor", "janus", "lumina"),
    "sequence_logprobs": ("cpu-floor", "janus", "lumina"),
    "fused_linear_logprobs": ("cpu-floor", "janus", "janus-7b", "lumina"),
    "fused_linear_dpo": ("cpu-floor", "janus", "janus-7b", "lumina"),
    "kernel_similarity": ("cpu-kc", "dreamllm-4k-k8", "wide-64k"),
    "diverse_select": ("floor-naive", "floor-gram", "dreamllm"),
}
# benchmarked computation -> how the README names it (the public op it measures)
OP_NAMES = {
    "kernel_similarity": "`pairwise_distance` (KC-DPO's launch)",
    "fused_linear_dpo": "`FusedLinearDPOLoss`",
}
MODE_NAMES = {"full": "fwd+bwd", "forward": "forward", "backward": "backward", "dpp": "DPP", "fps": "FPS"}
COMPARISON_MODES = ("gram",)  # floor measurements every mode of their shape is compared with
HEAD_ORDER = {"trainable": 0, "frozen": 1}


def load_rows(results_dir: Path | str) -> list[dict]:
    """Every benchmark row (measured or skipped) in ``results_dir/*.jsonl``; other JSON lines are ignored."""
    rows = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "op" in r and "provider" in r and ("time_ms" in r or "skipped" in r):
                rows.append(r)
    return rows


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "skipped" not in r and r.get("time_ms") is not None]


def _is_cuda(r: dict) -> bool:
    return r.get("device_type", "cpu" if r["device"].startswith("cpu") else "cuda") == "cuda"


def _size(r: dict) -> float:
    size = 1.0
    for k, v in r["shape"].items():
        if k != "name" and isinstance(v, int):
            size *= v
    return size


def _best(rows: list[dict]) -> dict[str, dict]:
    """provider -> its fastest row."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["provider"] not in out or r["time_ms"] < out[r["provider"]]["time_ms"]:
            out[r["provider"]] = r
    return out


def _ms(t: float) -> str:
    return f"{t:.3g} ms" if t < 100 else f"{t:.0f} ms"


def _ratio(a: float, b: float) -> str:
    """``a / b`` to three digits; a small ratio also as the speedup it is."""
    if not b:
        return "-"
    ratio = a / b
    return f"{ratio:.3g}× ({1 / ratio:.3g}× faster)" if 0 < ratio < 0.2 else f"{ratio:.3g}×"


def _memory(silmm: dict, base: dict) -> str:
    for key, note in (("peak_mem_bytes", ""), ("traced_peak_bytes", ", traced")):
        a, b = silmm.get(key), base.get(key)
        if a and b:
            return f"{a / b:.3g}× ({a / 2**20:.3g} vs {b / 2**20:.3g} MiB{note})"
    return "-"


def _shape(r: dict) -> str:
    dims = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "name")
    dtype = f", {r['dtype']}" if r.get("dtype") else ""
    return f"{r['shape']['name']}: {dims}{dtype}"


def _case_name(mode: str, head: str | None) -> str:
    name = MODE_NAMES.get(mode, mode)
    return name if head in (None, "-") else f"{name}, {head} head"


def _lines_for_device(rows: list[dict]) -> tuple[list[str], set[tuple[str, str]]]:
    """Table lines for one device's measured rows, and the (git, timestamp) runs they come from."""
    lines, runs = [], set()
    ops = list(dict.fromkeys(list(README_MODES) + [r["op"] for r in rows]))
    for op in ops:
        op_rows = [r for r in rows if r["op"] == op]
        silmm_rows = [r for r in op_rows if r["provider"] == "silmm"]
        if not silmm_rows:
            continue
        measured_shapes = {r["shape"]["name"] for r in silmm_rows}
        shapes = [s for s in HEADLINE_SHAPES.get(op, ()) if s in measured_shapes]
        if not shapes:
            shapes = [max(silmm_rows, key=_size)["shape"]["name"]]
        for shape in shapes:
            wanted = README_MODES.get(op) or tuple(dict.fromkeys(r["mode"] for r in silmm_rows))
            cases = sorted(
                {(r["mode"], r.get("head")) for r in silmm_rows if r["shape"]["name"] == shape and r["mode"] in wanted},
                key=lambda c: (wanted.index(c[0]), HEAD_ORDER.get(c[1], 2)),
            )
            for mode, head in cases:
                line = _case_line(op, shape, mode, head, op_rows, runs)
                if line:
                    lines.append(line)
    return lines, runs


def _case_line(op: str, shape: str, mode: str, head: str | None, op_rows: list[dict], runs: set) -> str | None:
    at_shape = [r for r in op_rows if r["shape"]["name"] == shape]
    same_case = [r for r in at_shape if r["mode"] == mode and r.get("head") == head]
    by_run: dict[str, list[dict]] = {}
    for r in same_case:
        by_run.setdefault(r["timestamp"], []).append(r)
    for stamp in sorted(by_run, reverse=True):
        best = _best(by_run[stamp])
        baseline = "naive" if "naive" in best else "reference"
        if "silmm" not in best or baseline not in best:
            continue
        silmm, base = best["silmm"], best[baseline]
        runs.add((silmm.get("git") or "?", stamp))
        t = silmm["time_ms"]
        others = [f"{p} {_ratio(t, r['time_ms'])}" for p, r in best.items() if p not in ("silmm", baseline)]
        floors = _best([r for r in at_shape if r["timestamp"] == stamp and r["mode"] in COMPARISON_MODES])
        others += [f"{p} ({r['mode']}) {_ratio(t, r['time_ms'])}" for p, r in floors.items()]
        roofline = "-" if silmm.get("roofline") is None else f"{100 * silmm['roofline']:.2g} %"
        return (
            f"| {OP_NAMES.get(op, f'`{op}`')} | {_case_name(mode, head)} | {_shape(silmm)} | {_ms(silmm['time_ms'])} "
            f"| {_ratio(silmm['time_ms'], base['time_ms'])} {baseline} | {_memory(silmm, base)} "
            f"| {', '.join(others) or '-'} | {roofline} |"
        )
    return None


def _short(reason: str, limit: int = 140) -> str:
    """A skip reason's first sentence, at most ``limit`` characters (the rows keep the whole message)."""
    first = reason.split(". ")[0].rstrip(".")
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def _not_measured(rows: list[dict]) -> str:
    parts = []
    if not any(_is_cuda(r) for r in _measured(rows)):
        parts.append(
            "GPU: no GPU has been available to this project, so no GPU figure is claimed (the GPU benchmarks, "
            "`python -m silmm_fast.bench --device cuda`, and the `gpu`-marked tests exist but have not been run)"
        )
    latest: dict[tuple[str, str, str], str] = {}
    for r in _measured(rows):
        key = (r["device"], r["op"], r["provider"])
        latest[key] = max(latest.get(key, ""), r["timestamp"])
    reasons: dict[str, list[str]] = {}
    ops: dict[str, list[str]] = {}
    for s in rows:
        if "skipped" not in s or s.get("skip_kind") == "unsupported":
            continue
        if latest.get((s.get("device"), s["op"], s["provider"]), "") > s.get("timestamp", ""):
            continue
        key = f"`{s['provider']}` ({s.get('device', 'unknown device')}"
        why = reasons.setdefault(key, [])
        short = _short(s["skipped"])
        if short not in why:
            why.append(short)
        if s["op"] not in ops.setdefault(key, []):
            ops[key].append(s["op"])
    if reasons:
        listed = "; ".join(
            f"{key}, {', '.join(sorted(ops[key]))}: {' / '.join(why)})" for key, why in sorted(reasons.items())
        )
        parts.append(f"providers skipped on the measuring machine: {listed}")
    return "Not measured: " + "; ".join(parts) + "." if parts else ""


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


def _how(how: tuple) -> str:
    """A run's threads and clock: ", 1 thread, CPU time" (process CPU time: bench/common.py CPU_CLOCK)."""
    threads, clock = how or (None, "wall")
    return (f", {_threads(threads)}" if threads else "") + (", CPU time" if clock == "process" else "")


def section(rows: list[dict]) -> str:
    """The generated section body (without the markers)."""
    measured = _measured(rows)
    out = [
        "<!-- generated by `python -m silmm_fast.bench --readme` from bench/results/*.jsonl:"
        " edit bench/readme_table.py, not this section -->",
    ]
    devices = list(dict.fromkeys(r["device"] for r in sorted(measured, key=lambda r: not _is_cuda(r))))
    for device in devices:
        dev_rows = [r for r in measured if r["device"] == device]
        lines, runs = _lines_for_device(dev_rows)
        if not lines:
            continue
        first = max(dev_rows, key=lambda r: r["timestamp"])
        # the rows shown may come from runs on different machines of one device type, with other thread counts and
        # clocks: name each run's CPU, and its threads and clock where runs differ
        cpu_of = {r["timestamp"]: r.get("cpu_model") for r in dev_rows}
        how_of = {r["timestamp"]: (r.get("threads"), r.get("clock", "wall")) for r in dev_rows}
        in_order = sorted(runs, key=lambda run: run[1])  # by time, so regenerating writes the same text
        models = list(dict.fromkeys(cpu_of.get(stamp) for _, stamp in in_order if cpu_of.get(stamp)))
        model = f" — {' / '.join(models)}" if models else ""
        hows = list(dict.fromkeys(how_of.get(stamp) for _, stamp in in_order))
        threads = ""
        if len(hows) == 1 and hows[0][0]:
            threads = f", {_threads(hows[0][0])}" + (", CPU time" if hows[0][1] == "process" else "")
        dates = list(dict.fromkeys((git, stamp[:10], cpu_of.get(stamp), how_of.get(stamp)) for git, stamp in in_order))
        run_text = ", ".join(
            f"git {git} ({date}{', ' + cpu if cpu and len(models) > 1 else ''}{_how(how) if len(hows) > 1 else ''})"
            for git, date, cpu, how in dates
        )
        loads = [r.get("load_average_1min") for r in dev_rows if r["timestamp"] in {s for _, s in runs}]
        loads = [x for x in loads if x is not None]
        if loads:
            run_text += f"; load average {min(loads):.3g}–{max(loads):.3g} while they ran"
        ceilings = ""
        if first.get("ceiling_gbps"):
            ceilings = (
                f" Ceilings measured there: copy {first['ceiling_gbps']:.3g} GB/s, "
                f"{first['ceiling_matmul_dtype']} matmul {1e3 * first['ceiling_tflops']:.3g} GFLOP/s."
            )
        out += [
            "",
            f"**{device}**{model} (torch {first['torch']}{threads}; runs: {run_text}).{ceilings}",
            "",
            "| op | case | shape | silmm time | time vs baseline | peak memory vs baseline | silmm ÷ others (time)"
            " | silmm roofline |",
            "|---|---|---|---|---|---|---|---|",
            *lines,
        ]
    if len(out) == 1:
        out += ["", "No benchmark results yet: run `python -m silmm_fast.bench`."]
    out += [
        "",
        "Ratios are silmm ÷ the other provider, so below 1 silmm is faster or uses less memory; each figure is its "
        "case's fastest round in one run where the providers were measured side by side, so ratios hold even where "
        "other work shared the machine, absolute times less so; runs marked CPU time were timed by the process's "
        "CPU time (one thread), which other work on a shared machine does not inflate. Peak memory is what one call "
        "adds (bench/common.py "
        "says how it is taken); roofline is the share of the time the device's measured copy and matmul ceilings "
        "allow for the case's minimal bytes and FLOPs. Raw rows: `bench/results/*.jsonl`; plots: "
        "`bench/results/suite-<device>-<op>.png`.",
    ]
    missing = _not_measured(rows)
    if missing:
        out += ["", missing]
    out += [
        "",
        "`python -m silmm_fast.bench [--device cpu|cuda] [--ops ...] [--shapes ...] [--providers ...] [--profile]` "
        "reruns the suite and writes JSON lines, a markdown table and plots to `bench/results/` (`--profile`: a "
        "torch.profiler trace per case in `bench/results/traces/`); `python -m silmm_fast.bench --readme` rewrites "
        "this section from them. `pytest bench/ --benchmark-only` runs CPU micro-benchmarks of every public op.",
    ]
    return "\n".join(out) + "\n"


def replace_section(text: str, body: str) -> str:
    """``text`` with everything between the markers replaced by ``body``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README: expected one {BEGIN} ... {END} pair around the Performance section")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def update_readme(readme: Path | str, results_dir: Path | str) -> str:
    """Rewrite the section of ``readme`` from the rows in ``results_dir``; returns the new section body."""
    readme = Path(readme)
    body = section(load_rows(results_dir))
    readme.write_text(replace_section(readme.read_text(), body))
    return body


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    readme = Path(argv[0]) if argv else root / "README.md"
    results = Path(argv[1]) if len(argv) > 1 else root / "bench" / "results"
    update_readme(readme, results)
    print(f"{readme}: Performance section regenerated from {results} ({datetime.date.today()})")


if __name__ == "__main__":
    main()
