#!/usr/bin/env bash
# Creates .venv and installs silmm_fast (editable) with the extras `make run` and `make test` need: [loop] (the SILMM
# loop), [trl] (the TRL integration and its tests) and [dev] (test tools). Idempotent: a second run only checks.
# Machines without an NVIDIA GPU get the pinned CPU-friendly torch/triton pair (requirements/cpu-constraints.txt);
# GPU machines keep whatever torch/triton they resolve (or already have, with SILMM_FAST_SYSTEM_SITE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.silmm_fast_setup
want="$(cat pyproject.toml requirements/cpu-constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  if [ "${SILMM_FAST_SYSTEM_SITE:-0}" = 1 ]; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
constraints=()
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  constraints=(-c requirements/cpu-constraints.txt)
fi
echo "[setup] installing silmm_fast and its dependencies (first time: about a minute)"
# (pip's notes about this machine's unused local index folders are filtered out; its exit status is kept)
set +o pipefail
.venv/bin/python -m pip install -q --disable-pip-version-check "${constraints[@]}" -e ".[dev,loop,trl]" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[setup] pip install failed" >&2; exit 1; }
set -o pipefail
.venv/bin/python -c "import silmm_fast, torch, triton, transformers, trl, pytest" \
  || { echo "[setup] install check failed" >&2; exit 1; }
echo "[setup] building the C++ extension (cached under ~/.cache/silmm_fast/ext; about 30 s the first time)"
.venv/bin/python -m silmm_fast.build_ext || echo "[setup] warning: C++ extension build failed; the reference path will be used"
echo "$want" > "$stamp"
echo "[setup] ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
