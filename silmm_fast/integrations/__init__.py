"""Explicit integrations of silmm_fast's losses into other trainers, each behind its extra.

- ``silmm_fast.integrations.trl``: ``FusedDPOTrainer``, a ``trl.DPOTrainer`` whose loss runs through silmm_fast's
  fused head (``pip install 'silmm_fast[trl]'``).
"""
