"""Turn a parse into yes/no questions: one per entity (with its attributes and count), one per predicate adjective,
one per relation.

Every question is asked so that an image that matches the prompt answers "yes" (the score averages p(yes) − p(no)).
A negated entity ("no dogs", "without a hat") is asked as "are there no dogs?" / "is there no hat?"; its predicates
and every relation it takes part in are not asked (an absent thing has no color and no position).

Length: words are cut at ``tokens.MAX_WORD_CHARS`` characters, and a noun phrase keeps at most
``MAX_PHRASE_WORDS`` words (its head and the modifiers nearest to it; likewise its "of ..." complement), so a
question stays short whatever the prompt.
"""

from __future__ import annotations

from silmm_fast.loop.decompose.inflect import pluralize
from silmm_fast.loop.decompose.lexicon import WORDS_FOR_NUMBERS
from silmm_fast.loop.decompose.parse import HAVE_RELATION, Entity, Parse

MAX_PHRASE_WORDS = 12
_AN_EXCEPTIONS = ("uni", "use", "usu", "eu", "one", "once")
_AN_SILENT_H = ("hour", "honest", "honor", "heir")


def _article(phrase: str) -> str:
    first = phrase.split()[0] if phrase else ""
    vowel_sound = (first[:1] in "aeiou" and not first.startswith(_AN_EXCEPTIONS)) or first.startswith(_AN_SILENT_H)
    return "an" if vowel_sound else "a"


def _words(entity: Entity) -> str:
    words = list(entity.words[-MAX_PHRASE_WORDS:])
    if entity.count is not None and entity.count > 1 and not entity.plural and words[-1][-1:].isalpha():
        words[-1] = pluralize(words[-1])  # "two 🐶" stays as written
    if entity.complement:
        words += entity.complement.split()[: MAX_PHRASE_WORDS + 1]  # "of" and at most MAX_PHRASE_WORDS words
    return " ".join(words)


def _number(count: int) -> str:
    return WORDS_FOR_NUMBERS.get(count, str(count))


def _definite(entity: Entity) -> str:
    return "the " + _words(entity)


def _indefinite(entity: Entity) -> str:
    phrase = _words(entity)
    if entity.negated:
        return f"no {phrase}"
    if entity.count is not None:
        return f"{_number(entity.count)} {phrase}"
    return phrase if entity.plural else f"{_article(phrase)} {phrase}"


def _be(entity: Entity) -> str:
    return "are" if entity.plural else "is"


def entity_question(entity: Entity) -> str:
    """ "is there a red apple?", "are there three dogs?", "are there rubber gloves?", "are there no dogs?"."""
    return f"{_be(entity)} there {_indefinite(entity)}?"


def questions_from_parse(parsed: Parse) -> list[str]:
    """Yes/no questions for every entity, predicate adjective and relation of ``parsed``, without repeats."""
    out: list[str] = []
    for entity in parsed.entities:
        out.append(entity_question(entity))
        if entity.negated:
            continue
        for adjective in entity.predicates:
            out.append(f"{_be(entity)} {_definite(entity)} {adjective}?")
    for relation in parsed.relations:
        subject = parsed.entities[relation.subject]
        obj = None if relation.obj is None else parsed.entities[relation.obj]
        if subject.negated or (obj is not None and obj.negated):
            continue
        if relation.kind == HAVE_RELATION and obj is not None:
            does = "do" if subject.plural else "does"
            out.append(f"{does} {_definite(subject)} have {_indefinite(obj)}?")
        elif obj is None:
            out.append(f"{_be(subject)} {_definite(subject)} {relation.predicate}?")
        else:
            out.append(f"{_be(subject)} {_definite(subject)} {relation.predicate} {_definite(obj)}?")
    return list(dict.fromkeys(out))
