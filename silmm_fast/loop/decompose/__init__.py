"""Rule-based decomposition of compositional text-to-image prompts into yes/no questions (SILMM step 3).

Pipeline: ``tokens`` (normalize, split, tag words from ``lexicon``) -> ``parse`` (noun phrases with count and
attributes, relations between them) -> ``questions`` (one yes/no question per entity, predicate and relation).
Deterministic, no model, no downloads: it is the fallback when a model's own questions cannot be parsed, and the
validator that checks a model's questions cover the prompt.
"""

from __future__ import annotations

from silmm_fast.loop.decompose.parse import Entity, Parse, Relation, parse
from silmm_fast.loop.decompose.questions import MAX_PHRASE_WORDS, questions_from_parse
from silmm_fast.loop.decompose.tokens import MAX_WORD_CHARS, PUNCT, tokenize


def decompose_prompt(prompt: str) -> list[str]:
    """Yes/no questions that together check an image against ``prompt``.

    Equivalent to: one question per object with its attributes and count ("is there a red apple?", "are there three
    dogs?"), one per predicate adjective ("is the sky blue?"), one per spatial relation ("is the cup to the left of
    the cat?"), one per non-spatial relation ("is the man riding the horse?"), in order of appearance, without
    repeats. Questions are lower-case. Each is asked so that a matching image answers "yes": a negated object ("a
    red cube and no dogs", "without a hat", "neither ... nor") gives "are there no dogs?" and no question about its
    attributes or relations; a negated verb or relation ("not on the sofa") is not asked. Emoji and other
    pictographs are words ("a red 🚗" asks "is there a red 🚗?"); invisible characters (zero-width space, soft
    hyphen, joiners outside emoji) are removed, so they never split a word.

    Length limits: a word is cut at ``MAX_WORD_CHARS`` (48) characters and a noun phrase in a question keeps at most
    ``MAX_PHRASE_WORDS`` (12) words (the head and the modifiers nearest to it), so no question grows with the prompt.

    Args:
        prompt: a natural-language prompt, e.g. "a red apple on the left of a blue car".

    Returns:
        list[str]: the questions; never empty for a prompt that names at least one object.

    Raises:
        TypeError: ``prompt`` is not a ``str``.
        ValueError: ``prompt`` is empty or only whitespace / punctuation.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not any(tok.tag != PUNCT for tok in tokenize(prompt)):
        raise ValueError(f"prompt must contain at least one word, got {prompt!r}")
    return questions_from_parse(parse(prompt))


__all__ = ["MAX_PHRASE_WORDS", "MAX_WORD_CHARS", "Entity", "Parse", "Relation", "decompose_prompt", "parse"]
