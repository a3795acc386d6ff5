"""Model adapters: how the SILMM loop talks to a model.

- ``protocol``: ``ModelAdapter`` (the ``typing.Protocol`` every model implements: write prompts, generate and decode
  candidates, decompose prompts into questions, answer them, give DPO inputs, save / load), ``ContinuousAdapter``
  (feature matrices for KC-DPO), ``LayeredAdapter`` (decoder blocks for FSDP2), ``Sourced`` (texts and where each
  came from), ``ImageLogprobInputs`` and ``check_adapter``.
- ``factory``: ``ModelSpec`` and ``build_adapter`` / ``load_adapter`` / ``blank_adapter``: a model's name to its
  adapter (the only place the loop's models are built).
- ``shapes``: ``ShapesAdapter``, the built-in world's ``ShapesLMM`` behind the protocol.
- ``janus``: ``JanusAdapter``, transformers' ``JanusForConditionalGeneration`` (Janus / Janus-Pro) from a local
  checkpoint.
- ``prompting``: the instructions, examples, parsers and rule-based fallbacks used by adapters whose model writes
  prompts and questions as free text.
- ``random_janus``: randomly initialized Janus models with a word-level tokenizer (tests, benchmarks).
"""

from silmm_fast.loop.adapters.factory import ModelSpec, blank_adapter, build_adapter, load_adapter
from silmm_fast.loop.adapters.janus import JanusAdapter, JanusOptions
from silmm_fast.loop.adapters.protocol import (
    ContinuousAdapter,
    ImageLogprobInputs,
    LayeredAdapter,
    ModelAdapter,
    Sourced,
    adapter_mismatches,
    check_adapter,
)
from silmm_fast.loop.adapters.shapes import ShapesAdapter

__all__ = [
    "ContinuousAdapter",
    "ImageLogprobInputs",
    "JanusAdapter",
    "JanusOptions",
    "LayeredAdapter",
    "ModelAdapter",
    "ModelSpec",
    "ShapesAdapter",
    "Sourced",
    "adapter_mismatches",
    "blank_adapter",
    "build_adapter",
    "check_adapter",
    "load_adapter",
]
