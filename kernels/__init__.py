"""Triton kernels of silmm_fast, installed as ``silmm_fast.kernels`` (setup.py maps this folder there).

From a checkout's root the working directory is on ``sys.path`` (``python -m``, pytest), so this folder would also
be found as a top-level ``kernels`` and shadow the PyPI package of that name, which transformers imports. Imported
under that name, this module hands it over to the installed package (or fails as if it were absent).
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
