"""Tile / launch-configuration sweep for the fused linear log-prob kernels (``_fused_linear_logprobs_fwd_kernel`` and
``_fused_linear_logprobs_bwd_kernel`` in kernels/fused_linear_logprobs.py): which (BLOCK_N, BLOCK_V, BLOCK_H,
num_warps, num_stages) runs them fastest?

For each candidate configuration, two launches are timed on their own, through ``_Plan.launch_fwd`` /
``_Plan.launch_bwd`` of a plan made with the configuration's tiles (the kernel module and its ``GPU_TILES`` are left
untouched):
- ``stats``: the forward kernel (statistics epilogue) over all N tokens, 2·N·H·V FLOPs;
- ``grad``: the backward kernel (gradient epilogue, logits recomputed) over one slab of rows, writing its dz slab,
  2·rows·H·V FLOPs, with rows the slab height the launchers use (``SLAB_BYTES`` / (4·V) tokens, at most N).
Each launch is called once first (this compiles it; a configuration that fails to compile or launch, e.g. out of
shared memory, becomes a row with an ``error`` field and the sweep goes on) and its result checked against a torch
reference from materialized fp32 logits: the log-probs for ``stats``, the dz slab for ``grad``. A configuration off
by more than the dtype's tolerance is marked ``ok: false`` and cannot be the best. Then, after a few untimed calls,
``--repeats`` launches are queued between CUDA events (wall time on CPU) and the median kept. A cuBLAS ``torch.mm``
of [N, H] × [H, V] in the same dtype is timed once, so the TFLOP/s of every row can be read against it.

Candidates (half precision; the current default first, so it is always measured): BLOCK_N, BLOCK_V in {64, 128, 256},
BLOCK_H in {32, 64, 128}, 4 or 8 warps, 2-5 stages, kept when
- the pipeline's shared memory, (BLOCK_N + BLOCK_V) · BLOCK_H · element size · stages, is at most 220 KiB;
- the fp32 logit tile is 64-128 registers per thread (so 256 × 256 is out: 256 registers a thread even with 8 warps,
  and 128 × 256 needs 8 warps);
- the stages suit the hidden step: 4-5 for 32, 3-4 for 64, 2-3 for 128 (128-384 hidden columns in flight);
- tiles with less operand reuse than 128 × 128 (BLOCK_N·BLOCK_V / (BLOCK_N + BLOCK_V) below 64: 64 × 256, 64 × 128
  and their transposes) only with the default hidden step of 64.
That is 34 configurations, tiles with more reuse first: when ``--budget`` seconds have passed no new configuration
is started, and what was measured is kept. Every row is appended to ``--out`` as soon as it is measured (so a run cut
off from outside keeps what it finished), then a sorted table per epilogue is printed with the best configuration of
each and the one fastest for a forward and backward together (one statistics launch and N / slab rows gradient
launches: ``GPU_TILES`` holds one configuration for both), and a summary row is written.

    python tools/gpu/tune_fused_head.py --device cuda --budget 240 --out /tmp/tune_fused_head.jsonl
    TRITON_INTERPRET=1 python tools/gpu/tune_fused_head.py --device cpu --quick --out /tmp/tune_smoke.jsonl

``--quick``: a tiny shape with partial tiles and three configurations, a smoke run of the plumbing (on CPU under the
Triton interpreter, where warps and stages mean nothing and the timings say nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from silmm_fast.kernels import fused_linear_logprobs as flp  # noqa: E402

from bench.common import RESULTS_DIR, environment, significant  # noqa: E402
from silmm_fast.reference.logprobs import gather_logprobs as reference_gather_logprobs  # noqa: E402

IGNORE = -100
JANUS_SHAPE = (16 * 576, 2048, 16384)  # N, H, V: Janus-Pro-1B's image head over a batch of 16 images
QUICK_SHAPE = (96, 80, 320)  # partial token, vocabulary and hidden tiles for every quick configuration
SMEM_LIMIT = 220 * 2**10
STAGES = {32: (4, 5), 64: (3, 4), 128: (2, 3)}  # pipeline depths tried per hidden step
ACC_REGISTERS = (64, 128)  # fp32 logit-tile values per thread kept
MAX_CONFIGS = 40
# Largest |error| accepted against the fp32 reference (log-probs of order log V; dz entries in [-1, 1] rounded to the
# slab dtype, bf16 keeps 8 bits)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-3, torch.float64: 1e-6}


@dataclass(frozen=True)
class Config:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"{self.block_n}x{self.block_v}x{self.block_h} w{self.num_warps} s{self.num_stages}"

    def smem_bytes(self, element_size: int) -> int:
        """Shared memory of the operand pipeline: one hidden step of both operand tiles per stage."""
        return (self.block_n + self.block_v) * self.block_h * element_size * self.num_stages

    def reuse(self) -> float:
        """Products per operand value loaded: BLOCK_N·BLOCK_V / (BLOCK_N + BLOCK_V)."""
        return self.block_n * self.block_v / (self.block_n + self.block_v)

    def acc_registers(self) -> float:
        """fp32 logit-tile values per thread."""
        return self.block_n * self.block_v / (32 * self.num_warps)


def default_config(dtype: torch.dtype) -> Config:
    return Config(*flp.GPU_TILES[dtype])


def candidate_configs(dtype: torch.dtype, quick: bool) -> list[Config]:
    """The configurations to try, the current default first, then by operand reuse, most first (module docstring)."""
    default = default_config(dtype)
    if quick:
        return [default, Config(64, 64, 32, 4, 2), Config(64, 128, 32, 4, 4)]
    element_size = torch.empty(0, dtype=dtype).element_size()
    grid = itertools.product((64, 128, 256), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4, 5))
    kept = []
    for c in (Config(*values) for values in grid):
        if c.smem_bytes(element_size) > SMEM_LIMIT or c.num_stages not in STAGES[c.block_h]:
            continue
        if not ACC_REGISTERS[0] <= c.acc_registers() <= ACC_REGISTERS[1]:
            continue
        if c.reuse() < Config(128, 128, 64, 8, 3).reuse() and c.block_h != 64:
            continue
        if c != default:
            kept.append(c)
    kept.sort(key=lambda c: -c.reuse())  # stable: the grid's order among tiles of equal reuse
    return [default, *kept][:MAX_CONFIGS]


# --- the problem and its reference ------------------------------------------------------------------------------------
@dataclass
class Problem:
    """Inputs of one shape, and what a correct kernel gives for them (fp32; fp64 for fp64 inputs)."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    labels: torch.Tensor  # [N], every 13th token ignored
    grad: torch.Tensor  # [N] upstream gradient of each log-prob
    slab_rows: int  # rows of the gradient launch
    logp: torch.Tensor  # [N]
    row_max: torch.Tensor  # [N]
    row_logsum: torch.Tensor  # [N]
    dz: torch.Tensor  # [slab_rows, V]

    @property
    def shape(self) -> dict:
        return {"N": self.hidden.shape[0], "H": self.hidden.shape[1], "V": self.weight.shape[0]}


def slab_rows(n: int, vocab: int) -> int:
    """The slab height the launchers pick (a multiple of every token tile tried), at most ``n``."""
    return min(n, max(256, flp.SLAB_BYTES // (4 * vocab) // 256 * 256))


def make_problem(n: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Problem:
    """Random inputs as in bench_logprobs (unit-variance logits) and what the reference gives for them."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=device) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    labels[::13] = IGNORE
    grad = torch.rand(n, generator=gen, device=device) + 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = slab_rows(n, vocab)
    torch.backends.cuda.matmul.allow_tf32 = False  # an IEEE fp32 reference
    # the project's reference log-probs over materialized logits; dz = d(Σ g·logp)/dz by autograd through it
    logits = (hidden.to(acc) @ weight.to(acc).t()).requires_grad_()
    logp = reference_gather_logprobs(logits, labels, ignore_index=IGNORE)
    (logp * grad.to(acc)).sum().backward()
    with torch.no_grad():
        row_max = logits.amax(1)
        row_logsum = torch.log(torch.exp(logits - row_max[:, None]).sum(1))  # the kernel's m and r inputs
    dz = logits.grad[:rows].clone()
    del logits
    return Problem(hidden, weight, labels, grad.to(acc), rows, logp.detach(), row_max, row_logsum, dz)


# --- launching and timing ---------------------------------------------------------------------------------------------
def make_plan(config: Config, problem: Problem) -> flp._Plan:
    """The launchers' plan with ``config``'s tiles, warps and stages."""
    tiles = flp.Tiles(config.block_n, config.block_v, config.block_h, config.num_warps, config.num_stages)
    return flp._Plan(problem.hidden, problem.weight, tiles=tiles, chunk_rows=problem.slab_rows)


def stats_epilogue(plan: flp._Plan, problem: Problem) -> tuple[Callable[[], None], Callable[[], float], int]:
    """(launch, its largest log-prob error against the reference, FLOPs) of the statistics epilogue over all rows."""
    n, dev = plan.N, problem.hidden.device
    stats = (
        torch.empty(n, plan.n_vtiles, dtype=plan.acc, device=dev),
        torch.empty(n, plan.n_vtiles, dtype=plan.acc, device=dev),
        torch.zeros(n, dtype=plan.acc, device=dev),
    )

    def launch():
        part_max, part_sum, target = stats
        plan.launch_fwd(
            problem.hidden,
            problem.weight,
            None,
            problem.labels,
            rows=(0, n),
            ignore_index=IGNORE,
            part_max=part_max,
            part_sum=part_sum,
            target=target,
        )

    def error():
        logp = flp._combine(*stats, problem.labels, IGNORE)[0]
        return (logp - problem.logp).abs().max().item()

    return launch, error, 2 * n * plan.H * plan.V


def grad_epilogue(plan: flp._Plan, problem: Problem) -> tuple[Callable[[], None], Callable[[], float], int]:
    """(launch, its largest dz error against the reference, FLOPs) of the gradient epilogue over one slab."""
    rows = problem.slab_rows
    dz = torch.empty(rows, plan.V, dtype=plan.slab_dtype, device=problem.hidden.device)
    grad = dict(row_max=problem.row_max, row_logsum=problem.row_logsum, grad=problem.grad, dz=dz)

    def launch():
        plan.launch_bwd(
            problem.hidden, problem.weight, None, problem.labels, rows=(0, rows), ignore_index=IGNORE, **grad
        )

    def error():
        return (dz.to(problem.dz.dtype) - problem.dz).abs().max().item()

    return launch, error, 2 * rows * plan.H * plan.V


EPILOGUES = {"stats": stats_epilogue, "grad": grad_epilogue}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CUDA_SPIN_UP = 5  # untimed calls queued before the timed ones: the GPU idled while the next config compiled


def time_launch(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median, fastest) milliseconds of ``repeats`` calls of ``fn``, already compiled. CUDA: ``CUDA_SPIN_UP``
    untimed calls (clocks back up), then all timed calls queued between event pairs before one synchronization (no
    launch gaps); CPU: wall time per call."""
    if device.type == "cuda":
        for _ in range(CUDA_SPIN_UP):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def timing_fields(median_ms: float, min_ms: float, repeats: int, flops: int) -> dict:
    return {
        "time_ms": round(median_ms, 4),
        "min_ms": round(min_ms, 4),
        "repeats": repeats,
        "flops": flops,
        "tflops": significant(flops / (median_ms * 1e9)),
    }


def measure_config(config: Config, epilogue: str, problem: Problem, repeats: int) -> dict:
    """One row: the first call (compiles), the check against the reference, then the timed calls; a failure at any
    step is recorded in ``error``."""
    device, dtype = problem.hidden.device, problem.hidden.dtype
    row = {
        "kind": "config",
        "epilogue": epilogue,
        "config": asdict(config),
        "label": config.label,
        "default": config == default_config(dtype),
        "smem_bytes": config.smem_bytes(problem.hidden.element_size()),
        "ok": False,
        "error": None,
    }
    try:
        launch, error, flops = EPILOGUES[epilogue](make_plan(config, problem), problem)
        t0 = time.perf_counter()
        launch()
        _sync(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        row["max_err"] = significant(error())
        row["ok"] = row["max_err"] <= TOLERANCE[dtype]  # False for NaN too
        row.update(timing_fields(*time_launch(launch, device, repeats), repeats, flops))
    except Exception as err:  # noqa: BLE001 - a configuration that does not compile or launch is a result too
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    return row


def measure_mm(problem: Problem, repeats: int) -> dict:
    """The cuBLAS reference row: torch.mm of hidden [N, H] by weight [V, H] transposed, same dtype."""
    h, w = problem.hidden, problem.weight
    out = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    launch = lambda: torch.mm(h, w.t(), out=out)
    launch()
    _sync(h.device)
    provider = "cublas" if h.device.type == "cuda" else "torch.mm"
    fields = timing_fields(*time_launch(launch, h.device, repeats), repeats, 2 * h.shape[0] * h.shape[1] * w.shape[0])
    return {"kind": "reference", "epilogue": "mm", "label": provider, "ok": True, "error": None, **fields}


# --- reporting --------------------------------------------------------------------------------------------------------
def ranked(rows: list[dict], epilogue: str) -> list[dict]:
    """The rows of ``epilogue``: correct ones fastest first, then wrong ones, then failed ones."""
    mine = [r for r in rows if r.get("epilogue") == epilogue]
    return sorted(mine, key=lambda r: (r["error"] is not None, not r["ok"], r.get("time_ms", float("inf"))))


def best(rows: list[dict], epilogue: str) -> dict | None:
    top = ranked(rows, epilogue)
    return top[0] if top and top[0]["ok"] and top[0]["error"] is None else None


def print_table(rows: list[dict], epilogue: str, mm: dict) -> None:
    """The sorted table of one epilogue, with each row's speed against the default and TFLOP/s against cuBLAS."""
    default = next((r for r in rows if r.get("epilogue") == epilogue and r["default"] and "time_ms" in r), None)
    print(f"\n{epilogue} epilogue (cuBLAS mm: {mm['time_ms']:.3f} ms, {mm['tflops']} TFLOP/s)")
    print(f"{'#':>3}  {'config':<22}{'smem KiB':>9}{'ms':>10}{'min ms':>10}{'TFLOP/s':>11}"
          f"{'x default':>10}{'/ cuBLAS':>10}{'first s':>9}  status")  # fmt: skip
    for i, r in enumerate(ranked(rows, epilogue), 1):
        name = r["label"] + (" *" if r["default"] else "")
        if "time_ms" not in r:
            print(f"{i:>3}  {name:<22}{r['smem_bytes'] / 2**10:>9.0f}  {r['error']}")
            continue
        speedup = f"{default['time_ms'] / r['time_ms']:.3f}" if default else "-"
        status = "ok" if r["ok"] else f"WRONG (max err {r['max_err']})"
        print(f"{i:>3}  {name:<22}{r['smem_bytes'] / 2**10:>9.0f}{r['time_ms']:>10.3f}{r['min_ms']:>10.3f}"
              f"{r['tflops']:>11.4g}{speedup:>10}{r['tflops'] / mm['tflops']:>10.3f}{r['first_call_s']:>9.1f}  "
              f"{status}")  # fmt: skip


def best_total(rows: list[dict], slabs: float) -> dict | None:
    """The configuration fastest for one forward and backward (``GPU_TILES`` holds one configuration for both): the
    statistics launch plus ``slabs`` (N / slab rows) gradient launches, among configurations correct in both."""
    times: dict[str, dict] = {}
    for r in rows:
        if r.get("kind") == "config" and r["ok"] and r["error"] is None:
            times.setdefault(r["label"], {"config": r["config"]})[r["epilogue"]] = r["time_ms"]
    both = [t for t in times.values() if set(EPILOGUES) <= set(t)]
    if not both:
        return None
    top = min(both, key=lambda t: t["stats"] + slabs * t["grad"])
    return {"config": top["config"], "label": Config(**top["config"]).label,
            "time_ms": round(top["stats"] + slabs * top["grad"], 4)}  # fmt: skip


def summary_row(rows: list[dict], not_measured: list[Config], slabs: float) -> dict:
    """The best configuration of each epilogue and for a whole forward and backward (None where none was correct),
    and the configurations left out."""
    out = {"kind": "summary", "not_measured": [c.label for c in not_measured]}
    for epilogue in EPILOGUES:
        top = best(rows, epilogue)
        out[f"best_{epilogue}"] = None if top is None else {k: top[k] for k in ("config", "label", "time_ms", "tflops")}
    out["best_total"] = best_total(rows, slabs)
    return out


# --- the sweep --------------------------------------------------------------------------------------------------------
def sweep(problem: Problem, configs: list[Config], repeats: int, budget: float, emit: Callable[[dict], None]):
    """Measure the cuBLAS reference, then both epilogues of each configuration until ``budget`` seconds have passed.
    Returns (rows, configurations not measured)."""
    start = time.perf_counter()
    rows = [measure_mm(problem, repeats)]
    emit(rows[0])
    for i, config in enumerate(configs):
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            print(f"[tune] budget of {budget:.0f} s spent after {elapsed:.0f} s: {len(configs) - i} configs left out")
            return rows, configs[i:]
        for epilogue in EPILOGUES:
            row = measure_config(config, epilogue, problem, repeats)
            rows.append(row)
            emit(row)
            result = row["error"] or f"{row['time_ms']:.3f} ms, {row['tflops']} TFLOP/s, max err {row['max_err']}"
            print(f"[tune] {i + 1}/{len(configs)} {config.label:<22} {epilogue:<6} {result}", flush=True)
    return rows, []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--shape",
        nargs=3,
        type=int,
        metavar=("N", "H", "V"),
        default=None,
        help=f"tokens, hidden size, vocabulary (default {JANUS_SHAPE}; {QUICK_SHAPE} with --quick)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no new config is started")
    parser.add_argument("--repeats", type=int, default=None, help="timed launches per row (default 30; 2 on CPU)")
    parser.add_argument("--out", default=None, help="JSON-lines file rows are appended to "
                        "(default bench/results/tune_fused_head-<device>.jsonl)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a tiny shape and three configs (smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not flp.interpreted():
        parser.error("on CPU the Triton kernel runs only under the interpreter: set TRITON_INTERPRET=1")
    dtype = getattr(torch, args.dtype)
    n, hidden_size, vocab = args.shape or (QUICK_SHAPE if args.quick else JANUS_SHAPE)
    repeats = args.repeats or (30 if device.type == "cuda" else 2)
    out = Path(args.out or RESULTS_DIR / f"tune_fused_head-{device.type}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)

    problem = make_problem(n, hidden_size, vocab, dtype, device)
    configs = candidate_configs(dtype, args.quick)
    print(f"[tune] N={n} H={hidden_size} V={vocab} {args.dtype} on {device}: {len(configs)} configs, grad slab "
          f"{problem.slab_rows} rows, budget {args.budget:.0f} s", flush=True)  # fmt: skip
    common = {**environment(device), "shape": problem.shape, "dtype": args.dtype, "slab_rows": problem.slab_rows}
    with out.open("a") as f:

        def emit(row: dict) -> None:
            f.write(json.dumps({**common, **row}, sort_keys=True) + "\n")
            f.flush()

        rows, not_measured = sweep(problem, configs, repeats, args.budget, emit)
        summary = summary_row(rows, not_measured, n / problem.slab_rows)
        emit(summary)

    mm = rows[0]
    for epilogue in EPILOGUES:
        print_table(rows, epilogue, mm)
    print()
    rate = lambda top: f", {top['tflops']} TFLOP/s" if "tflops" in top else ""
    for epilogue in (*EPILOGUES, "total"):
        top = summary[f"best_{epilogue}"]
        print(f"best {epilogue}: " + ("none correct" if top is None else
              f"{top['label']} ({top['time_ms']:.3f} ms{rate(top)}) {top['config']}"))  # fmt: skip
    print(f"wrote {len(rows) + 1} rows to {out}")


if __name__ == "__main__":
    main()
