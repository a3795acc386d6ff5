"""Does an error raised inside the C++ extension reach Python as a RuntimeError on this machine?

    python tools/cpp_error_probe.py

On one lent GPU machine (extension built by a g++ other than the one torch was built with) the op crashed the process
instead of raising. This probe calls the op with a bad argument in a child process, once as is and once with the
building compiler's libstdc++ preloaded, prints how each ended and which C++ runtime libraries the extension and the
process load, so a crash can be told apart from a bug in the op's argument checks. Exit status 0 when the plain call
raises the expected error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import torch
from silmm_fast.ops.diverse_select import cpp_op
op = cpp_op("diverse_select_fps")
assert op is not None, "extension unavailable"
try:
    op(torch.randn(2, 5), None, 1)
except RuntimeError as err:
    print("raised:", str(err).splitlines()[0])
else:
    print("no error raised")
libs = [line.split()[-1] for line in open("/proc/self/maps") if "libstdc++" in line or "libgcc_s" in line]
print("process loads:", sorted(set(libs)))
"""


def compiler_libstdcxx() -> str | None:
    """The libstdc++ of the compiler torch.utils.cpp_extension builds with (None when it cannot say)."""
    from torch.utils.cpp_extension import get_cxx_compiler

    try:
        path = subprocess.run(
            [get_cxx_compiler(), "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if Path(path).is_file() else None


def run_child(extra_env: dict[str, str]) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env={**os.environ, **extra_env}, capture_output=True, text=True
    )
    print(f"  exit status {proc.returncode}")
    for line in (proc.stdout + proc.stderr).strip().splitlines()[-4:]:
        print("  " + line)
    return proc.returncode


def main() -> int:
    from silmm_fast import _ext

    module = _ext.load()
    if module is None:
        print(f"extension unavailable: {_ext.status()}")
        return 1
    so = module.__file__
    print(f"extension: {so}")
    ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
    print("".join(line + "\n" for line in ldd.splitlines() if "stdc++" in line or "gcc_s" in line or "gomp" in line))
    print("plain call:")
    status = run_child({})
    lib = compiler_libstdcxx()
    if lib:
        print(f"with LD_PRELOAD={lib}:")
        run_child({"LD_PRELOAD": lib})
    return status


if __name__ == "__main__":
    raise SystemExit(main())
