"""report.md's per-constraint table, from summary entries whose values are known."""

from silmm_fast.loop.train.report import build_summary, constraint_table, write_report


def _entry(it: int, extra: float, by_constraint: dict | None) -> dict:
    overall = {"all_constraints": 0.5, "constraint_fraction": 0.6, "extra_objects": extra}
    heldout = {"overall": overall, "by_category": {"color": dict(overall)}}
    if by_constraint is not None:
        heldout["by_constraint"] = by_constraint
    return {"iteration": it, "heldout": heldout, "wall_s": {}}


def test_constraint_table_shows_each_kind_met_per_iteration_and_the_extra_objects():
    base = _entry(0, 0.0, {"exists": {"met": 3, "n": 4}, "below": {"met": 0, "n": 2}})
    later = _entry(1, 1.25, {"exists": {"met": 4, "n": 4}, "count": {"met": 1, "n": 2}, "below": {"met": 1, "n": 2}})
    lines = constraint_table([base, later])
    header = "| iteration | exists | count | below | extra objects |"
    assert lines[lines.index(header) + 2 :] == [
        "| 0 | 0.750 | - | 0.000 | 0.00 |",  # no count constraint among iteration 0's prompts
        "| 1 | 1.000 | 0.500 | 0.500 | 1.25 |",
    ]


def test_report_leaves_the_table_out_for_entries_without_the_split(tmp_path):
    # a run resumed from entries written before the split: the report still renders, without that table
    summary = build_summary(
        {"mode": "discrete", "feedback": "self", "seed": 0, "evaluator": "world"},
        [
            _entry(0, 0.0, None),
            _entry(1, 0.0, {"exists": {"met": 1, "n": 1}}),
        ],
    )
    assert constraint_table(summary["iterations"]) == []
    text = write_report(summary, tmp_path).read_text()
    assert "| iteration | overall | color |" in text and "extra objects" not in text
