"""Benchmark diverse_select: keep n of K candidates per prompt, for B prompts of D-dim (or L×D, pooled) features.

Providers (per method, ``--modes dpp fps``):
- ``silmm``: ``silmm_fast.diverse_select`` on the C++ extension (one Gram matmul + one batched C++ call).
- ``reference``: the same call forced onto the pure-PyTorch reference (batched over prompts, loops over picks).
- ``torch_compile``: ``silmm_fast.reference.diverse_select`` through ``torch.compile``. Not run unless asked for
  (``--providers ... torch_compile``): compiling the reference's pick loop takes about 80 s per shape and method on
  the 2-core CPU (``floor-naive``, DPP), longer than the rest of the sweep together. Skipped with a printed reason
  when compiling fails.
- ``naive``: a per-prompt Python loop, the way a user would write it: normalize, ``xn @ xn.T``, then Chen et al.'s
  greedy DPP (or FPS) with torch ops on one prompt at a time.
- ``fpsample`` / ``torch-fps`` (FPS only, when installed): the point-cloud FPS libraries on the normalized pooled
  features (Euclidean distance on unit vectors orders like cosine distance); fpsample one prompt at a time, torch-fps
  batched. Their start rule differs from ours, so only the time is comparable.
- ``torch.bmm`` (mode ``gram``): one batched Gram product of the features (after the mean over ``L`` for 4-D input):
  the work no selection method can skip, the hardware floor for wide features.

Timing: per shape every (provider, method) pair is warmed up once, then timed ``--rounds`` times taking turns (one call
each per round; CUDA events on a GPU, with the features rotated among ``bench.common.rotation_copies`` copies),
median reported: on a shared machine a load spike then hits all providers alike. Cost model: ``cost``.

Floors (issue 4, CPU, side by side in one run): ``floor-naive`` silmm >= 20x faster than naive; ``floor-gram`` silmm
within 1.5x of torch.bmm. ``python bench/bench_diverse_select.py --device cpu`` runs the sweep and appends rows to
``bench/results/diverse_select-<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import (  # noqa: E402
    Cost,
    Measurement,
    case_label,
    environment,
    note_skip,
    peak_memory,
    peer_missing,
    print_table,
    rotation_copies,
    row,
    tensor_bytes,
    time_call,
    write_rows,
)
from silmm_fast import diverse_select, use_backend  # noqa: E402


@dataclass(frozen=True)
class SelectShape:
    """``prompts`` (B) × ``candidates`` (K) feature matrices of ``tokens`` (L; 1 = already pooled, [B, K, D]) × ``dim``
    (D); keep ``keep`` (n) per prompt."""

    name: str
    prompts: int
    candidates: int
    keep: int
    tokens: int
    dim: int
    note: str = ""


SELECT_SHAPES = {
    "floor-naive": SelectShape("floor-naive", 1024, 64, 16, 1, 256, "issue floor: silmm >= 20x naive"),
    "floor-gram": SelectShape("floor-gram", 256, 32, 8, 1, 4096, "issue floor: silmm <= 1.5x one torch.bmm Gram"),
    "b64": SelectShape("b64", 64, 64, 16, 1, 256, "fewer prompts"),
    "k16": SelectShape("k16", 1024, 16, 4, 1, 256, "few candidates"),
    "k256": SelectShape("k256", 64, 256, 32, 1, 256, "many candidates"),
    "d4096": SelectShape("d4096", 64, 64, 16, 1, 4096, "wide pooled features"),
    "dreamllm": SelectShape("dreamllm", 32, 16, 4, 64, 1024, "DreamLLM-like: 64 query tokens, mean-pooled"),
    "tiny": SelectShape("tiny", 2, 6, 3, 2, 8, "test registry"),
}
SHAPES = SELECT_SHAPES  # the registry the suite runner picks --shapes names from
DEFAULT_SHAPES = ("floor-naive", "floor-gram", "b64", "k16", "k256", "d4096", "dreamllm")
PROVIDERS = ("silmm", "reference", "torch_compile", "naive", "fpsample", "torch-fps", "torch.bmm")
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS if p != "torch_compile")
MODES = ("dpp", "fps")


# --- the per-prompt loop a user would write --------------------------------------------------------------------------
def _naive_dpp(L: torch.Tensor, n: int, eps: float = 1e-10) -> list[int]:
    """Chen et al. 2018 greedy MAP on one prompt's kernel, with torch ops (the usual port of their numpy code)."""
    K = L.shape[0]
    cis = torch.zeros(n, K, dtype=L.dtype)
    di2s = L.diagonal().clone()
    selected = [int(torch.argmax(di2s))]
    while len(selected) < n:
        k = len(selected) - 1
        j = selected[-1]
        ci_opt = cis[:k, j]
        di_opt = torch.sqrt(di2s[j])
        eis = (L[j, :] - ci_opt @ cis[:k, :]) / di_opt
        cis[k, :] = eis
        di2s = di2s - eis * eis
        di2s[j] = -math.inf
        j = int(torch.argmax(di2s))
        if di2s[j] < eps:
            remaining = [i for i in range(K) if i not in selected]
            selected += remaining[: n - len(selected)]
            break
        selected.append(j)
    return selected


def _naive_fps(S: torch.Tensor, n: int) -> list[int]:
    dist = 1.0 - S.mean(dim=1)
    selected = [int(torch.argmax(dist))]
    dist = 1.0 - S[:, selected[0]]
    while len(selected) < n:
        dist[selected[-1]] = -math.inf
        j = int(torch.argmax(dist))
        selected.append(j)
        dist = torch.minimum(dist, 1.0 - S[:, j])
    return selected


def naive_select(features: torch.Tensor, n: int, method: str, quality: torch.Tensor | None = None) -> torch.Tensor:
    out = []
    for b in range(features.shape[0]):
        x = features[b]
        if x.dim() == 3:
            x = x.mean(dim=1)
        xn = F.normalize(x, dim=-1)
        S = xn @ xn.T
        if method == "dpp":
            q = quality[b] if quality is not None else torch.ones(S.shape[0], dtype=S.dtype)
            out.append(_naive_dpp(q[:, None] * S * q[None, :], n))
        else:
            out.append(_naive_fps(S, n))
    return torch.tensor(out, dtype=torch.long)


# --- peers -----------------------------------------------------------------------------------------------------------
def _peer_missing(provider: str) -> str | None:
    return peer_missing({"fpsample": "fpsample", "torch-fps": "torch_fps"}[provider], provider)


def _pooled_unit(features: torch.Tensor) -> torch.Tensor:
    x = features.mean(dim=2) if features.dim() == 4 else features
    return F.normalize(x.float(), dim=-1)


def _peer_fn(provider: str, features: torch.Tensor, n: int):
    if provider == "fpsample":
        import fpsample
        import numpy as np

        def run_fpsample():
            pts = _pooled_unit(features).numpy()
            return np.stack([fpsample.fps_sampling(pts[b], n, start_idx=0) for b in range(pts.shape[0])])

        return run_fpsample
    import torch_fps

    def run_torch_fps():
        pts = _pooled_unit(features)
        mask = torch.ones(pts.shape[:2], dtype=torch.bool, device=pts.device)
        return torch_fps.farthest_point_sampling(pts, mask, n, random_start=False)

    return run_torch_fps


# --- the sweep -------------------------------------------------------------------------------------------------------
def _features(shape: SelectShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dims = (shape.prompts, shape.candidates, shape.dim)
    if shape.tokens > 1:
        dims = (shape.prompts, shape.candidates, shape.tokens, shape.dim)
    feats = torch.randn(dims, generator=g).to(device)
    quality = torch.rand(shape.prompts, shape.candidates, generator=g).to(device)
    return feats, quality


def cost(shape: SelectShape, mode: str) -> Cost:
    """Minimal cost of one case: bytes = the fp32 features read once (B·K·L·D·4) and the indices written (B·n·8; the
    Gram matrix B·K·K·4 for mode ``gram``); FLOPs = the Gram product of the pooled features, 2·B·K·K·D (the pooling
    adds and the pick loops, O(B·n·K) and O(B·n²·K), are not counted)."""
    read = shape.prompts * shape.candidates * shape.tokens * shape.dim * 4
    written = shape.prompts * shape.candidates**2 * 4 if mode == "gram" else shape.prompts * shape.keep * 8
    return Cost(read + written, 2 * shape.prompts * shape.candidates**2 * shape.dim)


def _provider_fn(provider: str, mode: str, feats: torch.Tensor, n: int, device: torch.device):
    """The call to time for ``provider``, or a (kind, reason) pair saying why it is skipped."""
    if provider in ("fpsample", "torch-fps"):
        why = _peer_missing(provider)
        if why is not None:
            return "unavailable", why
        if provider == "fpsample" and device.type != "cpu":
            return "unavailable", "CPU (numpy) only"
        return _peer_fn(provider, feats, n)
    if provider == "silmm":
        return lambda: diverse_select(feats, n, method=mode)
    if provider == "reference":

        def reference():
            with use_backend("reference"):
                return diverse_select(feats, n, method=mode)

        return reference
    if provider == "torch_compile":
        from silmm_fast.reference.diverse_select import diverse_select as reference

        return torch.compile(lambda: reference(feats, n, method=mode), dynamic=False)
    if provider == "naive":
        if device.type != "cpu":
            return "not_run", "the per-prompt loop is benchmarked on CPU only"
        return lambda: naive_select(feats, n, mode)
    raise ValueError(f"providers: unknown provider {provider!r}; expected some of {PROVIDERS}")


def _measure_interleaved(fns: dict, device: torch.device, rounds: int, shape_name: str) -> dict:
    """Median over ``rounds`` of one call of each provider per round, the providers taking turns, so a load spike
    from other processes on a shared machine hits every provider alike (sequential blocks of repeats would charge
    it to whichever provider was running). Each value of ``fns`` is one call per input copy; round ``r`` uses copy
    ``r``. Peak memory from ``bench.common.peak_memory`` (one extra call each); a failing provider is skipped."""
    times: dict = {key: [] for key in fns}
    for key, calls in list(fns.items()):
        try:
            calls[0]()  # warm-up (extension load, compilation, caches, allocator)
        except Exception as err:  # noqa: BLE001 - torch.compile or a peer failing must not stop the sweep
            note_skip("diverse_select", key[0], f"{key[1]} failed with {type(err).__name__}: {err}", "failed")
            del fns[key], times[key]
    for r in range(rounds):
        for key, calls in fns.items():
            times[key].append(time_call(calls[r % len(calls)], device))
    out = {}
    for key, calls in fns.items():
        peak, metric = peak_memory(calls[0], device)
        out[key] = Measurement(times[key], peak, metric, len(calls))
        if common.TRACE_DIR is not None:
            common.write_trace(calls[0], device, case_label("diverse_select", key[0], shape_name, key[1]))
    return out


def run(
    shapes: list[str] | None,
    device: torch.device | str,
    providers: list[str] | None = None,
    modes: list[str] | None = None,
    rounds: int | None = None,
) -> list[dict]:
    """Time every (shape, provider, method); returns result rows (bench.common.row schema). ``rounds``: timed calls
    per provider (default 5 on CPU, 50 on CUDA). ``providers`` None: every provider but ``torch_compile``."""
    device = torch.device(device)
    rounds = rounds or (50 if device.type == "cuda" else 5)
    if providers is None:
        providers = list(DEFAULT_PROVIDERS)
        why = "left out by default, compiling the reference's pick loop takes ~80 s per case on 2 CPU cores"
        note_skip("diverse_select", "torch_compile", why + " (--providers torch_compile runs it)", "not_run")
    modes = list(modes or MODES)
    env = environment(device)
    rows: list[dict] = []
    for name in shapes or DEFAULT_SHAPES:
        shape = SELECT_SHAPES[name]
        feats, _ = _features(shape, device)
        extra_copies = rotation_copies(tensor_bytes(feats), device) - 1
        copies = [feats] + [_features(shape, device)[0] for _ in range(extra_copies)]
        n = shape.keep
        shape_doc = {k: v for k, v in asdict(shape).items() if k != "note"}
        fns = {}
        if "torch.bmm" in providers:

            def gram(feats):
                def call():
                    pooled = feats.mean(dim=2) if feats.dim() == 4 else feats
                    return torch.bmm(pooled, pooled.transpose(1, 2))

                return call

            fns[("torch.bmm", "gram")] = [gram(f) for f in copies]
        for mode in modes:
            expected = diverse_select(feats, n, method=mode)
            with use_backend("reference"):
                assert torch.equal(diverse_select(feats, n, method=mode), expected), "reference != silmm"
            for provider in providers:
                if provider == "torch.bmm" or (provider in ("fpsample", "torch-fps") and mode != "fps"):
                    continue
                calls = [_provider_fn(provider, mode, f, n, device) for f in copies]
                if isinstance(calls[0], tuple):
                    note_skip("diverse_select", provider, calls[0][1], calls[0][0])
                    continue
                fns[(provider, mode)] = calls
        measured = _measure_interleaved(fns, device, rounds, shape.name)
        shape_rows = {
            key: row("diverse_select", key[0], key[1], shape_doc, m, env, cost=cost(shape, key[1]))
            for key, m in measured.items()
        }
        bmm = measured.get(("torch.bmm", "gram"))
        for mode in modes:
            silmm = measured.get(("silmm", mode))
            if silmm is None:
                continue
            silmm_row = shape_rows[("silmm", mode)]
            for (provider, m_mode), m in measured.items():
                if m_mode == mode and provider != "silmm":
                    silmm_row[f"speedup_vs_{provider}"] = round(m.median_ms / silmm.median_ms, 2)
            if bmm is not None:
                silmm_row["ratio_to_bmm"] = round(silmm.median_ms / bmm.median_ms, 3)
        rows.extend(shape_rows.values())
    return rows


def _summary(rows: list[dict]) -> None:
    for r in rows:
        if r["provider"] != "silmm":
            continue
        extras = {k: v for k, v in r.items() if k.startswith(("speedup_vs_", "ratio_to_"))}
        if extras:
            name = ",".join(f"{k}={v}" for k, v in r["shape"].items() if k != "name")
            print(
                f"silmm {r['mode']:<4} {r['shape']['name']:<12} {name:<40} "
                + " ".join(f"{k}={v}" for k, v in extras.items())
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), choices=sorted(SELECT_SHAPES))
    parser.add_argument("--providers", nargs="*", default=None, choices=PROVIDERS, help="default: all but compile")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per provider, taken in turns")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(args.shapes, device, args.providers, args.modes, rounds=args.rounds)
    print_table(rows)
    _summary(rows)
    path = write_rows(rows, f"diverse_select-{device.type}", args.out)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
