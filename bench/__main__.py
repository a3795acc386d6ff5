"""``python -m bench`` from a checkout: the benchmark suite (bench/suite.py)."""

from bench.suite import main

raise SystemExit(main())
