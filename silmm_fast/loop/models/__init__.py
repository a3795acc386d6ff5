"""The built-in world's tiny multimodal model (``ShapesLMM``), its joint vocabulary, its bootstrap and its
held-out measurement.

``bootstrap("discrete" | "continuous")`` returns a cached base model (trained on first use); ``measure_base(model)``
scores its VQA, decomposition and generation on held-out prompts with the world's ground truth.
"""

from silmm_fast.loop.models.bootstrap import BootstrapConfig, bootstrap, bootstrap_stats, cache_path, default_cache_dir
from silmm_fast.loop.models.measure import format_report, measure_base
from silmm_fast.loop.models.shapes_lmm import ShapesLMM, ShapesLMMConfig
from silmm_fast.loop.models.vocab import JointVocab

__all__ = [
    "BootstrapConfig",
    "JointVocab",
    "ShapesLMM",
    "ShapesLMMConfig",
    "bootstrap",
    "bootstrap_stats",
    "cache_path",
    "default_cache_dir",
    "format_report",
    "measure_base",
]
