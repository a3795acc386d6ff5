"""Evaluation scripts of the SILMM testbed, run from a checkout (not installed): what the decomposer covers of the
T2I-CompBench++ prompts (``decompose_coverage.py``), how fast a fresh model learns to read images
(``reading_probe.py``), and the Janus adapter's image-generation throughput (``janus_generate_throughput.py``).
Their result rows go to ``bench/results/`` beside the benchmarks'."""
