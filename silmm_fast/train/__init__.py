"""The SILMM loop (``python -m silmm_fast.train``): configuration, run directory, phases, report."""

from silmm_fast.train.config import TrainConfig, load, parse_args

__all__ = ["TrainConfig", "load", "parse_args", "run"]


def run(cfg: TrainConfig) -> dict:
    """Run (or resume) the loop described by ``cfg``; returns the final summary (``summary.json``)."""
    from silmm_fast.train.loop import Run

    return Run(cfg).run()
