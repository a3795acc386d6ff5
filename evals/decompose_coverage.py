"""Coverage of ``silmm_fast.decompose_prompt`` on the T2I-CompBench++ training prompts, per category.

Coverage (issue 7): each object with its attributes, each relation and each count of a prompt must be covered by
some question. This file holds a small oracle that finds those items in a prompt with its own word lists and
surface patterns, independently of the decomposer's parser:

- attribute (color / shape / texture): an attribute word and the noun it modifies (the next word that is not
  another attribute of the category or "and" / ","); covered when one question holds both, attribute first;
- spatial: a relation phrase ("on the left of", "near", "hidden by", ...), the word before it (skipping "is" and
  the like) and the head of the noun phrase after it; covered when one question holds a keyword of the relation
  and both nouns;
- count: a number word and the next word; covered when one question holds both;
- verb: an -ing word after "is" / "are" / "was" / "were"; covered when a question holds it;
- noun: the head of every phrase that starts with a determiner or number (its last word before a function word or
  punctuation); covered when a question holds it or the word before it.

Nouns match modulo a plural ending. Run ``python evals/decompose_coverage.py [--data DIR] [--write]``: it prints
coverage per category and item kind, and with ``--write`` appends them as JSON lines to
``bench/results/decompose_coverage.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data" / "t2i-compbench"
RESULTS_DIR = REPO / "bench" / "results"
CATEGORIES = ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex")

# --- the oracle's own word lists (the T2I-CompBench++ attribute vocabularies) --------------------------------------
COLORS = set("red orange yellow green blue purple pink brown black white gray grey silver gold beige".split())
SHAPES = set(
    "round square triangular rectangular oval circular spherical conical cylindrical cubic pyramidal pentagonal "
    "hexagonal oblong teardrop crescent diamond big small tall short".split()
)
TEXTURES = set("wooden metallic plastic fluffy leather glass rubber fabric".split())
NUMBERS = set("one two three four five six seven eight nine ten".split())
DETERMINERS = set("a an the his her their its my our".split()) | NUMBERS
FUNCTION_WORDS = set(
    "and or but with of in on at to from for by into onto over under above below behind near next beside across "
    "through along around against between while as is are was were be has have had it they them he she we us you "
    "i me him that which who this these those when where then so during before after".split()
)
_LY_NOUNS = set("butterfly dragonfly lily family belly jelly fly".split())
# relation phrase -> words any of which names the relation in a question
SPATIAL = {
    "on the left of": {"left"}, "to the left of": {"left"}, "on the right of": {"right"},
    "to the right of": {"right"}, "on the top of": {"top", "above", "over"}, "on top of": {"top", "above", "over"},
    "on the bottom of": {"bottom", "below", "under", "beneath"}, "below": {"below", "bottom", "under", "beneath"},
    "under": {"under", "below", "beneath"}, "beneath": {"beneath", "below", "under"},
    "above": {"above", "over", "top"}, "on side of": {"side", "next", "beside"}, "next to": {"next", "beside"},
    "beside": {"beside", "next"}, "near": {"near", "next"}, "behind": {"behind"}, "in front of": {"front"},
    "hidden by": {"hidden"}, "on the side of": {"side", "next", "beside"},
}  # fmt: skip
_SUBJECT_SKIP = set("is are was were sat stood lay hung swam shone rose".split())
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*|[.,;:!?]")


def words_of(text: str) -> list[str]:
    """Lower-case words and punctuation marks of ``text``."""
    return _WORD.findall(text.lower())


def _forms(noun: str) -> set[str]:
    forms = {noun, noun + "s", noun + "es"}
    if noun.endswith("s"):
        forms.add(noun[:-1])
    if noun.endswith("es"):
        forms.add(noun[:-2])
    return forms


def _has(question: list[str], noun: str) -> bool:
    return bool(_forms(noun) & set(question))


def _index_of(question: list[str], noun: str) -> int:
    forms = _forms(noun)
    return next((k for k, w in enumerate(question) if w in forms), -1)


# --- items and coverage --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """Something a prompt asks for, and the test that a question covers it."""

    kind: str
    text: str
    covered_by: Callable[[list[str]], bool]


def attribute_items(words: list[str], vocabulary: set[str], kind: str) -> list[Item]:
    """An item per attribute word of ``vocabulary``, paired with the noun it modifies."""
    items = []
    for k, word in enumerate(words):
        if word not in vocabulary:
            continue
        skipped, noun = [], None
        for later in words[k + 1 :]:
            if later in vocabulary or later in ("and", ","):
                skipped.append(later)
                continue
            if later not in FUNCTION_WORDS and later not in ".;:!?" and later not in DETERMINERS:
                noun = later
            break
        if noun is None:  # "a red orange": the last attribute word is the noun
            noun = next((w for w in reversed(skipped) if w in vocabulary), None)
        if noun is None:
            continue

        def covered(q: list[str], word: str = word, noun: str = noun) -> bool:
            return word in q and _index_of(q, noun) > q.index(word)

        items.append(Item(kind, f"{word} {noun}", covered))
    return items


def _phrase_head(words: list[str], start: int) -> tuple[str | None, str | None]:
    """Head (last word) of the phrase at ``start`` up to a function word or punctuation, and the word before it."""
    span = []
    for word in words[start:]:
        adverb = word.endswith("ly") and word not in _LY_NOUNS
        if word in FUNCTION_WORDS or word in ".,;:!?" or (word in DETERMINERS and span) or adverb:
            break
        if word not in DETERMINERS:
            span.append(word)
    if not span:
        return None, None
    return span[-1], (span[-2] if len(span) > 1 else None)


def _spatial_matches(words: list[str]) -> list[tuple[int, str]]:
    """(word index, phrase) of every spatial phrase in ``words``."""
    text, out = " ".join(words), []
    for phrase in SPATIAL:
        for match in re.finditer(rf"(?:^| ){re.escape(phrase)}(?= )", text):
            out.append((text[: match.start()].count(" ") + (1 if match.start() else 0), phrase))
    return out


def spatial_items(words: list[str]) -> list[Item]:
    """An item per spatial phrase: its keywords, the noun before it and the noun after it.

    The noun before is the head of the latest determiner-led phrase before the relation (or the word before that
    head when the head is a verb form: "the clouds floated above ..."), else the word right before the relation.
    """
    items = []
    for k, phrase in _spatial_matches(words):
        keywords = SPATIAL[phrase]
        determiners = [d for d in range(k) if words[d] in DETERMINERS]
        subjects = set()
        if determiners:
            head, before = _phrase_head(words, determiners[-1] + 1)
            verb_like = head is not None and (head.endswith("ed") or head in _SUBJECT_SKIP)
            subjects = {before} if verb_like and before else {head} - {None}
        if not subjects:
            before = [w for w in words[:k] if w not in _SUBJECT_SKIP and w not in ".,;:!?"]
            subjects = set(before[-1:])
        obj, _ = _phrase_head(words, k + len(phrase.split()))
        if not subjects or obj is None:
            continue

        def covered(q: list[str], keywords: set[str] = keywords, subjects: set = subjects, obj: str = obj) -> bool:
            return bool(keywords & set(q)) and any(_has(q, s) for s in subjects) and _has(q, obj)

        items.append(Item("spatial", f"{'/'.join(sorted(subjects))} {phrase} {obj}", covered))
    return items


def count_items(words: list[str]) -> list[Item]:
    """An item per number word: the number and the noun after it."""
    items = []
    for k, word in enumerate(words[:-1]):
        if word in NUMBERS and words[k + 1] not in FUNCTION_WORDS and words[k + 1] not in ".,;:!?":
            noun = words[k + 1]
            items.append(Item("count", f"{word} {noun}", lambda q, w=word, n=noun: w in q and _has(q, n)))
    return items


def verb_items(words: list[str]) -> list[Item]:
    """An item per progressive verb ("is holding")."""
    return [
        Item("verb", verb, lambda q, v=verb: v in q)
        for k, verb in enumerate(words[1:], start=1)
        if verb.endswith("ing") and words[k - 1] in ("is", "are", "was", "were")
    ]


def noun_items(words: list[str]) -> list[Item]:
    """An item per determiner-led noun phrase: its head noun."""
    inside_relation = {k + j for k, phrase in _spatial_matches(words) for j in range(len(phrase.split()))}
    items = []
    for k, word in enumerate(words):
        if word not in DETERMINERS or k in inside_relation:
            continue
        head, before = _phrase_head(words, k + 1)
        if head is None:
            continue

        def covered(q: list[str], head: str = head, before: str | None = before) -> bool:
            return _has(q, head) or (before is not None and _has(q, before))

        items.append(Item("noun", head, covered))
    return items


ORACLES: dict[str, tuple[Callable[[list[str]], list[Item]], ...]] = {
    "color": (lambda w: attribute_items(w, COLORS, "color"), noun_items),
    "shape": (lambda w: attribute_items(w, SHAPES, "shape"), noun_items),
    "texture": (lambda w: attribute_items(w, TEXTURES, "texture"), noun_items),
    "spatial": (spatial_items, noun_items),
    "3d_spatial": (spatial_items, noun_items),
    "numeracy": (count_items, noun_items),
    "non_spatial": (verb_items, noun_items),
    "complex": (
        lambda w: attribute_items(w, COLORS, "color"),
        lambda w: attribute_items(w, SHAPES, "shape"),
        lambda w: attribute_items(w, TEXTURES, "texture"),
        spatial_items,
        noun_items,
    ),
}


def prompt_items(prompt: str, category: str) -> list[Item]:
    """Everything ``prompt`` of ``category`` asks for, by the oracle."""
    words = words_of(prompt)
    return [item for oracle in ORACLES[category] for item in oracle(words)]


def missed_items(prompt: str, category: str, questions: Iterable[str]) -> list[Item]:
    """The items of ``prompt`` no question covers."""
    tokenized = [words_of(q) for q in questions]
    return [item for item in prompt_items(prompt, category) if not any(item.covered_by(q) for q in tokenized)]


def read_prompts(category: str, data_dir: Path = DATA_DIR) -> list[str]:
    """The training prompts of ``category`` (one a line, blank lines dropped)."""
    text = (Path(data_dir) / f"{category}_train.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def coverage(category: str, decompose: Callable[[str], list[str]], data_dir: Path = DATA_DIR) -> dict:
    """Covered / total items of every prompt of ``category``, overall and per item kind."""
    prompts = read_prompts(category, data_dir)
    totals: dict[str, list[int]] = {}
    for prompt in prompts:
        questions = [words_of(q) for q in decompose(prompt)]
        for item in prompt_items(prompt, category):
            pair = totals.setdefault(item.kind, [0, 0])
            pair[0] += any(item.covered_by(q) for q in questions)
            pair[1] += 1
    covered, total = sum(p[0] for p in totals.values()), sum(p[1] for p in totals.values())
    return {
        "category": category,
        "prompts": len(prompts),
        "items": total,
        "covered": covered,
        "coverage": covered / total if total else 1.0,
        "by_kind": {kind: {"items": t, "covered": c, "coverage": c / t} for kind, (c, t) in sorted(totals.items())},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder with the *_train.txt prompt files")
    parser.add_argument("--write", action="store_true", help="append rows to bench/results/decompose_coverage.jsonl")
    parser.add_argument("--show-misses", type=int, default=0, metavar="N", help="print N missed items per category")
    args = parser.parse_args(argv)

    from silmm_fast import decompose_prompt

    rows = []
    print(f"{'category':<12}{'prompts':>8}{'items':>8}{'coverage':>10}   by kind")
    for category in CATEGORIES:
        result = coverage(category, decompose_prompt, args.data)
        kinds = "  ".join(f"{k} {v['coverage']:.1%}" for k, v in result["by_kind"].items())
        print(f"{category:<12}{result['prompts']:>8}{result['items']:>8}{result['coverage']:>10.1%}   {kinds}")
        rows.append(result)
        if args.show_misses:
            shown = 0
            for prompt in read_prompts(category, args.data):
                for item in missed_items(prompt, category, decompose_prompt(prompt)):
                    if shown < args.show_misses:
                        print(f"    miss {item.kind:<8}{item.text!r:<30} in {prompt!r}")
                    shown += 1
    if args.write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with (RESULTS_DIR / "decompose_coverage.jsonl").open("a") as f:
            for result in rows:
                f.write(json.dumps({"op": "decompose_prompt", "timestamp": stamp, **result}, sort_keys=True) + "\n")
        print(f"wrote {RESULTS_DIR / 'decompose_coverage.jsonl'}")


if __name__ == "__main__":
    main()
