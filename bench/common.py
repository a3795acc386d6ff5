"""Shared benchmark machinery: timing, peak memory, result rows as JSON lines, and the registry of realistic shapes.

Timing: on CUDA, CUDA events around each repeat after warm-up, median of the repeats; on CPU, wall time
(perf_counter), median. Inputs are rebuilt per provider, so no provider benefits from another's warm caches.
Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the call; on CPU, the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before the call.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    # CPU-sized
    "cpu-floor": HeadShape("cpu-floor", 8, 512, 1024, 16384, "issue floor: N=4096, H=1024, V=16384"),
    "cpu-small": HeadShape("cpu-small", 4, 256, 512, 8192, "quick CPU check"),
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


@dataclass
class Measurement:
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 5) -> Measurement:
    """Median time of ``fn()`` and the peak memory one call adds."""
    for _ in range(warmup):
        fn()
    out = Measurement()
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.times_ms.append(start.elapsed_time(end))
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        out.peak_bytes = torch.cuda.max_memory_allocated() - base
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.times_ms.append((time.perf_counter() - t0) * 1e3)
        gc.collect()
        if _reset_peak_rss():
            base = _rss_bytes("VmRSS")
            fn()
            out.peak_bytes = max(0, _rss_bytes("VmHWM") - base)
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


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {
        "device": device_name(device),
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


def row(op: str, provider: str, mode: str, shape: dict, m: Measurement, env: dict, **extra) -> dict:
    """One result row: the schema every benchmark writes."""
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "time_ms": round(m.median_ms, 4),
        "peak_mem_bytes": m.peak_bytes,
        **env,
        **extra,
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'op':<24}{'provider':<16}{'mode':<10}{'shape':<44}{'time ms':>10}{'peak MiB':>10}")
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        print(f"{r['op']:<24}{r['provider']:<16}{r['mode']:<10}{shape[:43]:<44}{r['time_ms']:>10.2f}{mem:>10}")
