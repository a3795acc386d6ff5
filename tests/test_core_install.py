"""The light core install: ``pip install silmm_fast`` (torch, numpy, triton) gives every public op and loss.

The fast test runs in a subprocess whose import system refuses every optional dependency (the [loop] and [trl]
extras), imports silmm_fast and calls every public name on tiny tensors; loop packages must then fail with an
ImportError naming the [loop] extra. The slow, opt-in test builds a fresh virtual environment with only the core
dependencies, installs the package from this checkout and runs the same script there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the extras' import names: none of them may be imported by the core
OPTIONAL = ("transformers", "PIL", "matplotlib", "yaml", "tqdm", "safetensors", "trl", "datasets", "accelerate")

BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {OPTIONAL!r}
attempts = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not a core dependency)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""

# Calls every public name of silmm_fast on tiny CPU tensors; prints one line per name, then "ok".
EXERCISE = """
import torch
import silmm_fast as sf

torch.manual_seed(0)
B, T, V, H = 2, 5, 11, 4
logits = torch.randn(B, T, V, requires_grad=True)
labels = torch.randint(0, V, (B, T))
labels[0, :2] = -100
done = set()


def ran(name):
    done.add(name)
    print("ran", name)


lp = sf.gather_logprobs(logits, labels)
assert lp.shape == (B, T) and lp.dtype == torch.float32
ran("gather_logprobs")
seq = sf.sequence_logprobs(logits, labels)
seq.sum().backward()
assert logits.grad is not None
ran("sequence_logprobs")
hidden = torch.randn(B, T, H, requires_grad=True)
weight = torch.randn(V, H, requires_grad=True)
fused = sf.fused_linear_logprobs(hidden, weight, labels)
assert torch.allclose(fused, sf.sequence_logprobs(hidden @ weight.T, labels), atol=1e-5)
fused.sum().backward()
assert hidden.grad is not None and weight.grad is not None
ran("fused_linear_logprobs")
pc, pr, rc, rr = torch.randn(4, 3).unbind(0)
out = sf.dpo_loss(pc, pr, rc, rr, beta=0.1)
assert isinstance(out, sf.DPOOutput)
ran("dpo_loss")
ran("DPOOutput")
assert torch.allclose(sf.DPOLoss(beta=0.1)(pc, pr, rc, rr).loss, out.loss)
ran("DPOLoss")
loss_fn = sf.FusedLinearDPOLoss(beta=0.1)
ref_c, ref_r = loss_fn.reference_logps(hidden.detach(), weight.detach(), labels)
res = loss_fn(hidden, weight, labels, ref_c, ref_r)
res.loss.backward()
assert abs(res.loss.item() - 0.6931471805599453) < 1e-5  # policy == reference: loss log 2
ran("FusedLinearDPOLoss")
feats = torch.randn(2, 3, 4, 6)
pol, ref, ch, rj = (torch.randn(2, 4, 6) for _ in range(4))
kc = sf.kc_dpo_loss(pol, ref, ch, rj)
assert torch.allclose(sf.KCDPOLoss()(pol, ref, ch, rj).loss, kc.loss)
ran("kc_dpo_loss")
ran("KCDPOLoss")
assert sf.pairwise_distance(feats, feats).shape == (2, 3, 3)
ran("pairwise_distance")
idx = sf.diverse_select(feats, 2)
assert idx.shape == (2, 2)
ran("diverse_select")
tok = sf.sample_tokens(torch.randn(3, V), top_p=0.9, generator=torch.Generator().manual_seed(0))
assert tok.shape == (3,)
ran("sample_tokens")


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def dropdiv_mlps(self):
        return list(self.layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


model = TinyLM()
x = torch.randn(2, 4)
with sf.dropdiv(model, last_layers=1, p=0.5, seed=0):
    a = model(x)
with sf.DropDiv(model, last_layers=1, p=0.5, seed=1):
    b = model(x)
assert not torch.equal(a, b)
ran("dropdiv")
ran("DropDiv")
qs = sf.decompose_prompt("a red cube to the left of two blue spheres")
assert qs and all(q.endswith("?") for q in qs)
ran("decompose_prompt")
report = sf.env_report(print_report=False)
assert "transformers" not in sys.modules  # its version is read from package metadata, never imported
ran("env_report")
with sf.use_backend("reference"):
    assert torch.allclose(sf.gather_logprobs(logits, labels), lp, atol=1e-6)
ran("use_backend")
public = set(sf.__all__) - {"__version__"}
assert done == public, f"public names not exercised: {sorted(public - done)}"
print("ok")
"""

LOOP_GUARD = """
import silmm_fast
for name in ("silmm_fast.loop.train", "silmm_fast.loop.models", "silmm_fast.loop.adapters", "silmm_fast.loop.world"):
    try:
        __import__(name)
    except ImportError as err:
        assert "[loop]" in str(err) and "pip install 'silmm_fast[loop]'" in str(err), str(err)
        print("guarded", name)
    else:
        raise AssertionError(f"{name} imported without the [loop] extra")
try:
    import silmm_fast.integrations.trl
except ImportError as err:
    assert "[trl]" in str(err) and "pip install 'silmm_fast[trl]'" in str(err), str(err)
    print("guarded silmm_fast.integrations.trl")
else:
    raise AssertionError("silmm_fast.integrations.trl imported without the [trl] extra")
"""


def _run(code: str, python: str = sys.executable, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env or dict(os.environ)
    )


def test_core_imports_and_runs_every_op_without_the_optional_dependencies():
    code = BLOCKER + "import sys\n" + EXERCISE + LOOP_GUARD
    code += "\nleaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)\nassert not leaked, leaked\n"
    result = _run(code)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.splitlines()[-6] == "ok"
    assert result.stdout.count("guarded ") == 5


def test_loop_guard_lets_loop_packages_import_when_the_extra_is_installed():
    pytest.importorskip("transformers", reason="the [loop] extra is not installed here")
    result = _run("import silmm_fast.loop.world, silmm_fast.loop.train.config; print('imported')")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "imported"


def test_require_names_the_extra_and_the_missing_distribution():
    from silmm_fast._extras import require

    require("loop", {"os": "os"}, "something")  # present: no error
    with pytest.raises(ImportError, match=r"needs the \[trl\] extra \(missing: no-such-dist\)"):
        require("trl", {"no_such_module_silmm_fast": "no-such-dist"}, "something")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SILMM_FAST_FRESH_VENV") != "1",
    reason="opt-in (SILMM_FAST_FRESH_VENV=1): builds a fresh virtual environment and installs torch into it "
    "(about 1-2 min and ~1 GB of disk)",
)
def test_fresh_venv_with_only_the_core_dependencies(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    constraints = ROOT / "requirements" / "cpu-constraints.txt"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraints), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    for dist in ("transformers", "pillow", "matplotlib", "pyyaml", "tqdm", "safetensors", "trl"):
        assert dist not in names, f"{dist} was installed by the core install"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # run outside the checkout so the installed package, not the source tree, is imported
    code = "import os; os.chdir('/'); " + textwrap.dedent(EXERCISE) + LOOP_GUARD
    result = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "ok" in result.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SILMM_FAST_FRESH_VENV") != "1",
    reason="opt-in (SILMM_FAST_FRESH_VENV=1): compiles the C++ extension into a wheel (about 1-2 min)",
)
def test_wheel_built_with_torch_carries_the_extension_and_loads_it(tmp_path):
    """``pip wheel --no-build-isolation`` compiles silmm_fast._C into the wheel; installed, ``_ext.load`` uses it
    instead of building into the cache."""
    wheel_dir = tmp_path / "wheel"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    build = subprocess.run(
        [*pip_wheel, str(ROOT), "-w", str(wheel_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = wheel_dir.glob("silmm_fast-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("silmm_fast/_C") and n.endswith(".so") for n in names), names
    assert "silmm_fast/_C_build.json" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import silmm_fast, torch; from silmm_fast import _ext\n"
        "m = _ext.load(); assert m is not None and m.__name__ == 'silmm_fast._C', m\n"
        "print(silmm_fast.diverse_select(torch.randn(1, 5, 3), 2).tolist())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target), SILMM_FAST_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (tmp_path / "cache" / "ext").exists()  # nothing compiled on first use
