"""Normalize a prompt and split it into tagged tokens.

Tags are lexical (what a word can be, from ``lexicon``); whether a word tagged ``VERB`` / ``ING`` / ``ED`` acts as a
verb or inside a noun phrase is decided by the parser from its neighbours.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from silmm_fast.loop.decompose.inflect import verb_base
from silmm_fast.loop.decompose.lexicon import (
    ADVERBS,
    ATTRIBUTE_CATEGORIES,
    AUXILIARIES,
    CLAUSE_MARKERS,
    CONJUNCTIONS,
    DETERMINERS,
    ED_NOUNS,
    HAVE_VERBS,
    IRREGULAR_VERBS,
    LY_WORDS,
    MAX_PHRASE_WORDS,
    NUMBER_WORDS,
    OTHER_ADJECTIVES,
    PARTICLES,
    PREPOSITIONS,
    PRONOUNS,
    PURE_ING_NOUNS,
    RELATIVE_PRONOUNS,
    SPATIAL_PHRASES,
)

# Tags, one per token.
DET, NUM, CONJ, CLAUSE, RELPRON, PRON, AUX, HAVE = "DET", "NUM", "CONJ", "CLAUSE", "RELPRON", "PRON", "AUX", "HAVE"
REL, PREP, PARTICLE, ADV, PUNCT, STOP = "REL", "PREP", "PARTICLE", "ADV", "PUNCT", "STOP"
ATTR, ING, ED, VERB, NOUN, NEG = "ATTR", "ING", "ED", "VERB", "NOUN", "NEG"

# A word is cut to this many characters: the longest English words have 45, and a question must stay a question
# (a million-character "word" would otherwise be copied into one).
MAX_WORD_CHARS = 48

# Words, punctuation, and any other single non-space character (kept only when pictographic, see _pictographic),
# with emoji joined by ZERO WIDTH JOINER kept as one word ("👩‍🚀").
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*|[.,;:!?]|[^\w\s](?:\u200d[^\w\s])*")
_DEMONSTRATIVES = frozenset("that this these those".split())
# "not a dog", "the cat isn't on the mat", "neither a cat nor a dog": the parser negates what follows
_NEGATIONS = frozenset("not never neither cannot".split())
_ZWJ = "\u200d"
# Invisible characters that are letters or symbols by category: removed like format characters
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")


@dataclass(frozen=True)
class Token:
    """One word (or a multi-word spatial phrase, or a punctuation mark) with its tag.

    ``text`` is the normalized surface text; ``value`` is the canonical relation for ``REL`` tokens and the number
    for ``NUM`` tokens; ``category`` is the attribute category (color / shape / size / texture / other) for ``ATTR``.
    """

    text: str
    tag: str
    value: str | int | None = None
    category: str | None = None


def _visible(ch: str) -> bool:
    """False for characters that show nothing: format characters (zero-width space, soft hyphen, bidi marks,
    joiners), variation selectors, emoji skin-tone modifiers and blank letters. Removing them (not turning them into
    spaces) keeps "cu\u200bbe" one word."""
    if ch in _INVISIBLE or "\U0001f3fb" <= ch <= "\U0001f3ff":
        return False
    category = unicodedata.category(ch)
    return category != "Cf" and not (category == "Mn" and unicodedata.name(ch, "").startswith("VARIATION SELECTOR"))


def normalize(prompt: str) -> str:
    """Lower-case, Unicode-normalized text with typographic quotes and dashes made plain and invisible characters
    removed."""
    text = unicodedata.normalize("NFKC", prompt).lower()
    kept: list[str] = []
    for ch in text:
        if ch == _ZWJ and kept and _pictographic(kept[-1]):
            kept.append(ch)  # inside an emoji sequence ("👩‍🚀"): the joiner binds it into one word
        elif _visible(ch):
            kept.append(ch)
    text = "".join(kept)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2013", " ").replace("\u2014", " ")
    return " ".join(text.split())


def _pictographic(word: str) -> bool:
    """Emoji and other pictographic symbols (Unicode category So from the arrows block U+2190 on): they name things
    ("a red 🚗"), so they are words. Latin-1 signs such as ° © ® stay out."""
    return unicodedata.category(word[0]) == "So" and word[0] >= "\u2190"


def _words(text: str) -> list[str]:
    """Words (cut to MAX_WORD_CHARS), punctuation marks and pictographs of normalized text, in order."""
    out = []
    for word in _WORD.findall(text):
        if word[0].isalnum() or word in ".,;:!?" or _pictographic(word):
            out.append(word.strip(_ZWJ)[:MAX_WORD_CHARS])
    return [w for w in out if w]


def _attribute_category(word: str) -> str | None:
    for category, words in ATTRIBUTE_CATEGORIES.items():
        if word in words:
            return category
    if word in OTHER_ADJECTIVES:
        return "other"
    return None


def _is_adverb(word: str) -> bool:
    return word in ADVERBS or (word.endswith("ly") and len(word) > 4 and word not in LY_WORDS)


def _tag_word(word: str, previous: Token | None, next_word: str | None) -> Token:
    if word in _NEGATIONS or word.endswith("n't"):
        return Token(word, NEG)
    if word in NUMBER_WORDS:
        return Token(word, NUM, NUMBER_WORDS[word])
    if word.isdecimal():  # not isdigit: it also admits digits that int() refuses (superscripts, Rumi numerals)
        return Token(word, NUM, int(word))
    if word in _DEMONSTRATIVES and (next_word in AUXILIARIES or (next_word or "").endswith(("ed", "ing"))):
        return Token(word, RELPRON)
    if word in DETERMINERS:
        return Token(word, DET)
    if word == "can" and previous is not None and (previous.tag in (DET, ATTR, ING) or next_word == "of"):
        return Token(word, NOUN)  # "a cylindrical can of soup", "the watering can"
    for tag, words in (
        (CONJ, CONJUNCTIONS),
        (CLAUSE, CLAUSE_MARKERS),
        (RELPRON, RELATIVE_PRONOUNS),
        (PRON, PRONOUNS),
        (AUX, AUXILIARIES),
        (HAVE, HAVE_VERBS),
        (PARTICLE, PARTICLES),
        (PREP, PREPOSITIONS),
    ):
        if word in words:
            return Token(word, tag)
    category = _attribute_category(word)
    if category is not None:
        return Token(word, ATTR, category=category)
    if _is_adverb(word):
        return Token(word, ADV)
    if word.endswith("ing") and len(word) > 4 and word not in PURE_ING_NOUNS:
        return Token(word, ING)
    if word in IRREGULAR_VERBS or (word.endswith("ed") and len(word) > 4 and word not in ED_NOUNS):
        return Token(word, ED)
    if verb_base(word) is not None:
        return Token(word, VERB)
    return Token(word, NOUN)


def tokenize(prompt: str) -> list[Token]:
    """Tagged tokens of ``prompt``: spatial phrases ("on the left of") are matched first, longest first."""
    words = _words(normalize(prompt))
    tokens: list[Token] = []
    i = 0
    while i < len(words):
        if words[i] == "none" and i + 1 < len(words) and words[i + 1] == "of":
            tokens.append(Token("no", DET))  # "none of the dogs" is "no dogs"
            i += 2
            continue
        for size in range(min(MAX_PHRASE_WORDS, len(words) - i), 0, -1):
            phrase = " ".join(words[i : i + size])
            if phrase in SPATIAL_PHRASES:
                tokens.append(Token(phrase, REL, SPATIAL_PHRASES[phrase]))
                i += size
                break
        else:
            word = words[i]
            if word in ".,;:!?":
                tokens.append(Token(word, PUNCT))
            else:
                previous = tokens[-1] if tokens else None
                tokens.append(_tag_word(word, previous, words[i + 1] if i + 1 < len(words) else None))
            i += 1
    return tokens
