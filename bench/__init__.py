"""The benchmarks of a checkout (not installed): ``suite.py``, the runner (``python -m bench``, or
``python -m silmm_fast.bench``); one ``bench_<op>.py`` per op, each also runnable alone; ``common.py``, the timing,
memory, cost and row machinery they share; ``readme_table.py``, the README's performance table made from the rows in
``results/``; ``test_micro.py``, per-call CPU micro-benchmarks of every public op (``pytest bench/
--benchmark-only``)."""
