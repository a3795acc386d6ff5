"""Benchmark the discrete DPO head: log-probs over given logits, the fused linear head + log-prob gather, and the
fused DPO loss, against what trainers do today.

Ops: ``gather_logprobs`` / ``sequence_logprobs`` (logits [B, T, V] given), ``fused_linear_logprobs`` (hidden [B, T, H]
and a head weight [V, H]; ``head`` trainable or frozen), ``fused_linear_dpo`` (B = 2 × pairs sequences, reference
log-probs given, as in DPO with cached reference log-probs).
Providers: ``naive`` (materialized logits, fp32 ``log_softmax``, gather, mask: what TRL does by default),
``gemm_floor`` (fused heads only: the bare matrix products over the kept tokens, logits and the gradients' products
through the vendor BLAS with nothing else: the floor a fused head can approach),
``reference`` (``silmm_fast.reference``), ``torch_compile`` (the reference through ``torch.compile``), ``silmm``
(the public API, auto backend), and peers when installed: ``trl`` (``selective_log_softmax``), ``cut_cross_entropy``
(``linear_cross_entropy``, per-token; ``torch_compile`` implementation off CUDA), ``liger_kernel`` (fused linear
cross-entropy: Triton, CUDA only; chunked DPO with its reference model inside: PyTorch + ``torch.compile``, any
device), ``trl`` (logits ops: ``selective_log_softmax``; fused heads: TRL's chunked log-prob function at the
trainer's default chunk, DPO on top).
A provider that is missing or fails (``torch.compile`` included) is skipped with a printed reason.
Modes: ``forward`` (autograd recording, as in training), ``backward`` (on a retained graph), ``full`` (both).
Metrics: median time and the peak memory one call adds (bench.common.measure), and the minimal cost of the case
(``cost``: bytes an ideal implementation moves, matrix-product FLOPs) with the GB/s and TFLOP/s it implies.

    python bench/bench_logprobs.py --device cpu --shapes cpu-floor --ops fused_linear_logprobs --providers naive silmm
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    HEAD_SHAPES,
    Cost,
    HeadShape,
    case_label,
    environment,
    measure,
    note_skip,
    peer_missing,
    print_table,
    rotation_copies,
    row,
    tensor_bytes,
    write_rows,
)

OPS = ("gather_logprobs", "sequence_logprobs", "fused_linear_logprobs", "fused_linear_dpo")
SHAPES = HEAD_SHAPES  # the registry the suite runner picks --shapes names from
PROVIDERS = ("naive", "gemm_floor", "reference", "torch_compile", "silmm", "trl", "cut_cross_entropy", "liger_kernel")
MODES = ("forward", "backward", "full")
HEADS = ("trainable", "frozen")
IGNORE = -100
BETA = 0.1
# Fraction of a fused head's labels set to IGNORE (prompt positions, padding): an implementation that skips them
# saves their products, and the floor is taken over the kept tokens.
IGNORED_FRACTION = 0.1


class Skip(Exception):
    """A provider that cannot run here (not installed, no CUDA)."""


class Unsupported(Skip):
    """A provider with no implementation of the op."""


class ModeUnsupported(Unsupported):
    """A provider that cannot be measured in one mode (the others still run)."""


# --- the computations ------------------------------------------------------------------------------------------------
def _naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != IGNORE)


def _naive_head_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _naive_token_logps(F.linear(hidden, weight), labels).sum(-1)


def _dpo(logps: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor) -> torch.Tensor:
    from silmm_fast import dpo_loss

    pairs = logps.shape[0] // 2
    return dpo_loss(logps[:pairs], logps[pairs:], ref_c, ref_r, beta=BETA).loss


def _logits_fn(op: str, provider: str, device: torch.device) -> Callable:
    """(logits, labels) -> scalar."""
    import silmm_fast
    from silmm_fast.reference import logprobs as ref

    if op == "gather_logprobs":
        reference = lambda z, y: ref.gather_logprobs(z, y, ignore_index=IGNORE).sum()
        silmm = lambda z, y: silmm_fast.gather_logprobs(z, y, ignore_index=IGNORE).sum()
    else:
        reference = lambda z, y: ref.sequence_logprobs(z, y, ignore_index=IGNORE).sum()
        silmm = lambda z, y: silmm_fast.sequence_logprobs(z, y, ignore_index=IGNORE).sum()
    if provider == "naive":
        return lambda z, y: _naive_token_logps(z, y).sum()
    if provider == "reference":
        return reference
    if provider == "torch_compile":
        return torch.compile(reference, dynamic=False)
    if provider == "silmm":
        return silmm
    if provider == "trl":
        if why := peer_missing("trl.trainer.utils", "trl"):
            raise Skip(why)
        from trl.trainer.utils import selective_log_softmax

        return lambda z, y: (selective_log_softmax(z, y.clamp(min=0)) * (y != IGNORE)).sum()
    raise Unsupported(f"{provider} has no {op}")


def _head_logps_fn(provider: str, device: torch.device) -> Callable:
    """(hidden, weight, labels) -> per-sequence log-probs [B]."""
    import silmm_fast
    from silmm_fast.reference.fused_linear_logprobs import fused_linear_logprobs as reference

    if provider == "naive":
        return _naive_head_logps
    if provider == "reference":
        return lambda h, w, y: reference(h, w, y, ignore_index=IGNORE)
    if provider == "torch_compile":
        return torch.compile(lambda h, w, y: reference(h, w, y, ignore_index=IGNORE), dynamic=False)
    if provider == "silmm":
        return lambda h, w, y: silmm_fast.fused_linear_logprobs(h, w, y, ignore_index=IGNORE)
    if provider == "cut_cross_entropy":
        if why := peer_missing("cut_cross_entropy", "cut-cross-entropy"):
            raise Skip(why)
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"
        return lambda h, w, y: -linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="none", impl=impl).sum(-1)
    if provider == "trl":
        if why := peer_missing("trl.trainer.utils", "trl"):
            raise Skip(why)
        from trl.trainer import utils as trl_utils

        def chunked(h, w, y):
            mask = y != IGNORE
            rows = trl_utils._ChunkedLogProbFunction.apply(
                h[mask], w, None, y[mask], 1.0, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
            )[0]
            return h.new_zeros(y.shape, dtype=rows.dtype).masked_scatter(mask, rows).sum(-1)

        return chunked
    if provider == "liger_kernel":
        if why := peer_missing("liger_kernel.transformers", "liger-kernel"):
            raise Skip(why)
        if device.type != "cuda":
            raise Skip("liger_kernel runs Triton kernels: CUDA only")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")
        return lambda h, w, y: -ce(w, h.reshape(-1, h.shape[-1]), y.reshape(-1)).view(y.shape).sum(-1)
    raise Unsupported(f"{provider} has no fused_linear_logprobs")


def _dpo_fn(provider: str, device: torch.device) -> Callable:
    """(hidden [2B, T, H], weight, labels, ref_c, ref_r) -> scalar DPO loss."""
    if provider == "silmm":
        from silmm_fast import FusedLinearDPOLoss

        module = FusedLinearDPOLoss(beta=BETA, ignore_index=IGNORE)
        return lambda h, w, y, rc, rr: module(h, w, y, rc, rr).loss
    if provider == "liger_kernel":
        if why := peer_missing("liger_kernel.chunked_loss", "liger-kernel"):
            raise Skip(why)
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger takes no precomputed reference log-probs: it scores the reference model's head inside every chunk
        # (here the policy's own states and head, detached: the same work as a separate reference model).
        module = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, use_ref_model=True)

        def liger(h, w, y, rc, rr):
            out = module(w, h, y, ref_input=h.detach(), ref_weight=w.detach())
            return out[0] if isinstance(out, tuple) else out

        return liger
    logps = _head_logps_fn(provider, device)
    return lambda h, w, y, rc, rr: _dpo(logps(h, w, y), rc, rr)


# --- cases -----------------------------------------------------------------------------------------------------------
def _inputs(op: str, shape: HeadShape, head: str, device: torch.device, dtype: torch.dtype):
    """(args, leaves): the call arguments and the tensors gradients are taken for."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, shape.vocab, (shape.sequences, shape.tokens), generator=gen).to(device)
    if op in ("gather_logprobs", "sequence_logprobs"):
        logits = torch.randn(shape.sequences, shape.tokens, shape.vocab, generator=gen).to(device, dtype)
        logits.requires_grad_(True)
        return (logits, labels), [logits]
    ignored = torch.rand(shape.sequences, shape.tokens, generator=gen) < IGNORED_FRACTION
    labels = labels.masked_fill(ignored.to(device), IGNORE)
    hidden = torch.randn(shape.sequences, shape.tokens, shape.hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(shape.vocab, shape.hidden, generator=gen) / shape.hidden**0.5).to(device, dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(head == "trainable")
    leaves = [hidden, weight] if head == "trainable" else [hidden]
    if op == "fused_linear_logprobs":
        return (hidden, weight, labels), leaves
    pairs = shape.sequences // 2
    ref = (torch.randn(2, pairs, generator=gen) - shape.tokens * 10.0).to(device)
    return (hidden, weight, labels, ref[0], ref[1]), leaves


def _gemm_floor(mode: str, trainable: bool) -> Callable:
    """The bare products of a fused head over the kept tokens (no softmax, no autograd): the logits (forward), the
    input gradient's product and, for a trainable head, the weight gradient's (backward)."""

    def products(hidden, weight, labels, *_):
        h = hidden.detach().reshape(-1, hidden.shape[-1])[(labels != IGNORE).reshape(-1)]
        w = weight.detach()
        z = h @ w.t()
        if mode == "forward":
            return z
        return z @ w, (z.t() @ h if trainable else None)

    return products


def _provider_fn(op: str, provider: str, device: torch.device) -> Callable:
    """The provider's computation for ``op``: call arguments -> scalar (built once per case, shared by the copies)."""
    if provider == "gemm_floor":
        raise Unsupported("gemm_floor is built per mode (_callable)")
    if op in ("gather_logprobs", "sequence_logprobs"):
        return _logits_fn(op, provider, device)
    if op == "fused_linear_logprobs":
        logps = _head_logps_fn(provider, device)
        return lambda *a: logps(*a).sum()
    return _dpo_fn(provider, device)


def _callable(fn: Callable | None, mode: str, args: tuple, leaves: list):
    if fn is None:  # the GEMM floor: its products are the whole call, in every mode
        floor = _gemm_floor(mode, trainable=args[1].requires_grad)
        return lambda: floor(*args)
    if mode == "forward":
        return lambda: fn(*args)
    if mode == "full":
        return lambda: torch.autograd.grad(fn(*args), leaves)
    loss = fn(*args)
    return lambda: torch.autograd.grad(loss, leaves, retain_graph=True)


def cost(op: str, shape: HeadShape, head: str, mode: str, dtype: torch.dtype, kept: int | None = None) -> Cost:
    """The minimal cost of one case (N = B·T tokens, ``kept`` of them scored, e bytes per element of logits / hidden /
    weight; FLOPs count the kept tokens, which are all a fused head needs to multiply).

    Bytes: every input read once, every output and gradient written once; int64 labels, fp32 outputs.
    - ``gather_logprobs`` / ``sequence_logprobs`` (memory-bound: FLOPs None): forward reads the logits (N·V·e);
      backward and full also write their gradient (N·V·e) and need the logits (or a softmax of the same size) once.
    - ``fused_linear_logprobs`` / ``fused_linear_dpo``: forward reads hidden (N·H·e) and weight (V·H·e); backward and
      full also write the hidden gradient (N·H·e) and, for a trainable head, the weight gradient (V·H·e). The logits
      never need to reach memory. FLOPs: the head's matrix products, 2·N·H·V each: one forward; backward two for a
      trainable head (input and weight gradients), one for a frozen head. An implementation that recomputes the
      logits in backward (not storing them) does one more product that this model does not credit. A frozen head's
      silmm forward already does its input-gradient product (the backward only rescales), so against this model its
      forward reads low and its backward above 1: compare frozen heads on the full case.
    """
    e = torch.finfo(dtype).bits // 8
    n, labels = shape.n, shape.n * 8
    grads = mode in ("backward", "full")
    if op in ("gather_logprobs", "sequence_logprobs"):
        out = n * 4 if op == "gather_logprobs" else shape.sequences * 4
        return Cost(n * shape.vocab * e * (2 if grads else 1) + labels + out)
    hidden, weight = n * shape.hidden * e, shape.vocab * shape.hidden * e
    written = (hidden + (weight if head == "trainable" else 0)) if grads else shape.sequences * 4
    product = 2 * (n if kept is None else kept) * shape.hidden * shape.vocab
    backward = 2 * product if head == "trainable" else product
    flops = {"forward": product, "backward": backward, "full": product + backward}[mode]
    return Cost(hidden + weight + labels + written, flops)


def run(
    shapes: list[str | HeadShape],
    device: torch.device | str,
    providers: list[str] | None = None,
    modes: list[str] | None = None,
    *,
    ops: list[str] | None = None,
    heads: list[str] | None = None,
    dtype: torch.dtype | None = None,
    warmup: int = 1,
    repeats: int | None = 3,
    rounds: int = 1,
) -> list[dict]:
    """Time and measure every (op, shape, head, provider, mode); returns result rows (bench.common.row schema).

    ``rounds`` > 1 repeats the whole sweep, so on a shared machine every provider sees the same spells of
    interference; each row records its ``round`` and ``print_ratios`` compares the fastest round of each case.
    """

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    rows = []
    # The backward mode calls backward on a retained graph, which compiled graphs with donated buffers refuse: the
    # compiled reference runs without them (they only save memory in backward).
    with functorch_config.patch(donated_buffer=False):
        _sweep(rows, shapes, device, dtype, env, providers, modes, ops, heads, warmup, repeats, rounds)
    return rows


def _sweep(rows, shapes, device, dtype, env, providers, modes, ops, heads, warmup, repeats, rounds) -> None:
    from silmm_fast import _backend

    for rnd, shape in [(r, s) for r in range(rounds) for s in shapes]:
        shape = HEAD_SHAPES[shape] if isinstance(shape, str) else shape
        for op in ops or OPS:
            if op == "fused_linear_dpo" and shape.sequences % 2:
                print(f"skip {op} at {shape.name}: needs an even number of sequences (chosen + rejected)")
                continue
            op_heads = ["-"] if op in ("gather_logprobs", "sequence_logprobs") else (heads or list(HEADS))
            print(f"[logprobs] {op} at {shape.name} (round {rnd})", flush=True)
            for head in op_heads:
                for provider in providers or PROVIDERS:
                    for mode in modes or MODES:
                        args, leaves = _inputs(op, shape, head, device, dtype)
                        fused = op in ("fused_linear_logprobs", "fused_linear_dpo")
                        kept = int((args[2] != IGNORE).sum()) if fused else None
                        copies = [(args, leaves)]
                        copies += [_inputs(op, shape, head, device, dtype)
                                   for _ in range(rotation_copies(tensor_bytes(args), device) - 1)]  # fmt: skip
                        label = case_label(op, provider, shape.name, mode, head)
                        try:
                            if provider == "gemm_floor" and op in ("gather_logprobs", "sequence_logprobs"):
                                raise Unsupported("gemm_floor measures fused heads only")
                            in_forward = op == "fused_linear_dpo" and provider in ("silmm", "liger_kernel")
                            if mode == "backward" and in_forward:
                                raise ModeUnsupported("gradients are formed in the forward (one backward per "
                                                      "forward): compare the full mode")  # fmt: skip
                            fn = None if provider == "gemm_floor" else _provider_fn(op, provider, device)
                            calls = [_callable(fn, mode, a, lv) for a, lv in copies]
                            m = measure(calls, device, warmup=warmup, repeats=repeats, label=label)
                        except Skip as why:
                            kind = "unsupported" if isinstance(why, Unsupported) else "unavailable"
                            note_skip(op, provider, f"{mode}: {why}" if isinstance(why, ModeUnsupported) else str(why),
                                      kind)  # fmt: skip
                            if isinstance(why, ModeUnsupported):
                                continue
                            break
                        except Exception as err:  # noqa: BLE001 - a peer or torch.compile failing must not stop the suite
                            note_skip(op, provider, f"{mode} failed with {type(err).__name__}: {err}", "failed")
                            continue
                        finally:
                            del args, leaves, copies
                        shape_doc = dict(name=shape.name, B=shape.sequences, T=shape.tokens, H=shape.hidden,
                                         V=shape.vocab)  # fmt: skip
                        extra = dict(head=head, dtype=str(dtype).removeprefix("torch."), round=rnd)
                        if provider == "silmm":
                            key = "fused_linear_logprobs" if op == "fused_linear_dpo" else op
                            extra["backend"] = _backend.choose(key, device)
                        case_cost = cost(op, shape, head, mode, dtype, kept)
                        rows.append(row(op, provider, mode, shape_doc, m, env, cost=case_cost, **extra))
                        del calls, fn


def print_ratios(rows: list[dict], baseline: str = "naive", provider: str = "silmm") -> None:
    """``provider`` against ``baseline`` per (op, shape, head, mode): time and peak-memory ratios, each case taken
    from its fastest round (interference only ever adds time)."""
    index: dict[tuple, dict] = {}
    for r in rows:
        key = (r["op"], r["shape"]["name"], r.get("head"), r["mode"], r["provider"])
        if key not in index or r["time_ms"] < index[key]["time_ms"]:
            index[key] = r
    print(f"\n{provider} / {baseline}:")
    for (op, shape, head, mode, prov), r in index.items():
        base = index.get((op, shape, head, mode, baseline))
        if prov != provider or base is None:
            continue
        mem = "-"
        if r["peak_mem_bytes"] and base["peak_mem_bytes"]:
            mem = f"{r['peak_mem_bytes'] / base['peak_mem_bytes']:.3f}"
        print(f"  {op:<22} {shape:<12} {head:<10} {mode:<9} time {r['time_ms'] / base['time_ms']:.3f}  memory {mem}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"names from {sorted(HEAD_SHAPES)}")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep (shared machines)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-clock",
        choices=("wall", "process"),
        default=None,
        help="CPU timing: wall time, or this process's CPU time (shared machines; with --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_clock:
        import bench.common as common

        common.CPU_CLOCK = args.cpu_clock
    device = torch.device(args.device)
    shapes = args.shapes or (["janus", "janus-7b", "seed-llama", "lumina"] if device.type == "cuda" else ["cpu-small"])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    rows = run(shapes, device, args.providers, args.modes, ops=args.ops, heads=args.heads, dtype=dtype,
               warmup=args.warmup, repeats=args.repeats, rounds=args.rounds)  # fmt: skip
    print_table(rows)
    print_ratios(rows)
    path = write_rows(rows, f"logprobs-{device.type}", args.out)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
