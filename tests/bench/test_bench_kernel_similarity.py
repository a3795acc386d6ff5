"""bench/bench_kernel_similarity.py: rows in the shared schema, traced memory, CLI writing JSON lines."""

import json

import torch

from bench import bench_kernel_similarity as bench


def test_run_rows_schema():
    rows = bench.run(["tiny"], "cpu", providers=["reference", "silmm"], modes=["forward", "full"], repeats=1)
    assert [(r["provider"], r["mode"]) for r in rows] == [
        ("reference", "forward"),
        ("reference", "full"),
        ("silmm", "forward"),
        ("silmm", "full"),
    ]
    for r in rows:
        assert r["op"] == "kernel_similarity" and r["shape"]["name"] == "tiny" and r["shape"]["M"] == 2
        assert r["time_ms"] > 0 and r["min_ms"] <= r["time_ms"]
        assert r["traced_peak_bytes"] > 0
        # forward reads x [2, 2, 3, 8] and y [2, 2, 3, 8] in float32; full also writes the gradient of x
        assert r["min_bytes"] == (96 + 96) * 4 + (96 * 4 if r["mode"] == "full" else 0)


def test_traced_peak_counts_live_storages():
    x = torch.randn(1000)

    def call():
        a = x * 2  # 4000 bytes
        b = a * 2  # 8000 live at the peak
        del a
        return b * 0  # b freed only after this: another 8000 peak

    assert bench._traced_peak_bytes(call) == 8000


def test_main_writes_json_lines(tmp_path, capsys):
    options = ["--providers", "silmm", "--modes", "forward", "--repeats", "1", "--out", str(tmp_path)]
    bench.main(["--device", "cpu", "--shapes", "tiny", *options])
    lines = (tmp_path / "kernel_similarity-cpu.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["provider"] == "silmm"
    assert "kernel_similarity" in capsys.readouterr().out


def test_kc_dpo_mode_rows_and_loss():
    # the whole loss forward + backward: eager over the reference distances against silmm_fast.kc_dpo_loss
    rows = bench.run(["tiny"], "cpu", providers=["reference", "silmm"], modes=["kc_dpo"], repeats=1)
    assert [(r["provider"], r["mode"]) for r in rows] == [("reference", "kc_dpo"), ("silmm", "kc_dpo")]
    for r in rows:
        # reads policy and reference [2, 3, 8] and the candidates [2, 2, 3, 8], writes the policy's gradient
        assert r["min_bytes"] == (96 + 48 + 96) * 4 and r["time_ms"] > 0
    gen = torch.Generator().manual_seed(0)
    policy, reference = (torch.randn(2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    chosen, rejected = (torch.randn(2, 2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    kw = dict(kernel="rbf", pool="max", sigma=2.0)
    eager = bench._kc_dpo_eager(policy, reference, chosen, rejected, **kw)
    silmm = bench._kc_dpo_silmm(policy, reference, chosen, rejected, **kw)
    torch.testing.assert_close(silmm, eager, rtol=1e-12, atol=1e-12)


def test_cuda_defaults_measure_the_dreamllm_shapes_in_every_mode():
    # what `bench_kernel_similarity.py --device cuda` records without options: the KC-DPO floor's case (eager,
    # torch.compile and silmm_fast on the DreamLLM shapes, the loss forward + backward)
    shapes = bench.default_shapes("cuda")
    assert {"dreamllm-1k", "dreamllm-4k", "dreamllm-4k-k8"} <= set(shapes)
    assert bench.PROVIDERS == ("reference", "torch_compile", "silmm") and "kc_dpo" in bench.ALL_MODES
