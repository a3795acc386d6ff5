"""``python -m silmm_fast.loop`` is the same command as ``python -m silmm_fast.train``."""

import sys

from silmm_fast.loop.train.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
