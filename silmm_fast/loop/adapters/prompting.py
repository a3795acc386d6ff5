"""Instructions, few-shot examples and output parsers for models that write SILMM's prompts and questions as text.

An adapter over a general-purpose LMM (``JanusAdapter``) asks the model in plain language, reads the first usable
answer out of what it wrote, checks it, and falls back to rules when the output does not pass:

- prompt writing: ``prompt_instruction(category)`` → the model's text → ``parse_prompt`` (first line, cleaned;
  3–40 words and at least one object that ``silmm_fast.loop.decompose.parse`` finds) → else ``template_prompt``, a
  prompt of the built-in world's generator for that category (``silmm_fast.loop.world.prompts.sample_prompt``);
- decomposition: ``decompose_instruction(prompt)`` → the model's text → ``parse_questions`` (lines that read as
  yes/no questions) → ``questions_cover`` (every object the rule-based parser finds in the prompt is named by some
  question) → else ``silmm_fast.decompose_prompt(prompt)``.

The few-shot answers of the decomposition examples are written by ``decompose_prompt`` itself, so the model is
shown the question style the validator expects.
"""

from __future__ import annotations

import random
import re

from silmm_fast.loop.decompose import decompose_prompt, parse
from silmm_fast.loop.decompose.inflect import singularize

CATEGORY_GOALS: dict[str, str] = {
    "color": "the colors of two or three objects",
    "shape": "the shapes of two or three objects",
    "texture": "the textures or materials of two or three objects",
    "spatial": "where two objects are relative to each other (left, right, above, below)",
    "numeracy": "how many objects of each kind there are",
    "complex": "several objects with colors, textures, counts and relations between them",
}
"""What a prompt of each category tests (the category names are the built-in world's ``CATEGORIES``)."""

PROMPT_EXAMPLES: dict[str, tuple[str, str]] = {
    "color": ("a red apple and a green book", "a blue car, a yellow bench and a white dog"),
    "shape": ("a round clock and a square window", "a triangular sign and an oval mirror"),
    "texture": ("a wooden table and a metallic chair", "a fluffy towel and a glass vase"),
    "spatial": ("a cat to the left of a lamp", "a bird above a wooden fence"),
    "numeracy": ("three apples and two cups", "four birds and one cat"),
    "complex": ("a red bus to the right of two green trees", "a striped cat on a blue sofa next to a wooden lamp"),
}
"""Two example prompts per category, shown to the model before it writes its own."""

DECOMPOSE_EXAMPLES: tuple[str, ...] = ("a red apple to the left of a blue car", "two dogs and a wooden bench")

MIN_PROMPT_WORDS, MAX_PROMPT_WORDS = 3, 40
_PROMPT_CHARS = re.compile(r"[A-Za-z0-9 ,.;'-]+")
_DANGLING = frozenset("a an the of to and or with on in at by from".split())  # a prompt cut off mid-phrase
YES_NO_OPENERS = frozenset("is are does do can has have was were will".split())
_WORD = re.compile(r"[a-z]+")


def check_category(category: object) -> str:
    if category not in CATEGORY_GOALS:
        raise ValueError(f"categories: unknown category {category!r}, expected one of {tuple(CATEGORY_GOALS)}")
    return category  # type: ignore[return-value]


def prompt_instruction(category: str) -> str:
    """The instruction that asks for one prompt of ``category``, with two examples; the answer is one line."""
    goal = CATEGORY_GOALS[check_category(category)]
    a, b = PROMPT_EXAMPLES[category]
    return (
        f"Write one short description of an image for a text-to-image model. The description should test {goal}.\n"
        f"Description: {a}\n"
        f"Description: {b}\n"
        "Description:"
    )


def decompose_instruction(prompt: str) -> str:
    """The instruction that asks for yes/no questions about ``prompt``, one per line, after one worked example per
    ``DECOMPOSE_EXAMPLES`` entry."""
    shots = []
    for example in DECOMPOSE_EXAMPLES:
        lines = "\n".join(f"- {q}" for q in decompose_prompt(example))
        shots.append(f"Description: {example}\nQuestions:\n{lines}\n")
    return (
        "Split the image description into simple yes/no questions that check every object, attribute, count and "
        "relation it mentions, one question per line.\n\n" + "\n".join(shots) + f"\nDescription: {prompt}\nQuestions:"
    )


def _clean(line: str) -> str:
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s*", "", line.strip())
    line = line.strip("\"'`").strip()
    line = re.sub(r"\s+([?,.!;:])", r"\1", line)  # "circle ?" → "circle?" (word-level tokenizers)
    return re.sub(r"\s+", " ", line).strip()


def parse_prompt(text: str) -> str | None:
    """The prompt in the model's answer ``text`` (its first non-empty line, cleaned), or None when it is not a
    usable prompt: characters other than letters, digits, spaces and ``,.;'-``; fewer than ``MIN_PROMPT_WORDS`` or
    more than ``MAX_PROMPT_WORDS`` words; a last word that leaves a phrase open ("of", "and", "the", ...); or no
    object that the rule-based parser recognizes."""
    for line in text.splitlines():
        line = _clean(line)
        if line.lower().startswith("description:"):
            line = line.split(":", 1)[1].strip()
        if not line:
            continue
        line = line.rstrip(".")
        words = line.lower().replace(",", " ").split()
        if not _PROMPT_CHARS.fullmatch(line) or not MIN_PROMPT_WORDS <= len(words) <= MAX_PROMPT_WORDS:
            return None
        if words[-1] in _DANGLING:
            return None
        try:
            if not parse(line).entities:
                return None
        except ValueError:
            return None
        return line
    return None


def parse_questions(text: str) -> list[str]:
    """The yes/no questions in the model's answer ``text``: lines (bullets and numbering stripped) that open with a
    yes/no auxiliary ("is", "are", "does", ...) and end with "?", lower-cased, without repeats, up to the first
    line that starts a new description."""
    out: list[str] = []
    for raw in text.splitlines():
        line = _clean(raw)
        if line.lower().startswith("description"):
            break
        words = line.lower().split()
        if words and words[0] in YES_NO_OPENERS and line.endswith("?") and len(words) >= 2:
            q = line.lower()
            if q not in out:
                out.append(q)
    return out


def questions_cover(prompt: str, questions: list[str]) -> bool:
    """Whether ``questions`` (at least one) name every object the rule-based parser finds in ``prompt`` (its head
    noun, singular or plural)."""
    if not questions:
        return False
    words = {singularize(w) for q in questions for w in _WORD.findall(q.lower())}
    try:
        entities = parse(prompt).entities
    except ValueError:
        return True
    return all(e.lemma in words for e in entities)


def template_prompt(category: str, rng: random.Random) -> str:
    """A rule-written prompt of ``category``: the built-in world's generator (``sample_prompt``, train split)."""
    from silmm_fast.loop.world.prompts import sample_prompt

    return sample_prompt(check_category(category), rng, "train").text
