"""The fused head kernels (forward and backward) compile for an H100 / H200 (sm_90) on a machine without a GPU.

Interpreter tests check what the kernels compute, not whether Triton's GPU compiler accepts them: the frozen-head
variant of an earlier fused_linear_logprobs kernel failed in Triton 3.6's layout pass only on the GPU (3.7 compiled
it, so this check speaks for the Triton installed where it runs; `PYTHONPATH` can put another first). Triton compiles
for a named target without a device (its wheel carries ptxas), so each variant the launcher can pick at the default
GPU tiles is compiled here in a child process (the interpreter, set for the other tests, must be off there), with the
16-byte divisibility hints real CUDA tensors give. The bf16 variants take the tensor-core (wgmma) path the GPU runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compile_in_child(child: str, n_variants: int) -> None:
    """Run a ``*_CHILD`` script (interpreter off, this checkout first on the path) and require that it compiled all
    ``n_variants`` variants without a failure; skip only when the Triton install has no ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "compiled" not in proc.stdout:
        if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
            pytest.skip(f"this Triton install has no ptxas to compile for sm_90: {proc.stderr.strip()[-300:]}")
        raise AssertionError(f"the compile run itself failed:\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"variants that do not compile for sm_90:\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert f"compiled {n_variants}" in proc.stdout


CHILD = r"""
import itertools, sys, torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from silmm_fast.kernels import fused_linear_logprobs as k

products = {torch.bfloat16: ("bf16", tl.bfloat16, "tf32"), torch.float32: ("fp32", tl.float32, "ieee")}
# the forward kernel stores the logit slab (STORE_Z) or not; the backward kernel reads it (LOAD_Z) or recomputes
kernels = {"fwd": (k._fused_linear_logprobs_fwd_kernel, "STORE_Z"),
           "bwd": (k._fused_linear_logprobs_bwd_kernel, "LOAD_Z")}
failures, compiled = [], 0
for (direction, (fn, slab_flag)), dtype, bias, z_slab in itertools.product(
    kernels.items(), products, (False, True), (False, True)
):
    if dtype == torch.float32 and bias:
        continue  # the bias only adds a vector load; fp32 keeps the CUDA-core tile shapes covered
    names = fn.arg_names
    name, dot, precision = products[dtype]
    tiles = k.GPU_TILES[dtype]
    const = {"HAS_BIAS": bias, slab_flag: z_slab, "ACC": tl.float32, "DOT": dot, "PRECISION": precision,
             "BLOCK_N": tiles.block_n, "BLOCK_V": tiles.block_v, "BLOCK_H": tiles.block_h}
    if not bias:
        const["b_ptr"] = None  # the launcher passes None for an absent bias
    if not z_slab:
        const["z_ptr"] = None
    signature = {}
    for arg in names:
        if arg in const:
            signature[arg] = "constexpr"
        elif arg == "labels_ptr":
            signature[arg] = "*i64"
        elif arg in ("h_ptr", "w_ptr", "b_ptr", "dz_ptr"):
            signature[arg] = "*" + name
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        else:
            signature[arg] = "i32"
    sizes = ("V", "H", "stride_hn", "stride_wv", "n_vtiles")
    aligned = [a for a in names if (a.endswith("_ptr") and a not in const) or a in sizes]
    source = ASTSource(fn, signature, constexprs={(names.index(a),): v for a, v in const.items()},
                       attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    variant = f"{direction} {name} bias={bias} z_slab={z_slab}"
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    except Exception as err:
        failures.append(f"{variant}: {str(err).splitlines()[-1][:300]}")
        continue
    compiled += 1
    matmul = not (direction == "bwd" and z_slab)  # the backward over stored logits has no product
    if name == "bf16" and matmul and "wgmma" not in kernel.asm["ptx"]:
        failures.append(f"{variant}: no wgmma instruction in the PTX")
print("compiled", compiled)
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_fused_head_kernels_compile_for_sm90():
    compile_in_child(CHILD, 12)


PAIRWISE_CHILD = r"""
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from silmm_fast.kernels import pairwise_distance as k

tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=128)
fwd = [  # split-D with the exact epilogue; one program per tile, per-token statistics
    dict(KERNEL=1, POOL=1, SPLIT=True, EPS=1e-8, RATIO=2.0**-6, EXACT_BLOCK_D=8),
    dict(KERNEL=3, POOL=2, SPLIT=False, EPS=1e-8, RATIO=2.0**-6, EXACT_BLOCK_D=8,
         part_g_ptr=None, part_na_ptr=None, part_nc_ptr=None, tickets_ptr=None),
]
bwd = [  # both gradients with the exact branch; one gradient, mean pooling
    dict(KERNEL=3, POOL=2, NEED_X=True, NEED_Y=True, EPS=1e-8, RATIO=2.0**-6),
    dict(KERNEL=0, POOL=0, NEED_X=True, NEED_Y=False, EPS=1e-8, RATIO=2.0**-6, gy_ptr=None),
]
inputs = ("x_ptr", "y_ptr", "gx_ptr", "gy_ptr")
failures, compiled = [], 0
for acc, elem in ((tl.float32, "bf16"), (tl.float64, "fp64")):
    acc_name = "fp32" if acc == tl.float32 else "fp64"
    for fn, variants in ((k._pd_fwd_kernel, fwd), (k._pd_bwd_kernel, bwd)):
        for variant in variants:
            const = dict(variant, ACC=acc, **tiles)
            names = fn.arg_names
            signature = {}
            for a in names:
                if a in const:
                    signature[a] = "constexpr"
                elif a == "tickets_ptr":
                    signature[a] = "*i32"
                elif a == "INV_BITS":
                    signature[a] = "i64"
                elif a.endswith("_ptr"):
                    signature[a] = "*" + (elem if a in inputs else acc_name)
                else:
                    signature[a] = "i32"
            source = ASTSource(fn, signature, constexprs={(names.index(a),): v for a, v in const.items()})
            try:
                triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
                compiled += 1
            except Exception as err:
                failures.append(f"{fn.__name__} {acc_name} {variant}: {str(err).splitlines()[-1][:300]}")
print("compiled", compiled)
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_pairwise_distance_kernels_compile_for_sm90():
    # the interpreter accepts what Triton's GPU compiler may not (the split-D ticket and its data-dependent branch,
    # the exact-pair branch on a tile's flags, the per-column loop, None for the pointers a variant does not use)
    compile_in_child(PAIRWISE_CHILD, 8)


SAMPLING_CHILD = r"""
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from silmm_fast.kernels import sampling as k

types = {"cond_ptr": "*bf16", "uncond_ptr": "*bf16", "noise_ptr": "*fp64", "out_ptr": "*i64", "max_ptr": "*fp32",
         "z_ptr": "*fp32", "key_ptr": "*i32", "w_ptr": "*i64", "cfg_scale": "fp32", "inv_t": "fp32", "top_p": "fp32"}
variants = [  # (kernel, constants): with and without guidance; greedy (no noise), plain, top-k, top-p, both
    (k._sample_tokens_fwd_kernel, dict(uncond_ptr=uncond, **mode))
    for uncond in ("given", None)
    for mode in (dict(noise_ptr=None, DO_TOP_K=False, DO_TOP_P=False), dict(DO_TOP_K=False, DO_TOP_P=False),
                 dict(DO_TOP_K=True, DO_TOP_P=False), dict(DO_TOP_K=False, DO_TOP_P=True),
                 dict(DO_TOP_K=True, DO_TOP_P=True))
] + [(k._sample_tokens_weights_kernel, dict(uncond_ptr=uncond)) for uncond in ("given", None)]
failures, compiled = [], 0
for fn, variant in variants:
    const = {a: v for a, v in variant.items() if v != "given"}
    const["BLOCK_V"] = k.MAX_BLOCK_V
    names = fn.arg_names
    signature = {a: "constexpr" if a in const else types.get(a, "i32") for a in names}
    source = ASTSource(fn, signature, constexprs={(names.index(a),): v for a, v in const.items()})
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 8, "enable_fp_fusion": False})
    except Exception as err:
        failures.append(f"{fn.__name__} {variant}: {str(err).splitlines()[-1][:300]}")
        continue
    compiled += 1
    if "fma.rn.f32" in kernel.asm["ptx"]:  # the weights must round like the reference's separate multiply and add
        failures.append(f"{fn.__name__} {variant}: an fp32 FMA in the PTX")
print("compiled", compiled)
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_sample_tokens_kernels_compile_for_sm90():
    # None for an absent uncond or noise pointer, the bisection loops on data-dependent bounds and int64 weight
    # arithmetic, at the launchers' GPU block; with fp fusion off, as launched, no fp32 FMA may appear
    compile_in_child(SAMPLING_CHILD, 12)
