"""Prebuild the C++ extension ``silmm_fast._C`` into its cache: ``python -m silmm_fast.build_ext [--verbose]``.

Without it the extension is compiled on first use (about 25-35 s on a 2-core machine, once per torch version and
source hash). The cache folder is ``$SILMM_FAST_CACHE/ext`` (default ``~/.cache/silmm_fast/ext``). Exit status 0 when
the extension loads, 1 when it cannot be built (the package then runs on its pure-PyTorch references).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m silmm_fast.build_ext", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)

    from silmm_fast import _ext

    files = _ext.sources()
    target = _ext.build_dir(files)
    cached = (target / "silmm_fast_C.so").exists()
    what = "loading cached" if cached else "building"
    print(f"silmm_fast: {what} C++ extension ({len(files)} sources) in {target} ...", flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _ext.load(verbose=args.verbose)
    elapsed = time.perf_counter() - start
    if module is None:
        for w in caught:
            print(f"silmm_fast: {w.message}", file=sys.stderr)
        print(f"silmm_fast: extension unavailable after {elapsed:.1f} s: {_ext.status()}", file=sys.stderr)
        return 1
    print(f"silmm_fast: extension ready in {elapsed:.1f} s: {_ext.status()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
