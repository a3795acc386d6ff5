"""`python -m silmm_fast.bench`: the suite runner on a tiny registry writes rows, a table and plots, and every public
fast op appears in its rows."""

import json

from silmm_fast import bench


def test_suite_writes_rows_table_and_plots(tmp_path, capsys):
    argv = ["--device", "cpu", "--shapes", "tiny", "--providers", "reference", "silmm", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    rows_files = list(tmp_path.glob("suite-cpu-*.jsonl"))
    assert len(rows_files) == 1
    rows = [json.loads(line) for line in rows_files[0].read_text().splitlines()]
    for key in ("op", "provider", "mode", "shape", "time_ms", "peak_mem_bytes", "device", "torch", "git", "timestamp"):
        assert all(key in r for r in rows), key
    assert all(r["time_ms"] > 0 for r in rows)
    ops = {r["op"] for r in rows}
    # every public fast op has a benchmark entry (pairwise_distance is benchmarked as the KC-DPO kernel similarity)
    for op in (
        "gather_logprobs",
        "sequence_logprobs",
        "fused_linear_logprobs",
        "fused_linear_dpo",
        "kernel_similarity",
        "diverse_select",
    ):
        assert op in ops, (op, ops)
    assert {r["provider"] for r in rows} == {"reference", "silmm"}
    for op in bench.SUITE:
        png = tmp_path / f"suite-cpu-{op}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = next(tmp_path.glob("suite-cpu-*.md")).read_text()
    assert table.startswith("| op | provider |") and table.count("\n") == len(rows) + 2
    assert "[bench]" in capsys.readouterr().out
