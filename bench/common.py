"""Shared benchmark machinery: timing, peak memory, cost models and rooflines, profiler traces, result rows as JSON
lines, and the registry of realistic shapes.

Timing (``measure``): every call under test is warmed up first (``torch.compile`` compiles there). On CUDA each repeat
sits between two CUDA events, all repeats are queued before one synchronization, and the count is chosen so the
timed calls take about half a second (at least 20 repeats); the inputs rotate among enough copies
(``rotation_copies``) that together they are twice the L2 cache, so a repeat never finds its inputs still cached by
the previous one. On CPU, wall time (``perf_counter``) per repeat, without rotation (this machine's last-level cache
is hundreds of MiB; CPU figures are warm-cache figures). The row's ``time_ms`` is the median, ``min_ms`` the fastest
repeat (on a shared machine interference only ever adds time).

Peak memory (``peak_mem_bytes``, how it was taken in ``mem_metric``): what one call adds at its peak.
- ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` during one call, above the memory allocated before it.
- ``rss_hwm``: on CPU, the growth of the process's peak resident set during one call: ``/proc/self/clear_refs``
  resets the high-water mark, and the figure is VmHWM after the call minus VmRSS before it. Every page the call
  touches that was not resident counts: tensor storages, allocator scratch, compiled-kernel buffers, C++ extension
  work space. So that memory freed by earlier calls cannot hide a later allocation, the heap's free pages are
  handed back to the OS first (``trim_heap``) and glibc maps every block of 128 KiB or more fresh during the call
  (``MALLOC_FOR_MEMORY``); partly used pages, a few hundred KiB in all, may be reused unseen. Timed calls run with
  the allocator as a long-running process has it (``MALLOC_FOR_TIMING``). ``None`` where the kernel does not allow
  the reset.

Cost models (``Cost``): each benchmark script computes, per op, shape and mode, the bytes an ideal implementation must
move (inputs read once, outputs and gradients written once) and the arithmetic it must do (matrix products; None
where the op is memory-bound and the FLOP count is meaningless). ``row`` turns them into achieved GB/s and TFLOP/s,
and ``attach_roofline`` into the fraction of the device's measured ceilings (``measure_ceilings``).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCHEMA = 2  # version of the result rows (documented in bench/suite.py); rows without the field are version 1

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- shapes from ANCHORS.md: one registry, never scattered literals -----------------------------------------------
@dataclass(frozen=True)
class HeadShape:
    """A discrete image-token head: ``sequences`` × ``tokens`` image positions, hidden size, vocabulary size."""

    name: str
    sequences: int
    tokens: int
    hidden: int
    vocab: int
    note: str = ""

    @property
    def n(self) -> int:
        return self.sequences * self.tokens


HEAD_SHAPES = {
    # GPU-sized, from ANCHORS.md
    "seed-llama": HeadShape("seed-llama", 64, 32, 4096, 40192, "SEED-LLaMA: 32 image tokens, ~40.2K vocab"),
    "janus": HeadShape("janus", 16, 576, 2048, 16384, "Janus-Pro-1B: 576 tokens, 16,384-way image head"),
    "janus-7b": HeadShape("janus-7b", 8, 576, 4096, 16384, "Janus-Pro-7B"),
    "lumina": HeadShape("lumina", 4, 1024, 4096, 65536, "Chameleon / Lumina-mGPT"),
    "emu3": HeadShape("emu3", 1, 8190, 4096, 184622, "Emu3: one image, 184,622-way vocab"),
    "emu3-pair": HeadShape("emu3-pair", 2, 8190, 4096, 184622, "Emu3: one preference pair (DPO)"),
    # CPU-sized
    "cpu-xs": HeadShape("cpu-xs", 2, 256, 256, 4096, "smallest step of the CPU size sweep"),
    "cpu-small": HeadShape("cpu-small", 4, 256, 512, 8192, "quick CPU check"),
    "cpu-floor": HeadShape("cpu-floor", 8, 512, 1024, 16384, "issue floor: N=4096, H=1024, V=16384"),
    "tiny": HeadShape("tiny", 2, 16, 32, 96, "test registry"),
}


@dataclass(frozen=True)
class FeatureShape:
    """Continuous features: ``prompts`` × ``candidates`` feature matrices of ``tokens`` × ``dim``."""

    name: str
    prompts: int
    candidates: int
    tokens: int
    dim: int
    note: str = ""


FEATURE_SHAPES = {
    "dreamllm-1k": FeatureShape("dreamllm-1k", 32, 8, 64, 1024, "DreamLLM-like: 64 query tokens"),
    "dreamllm-4k": FeatureShape("dreamllm-4k", 32, 8, 64, 4096, "DreamLLM-like, H=4096"),
    # KC-DPO with K winners and K losers per prompt: candidates = 2K
    "dreamllm-1k-k1": FeatureShape("dreamllm-1k-k1", 32, 2, 64, 1024, "DreamLLM-like, K=1 (best vs worst)"),
    "dreamllm-4k-k1": FeatureShape("dreamllm-4k-k1", 32, 2, 64, 4096, "DreamLLM-like H=4096, K=1"),
    "dreamllm-4k-k8": FeatureShape("dreamllm-4k-k8", 32, 16, 64, 4096, "DreamLLM-like H=4096, K=8"),
    "wide-64k": FeatureShape("wide-64k", 32, 8, 1, 65536, "ANCHORS floor shape: pooled D=65,536"),
    "cpu-small": FeatureShape("cpu-small", 8, 4, 16, 256, "quick CPU check"),
    "cpu-kc": FeatureShape("cpu-kc", 8, 4, 64, 1024, "CPU-sized KC-DPO: 8 prompts, K=2, 64 tokens x 1024"),
    "tiny": FeatureShape("tiny", 2, 2, 3, 8, "test registry"),
}


# --- measuring ----------------------------------------------------------------------------------------------------
# How CPU calls are timed: "wall" (perf_counter) or "process" (this process's CPU time, all its threads). On a machine
# shared with other work, time-slicing inflates wall time but not CPU time; measure "process" with one thread
# (torch.set_num_threads(1)), or threads waiting for each other count too. SILMM_BENCH_CPU_CLOCK sets it.
CPU_CLOCK = os.environ.get("SILMM_BENCH_CPU_CLOCK", "wall")
CUDA_MIN_REPEATS = 20
CUDA_TIMED_SECONDS = 0.5
MAX_COPIES = 8


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc malloc thresholds (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). Timing: the 64-bit maxima of glibc's dynamic
# thresholds, the state a process that keeps allocating and freeing large blocks settles into (a fixed 128 KiB
# threshold made the chunked CPU log-prob path ~1.5x slower: every chunk buffer was a fresh mmap, page faults and
# all). Memory: every block of 128 KiB or more mapped fresh and unmapped on free, so the resident-set peak of a
# call is not hidden by memory an earlier call freed and the allocator reuses.
MALLOC_FOR_TIMING = (32 * 2**20, 64 * 2**20)
MALLOC_FOR_MEMORY = (128 * 2**10, 128 * 2**10)


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    """Set glibc's mmap and trim thresholds (process-wide; nothing where libc is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Hand the pages of every free heap block back to the OS (glibc ``malloc_trim``): a block freed earlier and
    reused by the next call then has to be faulted in again, so it shows in that call's resident-set peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cache_bytes(device: torch.device) -> int:
    """The cache that inputs are rotated to defeat: the GPU's L2 (0 on CPU, where inputs are not rotated)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return 0


def rotation_copies(input_bytes: int, device: torch.device) -> int:
    """How many copies of a case's inputs to rotate among: together at least twice the cache, at most ``MAX_COPIES``."""
    cache = cache_bytes(torch.device(device))
    if cache <= 0 or input_bytes <= 0:
        return 1
    return max(1, min(MAX_COPIES, math.ceil(2 * cache / input_bytes)))


def tensor_bytes(*tensors: object) -> int:
    """Storage bytes of the tensors among ``tensors`` (nested lists and tuples walked)."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            total += tensor_bytes(*t)
    return total


@dataclass
class Measurement:
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    mem_metric: str | None = None
    copies: int = 1

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on CUDA; on CPU wall time, or CPU time when ``CPU_CLOCK`` is "process"."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    clock = time.process_time if CPU_CLOCK == "process" else time.perf_counter
    t0 = clock()
    fn()
    return (clock() - t0) * 1e3


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str | None]:
    """(bytes one call of ``fn`` adds at its peak, how it was measured): see the module docstring."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda_max_allocated"
    set_malloc_thresholds(*MALLOC_FOR_MEMORY)
    trim_heap()
    try:
        if not _reset_peak_rss():
            fn()
            return None, None
        base = _rss_bytes("VmRSS")
        fn()
        return max(0, _rss_bytes("VmHWM") - base), "rss_hwm"
    finally:
        set_malloc_thresholds(*MALLOC_FOR_TIMING)


def measure(
    fn: Callable[[], object] | Sequence[Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int | None = None,
    label: str | None = None,
) -> Measurement:
    """Median time of the call and the peak memory one call adds (module docstring). ``fn`` is one callable or one
    per input copy (``rotation_copies``), called in turn. ``repeats``: CPU repeats (default 5); on CUDA the count is
    at least ``repeats`` and at least enough for about ``CUDA_TIMED_SECONDS`` of calls (20 minimum). ``label``
    names the case's profiler trace when tracing is on (``trace_into``)."""
    device = torch.device(device)
    fns = [fn] if callable(fn) else list(fn)
    if device.type == "cpu":
        set_malloc_thresholds(*MALLOC_FOR_TIMING)
    for i in range(max(warmup, 1 if device.type == "cuda" else warmup)):
        fns[i % len(fns)]()
    out = Measurement(copies=len(fns))
    if device.type == "cuda":
        estimate = time_call(fns[0], device)
        count = max(repeats or 0, CUDA_MIN_REPEATS, min(200, int(CUDA_TIMED_SECONDS * 1e3 / max(estimate, 1e-3))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for i in range(count):
            starts[i].record()
            fns[i % len(fns)]()
            ends[i].record()
        torch.cuda.synchronize(device)
        out.times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        out.times_ms = [time_call(fns[i % len(fns)], device) for i in range(repeats or 5)]
    out.peak_bytes, out.mem_metric = peak_memory(fns[0], device)
    if label is not None and TRACE_DIR is not None:
        write_trace(fns[0], device, label)
    return out


# --- device ceilings and rooflines ----------------------------------------------------------------------------------
def significant(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (rates span many orders of magnitude)."""
    return float(f"{x:.{digits}g}")


@dataclass(frozen=True)
class Cost:
    """What an ideal implementation of one case must do: ``bytes`` moved to and from memory (inputs read once,
    outputs and gradients written once) and ``flops`` of arithmetic (None where the op is memory-bound)."""

    bytes: int
    flops: int | None = None


def measure_ceilings(device: torch.device, *, copy_bytes: int | None = None, matmul_n: int | None = None) -> dict:
    """The device's own ceilings, measured: a large device-to-device copy (GB/s counting the bytes read and the bytes
    written) and a large square matmul (TFLOP/s; bf16 on CUDA, fp32 on CPU, where bf16 matmuls are emulated).
    CUDA: 1 GiB copy, n = 8192; CPU: 256 MiB copy, n = 2048 (about a second on 2 cores), with torch's current thread
    count. Each rate from the fastest repeat: a ceiling is the best the device does, and on a shared machine other
    work only ever slows a repeat down (``best_ceilings`` combines several measurements)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or (2**30 if cuda else 2**28)
    matmul_n = matmul_n or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    buffers = [torch.ones(copy_bytes // 4, dtype=torch.float32, device=device) for _ in range(2)]
    copy = measure(lambda: buffers[1].copy_(buffers[0]), device, warmup=1, repeats=5)
    buffers.clear()
    a, b = (torch.randn(matmul_n, matmul_n, device=device).to(dtype) for _ in range(2))
    mm = measure(lambda: a @ b, device, warmup=1, repeats=5)
    return {
        "ceiling_gbps": significant(2 * copy_bytes / (copy.min_ms * 1e6)),
        "ceiling_tflops": significant(2 * matmul_n**3 / (mm.min_ms * 1e9)),
        "ceiling_matmul_dtype": str(dtype).removeprefix("torch."),
    }


def best_ceilings(*measured: dict) -> dict:
    """The highest of several ``measure_ceilings`` results, rate by rate."""
    out = dict(measured[0])
    for m in measured[1:]:
        out["ceiling_gbps"] = max(out["ceiling_gbps"], m["ceiling_gbps"])
        out["ceiling_tflops"] = max(out["ceiling_tflops"], m["ceiling_tflops"])
    return out


def attach_roofline(rows: list[dict], ceilings: dict) -> None:
    """Add the ceilings and ``roofline`` to each row: the time the row's cost would take at the ceilings (bytes at the
    copy bandwidth, or FLOPs at the matmul rate, whichever is longer) over its measured median time. 1.0 is the
    ceiling; ``roofline_bound`` says which of the two set it."""
    for r in rows:
        r.update(ceilings)
        r["roofline"] = r["roofline_bound"] = None
        if not r.get("time_ms") or r.get("min_bytes") is None:
            continue
        memory_ms = r["min_bytes"] / (ceilings["ceiling_gbps"] * 1e6)
        compute_ms = (r.get("flops") or 0) / (ceilings["ceiling_tflops"] * 1e9)
        r["roofline"] = significant(max(memory_ms, compute_ms) / r["time_ms"])
        r["roofline_bound"] = "compute" if compute_ms > memory_ms else "memory"


# --- profiler traces ------------------------------------------------------------------------------------------------
TRACE_DIR: Path | None = None


def trace_into(folder: Path | str | None) -> None:
    """Write a torch.profiler Chrome trace of one call of every measured case into ``folder`` (None: stop)."""
    global TRACE_DIR
    TRACE_DIR = None if folder is None else Path(folder)
    if TRACE_DIR is not None:
        TRACE_DIR.mkdir(parents=True, exist_ok=True)


def case_label(op: str, provider: str, shape: str, mode: str, *tags: str | None) -> str:
    """``op-provider-shape-mode[-tag...]``, safe as a file name."""
    parts = [op, provider, shape, mode, *(t for t in tags if t and t != "-")]
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "-".join(parts))


def write_trace(fn: Callable[[], object], device: torch.device, label: str) -> Path:
    """One call of ``fn`` under torch.profiler (CPU, plus CUDA on a GPU) -> ``TRACE_DIR/<label>.json``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        fn()
        _sync(device)
    path = Path(TRACE_DIR or ".") / f"{label}.json"
    prof.export_chrome_trace(str(path))
    return path


# --- skipped providers ------------------------------------------------------------------------------------------------
SKIPPED: list[dict] = []


SKIP_KINDS = ("unavailable", "failed", "not_run", "unsupported")


def note_skip(op: str, provider: str, reason: str, kind: str = "unavailable") -> None:
    """Print why ``provider`` does not run for ``op`` here and keep the record (the suite writes it as a row).
    ``kind``: ``unavailable`` (not installed, or not on this device), ``failed`` (it raised, e.g. torch.compile),
    ``not_run`` (left out by default, the reason says how to ask for it), ``unsupported`` (it has no such op)."""
    if kind not in SKIP_KINDS:
        raise ValueError(f"kind: expected one of {SKIP_KINDS}, got {kind!r}")
    print(f"skip {provider} for {op}: {reason}", flush=True)
    if not any(s["op"] == op and s["provider"] == provider for s in SKIPPED):
        SKIPPED.append({"op": op, "provider": provider, "skipped": reason, "skip_kind": kind})


def peer_missing(module: str, package: str | None = None) -> str | None:
    """None when the peer library ``module`` can be imported; otherwise why not, with the install command."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.split(".")[0] == err.name.split(".")[0]:
            return f"{package or module} is not installed (pip install {package or module})"
        return f"{module} not importable ({err})"
    except Exception as err:  # noqa: BLE001 - a broken install is a reason too
        return f"{module} not importable ({type(err).__name__}: {err})"
    return None


def take_skips() -> list[dict]:
    """The skip records noted since the last call (and forget them)."""
    out = list(SKIPPED)
    SKIPPED.clear()
    return out


# --- recording ----------------------------------------------------------------------------------------------------
def _git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(device: torch.device) -> dict:
    """The fields every row carries: device, versions, revision, time, and the machine's load when the script ran
    (``load_average_1min``: on a shared machine it says how much other work competed for the cores)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    device = torch.device(device)
    return {
        "schema": SCHEMA,
        "device": device_name(device),
        "device_type": device.type,
        "cpu_model": cpu_model() if device.type == "cpu" else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "git": _git_revision(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_rows(rows: list[dict], name: str, results_dir: Path | None = None) -> Path:
    """Append ``rows`` to ``results_dir/name.jsonl`` (one JSON object per line)."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def row(
    op: str, provider: str, mode: str, shape: dict, m: Measurement, env: dict, cost: Cost | None = None, **extra
) -> dict:
    """One result row: the schema every benchmark writes (documented in bench/suite.py)."""
    out = {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "time_ms": round(m.median_ms, 4),
        "min_ms": round(m.min_ms, 4),
        "repeats": len(m.times_ms),
        "copies": m.copies,
        "peak_mem_bytes": m.peak_bytes,
        "mem_metric": m.mem_metric,
        "clock": "cuda_events" if env.get("device_type") == "cuda" else CPU_CLOCK,
        **env,
    }
    if cost is not None:
        out.update(
            min_bytes=cost.bytes,
            flops=cost.flops,
            gbps=significant(cost.bytes / (m.median_ms * 1e6)),
            tflops=None if cost.flops is None else significant(cost.flops / (m.median_ms * 1e9)),
        )
    out.update(extra)
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'op':<24}{'provider':<16}{'mode':<10}{'shape':<44}{'time ms':>10}{'peak MiB':>10}")
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        print(f"{r['op']:<24}{r['provider']:<16}{r['mode']:<10}{shape[:43]:<44}{r['time_ms']:>10.2f}{mem:>10}")
