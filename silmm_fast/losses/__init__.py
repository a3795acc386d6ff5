"""Preference losses: the DPO family over sequence log-probabilities (and their modules)."""

from silmm_fast.losses.dpo import DPOLoss, DPOOutput, dpo_loss
from silmm_fast.losses.fused_linear_dpo import FusedLinearDPOLoss
from silmm_fast.losses.kc_dpo import KCDPOLoss, kc_dpo_loss

__all__ = ["DPOLoss", "DPOOutput", "dpo_loss", "FusedLinearDPOLoss", "KCDPOLoss", "kc_dpo_loss"]
