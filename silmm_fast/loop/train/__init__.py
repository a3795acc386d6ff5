"""The SILMM loop (``python -m silmm_fast.train``): configuration (``config``), the recipe (``loop``), its phases
(``phases``), the run directory (``rundir``, ``store``), several processes (``distributed``), the report
(``report``)."""

from silmm_fast.loop.train.config import TrainConfig, load, parse_args

__all__ = ["TrainConfig", "load", "parse_args", "run"]


def run(cfg: TrainConfig) -> dict:
    """Run (or resume) the loop described by ``cfg``; returns the final summary (``summary.json``).

    Under torchrun (or with WORLD_SIZE > 1 in the environment) this process joins the process group first and
    leaves it at the end; every rank returns the same summary.
    """
    from silmm_fast.loop.train import distributed, loop

    d = distributed.setup(cfg.dist.device)
    try:
        summary = loop.run(cfg, d)
        # every rank done with its collectives before any leaves the group (a rank tearing gloo down while another
        # still talks to it can abort the process at exit)
        d.barrier()
        return summary
    finally:
        d.close()
