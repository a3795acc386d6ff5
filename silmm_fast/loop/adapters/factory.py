"""The one place that turns a model's name into an adapter: the SILMM loop builds, loads and rebuilds its models here
and names no adapter class itself.

=========  =======================================================================================================
name       adapter
=========  =======================================================================================================
shapes     ``ShapesAdapter`` over the built-in world's ``ShapesLMM``; the base model is bootstrapped once per recipe
           and cached (``silmm_fast.loop.models.bootstrap``)
janus      ``JanusAdapter`` over a local Janus / Janus-Pro checkpoint (``ModelSpec.path``; nothing is downloaded)
=========  =======================================================================================================

``build_adapter(spec)`` gives the base model, ``load_adapter(spec, path)`` a checkpoint written by the adapter's
``save``, and ``blank_adapter(spec, architecture(model))`` a model of ``model``'s architecture for weights loaded next
(how a process receives another's model through ``load_state_dict``). Every adapter returned passes
``check_adapter``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from silmm_fast.loop.adapters.protocol import ModelAdapter, check_adapter

MODELS = ("shapes", "janus")


@dataclass(frozen=True)
class ModelSpec:
    """Which model, and how to get it.

    Args:
        name: one of ``MODELS``.
        variant: shapes: "discrete" (image tokens) or "continuous" (feature matrices); janus: "discrete" only.
        path: janus: the base checkpoint directory.
        recipe: shapes: the bootstrap recipe (``silmm_fast.loop.models.bootstrap.RECIPES``).
        tiny: shapes: a tiny model and a short bootstrap (tests, smoke runs).
        cache_dir: shapes: where bootstrapped base models are cached (None: ~/.cache/silmm_fast).
        cfg_scale: janus: classifier-free guidance scale of image generation.
    """

    name: str = "shapes"
    variant: str = "discrete"
    path: str | os.PathLike | None = None
    recipe: str = "reading"
    tiny: bool = False
    cache_dir: str | os.PathLike | None = None
    cfg_scale: float = 5.0

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"name: expected one of {MODELS}, got {self.name!r}")
        if self.name == "janus" and not self.path:
            raise ValueError("path: a janus model needs its local checkpoint directory")

    @property
    def world_images(self) -> bool:
        """Whether the model's image tokens are the built-in world's, so that the world's ground truth can score
        its images (the held-out evaluator, oracle feedback, the pair audit)."""
        return self.name == "shapes"


def _janus(spec: ModelSpec, path: str | os.PathLike, device: str | torch.device) -> ModelAdapter:
    from silmm_fast.loop.adapters.janus import JanusAdapter

    adapter = JanusAdapter.from_pretrained(path, device=device)
    adapter.options.cfg_scale = spec.cfg_scale
    return adapter


def build_adapter(spec: ModelSpec, device: str | torch.device = "cpu") -> ModelAdapter:
    """The base model of ``spec``. shapes: bootstrapped on first use and cached, on the CPU (move it with ``.to``);
    janus: the checkpoint at ``spec.path`` on ``device``, with ``spec.cfg_scale``."""
    if spec.name == "janus":
        adapter = _janus(spec, spec.path, device)
    else:
        from silmm_fast.loop.adapters.shapes import ShapesAdapter
        from silmm_fast.loop.models.bootstrap import bootstrap, recipe

        config = recipe(spec.recipe, spec.variant, tiny=spec.tiny)
        adapter = ShapesAdapter(bootstrap(spec.variant, cache_dir=spec.cache_dir, config=config))
    check_adapter(adapter)
    return adapter


def load_adapter(spec: ModelSpec, path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelAdapter:
    """The checkpoint directory ``path`` (written by the adapter's ``save``) as ``spec``'s adapter. shapes: on the
    CPU; janus: on ``device``, with ``spec.cfg_scale``."""
    if spec.name == "janus":
        adapter = _janus(spec, path, device)
    else:
        from silmm_fast.loop.adapters.shapes import ShapesAdapter

        adapter = ShapesAdapter.load(path)
    check_adapter(adapter)
    return adapter


def architecture(adapter: ModelAdapter) -> Any:
    """What ``blank_adapter`` needs to build a model like ``adapter`` (picklable): the ``ShapesLMM`` config as a dict,
    or None for a Janus model (its architecture is the base checkpoint's)."""
    from silmm_fast.loop.adapters.shapes import ShapesAdapter

    return adapter.model.config.to_dict() if isinstance(adapter, ShapesAdapter) else None


def blank_adapter(spec: ModelSpec, arch: Any, device: str | torch.device = "cpu") -> ModelAdapter:
    """A model of the architecture ``arch`` (from ``architecture``) whose weights are loaded next with
    ``load_state_dict``. shapes: freshly initialized, on the CPU; janus: the base checkpoint, which must be readable
    here, on ``device``."""
    if spec.name == "janus":
        return build_adapter(spec, device)
    from silmm_fast.loop.adapters.shapes import ShapesAdapter
    from silmm_fast.loop.models.shapes_lmm import ShapesLMM, ShapesLMMConfig

    return ShapesAdapter(ShapesLMM(ShapesLMMConfig.from_dict(arch)))
