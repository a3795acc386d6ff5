"""What a run tells people: ``summary.json`` (stable schema, rewritten after every iteration), a plot of held-out
alignment per category per iteration, and ``report.md``.

summary.json schema (version 1):
    {"schema": 1, "mode": str, "feedback": str, "seed": int, "model": str, "evaluator": str,
     "iterations": [                       # index 0 is the base model, then one entry per SILMM iteration
        {"iteration": int,
         "heldout": {"overall": {"all_constraints": float, "constraint_fraction": float, "n_prompts": int, ...},
                     "by_category": {category: {same keys}}, "single_object": {...}, "multi_object": {...}},
         "throughput": {"candidates_per_s": float, "questions_per_s": float, "pairs_per_s": float},  # absent for 0
         "wall_s": {phase: seconds},
         "pairs": int, "train_loss": float | null,
         "pair_audit": {"overall": audit, "by_category": {category: audit}, "unparsed": int}}],  # built-in world
     "relative_gain": {"all_constraints": float | null, "constraint_fraction": float | null}}  # last vs base

    audit = {"pairs": int, "chosen_better": int, "chosen_worse": int, "objects_chosen": float,
             "objects_rejected": float}
``pair_audit`` (added within schema 1; absent for models outside the built-in world) is the iteration's pairs
scored by the ground truth (``silmm_fast.loop.world.audit_pairs``): how often the judge's chosen image meets more of
its prompt's constraints than the rejected one (``chosen_better``) or fewer (``chosen_worse``), and their mean
object counts. A diagnostic of the judge that training never sees; ``overall`` is absent when no pair's prompt
parses (``unparsed`` counts those pairs).
"""

from __future__ import annotations

from pathlib import Path

from silmm_fast.loop.train import store

SCHEMA_VERSION = 1


def relative_gain(first: float, last: float) -> float | None:
    return None if first <= 0 else (last - first) / first


def audited(entry: dict) -> tuple[int, int] | None:
    """(chosen better, chosen worse) of an iteration entry's pair audit overall, or None without one."""
    audit = (entry.get("pair_audit") or {}).get("overall")
    return (audit["chosen_better"], audit["chosen_worse"]) if audit else None


def build_summary(meta: dict, iterations: list[dict]) -> dict:
    gains = {"all_constraints": None, "constraint_fraction": None}
    if len(iterations) >= 2:
        base, last = iterations[0]["heldout"]["overall"], iterations[-1]["heldout"]["overall"]
        gains = {key: relative_gain(base[key], last[key]) for key in gains}
    return {"schema": SCHEMA_VERSION, **meta, "iterations": iterations, "relative_gain": gains}


def plot_alignment(summary: dict, path: Path) -> None:
    """Held-out all-constraints accuracy per category (and overall) against the iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = summary["iterations"]
    xs = [it["iteration"] for it in its]
    categories = sorted(its[0]["heldout"]["by_category"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, key, title in (
        (axes[0], "all_constraints", "all constraints met"),
        (axes[1], "constraint_fraction", "mean fraction of constraints met"),
    ):
        for cat in categories:
            ax.plot(xs, [it["heldout"]["by_category"][cat][key] for it in its], marker="o", label=cat)
        ax.plot(xs, [it["heldout"]["overall"][key] for it in its], marker="s", color="black", lw=2.5, label="overall")
        ax.set_xlabel("iteration (0 = base model)")
        ax.set_ylabel(title)
        ax.set_xticks(xs)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"held-out alignment — {summary['mode']} mode, feedback={summary['feedback']}, seed {summary['seed']}")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    store._atomic_bytes(Path(path), buf.getvalue())


def write_report(summary: dict, run_dir: Path) -> Path:
    """report.md with the table of held-out alignment per iteration and category, and the plot."""
    run_dir = Path(run_dir)
    plot_alignment(summary, run_dir / "alignment.png")
    its = summary["iterations"]
    categories = sorted(its[0]["heldout"]["by_category"])
    evaluator = summary.get("evaluator", "the world's ground-truth evaluator")
    lines = [
        f"# SILMM run — {summary['mode']} mode, feedback = {summary['feedback']}, seed {summary['seed']}",
        "",
        f"Held-out prompts (never trained on), scored by {evaluator}.",
        "Each cell: fraction of prompts with every constraint met (mean fraction of constraints met).",
        "",
        "| iteration | overall | " + " | ".join(categories) + " |",
        "|---|---|" + "---|" * len(categories),
    ]
    for it in its:
        h = it["heldout"]
        cells = [f"{h['overall']['all_constraints']:.3f} ({h['overall']['constraint_fraction']:.3f})"]
        cells += [
            f"{h['by_category'][c]['all_constraints']:.3f} ({h['by_category'][c]['constraint_fraction']:.3f})"
            for c in categories
        ]
        lines.append(f"| {it['iteration']} | " + " | ".join(cells) + " |")
    gain = summary["relative_gain"]["all_constraints"]
    lines += [
        "",
        "Relative gain in all-constraints accuracy, last iteration vs base: "
        + ("n/a" if gain is None else f"{gain * 100:+.1f} %"),
        "",
        "![alignment](alignment.png)",
        "",
        "| iteration | pairs | chosen better / worse (ground truth) | train loss | candidates/s | questions/s "
        "| pairs/s | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for it in its[1:]:
        t = it.get("throughput", {})
        loss = it.get("train_loss")
        counts = audited(it)
        truth = "{} / {}".format(*counts) if counts else "-"
        lines.append(
            f"| {it['iteration']} | {it.get('pairs', 0)} | {truth} | {'-' if loss is None else f'{loss:.4f}'} | "
            f"{t.get('candidates_per_s', 0):.1f} | {t.get('questions_per_s', 0):.1f} | {t.get('pairs_per_s', 0):.1f} | "
            f"{sum(it.get('wall_s', {}).values()):.1f} |"
        )
    lines += [
        "",
        "Per iteration, `iterN/` holds prompts.jsonl, questions.jsonl, scores.jsonl, pairs.jsonl, "
        "candidates.png (browse: prompt, candidates, scores, chosen/rejected marked), metrics.jsonl and "
        "the checkpoint.",
        "",
    ]
    path = run_dir / "report.md"
    store.write_text(path, "\n".join(lines))
    return path
