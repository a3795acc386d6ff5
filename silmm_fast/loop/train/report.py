"""What a run tells people: ``summary.json`` (stable schema, rewritten after every iteration), a plot of held-out
alignment per category per iteration, and ``report.md``.

summary.json schema (version 1):
    {"schema": 1, "mode": str, "feedback": str, "seed": int, "model": str, "evaluator": str,
     "iterations": [                       # index 0 is the base model, then one entry per SILMM iteration
        {"iteration": int,
         "heldout": {"overall": {"all_constraints": float, "constraint_fraction": float, "n_prompts": int, ...},
                     "by_category": {category: {same keys}}, "single_object": {...}, "multi_object": {...},
                     "by_constraint": {name: {"met": int, "n": int}}},
         "throughput": {"candidates_per_s": float, "questions_per_s": float, "pairs_per_s": float},  # absent for 0
         "wall_s": {phase: seconds},
         "pairs": int, "train_loss": float | null,
         "pair_audit": {"overall": audit, "by_category": {category: audit}, "unparsed": int}}],  # built-in world
     "relative_gain": {"all_constraints": float | null, "constraint_fraction": float | null}}  # last vs base

    audit = {"pairs": int, "chosen_better": int, "chosen_worse": int, "objects_chosen": float,
             "objects_rejected": float}
``heldout`` is ``silmm_fast.loop.world.evaluate``'s result: its ``extra_objects`` (objects drawn beyond the prompt's,
per image) and ``by_constraint`` (constraints met per kind and per relation) were added within schema 1.
``pair_audit`` (added within schema 1; absent for models outside the built-in world) is the iteration's pairs
scored by the ground truth (``silmm_fast.loop.world.audit_pairs``): how often the judge's chosen image meets more of
its prompt's constraints than the rejected one (``chosen_better``) or fewer (``chosen_worse``), and their mean
object counts. A diagnostic of the judge that training never sees; ``overall`` is absent when no pair's prompt
parses (``unparsed`` counts those pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from silmm_fast.loop.train import store
from silmm_fast.loop.world import CONSTRAINT_NAMES

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
    lines += constraint_table(its)
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


def constraint_table(its: list[dict]) -> list[str]:
    """Lines of report.md's per-constraint table: the held-out constraints met per kind and relation, and the objects
    drawn beyond the prompt's; none when the iterations' evaluations do not break them down."""
    if not all("by_constraint" in it["heldout"] for it in its):
        return []
    names = [n for n in CONSTRAINT_NAMES if any(n in it["heldout"]["by_constraint"] for it in its)]
    lines = [
        "",
        "Held-out constraints met per kind (a relation by its name), and objects drawn beyond the prompt's per image:",
        "",
        "| iteration | " + " | ".join(names) + " | extra objects |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for it in its:
        h = it["heldout"]
        cells = []
        for name in names:
            c = h["by_constraint"].get(name)
            cells.append(f"{c['met'] / c['n']:.3f}" if c else "-")
        lines.append(f"| {it['iteration']} | " + " | ".join(cells) + f" | {h['overall']['extra_objects']:.2f} |")
    return lines


def iteration_entry(it: int, heldout: dict, timings: dict, record: dict | None, cfg: Any, world_images: bool) -> dict:
    """An iteration's entry of ``summary.json``. ``record`` (None for iteration 0, the base model) holds the
    iteration's saved results: ``prompts`` (rows of prompts.jsonl), ``tokens`` (the candidates [P, N, T]),
    ``counts`` (judge.json), ``pairs`` (rows of pairs.jsonl) and ``metrics`` (rows of metrics.jsonl)."""
    entry = {"iteration": it, "heldout": heldout}
    if record is not None:
        metrics, n_pairs, counts = record["metrics"], len(record["pairs"]), record["counts"]
        images = counts["images"]
        generated = images if cfg.mode == "discrete" else images // cfg.sample.candidates * cfg.sample.oversample
        last_epoch = [m["loss"] for m in metrics if m["epoch"] == metrics[-1]["epoch"]] if metrics else []
        entry["throughput"] = {
            "candidates_per_s": round(generated / max(timings.get("generate", 0), 1e-9), 2),
            "questions_per_s": round(counts["questions_judged"] / max(timings.get("judge", 0), 1e-9), 2),
            "pairs_per_s": round(n_pairs * cfg.optim.epochs / max(timings.get("train", 0), 1e-9), 2),
        }
        entry["pairs"] = n_pairs
        entry["train_loss"] = round(sum(last_epoch) / len(last_epoch), 6) if last_epoch else None
        if world_images:
            entry["pair_audit"] = pair_audit(record["prompts"], record["tokens"], record["pairs"])
    entry["wall_s"] = timings
    return entry


def pair_audit(prompt_rows: list[dict], tokens: Any, pairs: list[dict]) -> dict:
    """The iteration's pairs scored by the world's ground truth (``audit_pairs``): how often the judge's chosen image
    is really the better one. A diagnostic for people reading the run; training never sees it."""
    from silmm_fast.loop.world import ImageTokenizer, audit_pairs, parse_prompt

    tokenizer = ImageTokenizer()
    prompts, chosen, rejected = [], [], []
    for pair in pairs:
        row = prompt_rows[pair["prompt_id"]]
        try:
            prompts.append(parse_prompt(row["prompt"], row["category"]))
        except ValueError:
            prompts.append(None)
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            out.append(tokenizer.decode(tokens[pair["prompt_id"], pair[side]].tolist(), strict=False))
    return audit_pairs(prompts, chosen, rejected)


def line(iterations: list[dict], it: int) -> str:
    """The one line printed when iteration ``it`` is summarized."""
    e = next(x for x in iterations if x["iteration"] == it)
    h = e["heldout"]["overall"]
    gain = relative_gain(iterations[0]["heldout"]["overall"]["all_constraints"], h["all_constraints"])
    parts = [
        f"iteration {it}: held-out all-constraints {h['all_constraints']:.3f}",
        f"constraint fraction {h['constraint_fraction']:.3f}",
    ]
    if it > 0:
        t, truth = e["throughput"], audited(e)
        parts += [
            f"vs base {'n/a' if gain is None else f'{gain * 100:+.1f}%'}",
            f"pairs {e['pairs']}" + (" (ground truth: {} better, {} worse)".format(*truth) if truth else ""),
            f"{t['candidates_per_s']:.0f} cand/s, {t['questions_per_s']:.0f} q/s, {t['pairs_per_s']:.0f} pairs/s",
        ]
    return " | ".join(parts) + f" | {sum(e['wall_s'].values()):.1f}s"
