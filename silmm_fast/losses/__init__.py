"""Preference losses: the DPO family over sequence log-probabilities (and their modules)."""

from silmm_fast.losses.dpo import DPOLoss, DPOOutput, dpo_loss

__all__ = ["DPOLoss", "DPOOutput", "dpo_loss"]
