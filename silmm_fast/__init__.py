"""silmm_fast: fused losses, diverse sampling and a self-improvement loop for image-generating multimodal models.

Public API: log-prob ops, DPO / KC-DPO losses and modules, pairwise distances, diverse selection, the image-token
sampler, DropDiv, prompt decomposition, ``env_report`` and ``use_backend`` (README.md has the table). This core needs
torch, numpy and triton only and imports nothing from ``silmm_fast.loop`` (the SILMM loop and its built-in world, the
``[loop]`` extra); ``silmm_fast.integrations.trl`` needs the ``[trl]`` extra (see ``silmm_fast._extras``).
"""

from silmm_fast import _moved
from silmm_fast._backend import use_backend
from silmm_fast._extras import install_loop_guard
from silmm_fast.dropdiv import DropDiv, dropdiv
from silmm_fast.env import env_report
from silmm_fast.losses.dpo import DPOLoss, DPOOutput, dpo_loss
from silmm_fast.losses.fused_linear_dpo import FusedLinearDPOLoss
from silmm_fast.losses.kc_dpo import KCDPOLoss, kc_dpo_loss
from silmm_fast.ops.diverse_select import diverse_select
from silmm_fast.ops.fused_linear_logprobs import fused_linear_logprobs
from silmm_fast.ops.logprobs import gather_logprobs, sequence_logprobs
from silmm_fast.ops.pairwise_distance import pairwise_distance
from silmm_fast.ops.sampling import sample_tokens

_moved.install()  # the loop's modules answer at their old paths too (silmm_fast.train, .adapters, ...)
install_loop_guard()  # a loop package imported without the [loop] extra raises an ImportError naming the extra

__version__ = "0.1.0"


def __getattr__(name: str):
    # decompose_prompt lives with the loop (standard library only); loaded on first use so importing the core
    # library loads nothing from silmm_fast.loop
    if name == "decompose_prompt":
        from silmm_fast.loop.decompose import decompose_prompt

        return decompose_prompt
    raise AttributeError(f"module 'silmm_fast' has no attribute {name!r}")


__all__ = [
    "decompose_prompt",
    "diverse_select",
    "DropDiv",
    "dropdiv",
    "DPOLoss",
    "DPOOutput",
    "dpo_loss",
    "FusedLinearDPOLoss",
    "fused_linear_logprobs",
    "gather_logprobs",
    "sequence_logprobs",
    "KCDPOLoss",
    "kc_dpo_loss",
    "pairwise_distance",
    "sample_tokens",
    "env_report",
    "use_backend",
    "__version__",
]
