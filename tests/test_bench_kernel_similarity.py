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
    bench.main(["--device", "cpu", "--shapes", "tiny", "--providers", "silmm", "--modes", "forward", "--repeats", "1",
                "--out", str(tmp_path)])  # fmt: skip
    lines = (tmp_path / "kernel_similarity-cpu.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["provider"] == "silmm"
    assert "kernel_similarity" in capsys.readouterr().out
