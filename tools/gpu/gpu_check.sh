#!/usr/bin/env bash
# Everything a lent GPU machine should check, in one call (run from the repository root):
#
#     OUT=/some/folder BUDGET=450 bash tools/gpu/gpu_check.sh
#
# 0. the peer libraries (Liger-Kernel, Cut Cross-Entropy, TRL) are installed offline from the pure-Python wheels that
#    tools/gpu/fetch_peer_wheels.sh downloads into .whl/ on a development machine (carry .whl with the tree);
# 1. the C++ / CUDA extension is built with the machine's nvcc;
# 2. the kernel tests run on CUDA (compiled Triton, not the interpreter), `gpu`-marked tests included;
# 3. the benchmark suite runs per (op, shapes) at GPU shapes, most wanted first: the DPO head at the Janus shape
#    beside its floor and the peers, then Lumina and Emu3 vocabularies, KC-DPO, the other ops.
#
# Every step has its own time limit and the whole run keeps to BUDGET seconds; a step that would start with too little
# time left is skipped and says so. After each step the logs and result folders are packed into $OUT/results.tgz, so
# a call that is cut off still brings back everything finished before. `python tools/gpu/gpu_collect.py results.tgz`
# turns the packed rows into one bench/results/suite-cuda-*.jsonl with its table and plots.
#
# The device image has its own torch / triton / transformers and nothing can be installed there, so the package runs
# from the checkout: silmm_fast.kernels and silmm_fast.csrc are linked to the top-level folders setup.py maps them
# from (the links are made here, on that machine's copy).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
BUDGET=${BUDGET:-450}  # the whole prepared check keeps under 8 minutes
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # cpu only to try the script's own plumbing on a machine without a GPU
RES=$(mktemp -d)
START=$(date +%s)
mkdir -p "$OUT"

left() { echo $((BUDGET - ($(date +%s) - START))); }
pack() { tar czf "$OUT/results.tgz.part" -C "$RES" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }

# step NAME LIMIT_SECONDS COMMAND...: run with a limit cut to the time left; output in $RES/NAME.log. ONLY="a b"
# runs just the steps named (a second call that redoes what failed in the first).
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        return
    fi
    local remaining
    remaining=$(left)
    if ((remaining < 30)); then
        echo "[gpu_check] $name: skipped, ${remaining} s of the budget left" | tee -a "$RES/steps.txt"
        return
    fi
    ((limit > remaining - 10)) && limit=$((remaining - 10))
    local t0=$(date +%s)
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    echo "[gpu_check] $name: rc=$rc after $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$RES/steps.txt"
    tail -n 4 "$RES/$name.log"
    pack
}

# bench NAME LIMIT ARGS...: one suite run into its own folder (the runner writes its rows when the run ends)
bench() {
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" -m silmm_fast.bench --device "$DEVICE" --out "$RES/$name" "$@"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$RES/site" .whl/*.whl \
        && export PYTHONPATH=$RES/site${PYTHONPATH:+:$PYTHONPATH} || echo "[gpu_check] peer wheels failed to install"
else
    echo "[gpu_check] no .whl/ folder: peers will be skipped (run tools/gpu/fetch_peer_wheels.sh and carry .whl)"
fi
ln -sfn ../kernels silmm_fast/kernels
ln -sfn ../csrc silmm_fast/csrc
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-16}
export SILMM_FAST_CACHE=$RES/cache

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
        --format=csv
    "$PY" -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
    nproc
    git rev-parse HEAD 2>/dev/null
} >"$RES/env.txt" 2>&1
cat "$RES/env.txt"

step build_ext 150 "$PY" -m silmm_fast.build_ext --verbose
step cpp_errors 40 "$PY" tools/cpp_error_probe.py
# xdist and pytest-timeout are in the device image; without them the tests run in one process, unbounded per test
PYTEST_OPTS=()
"$PY" -c "import xdist" 2>/dev/null && PYTEST_OPTS+=(-n 16)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS+=(--timeout 150)
TESTS=${TESTS:-tests/ops/test_gather_logprobs.py tests/ops/test_fused_linear_logprobs.py tests/ops/test_fused_linear_dpo.py \
tests/ops/test_pairwise_distance.py tests/ops/test_sample_tokens.py tests/ops/test_diverse_select.py}
# shellcheck disable=SC2086
step tests 150 "$PY" -m pytest -q -rfEs "${PYTEST_OPTS[@]}" $TESTS
# The DPO head at the Janus-Pro-1B shape: silmm, its baseline, the bare cuBLAS products and every peer, side by side in
# one script run (trainable and frozen head, forward+backward), then the large vocabularies
step dpo_janus 120 "$PY" bench/bench_logprobs.py --device "$DEVICE" --shapes janus --ops fused_linear_dpo \
    --modes forward full --providers naive gemm_floor silmm liger_kernel cut_cross_entropy trl --out "$RES/dpo_janus"
step dpo_large 70 "$PY" bench/bench_logprobs.py --device "$DEVICE" --shapes lumina emu3-pair --ops fused_linear_dpo \
    --modes full --heads trainable --providers naive gemm_floor silmm --out "$RES/dpo_large"
bench kernel_similarity 50 --ops kernel_similarity --providers reference torch_compile silmm
# the whole KC-DPO loss, forward+backward, against eager and torch.compile at the DreamLLM shapes (its floor: >= 2x eager)
step kc_dpo 50 "$PY" bench/bench_kernel_similarity.py --device "$DEVICE" --shapes dreamllm-4k-k8 dreamllm-1k \
    --modes kc_dpo --out "$RES/kc_dpo"
bench logprobs_janus 60 --ops logprobs --shapes janus --providers naive gemm_floor silmm
bench sampler 40 --ops sampler --providers naive reference silmm
bench diverse_select 40 --ops diverse_select --providers silmm reference torch.bmm
step janus_generate 50 "$PY" evals/janus_generate_throughput.py --device "$DEVICE" --out "$RES/janus_generate"
cat "$RES/steps.txt"
