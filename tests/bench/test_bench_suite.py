"""The benchmark suite (bench/suite.py, `python -m bench`): on the tiny registry it writes schema-valid rows with
rooflines, a table and plots; missing peers are skipped with a reason; --profile writes traces; every public op has a
benchmark entry; the README section is generated from results; the timing and memory helpers measure what they say.
`python -m silmm_fast.bench` launches it from the checkout, and says so clearly where there is none."""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import silmm_fast
from bench import suite as runner

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One tiny CPU run of the whole suite; cut_cross_entropy is asked for and made uninstalled."""
    out = tmp_path_factory.mktemp("suite")
    argv = ["--device", "cpu", "--shapes", "tiny", "--providers", "reference", "silmm", "cut_cross_entropy"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cut_cross_entropy", None)  # `import cut_cross_entropy` now fails as if missing
        assert runner.main([*argv, "--out", str(out)]) == 0
    (rows_file,) = out.glob("suite-cpu-*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    return out, rows


def test_rows_follow_the_schema(suite):
    _, rows = suite
    measured = runner.measured(rows)
    assert measured and {r["provider"] for r in measured} == {"reference", "silmm"}
    for r in measured:
        assert r["schema"] == 2
        for key in ("op", "provider", "mode", "device", "device_type", "torch", "triton", "git", "timestamp"):
            assert key in r, key
        assert r["shape"]["name"] == "tiny" and all(isinstance(v, int) for k, v in r["shape"].items() if k != "name")
        assert 0 < r["min_ms"] <= r["time_ms"] and r["repeats"] >= 1 and r["copies"] == 1
        assert r["mem_metric"] in ("rss_hwm", None) and (r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0)
        assert r["min_bytes"] > 0 and r["gbps"] >= 0
        assert r["ceiling_gbps"] > 0 and r["ceiling_tflops"] > 0 and r["ceiling_matmul_dtype"] == "float32"
        assert r["roofline"] > 0 and r["roofline_bound"] in ("memory", "compute")
    fused = [r for r in measured if r["op"] == "fused_linear_logprobs"]
    assert fused and all(r["flops"] > 0 and r["tflops"] > 0 for r in fused)


def test_missing_peer_is_skipped_with_a_reason(suite, capsys):
    _, rows = suite
    skips = [r for r in rows if "skipped" in r]
    missing = [s for s in skips if s["provider"] == "cut_cross_entropy" and s["op"] == "fused_linear_logprobs"]
    assert len(missing) == 1 and missing[0]["skip_kind"] == "unavailable"
    assert "not installed (pip install cut-cross-entropy)" in missing[0]["skipped"]
    assert all(s["schema"] == 2 and s["device"] and "time_ms" not in s for s in skips)
    table = next(suite[0].glob("suite-cpu-*.md")).read_text()
    assert "- cut_cross_entropy for fused_linear_logprobs (unavailable): cut-cross-entropy is not installed" in table


def test_table_and_plots(suite):
    out, rows = suite
    table = next(out.glob("suite-cpu-*.md")).read_text()
    assert table.startswith("| op | provider | case |")
    assert table.count("\n| ") == len(runner.measured(rows))  # one line per measured row under the header
    assert "Ceilings measured on this device" in table
    for op in {r["op"] for r in runner.measured(rows)}:
        png = out / f"suite-cpu-{op}.png"
        assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG


def test_every_public_op_has_a_benchmark_entry(suite):
    _, rows = suite
    ops = {r["op"] for r in runner.measured(rows)}
    public = [n for n in silmm_fast.__all__ if inspect.isfunction(getattr(silmm_fast, n))]
    assert "fused_linear_logprobs" in public and "kc_dpo_loss" in public
    for name in public:
        assert name in runner.PUBLIC_OPS or name in runner.NOT_BENCHMARKED, f"{name}: no benchmark entry"
        if name in runner.PUBLIC_OPS:
            entry, row_op = runner.PUBLIC_OPS[name]
            assert entry in runner.SUITE, (name, entry)
            if runner.script_exists(entry):  # an entry whose script is still being written is skipped by the runner
                assert row_op in ops, (name, row_op, ops)


def test_sweep_plot_draws_lines_over_sizes(tmp_path):
    rows = []
    for name, size in (("a", 1 << 20), ("b", 1 << 22), ("c", 1 << 24)):
        for provider, scale in (("reference", 2.0), ("silmm", 1.0)):
            rows.append(dict(op="x", provider=provider, mode="full", shape={"name": name, "N": size},
                             time_ms=scale * size / 1e6, peak_mem_bytes=int(scale * size), min_bytes=size))  # fmt: skip
    runner.plot(rows, tmp_path / "x.png", "x")
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG


def test_sweep_plot_with_shapes_of_equal_size(tmp_path):
    """Two shapes that move the same bytes (kernel_similarity's dreamllm-1k and wide-64k, 64 × 1,024 = 65,536) are two
    points at one x; ordering them must not compare the rows themselves (a TypeError lost a whole GPU run's rows)."""
    rows = [dict(op="x", provider="silmm", mode="full", shape={"name": name, "N": 1}, time_ms=t, peak_mem_bytes=1,
                 min_bytes=1 << 20) for name, t in (("a", 1.0), ("b", 2.0), ("c", 3.0))]  # fmt: skip
    runner.plot(rows, tmp_path / "x.png", "x")
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG


def test_a_new_op_is_one_suite_line(tmp_path, monkeypatch):
    from bench.common import Cost, Measurement, environment, row

    def run(shapes, device, providers):
        m = Measurement([1.0, 2.0, 3.0], 1024, "rss_hwm")
        return [row("sample_tokens", p, "forward", {"name": s, "V": 8}, m, environment(device), cost=Cost(64))
                for s in shapes for p in providers or ("silmm",)]  # fmt: skip

    monkeypatch.setitem(sys.modules, "bench.bench_fake", types.SimpleNamespace(run=run, PROVIDERS=("silmm",)))
    monkeypatch.setitem(runner.SUITE, "fake", runner.Bench("bench_fake", ("tiny",)))
    assert runner.main(["--device", "cpu", "--ops", "fake", "--out", str(tmp_path)]) == 0
    (rows_file,) = tmp_path.glob("*.jsonl")
    (r,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert r["op"] == "sample_tokens" and r["time_ms"] == 2.0 and r["roofline"] > 0
    assert (tmp_path / "suite-cpu-sample_tokens.png").is_file()


def test_profile_writes_a_chrome_trace(tmp_path, capsys):
    argv = ["--device", "cpu", "--ops", "kernel_similarity", "--shapes", "tiny", "--providers", "silmm", "--profile"]
    assert runner.main([*argv, "--out", str(tmp_path)]) == 0
    from bench.bench_kernel_similarity import MODES

    traces = sorted((tmp_path / "traces").glob("*.json"))  # one per mode the script measures
    assert [t.name for t in traces] == sorted(f"kernel_similarity-silmm-tiny-{mode}.json" for mode in MODES)
    assert "kernel_similarity-silmm-tiny-forward.json" in [t.name for t in traces]
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("pairwise_distance" in e.get("name", "") or e.get("name", "").startswith("aten::") for e in events)
    assert "traces in" in capsys.readouterr().out


# --- the README section ---------------------------------------------------------------------------------------------
def _synthetic_rows():
    env = dict(schema=2, device="cpu: test x2", device_type="cpu", threads=2, torch="2.x", triton=None, git="abc1234",
               timestamp="2030-01-02T03:04:05+00:00", ceiling_gbps=10.0, ceiling_tflops=0.1,
               ceiling_matmul_dtype="float32")  # fmt: skip
    shape = {"name": "tiny", "B": 2, "T": 16, "H": 32, "V": 96}
    rows = []
    mib = 2**20
    for provider, t, mem in (("naive", 10.0, 400 * mib), ("reference", 8.0, 400 * mib), ("silmm", 5.0, 100 * mib)):
        for mode in ("forward", "full"):
            rows.append(dict(env, op="fused_linear_logprobs", provider=provider, mode=mode, shape=shape, head="frozen",
                             dtype="float32", time_ms=t, peak_mem_bytes=mem, roofline=0.25))  # fmt: skip
    rows.append(dict(env, op="fused_linear_logprobs", provider="liger_kernel", skipped="liger-kernel is not installed",
                     skip_kind="unavailable"))  # fmt: skip
    rows.append(dict(env, op="gather_logprobs", provider="liger_kernel", skipped="no gather", skip_kind="unsupported"))
    return rows


def test_readme_section_is_generated_from_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "suite-cpu-x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _synthetic_rows()))
    (results / "other.jsonl").write_text('{"op": "decompose_prompt", "coverage": 1.0}\n')  # not a benchmark row
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\n<!-- perf:begin -->\nold table\n<!-- perf:end -->\n\n## Next\n")
    assert runner.main(["--readme", str(readme), "--out", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n<!-- perf:begin -->\n")
    assert text.endswith("<!-- perf:end -->\n\n## Next\n")
    assert "old table" not in text
    body = text.split("<!-- perf:begin -->")[1].split("<!-- perf:end -->")[0]
    assert "**cpu: test x2** (torch 2.x, 2 threads; runs: git abc1234 (2030-01-02))" in body
    assert "Ceilings measured there: copy 10 GB/s, float32 matmul 100 GFLOP/s." in body
    (line,) = [x for x in body.splitlines() if x.startswith("| `fused_linear_logprobs`")]  # only the fwd+bwd case
    assert "| fwd+bwd, frozen head | tiny: B=2 T=16 H=32 V=96, float32 | 5 ms | 0.5× naive |" in line
    assert "| 0.25× (100 vs 400 MiB) | reference 0.625× | 25 % |" in line
    assert "no GPU has been available" in body
    assert "`liger_kernel` (cpu: test x2, fused_linear_logprobs: liger-kernel is not installed)" in body
    assert "no gather" not in body
    runner.main(["--readme", str(readme), "--out", str(results)])
    assert readme.read_text() == text  # regenerating is stable


def test_readme_has_one_generated_section():
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- perf:begin -->") == 1 and text.count("<!-- perf:end -->") == 1


# --- the package's launcher ------------------------------------------------------------------------------------------
def test_package_command_runs_the_checkout_suite_from_any_folder(tmp_path):
    """`python -m silmm_fast.bench` from another folder: the suite of the package's checkout runs, and relative paths
    are the caller's."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "suite-cpu-x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _synthetic_rows()))
    (tmp_path / "README.md").write_text("# x\n\n<!-- perf:begin -->\nstale table\n<!-- perf:end -->\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "silmm_fast.bench", "--readme", "README.md", "--out", "results"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Performance section of README.md regenerated" in done.stdout
    text = (tmp_path / "README.md").read_text()
    assert "stale table" not in text and "**cpu: test x2**" in text
    bad = subprocess.run([*cmd[:3], "--ops", "no-such-op"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'no-such-op'" in bad.stderr  # the suite's own status comes back


def test_package_command_without_a_checkout_says_so(tmp_path):
    """Installed without a checkout there is no bench/ beside the package: a clear error, not a traceback."""
    package = tmp_path / "site" / "silmm_fast"
    package.mkdir(parents=True)
    launcher = package / "bench.py"
    launcher.write_text((ROOT / "silmm_fast" / "bench.py").read_text())
    done = subprocess.run([sys.executable, str(launcher), "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 2 and not done.stdout
    assert "no bench/suite.py next to the package" in done.stderr and "clone of the repository" in done.stderr
    assert "Traceback" not in done.stderr


def test_package_launcher_imports_only_the_standard_library():
    """Importing silmm_fast.bench changes nothing in the importing process: no import beyond the standard library,
    no sys.path entry."""
    code = (
        "import sys; before = set(sys.modules), list(sys.path)\n"
        "import silmm_fast.bench\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before[0]} - {'silmm_fast'}\n"
        "print(sorted(new - set(sys.stdlib_module_names)), sys.path == before[1])\n"
    )
    # silmm_fast/__init__ imports torch; what counts is what the launcher adds on top of the package
    warm = "import silmm_fast\n"
    done = subprocess.run([sys.executable, "-c", warm + code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]", "True"]


# --- measuring helpers ----------------------------------------------------------------------------------------------
def test_cpu_peak_memory_counts_what_one_call_allocates():
    from bench.common import measure

    size = 16 * 2**20  # below glibc's largest dynamic mmap threshold: freed, it could be reused unseen
    m = measure(lambda: torch.ones(size // 4).sum(), torch.device("cpu"), warmup=2, repeats=2)
    if m.mem_metric is None:
        pytest.skip("this kernel does not let /proc/self/clear_refs reset the peak resident set")
    assert m.mem_metric == "rss_hwm" and 0.9 * size <= m.peak_bytes <= 1.25 * size


def test_roofline_and_rotation(monkeypatch):
    from bench import common

    rows = [dict(time_ms=2.0, min_bytes=10**7, flops=10**8), dict(time_ms=4.0, min_bytes=10**6, flops=10**9)]
    common.attach_roofline(rows, dict(ceiling_gbps=10.0, ceiling_tflops=1.0, ceiling_matmul_dtype="bfloat16"))
    assert rows[0]["roofline"] == 0.5 and rows[0]["roofline_bound"] == "memory"  # 1 ms of traffic in 2 ms
    assert rows[1]["roofline"] == 0.25 and rows[1]["roofline_bound"] == "compute"  # 1 ms of math in 4 ms
    assert common.rotation_copies(10 * 2**20, torch.device("cpu")) == 1
    monkeypatch.setattr(common, "cache_bytes", lambda device: 50 * 2**20)
    assert common.rotation_copies(40 * 2**20, torch.device("cpu")) == 3  # together at least twice the cache
    assert common.rotation_copies(2**10, torch.device("cpu")) == common.MAX_COPIES
    calls = []
    m = common.measure([lambda: calls.append(0), lambda: calls.append(1)], torch.device("cpu"), warmup=0, repeats=4)
    assert calls[:4] == [0, 1, 0, 1] and m.copies == 2


def test_micro_benchmarks_run_under_pytest_benchmark():
    quick = ["--benchmark-max-time=0.001", "--benchmark-min-rounds=1", "--benchmark-warmup=off"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_micro.py", "--benchmark-only"]
    cmd += quick
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "7 passed" in done.stdout


# --- folding a GPU machine's archive into the results ---------------------------------------------------------------
def test_gpu_collect_folds_every_step_and_sets_the_revision(tmp_path):
    """An archive as tools/gpu/gpu_check.sh packs it: a suite step with ceilings, a script step without (its rows get
    the suite's ceilings), the machine facts and a test log. Rows carry a stale revision the collect must replace."""
    import tarfile

    spec = importlib.util.spec_from_file_location("gpu_collect", ROOT / "tools" / "gpu" / "gpu_collect.py")
    gpu_collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_collect)
    collect = gpu_collect.collect

    packed = tmp_path / "packed"
    rows = [dict(r, git="stale00") for r in _synthetic_rows()]
    script_rows = [{k: v for k, v in r.items() if not k.startswith("ceiling")} for r in rows if "time_ms" in r]
    for r in script_rows:
        r.pop("roofline")
        r["flops"], r["min_bytes"] = 1e6, 1e6
    for step, step_rows in (("suite_step", rows), ("script_step", script_rows)):
        (packed / step).mkdir(parents=True)
        (packed / step / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in step_rows))
    (packed / "env.txt").write_text("GPU name line\n")
    (packed / "steps.txt").write_text("[gpu_check] suite_step: rc=0 after 3 s (limit 9 s)\n")
    (packed / "tests.log").write_text("1 passed in 0.1s\n")
    archive = tmp_path / "results.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(packed, arcname=".")
    out = collect(archive, tmp_path / "results", "abc1234")
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(rows) + len(script_rows)
    assert {r["git"] for r in written} == {"abc1234"}
    from_script = [r for r in written if r.get("flops") == 1e6]
    assert len(from_script) == len(script_rows)
    assert all(r["ceiling_gbps"] == 10.0 and r["roofline"] is not None for r in from_script)
    checks = out.with_name(out.stem + "-checks.txt").read_text()
    assert checks.startswith("## revision\nabc1234") and "GPU name line" in checks and "1 passed" in checks
    assert out.with_suffix(".md").is_file() and (tmp_path / "results" / "suite-cpu-fused_linear_logprobs.png").is_file()
    assert collect(archive, tmp_path / "results", "abc1234") == out  # collecting again replaces the rows
    assert len(out.read_text().splitlines()) == len(written)
