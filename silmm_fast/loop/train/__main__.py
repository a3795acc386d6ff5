"""``python -m silmm_fast.train [--out DIR] [--mode discrete|continuous] ...`` — see ``--help``."""

from __future__ import annotations

import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from silmm_fast.loop.train import parse_args, run

    try:
        cfg = parse_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.run_dir()
    world = int(os.environ.get("WORLD_SIZE") or 1)
    main_rank = int(os.environ.get("RANK") or 0) == 0  # only rank 0 talks; every rank reports its own errors
    if main_rank:
        procs = f", {world} processes ({cfg.dist.strategy})" if world > 1 else ""
        print(
            f"SILMM loop: {cfg.mode} mode, {cfg.iterations} iterations, feedback={cfg.feedback}, seed {cfg.seed}"
            f"{procs} -> {out}"
        )
    t0 = time.perf_counter()
    try:
        summary = run(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad settings, or a model directory without its files
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged: nothing of the step was saved, other settings resume it
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the file system refused a read or write (disk full, permissions of the model cache)
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not main_rank:
        return 0
    gain = summary["relative_gain"]["all_constraints"]
    first, last = (summary["iterations"][i]["heldout"]["overall"]["all_constraints"] for i in (0, -1))
    print(
        f"done in {time.perf_counter() - t0:.0f}s: held-out all-constraints accuracy {first:.3f} (base) -> {last:.3f}"
        + ("" if gain is None else f" ({gain * 100:+.1f}% relative)")
    )
    print(
        f"look at: {out / 'report.md'} (table + {out / 'alignment.png'}), {out / 'summary.json'}, "
        f"and {out}/iterN/candidates.png for the judged candidates"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
