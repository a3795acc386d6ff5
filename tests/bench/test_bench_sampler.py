"""bench/bench_sampler.py runs end to end on the tiny registry shape and writes rows of the shared schema."""

import json

import torch

from bench import bench_sampler


def test_run_rows_and_cli(tmp_path, capsys):
    rows = bench_sampler.run(["tiny"], "cpu", providers=["naive", "reference", "silmm"], modes=["plain", "greedy"],
                             warmup=0, repeats=1)  # fmt: skip
    assert [(r["provider"], r["mode"]) for r in rows] == [
        (p, m) for p in ("naive", "reference", "silmm") for m in ("plain", "greedy")
    ]
    for r in rows:
        assert r["op"] == "sample_tokens" and r["shape"] == dict(name="tiny", B=4, V=96) and r["guided"]
        assert r["time_ms"] > 0 and r["min_bytes"] == 2 * 4 * 96 * 4 + 4 * 8
    assert all(r["backend"] == "torch" for r in rows if r["provider"] == "silmm")
    bench_sampler.main(["--device", "cpu", "--shapes", "tiny", "--providers", "naive", "silmm", "--modes", "top_p",
                        "--repeats", "1", "--out", str(tmp_path)])  # fmt: skip
    written = [json.loads(line) for line in (tmp_path / "sampler-cpu.jsonl").read_text().splitlines()]
    assert [r["provider"] for r in written] == ["naive", "silmm"] and written[1]["top_p"] == 0.9
    assert "silmm / naive" in capsys.readouterr().out


def test_naive_provider_samples_from_the_nucleus():
    """The naive baseline is a real sampler: with top_p it only returns tokens of the nucleus."""
    z = torch.tensor([[3.0, 2.0, -5.0, -6.0]]).expand(500, -1)
    g = torch.Generator().manual_seed(0)
    tokens = bench_sampler.naive_sample(z, None, cfg_scale=1.0, temperature=1.0, top_p=0.9, generator=g)
    assert set(tokens.tolist()) == {0, 1}
    assert bench_sampler.naive_sample(z, None, cfg_scale=1.0, temperature=0.0).unique().tolist() == [0]
