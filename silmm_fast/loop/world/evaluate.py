"""Ground-truth evaluation of generated scenes against prompts, independent of any model.

It plays the role of T2I-CompBench++'s detectors: a generated image is decoded to its exact ``Scene`` and every
atomic constraint of the prompt is checked (see ``prompts.Constraint``). An image that does not decode (``None``)
meets no constraint.

``evaluate`` reports, for all prompts together (``"overall"``), per category (``"by_category"``) and for prompts
asking for one object / several objects (``"single_object"`` / ``"multi_object"``):

- ``all_constraints``: fraction of prompts whose every constraint is met;
- ``constraint_fraction``: mean over prompts of the fraction of its constraints met;
- ``n_prompts``, ``n_constraints``, ``n_constraints_met``;
- ``extra_objects``: mean over prompts of the objects an image holds beyond those its prompt asks for. No constraint
  forbids them, but they show a generator padding its images (an extra object of a counted kind breaks the count).

A group with no prompts is left out (so ``by_category`` holds only the categories present). ``by_constraint`` splits
the constraints of all prompts by what they ask: ``exists``, ``count`` and each relation by name (``left``,
``right``, ``above``, ``below``), each ``{"met": int, "n": int}`` (a kind no prompt asks for is left out).

``audit_pairs`` scores preference pairs the same way, as a diagnostic of a judge: how often its chosen image meets
more of the prompt's constraints than its rejected one, and how many objects each carries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from silmm_fast.loop.world.prompts import CATEGORIES, RELATIONS, Prompt
from silmm_fast.loop.world.scene import Scene
from silmm_fast.loop.world.tokenizer import FeatureCodec, ImageTokenizer


def _check_prompt(name: str, prompt: object) -> Prompt:
    if not isinstance(prompt, Prompt):
        raise TypeError(f"{name}: expected a silmm_fast.loop.world.Prompt, got {type(prompt).__name__}")
    return prompt


def check(prompt: Prompt, scene: Scene | None) -> list[bool]:
    """One bool per constraint of ``prompt``: whether ``scene`` meets it (all False when ``scene`` is None)."""
    prompt = _check_prompt("prompt", prompt)
    if scene is None:
        return [False] * len(prompt.constraints)
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a silmm_fast.loop.world.Scene or None, got {type(scene).__name__}")
    return prompt.check(scene)


CONSTRAINT_NAMES: tuple[str, ...] = ("exists", "count", *RELATIONS)
"""The keys of ``evaluate``'s ``by_constraint``: a constraint's kind, or its relation for a relation."""


def _stats(results: list[list[bool]], extras: list[int]) -> dict[str, float | int]:
    n_constraints = sum(len(r) for r in results)
    n_met = sum(sum(r) for r in results)
    return {
        "all_constraints": sum(all(r) for r in results) / len(results),
        "constraint_fraction": sum(sum(r) / len(r) for r in results) / len(results),
        "n_prompts": len(results),
        "n_constraints": n_constraints,
        "n_constraints_met": n_met,
        "extra_objects": sum(extras) / len(extras),
    }


def _by_constraint(prompts: Sequence[Prompt], results: list[list[bool]]) -> dict[str, dict[str, int]]:
    counts = {name: {"met": 0, "n": 0} for name in CONSTRAINT_NAMES}
    for prompt, met in zip(prompts, results):
        for constraint, ok in zip(prompt.constraints, met):
            c = counts[constraint.relation if constraint.kind == "relation" else constraint.kind]
            c["met"] += ok
            c["n"] += 1
    return {name: c for name, c in counts.items() if c["n"]}


def _check_seq(name: str, value: object) -> Sequence:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence, got {type(value).__name__}")
    return value


def evaluate(prompts: Sequence[Prompt], scenes: Sequence[Scene | None]) -> dict:
    """Score ``scenes[i]`` against ``prompts[i]`` (None = no decodable image); see the module docstring for the
    returned dict: ``{"overall": stats, "by_category": {category: stats}, "single_object": stats,
    "multi_object": stats, "by_constraint": {name: {"met", "n"}}}``.

    Raises:
        TypeError: a prompt is not a ``Prompt`` or a scene neither a ``Scene`` nor None.
        ValueError: no prompts, or ``scenes`` of another length.
    """
    _check_seq("prompts", prompts)
    _check_seq("scenes", scenes)
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    if len(scenes) != len(prompts):
        raise ValueError(f"scenes: expected {len(prompts)} scenes (one per prompt), got {len(scenes)}")
    results, extras = [], []
    for i, (p, s) in enumerate(zip(prompts, scenes)):
        _check_prompt(f"prompts[{i}]", p)
        if s is not None and not isinstance(s, Scene):
            raise TypeError(f"scenes[{i}]: expected a silmm_fast.loop.world.Scene or None, got {type(s).__name__}")
        results.append(check(p, s))
        extras.append(0 if s is None else max(0, len(s.objects) - p.n_objects))

    def stats(keep: list[bool]) -> dict | None:
        """``_stats`` of the prompts ``keep`` marks, None when it marks none."""
        rows = [i for i, k in enumerate(keep) if k]
        return _stats([results[i] for i in rows], [extras[i] for i in rows]) if rows else None

    out: dict = {"overall": stats([True] * len(prompts)), "by_category": {}}
    for cat in CATEGORIES:
        if group := stats([p.category == cat for p in prompts]):
            out["by_category"][cat] = group
    for key, multi in (("single_object", False), ("multi_object", True)):
        if group := stats([(p.n_objects > 1) == multi for p in prompts]):
            out[key] = group
    out["by_constraint"] = _by_constraint(prompts, results)
    return out


def evaluate_tokens(
    prompts: Sequence[Prompt],
    token_seqs: Sequence[Sequence[int]] | torch.Tensor,
    tokenizer: ImageTokenizer | None = None,
) -> dict:
    """``evaluate`` on image-token sequences, decoded leniently (``tokenizer.decode(..., strict=False)``); a
    sequence that still does not decode (wrong length, id out of range) counts as no image and scores 0."""
    tokenizer = ImageTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tokenizer, ImageTokenizer):
        raise TypeError(f"tokenizer: expected an ImageTokenizer, got {type(tokenizer).__name__}")
    if not isinstance(token_seqs, torch.Tensor):
        _check_seq("token_seqs", token_seqs)
    scenes: list[Scene | None] = []
    for t in token_seqs:
        try:
            scenes.append(tokenizer.decode(t, strict=False))
        except (ValueError, TypeError):
            scenes.append(None)
    return evaluate(prompts, scenes)


def evaluate_features(prompts: Sequence[Prompt], features: torch.Tensor, codec: FeatureCodec) -> dict:
    """``evaluate`` on feature matrices [B, L, D], decoded leniently by ``codec``; a matrix with NaN / Inf counts
    as no image and scores 0."""
    if not isinstance(codec, FeatureCodec):
        raise TypeError(f"codec: expected a FeatureCodec, got {type(codec).__name__}")
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features: expected a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 3 or tuple(features.shape[1:]) != (codec.seq_len, codec.dim):
        raise ValueError(f"features: expected shape [B, {codec.seq_len}, {codec.dim}], got {tuple(features.shape)}")
    scenes: list[Scene | None] = []
    for f in features:
        try:
            scenes.append(codec.decode(f, strict=False))
        except ValueError:
            scenes.append(None)
    return evaluate(prompts, scenes)


def _audit_stats(rows: list[tuple[float, float, int, int]]) -> dict[str, float | int]:
    return {
        "pairs": len(rows),
        "chosen_better": sum(c > r for c, r, _, _ in rows),
        "chosen_worse": sum(c < r for c, r, _, _ in rows),
        "objects_chosen": round(sum(n for _, _, n, _ in rows) / len(rows), 4),
        "objects_rejected": round(sum(n for _, _, _, n in rows) / len(rows), 4),
    }


def audit_pairs(
    prompts: Sequence[Prompt | None], chosen: Sequence[Scene | None], rejected: Sequence[Scene | None]
) -> dict:
    """Ground-truth audit of preference pairs: pair i prefers ``chosen[i]`` to ``rejected[i]`` for ``prompts[i]``.

    A pair is *better* when its chosen scene meets a larger fraction of the prompt's constraints than its rejected
    one, *worse* when smaller (a tie is neither). A prompt given as None (text outside the world's grammar) leaves
    its pair out of the counts; an undecodable scene (None) meets no constraint and has no objects.

    Returns ``{"overall": stats, "by_category": {category: stats}, "unparsed": int}``, stats = ``{"pairs",
    "chosen_better", "chosen_worse", "objects_chosen", "objects_rejected"}`` (the last two: mean object count);
    ``overall`` and categories without pairs are left out.
    """
    for name, value in (("prompts", prompts), ("chosen", chosen), ("rejected", rejected)):
        _check_seq(name, value)
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(
            f"prompts, chosen, rejected: expected one entry per pair each, got {len(prompts)}, {len(chosen)}, "
            f"{len(rejected)}"
        )
    rows: dict[str, list[tuple[float, float, int, int]]] = {}
    unparsed = 0
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        if p is None:
            unparsed += 1
            continue
        _check_prompt(f"prompts[{i}]", p)
        met = [sum(check(p, s)) / len(p.constraints) for s in (c, r)]
        sizes = [0 if s is None else len(s.objects) for s in (c, r)]
        rows.setdefault(p.category, []).append((met[0], met[1], sizes[0], sizes[1]))
    out: dict = {"by_category": {cat: _audit_stats(rows[cat]) for cat in CATEGORIES if cat in rows}}
    if rows:
        out["overall"] = _audit_stats([row for cat in rows for row in rows[cat]])
    out["unparsed"] = unparsed
    return out
