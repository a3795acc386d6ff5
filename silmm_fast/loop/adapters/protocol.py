"""The model adapter protocol: what the SILMM loop asks of a model, as a ``typing.Protocol``.

An adapter is an ``nn.Module`` (the loop deep-copies it to make the reference model, optimizes its
``parameters()`` and switches it between ``train()`` and ``eval()``) with one method per SILMM step:

=====================  ==========================================================================================
step                   method
=====================  ==========================================================================================
1. prompts             ``write_prompts(categories, n, ...) -> list[str]`` (category-major; a ``Sourced`` list)
2. candidates          ``generate_images(prompts, n_samples, ...) -> LongTensor [P, N, T]`` image tokens, and
                       ``decode_images(image_tokens [..., T]) -> uint8 [..., H, W, 3]`` (``PIL.Image.fromarray``-able)
3. questions           ``decompose(prompts) -> list[list[str]]`` yes/no questions per prompt (a ``Sourced`` list)
4. self-feedback       ``answer(image_tokens [I, T], questions) -> (p_yes, p_no)``, two lists of I float tensors
5. DPO                 ``image_logprob_inputs(prompts, image_tokens) -> ImageLogprobInputs`` (hidden states entering
                       the last Linear of the image head, that Linear's weight / bias, labels)
checkpoints            ``save(path)`` and the classmethod ``load(path, device)``
=====================  ==========================================================================================

Continuous models (features instead of tokens; KC-DPO) also implement ``ContinuousAdapter``'s ``feature_forward``
and ``generate_features``; models whose decoder blocks FSDP2 should shard one by one implement ``LayeredAdapter``'s
``decoder_layers``. The loop tests these capabilities with ``isinstance``.

Where the texts come from: ``write_prompts`` and ``decompose`` may return a ``Sourced`` list, a ``list`` whose
``sources`` say for each item whether the model wrote it ("model") or a rule-based fallback stood in ("template",
"rules", "none"), so the loop can record what was used. A plain list means every item is the model's.

``isinstance(obj, ModelAdapter)`` checks only that the members exist (``runtime_checkable``);
``adapter_mismatches(obj)`` also compares every method's parameters with the protocol's.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch


class Sourced(list):
    """A list of texts (prompts, or question lists) and where each came from: ``sources[i]`` is "model" when the
    model wrote item i, else the name of the fallback that stood in ("template", "rules", "none").

    Equivalent to: ``list(items)`` with a ``sources`` attribute of the same length. Compares, slices and iterates as a
    plain list (slices are plain lists).
    """

    def __init__(self, items: Iterable[Any] = (), sources: Iterable[str] | None = None) -> None:
        super().__init__(items)
        self.sources: list[str] = ["model"] * len(self) if sources is None else list(sources)
        if len(self.sources) != len(self):
            raise ValueError(f"sources: expected one per item ({len(self)}), got {len(self.sources)}")

    @classmethod
    def of(cls, items: Sequence[Any]) -> Sourced:
        """``items`` itself when it is a ``Sourced`` list, else ``items`` with every source "model"."""
        return items if isinstance(items, Sourced) else cls(items)

    def __reduce__(self) -> tuple:  # pickled with its sources (the loop sends it between processes)
        return (Sourced, (list(self), self.sources))


class RemembersSources:
    """The deprecated ``last_sources`` attribute, for the built-in adapters: ``remember(kind, result)`` keeps the
    sources of the last ``write_prompts`` ("prompts") or ``decompose`` ("questions") result and returns it."""

    def remember(self, kind: str, result: Sourced) -> Sourced:
        self.__dict__.setdefault("_last_sources", {})[kind] = list(result.sources)
        return result

    @property
    def last_sources(self) -> dict[str, list[str]]:
        """Deprecated: the ``sources`` of the last ``write_prompts`` / ``decompose`` result; read the returned
        ``Sourced`` list's ``sources`` instead."""
        warnings.warn(
            "last_sources is deprecated: write_prompts and decompose return a Sourced list whose .sources say where "
            "each item came from",
            FutureWarning,
            stacklevel=2,
        )
        return {k: list(v) for k, v in self.__dict__.get("_last_sources", {}).items()}


class ImageLogprobInputs(NamedTuple):
    """What the DPO step needs to score images without materializing the [B·T, V] logits.

    ``fused_linear_logprobs(hidden, weight, labels, bias=bias)`` is each image's log-likelihood under the model,
    ``[B]`` float32 (``logprobs()`` does exactly that call).

    Fields:
        hidden: [B, T, H'] activations entering the image head's last Linear at the T positions that predict the
            image tokens, differentiable w.r.t. the model.
        weight: [V, H'] that Linear's weight.
        labels: [B, T] the image tokens as indices of that Linear's outputs.
        bias: [V] that Linear's bias, or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def frozen(self) -> bool:
        """Whether the head needs no gradient (``fused_linear_logprobs`` then takes its frozen-head fast path)."""
        return not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)

    def logprobs(self, reduction: str = "sum") -> torch.Tensor:
        """``fused_linear_logprobs(hidden, weight, labels, bias=bias, reduction=reduction)``: [B] float32."""
        from silmm_fast.ops.fused_linear_logprobs import fused_linear_logprobs

        return fused_linear_logprobs(self.hidden, self.weight, self.labels, bias=self.bias, reduction=reduction)


@runtime_checkable
class ModelAdapter(Protocol):
    """A model that can run every step of the SILMM loop on discrete image tokens (see the module docstring).

    Conventions: prompts are lists of ``str``; image tokens are LongTensors of indices into the image codebook,
    [..., T] with T the fixed number of tokens per image; ``generator`` is a ``torch.Generator`` that makes sampling
    reproducible, or ``noise`` holds one uniform number per sampled token (each row its own stream: results do not
    depend on how prompts are batched or sharded); ``temperature=0`` means greedy decoding.

    ``image_seq_len`` is T. Optional methods: ``decoder_layers()`` (``LayeredAdapter``: the decoder blocks, which
    FSDP2 shards one by one) and ``dropdiv_mlps()`` (for ``silmm_fast.dropdiv``).
    """

    @property
    def image_seq_len(self) -> int:
        """T, the number of image tokens per image."""
        ...

    def write_prompts(
        self,
        categories: Sequence[str],
        n: int,
        temperature: float = 1.0,
        top_p: float = 0.95,
        generator: torch.Generator | None = None,
        max_new_tokens: int = 32,
        noise: torch.Tensor | None = None,
    ) -> list[str]:
        """``n`` prompts per category, category-major: ``len(categories) * n`` strings, a ``Sourced`` list when some
        may come from a fallback. ``noise`` [len(categories), n, max_new_tokens] uniform in [0, 1) gives each prompt
        its own draws (then no ``generator``)."""
        ...

    def generate_images(
        self,
        prompts: Sequence[str],
        n_samples: int = 1,
        top_p: float = 0.9,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n_samples`` images per prompt: LongTensor [P, n_samples, T] of image tokens. ``noise`` [P, n_samples, T]
        uniform in [0, 1) gives every sample its own draws, so a prompt's images do not depend on the other prompts
        of the call (then no ``generator``)."""
        ...

    def decode_images(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Pixels of images given as tokens [..., T]: uint8 [..., H, W, 3] on the CPU."""
        ...

    def decompose(self, prompts: Sequence[str], max_new_tokens: int = 96) -> list[list[str]]:
        """Yes/no questions per prompt (an empty list where nothing usable came out), a ``Sourced`` list when some
        may come from a fallback."""
        ...

    def answer(
        self, image_tokens: torch.Tensor, questions: Sequence[Sequence[str]], images_per_chunk: int = 256
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """p(yes), p(no) of ``questions[i]`` about image i of ``image_tokens`` [I, T]: two lists of I float32
        tensors [M_i]."""
        ...

    def image_logprob_inputs(self, prompts: Sequence[str], image_tokens: torch.Tensor) -> ImageLogprobInputs:
        """Hidden states and head for scoring ``image_tokens`` ([B, T] with B prompts, or [P, n, T] with P prompts,
        rows flattened prompt-major) given their prompts; see ``ImageLogprobInputs``."""
        ...

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint directory that ``load`` reads back."""
        ...

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
        """Read a checkpoint directory written by ``save``."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """The trainable parameters (``nn.Module.parameters``)."""
        ...

    def train(self, mode: bool = True) -> Any:
        """``nn.Module.train``."""
        ...

    def eval(self) -> Any:
        """``nn.Module.eval``."""
        ...


@runtime_checkable
class ContinuousAdapter(Protocol):
    """The continuous capability (DropDiv + KC-DPO): feature matrices instead of image tokens."""

    def feature_forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Feature matrices [P, L, D], differentiable."""
        ...

    def generate_features(self, prompts: Sequence[str], n_samples: int = 1) -> torch.Tensor:
        """``n_samples`` feature matrices per prompt [P, n_samples, L, D], without grad (samples differ only when
        something stochastic such as ``silmm_fast.dropdiv`` is active)."""
        ...


@runtime_checkable
class LayeredAdapter(Protocol):
    """A model whose decoder blocks can be sharded one by one (FSDP2)."""

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The decoder blocks, in depth order."""
        ...


def _members(protocol: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                out[name] = value
    return out


def _parameters(member: Any) -> list[inspect.Parameter]:
    func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    params = list(inspect.signature(func).parameters.values())
    return params if isinstance(member, staticmethod) else params[1:]  # drop self / cls


def adapter_mismatches(obj: object, protocol: type = ModelAdapter) -> list[str]:
    """How ``obj`` (an instance or a class) departs from ``protocol``: one message per missing member or
    incompatible signature; an empty list when it conforms.

    A property conforms when the attribute exists. A method conforms when it accepts every parameter of the
    protocol's method under the same name, in the same position and kind (positional or keyword-only), with a default
    wherever the protocol has one; any parameters it adds must have defaults (or be ``*args`` / ``**kwargs``).
    Annotations and default values are not compared.
    """
    problems = []
    for name, member in _members(protocol).items():
        if isinstance(member, property):
            if not hasattr(obj, name):
                problems.append(f"{name}: missing")
            continue
        if not callable(member) and not isinstance(member, (classmethod, staticmethod)):
            continue
        if not hasattr(obj, name):
            problems.append(f"{name}: missing")
            continue
        impl = getattr(obj, name)
        if not callable(impl):
            problems.append(f"{name}: not callable")
            continue
        try:
            have = list(inspect.signature(impl).parameters.values())
        except (TypeError, ValueError):
            continue  # builtins without a signature: nothing to compare
        if isinstance(obj, type) and not isinstance(inspect.getattr_static(obj, name), (classmethod, staticmethod)):
            have = have[1:]  # a plain function looked up on the class still lists self
        want = _parameters(member)
        by_name = {p.name: (i, p) for i, p in enumerate(have)}
        var_kw = any(p.kind is p.VAR_KEYWORD for p in have)
        for i, p in enumerate(want):
            if p.name not in by_name:
                if not var_kw:
                    problems.append(f"{name}: no parameter {p.name!r}")
                continue
            j, q = by_name[p.name]
            positional = (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            if p.kind in positional and (q.kind not in positional or j != i):
                problems.append(f"{name}: parameter {p.name!r} should be positional number {i + 1}")
            elif p.kind is p.KEYWORD_ONLY and q.kind not in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD):
                problems.append(f"{name}: parameter {p.name!r} should be accepted by keyword")
            if p.default is not p.empty and q.default is q.empty:
                problems.append(f"{name}: parameter {p.name!r} needs a default")
        names = {p.name for p in want}
        for q in have:
            extra = q.name not in names and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)
            if extra and q.default is q.empty:
                problems.append(f"{name}: extra parameter {q.name!r} has no default")
    return problems


def check_adapter(obj: object, protocol: type = ModelAdapter) -> None:
    """Raise ``TypeError`` listing every mismatch of ``obj`` with ``protocol`` (see ``adapter_mismatches``)."""
    problems = adapter_mismatches(obj, protocol)
    if problems:
        what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise TypeError(f"{what} does not implement {protocol.__name__}: " + "; ".join(problems))
