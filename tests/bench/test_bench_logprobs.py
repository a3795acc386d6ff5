"""bench/bench_logprobs.py runs end to end on the tiny registry shape and writes rows of the shared schema."""

import importlib.util
import json

from bench import bench_logprobs


def test_run_and_write(tmp_path, capsys):
    rows = bench_logprobs.run(
        ["tiny"],
        "cpu",
        providers=["naive", "silmm", "liger_kernel"],
        modes=["forward", "full"],
        ops=["sequence_logprobs", "fused_linear_logprobs", "fused_linear_dpo"],
        heads=["frozen"],
        warmup=0,
        repeats=1,
    )
    # Liger's fused linear cross-entropy is CUDA only: skipped with a printed reason; its chunked DPO (PyTorch) runs
    # on the CPU where liger-kernel is installed
    assert "skip liger_kernel" in capsys.readouterr().out
    liger_dpo = 2 if importlib.util.find_spec("liger_kernel") is not None else 0
    cases = {(r["op"], r["provider"], r["mode"]) for r in rows}
    assert len(rows) == len(cases) == 3 * 2 * 2 + liger_dpo
    silmm = [r for r in rows if r["provider"] == "silmm"]
    assert all(r["backend"] == "torch" and r["time_ms"] > 0 for r in silmm)
    assert all(r["head"] == "frozen" and r["flops"] > 0 for r in rows if r["op"] != "sequence_logprobs")
    bench_logprobs.main(["--device", "cpu", "--shapes", "tiny", "--ops", "fused_linear_logprobs", "--providers",
                         "naive", "silmm", "--modes", "full", "--repeats", "1", "--out", str(tmp_path)])  # fmt: skip
    written = [json.loads(line) for line in (tmp_path / "logprobs-cpu.jsonl").read_text().splitlines()]
    assert {r["head"] for r in written} == {"trainable", "frozen"} and len(written) == 4
    assert "silmm / naive" in capsys.readouterr().out
