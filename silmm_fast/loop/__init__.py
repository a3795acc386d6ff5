"""The SILMM self-improvement loop and its built-in shapes world (the ``[loop]`` extra).

- ``train``: the loop itself (``python -m silmm_fast.train``): configuration, phases, run directory, report.
- ``adapters``: how the loop talks to a model (``ModelAdapter`` protocol; the shapes model, Janus / Janus-Pro).
- ``models``: the built-in tiny multimodal model over the shapes world and its bootstrap.
- ``world``: scenes, PNG rendering, the image tokenizer, prompts and the ground-truth evaluator.
- ``decompose``: rule-based decomposition of a compositional prompt into yes/no questions (standard library only,
  so ``silmm_fast.decompose_prompt`` works on the core install).

The core library (ops, references, losses, DropDiv, diverse selection, sampling, kernels) never imports this package.
"""
