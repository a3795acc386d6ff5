"""What tests/loop/train/test_distributed.py launches under torchrun: ``python -m silmm_fast.train``, with two test
hooks.

- ``SILMM_TEST_CRASH="RANK:METHOD:CALL"``: on rank RANK, the CALL-th call of ``ShapesLMM.METHOD`` kills the process
  (``os._exit``, no cleanup), as a crashed or preempted worker would die mid-phase.
- ``SILMM_TEST_RANK1_ARGS="..."``: extra command-line arguments for rank 1 only (a rank started differently).
"""

import os
import sys

from silmm_fast.loop.models.shapes_lmm import ShapesLMM
from silmm_fast.loop.train.__main__ import main

rank = int(os.environ.get("RANK", "0"))
argv = sys.argv[1:]
if rank == 1 and os.environ.get("SILMM_TEST_RANK1_ARGS"):
    argv += os.environ["SILMM_TEST_RANK1_ARGS"].split()
crash = os.environ.get("SILMM_TEST_CRASH")
if crash:
    crash_rank, method, call = crash.split(":")
    if rank == int(crash_rank):
        original = getattr(ShapesLMM, method)
        calls = [0]

        def dying(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == int(call):
                os._exit(3)
            return original(self, *args, **kwargs)

        setattr(ShapesLMM, method, dying)
sys.exit(main(argv))
