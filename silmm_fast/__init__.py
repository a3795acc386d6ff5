"""silmm_fast: fused losses, diverse sampling and a self-improvement loop for image-generating multimodal models.

Public API (SPEC.md §4): log-prob ops, DPO / KC-DPO losses and modules, pairwise distances, diverse selection,
DropDiv, prompt decomposition and ``env_report``.
"""

from silmm_fast._backend import use_backend
from silmm_fast.env import env_report

__version__ = "0.1.0"

__all__ = ["env_report", "use_backend", "__version__"]
