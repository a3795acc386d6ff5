"""Collect what ``tools/gpu/gpu_check.sh`` brought back from a GPU machine into ``bench/results/``:

    python tools/gpu/gpu_collect.py results.tgz --git REVISION

The per-step runs (one folder each in the archive: suite runs, or one script run alone) become one
``suite-<device>-<stamp>.jsonl`` with its markdown table and one plot per op, as a single ``python -m silmm_fast.bench
--device cuda`` run would have written them; the machine facts, the step times and the end of the test log go to
``suite-<device>-<stamp>-checks.txt`` beside them.
``--git`` sets the revision of every row: the device machine gets the working tree, and whatever history it reports
there may be stale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def read_rows(folder: Path) -> list[dict]:
    """Every row of every step's result file (suite runs and single scripts alike), in the order they were written."""
    files = sorted(folder.glob("*/*.jsonl"), key=lambda p: p.stat().st_mtime)
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def checks_text(folder: Path, test_lines: int = 60) -> str:
    parts = []
    for name, title in (("env.txt", "machine"), ("steps.txt", "steps")):
        path = folder / name
        if path.is_file():
            parts.append(f"## {title}\n{path.read_text().rstrip()}\n")
    tests = folder / "tests.log"
    if tests.is_file():
        lines = tests.read_text().rstrip().splitlines()
        marks = [i for i, line in enumerate(lines) if "short test summary info" in line]
        tail = lines[marks[-1] :] if marks else lines[-1:]  # pytest: a line per failure or skip, then counts
        if len(tail) > test_lines:
            tail = tail[: test_lines - 1] + [f"... ({len(tail) - test_lines} more lines)", tail[-1]]
        parts.append("## tests (pytest's summary)\n" + "\n".join(tail) + "\n")
    return "\n".join(parts)


def collect(archive: Path, results: Path, git: str | None) -> Path:
    from bench.common import attach_roofline, best_ceilings
    from bench.suite import measured, write_outputs

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        rows = read_rows(folder)
        if not measured(rows):
            raise SystemExit(f"gpu_collect: no measured rows in {archive}")
        for r in rows:
            if git:
                r["git"] = git
        first = min(r["timestamp"] for r in rows if r.get("timestamp"))
        stamp = first[:19].replace("-", "").replace(":", "").replace("T", "-")
        kind = measured(rows)[0]["device_type"]
        results.mkdir(parents=True, exist_ok=True)
        keys = ("ceiling_gbps", "ceiling_tflops", "ceiling_matmul_dtype")
        suite_ceilings = [{k: r[k] for k in keys} for r in measured(rows) if r.get("ceiling_gbps")]
        best = best_ceilings(*suite_ceilings) if suite_ceilings else None
        if best:
            # a script run alone measures no ceilings: its rows get the ones the suite steps measured on that machine
            attach_roofline([r for r in measured(rows) if not r.get("ceiling_gbps")], best)
        (results / f"suite-{kind}-{stamp}.jsonl").unlink(missing_ok=True)  # collecting again replaces, not appends
        path, _ = write_outputs(rows, best, results, kind, stamp)
        revision = f"## revision\n{git} (the machine's own history, below, may be stale)\n\n" if git else ""
        (results / f"suite-{kind}-{stamp}-checks.txt").write_text(revision + checks_text(folder))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="results.tgz from tools/gpu/gpu_check.sh")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--git", default=None, help="revision the device ran (set on every row)")
    args = parser.parse_args(argv)
    path = collect(args.archive, args.results, args.git)
    print(f"gpu_collect: rows -> {path} (+ .md table, -checks.txt, per-op plots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
