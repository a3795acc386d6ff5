"""The decomposer's coverage oracle lives in ``evals/decompose_coverage.py``; this module re-exports it for
tests/test_decompose_prompt.py until that test imports it from ``evals`` (then this file goes)."""

from evals.decompose_coverage import *  # noqa: F403
