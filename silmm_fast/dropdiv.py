"""DropDiv (SILMM's diverse sampling for continuous models): dropout switched on at inference in the MLPs of the last
``L`` decoder layers, so every forward pass (and every sample of an expanded batch) gives a different feature matrix.

Mechanism: a forward hook on each chosen MLP multiplies its output by a fresh Bernoulli(1 − p) mask scaled by
1/(1 − p), exactly what ``F.dropout(output, p, training=True)`` does, with the masks drawn from a dedicated
``torch.Generator`` (one per device, seeded at entry) — or, with ``row_seeds``, from one stream per batch row, so a
row's masks never depend on the other rows it shares a batch with (see ``dropdiv``). Nothing else changes: parameters
and buffers are untouched, the module tree is the same, the global RNG is never consumed, and by default the whole
model runs in eval mode inside the block (so any other dropout stays off); on exit the hooks are removed and every
module's ``training`` flag restored.

Which MLPs (the lookup rule, first match wins):
1. ``model.dropdiv_mlps()``, if the model defines it: the MLP modules of its decoder layers, in depth order (our own
   models implement this).
2. The decoder layers of a ``transformers`` model: ``model.get_decoder().layers``, else the first of the attribute
   paths in ``LAYER_PATHS`` that holds a sequence of modules (Llama style ``model.model.layers``, Janus's
   ``model.model.language_model.layers``, GPT-2's ``transformer.h``, ...); in each layer, the first of the attributes
   in ``MLP_NAMES`` (``mlp``, ``feed_forward``, ``ffn``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from types import TracebackType

import torch
from torch import nn

LAYER_PATHS = (
    "model.layers",
    "layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "model.decoder.layers",
    "decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
)
MLP_NAMES = ("mlp", "feed_forward", "ffn")

DEFAULT_LAST_LAYERS = 2
DEFAULT_P = 0.1


def _attr_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _is_layer_list(obj: object) -> bool:
    return (
        isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple))
        and len(obj) > 0
        and all(isinstance(m, nn.Module) for m in obj)
    )


def find_mlps(model: nn.Module) -> tuple[list[nn.Module], str]:
    """The decoder-layer MLPs of ``model`` in depth order (the lookup rule in the module docstring), and where they
    were found. Raises TypeError (naming ``model``) when the rule finds none."""
    own = getattr(model, "dropdiv_mlps", None)
    if callable(own):
        mlps = list(own())
        if not mlps or not all(isinstance(m, nn.Module) for m in mlps):
            raise TypeError("model: dropdiv_mlps() must return a non-empty sequence of nn.Module")
        return mlps, "model.dropdiv_mlps()"
    candidates: list[tuple[str, object]] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
        if isinstance(decoder, nn.Module):
            candidates.append(("model.get_decoder().layers", getattr(decoder, "layers", None)))
    candidates += [(f"model.{path}", _attr_path(model, path)) for path in LAYER_PATHS]
    for where, layers in candidates:
        if not _is_layer_list(layers):
            continue
        names = [_mlp_name(layer) for layer in layers]  # type: ignore[union-attr]
        if all(names):
            mlps = [getattr(layer, name) for layer, name in zip(layers, names)]  # type: ignore[call-overload]
            return mlps, f"{where}[i].{names[0]}"
    raise TypeError(
        f"model: cannot find decoder-layer MLPs in {type(model).__name__}; define model.dropdiv_mlps() returning them "
        f"in depth order, or expose decoder layers at one of {LAYER_PATHS} with an MLP attribute in {MLP_NAMES}"
    )


def _mlp_name(layer: nn.Module) -> str | None:
    return next((name for name in MLP_NAMES if isinstance(getattr(layer, name, None), nn.Module)), None)


class DropDiv:
    """Context manager enabling dropout in the last ``last_layers`` decoder MLPs of ``model``; see ``dropdiv``."""

    def __init__(
        self,
        model: nn.Module,
        last_layers: int | None = DEFAULT_LAST_LAYERS,
        p: float = DEFAULT_P,
        *,
        seed: int | None = None,
        eval_mode: bool = True,
        row_seeds: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        all_mlps, where = find_mlps(model)
        if last_layers is None:
            last_layers = len(all_mlps)
        if isinstance(last_layers, bool) or not isinstance(last_layers, int):
            raise TypeError(f"last_layers: expected an int or None, got {type(last_layers).__name__}")
        if not 1 <= last_layers <= len(all_mlps):
            raise ValueError(
                f"last_layers: expected 1 <= last_layers <= {len(all_mlps)} (decoder layers found at {where}), "
                f"got {last_layers}"
            )
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a dropout probability in [0, 1), got {p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        if row_seeds is not None:
            if seed is not None:
                raise ValueError("seed, row_seeds: pass one of them, not both")
            if isinstance(row_seeds, (str, bytes)) or not isinstance(row_seeds, Sequence) or not row_seeds:
                raise TypeError("row_seeds: expected a non-empty sequence of ints (one per batch row)")
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in row_seeds):
                raise TypeError("row_seeds: expected a non-empty sequence of ints (one per batch row)")
            row_seeds = [int(r) for r in row_seeds]
        self.row_seeds: list[int] | None = row_seeds
        self._calls = 0
        self.model = model
        self.last_layers = last_layers
        self.p = float(p)
        self.requested_seed = seed
        self.eval_mode = bool(eval_mode)
        self.location = where
        self.num_layers = len(all_mlps)
        self.mlps: list[nn.Module] = all_mlps[len(all_mlps) - last_layers :]
        self.seed: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._generators: dict[torch.device, torch.Generator] = {}

    def __repr__(self) -> str:
        return (
            f"DropDiv(last_layers={self.last_layers} of {self.num_layers} at {self.location}, p={self.p}, "
            f"seed={self.seed if self.seed is not None else self.requested_seed}, active={bool(self._handles)})"
        )

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def _row_keep(self, x: torch.Tensor) -> torch.Tensor:
        """Keep-masks for ``x`` [B, ...] from the per-row streams: row b at hook call c reads uniforms from a CPU
        generator seeded with a hash of (row_seeds[b], c); with a token axis (x.dim() >= 3) they fill the positions
        from the last one backwards, so a row's masks don't depend on how much left padding its batch adds."""
        assert self.row_seeds is not None
        if x.shape[0] != len(self.row_seeds):
            raise ValueError(
                f"row_seeds: {len(self.row_seeds)} seeds given, but a hooked MLP saw a batch of {x.shape[0]} rows; "
                "every forward pass inside the block must have one row per seed"
            )
        call, self._calls = self._calls, self._calls + 1
        rows = []
        for seed in self.row_seeds:
            digest = hashlib.sha256(f"{seed}/{call}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            u = torch.rand(x.shape[1:], generator=g)
            rows.append(u.flip(0) if x.dim() >= 3 else u)
        return (torch.stack(rows) >= self.p).to(device=x.device, dtype=x.dtype)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not x.is_floating_point():
            return x
        if self.row_seeds is not None:
            return x * self._row_keep(x).mul_(1.0 / (1.0 - self.p))
        keep = torch.empty_like(x, memory_format=torch.contiguous_format)
        keep.bernoulli_(1.0 - self.p, generator=self._generator(x.device))
        return x * keep.mul_(1.0 / (1.0 - self.p))

    def _hook(self, module: nn.Module, inputs: tuple, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return self._drop(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self._drop(output[0]), *output[1:])  # e.g. MoE blocks returning (hidden, router_logits)
        raise TypeError(
            f"model: DropDiv expects an MLP to return a tensor, {type(module).__name__} returned "
            f"{type(output).__name__}"
        )

    def __enter__(self) -> DropDiv:
        if self._handles:
            raise RuntimeError("DropDiv: this context is already active; create a new one to nest")
        self.seed = (
            self.requested_seed
            if self.requested_seed is not None
            else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        )
        self._generators = {}
        self._calls = 0
        if self.eval_mode:
            self._modes = [(m, m.training) for m in self.model.modules()]
            self.model.eval()
        self._handles = [mlp.register_forward_hook(self._hook) for mlp in self.mlps]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, training in self._modes:
            module.training = training
        self._modes = []
        self._generators = {}


def dropdiv(
    model: nn.Module,
    last_layers: int | None = DEFAULT_LAST_LAYERS,
    p: float = DEFAULT_P,
    *,
    seed: int | None = None,
    eval_mode: bool = True,
    row_seeds: Sequence[int] | None = None,
) -> DropDiv:
    """Context manager: dropout at inference in the MLPs of the last ``last_layers`` decoder layers of ``model``.

    Equivalent to, for each of those MLPs, replacing ``out = mlp(h)`` by ``F.dropout(out, p, training=True)`` (the
    masks drawn from a generator seeded with ``seed``), with the rest of the model in eval mode, for the duration of
    the ``with`` block::

        with silmm_fast.dropdiv(model, last_layers=2, p=0.1, seed=0):
            feats = model(input_ids.expand(K, -1), output_hidden_states=True).hidden_states[-1]  # K different samples

    Masks are elementwise over the MLP output ``[batch, tokens, hidden]``, so every sample of an expanded batch and
    every generated token gets its own mask. Parameters, buffers and the module tree are untouched; on exit the hooks
    are removed and each module's ``training`` flag restored, so the model is exactly as before.

    Args:
        model: a ``transformers`` decoder model (Llama-style ``model.model.layers[i].mlp``, Janus, GPT-2, ...) or any
            ``nn.Module`` with ``dropdiv_mlps()``; the lookup rule is in this module's docstring.
        last_layers: how many of the last decoder layers get dropout (default 2; the paper leaves it open); None for
            every decoder layer.
        p: dropout probability in [0, 1) (default 0.1).
        seed: seeds the dedicated mask generator (one per device); the same seed and the same calls give the same
            masks. None draws a fresh seed from the OS (read it back from ``.seed``). The global RNG is never used.
        eval_mode: put the whole model in eval mode inside the block (default True), so only these MLPs are random.
        row_seeds: instead of ``seed``, one seed per batch row (every forward pass inside the block must have
            exactly ``len(row_seeds)`` rows). Row b's mask at the c-th hooked call inside the block comes from its own
            generator seeded with a hash of ``(row_seeds[b], c)``, filled along the token axis from the last position
            backwards: a row's masks depend only on its seed, the call and its own (right-aligned) positions, never
            on the other rows of the batch or their left padding. Used by the SILMM loop so that each prompt's
            samples are the same whatever batch or process it runs in. Masks are drawn on the CPU (a loop over rows).

    Returns:
        A ``DropDiv`` context manager (``.mlps``: the hooked modules, ``.seed``: the seed in use once entered).
    """
    return DropDiv(model, last_layers, p, seed=seed, eval_mode=eval_mode, row_seeds=row_seeds)
