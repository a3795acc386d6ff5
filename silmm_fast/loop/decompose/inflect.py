"""English inflection rules the decomposer needs: plural -> singular nouns, and verb forms -> the -ing form."""

from __future__ import annotations

from silmm_fast.loop.decompose.lexicon import (
    INVARIANT_NOUNS,
    IRREGULAR_PLURALS,
    IRREGULAR_VERBS,
    SINGULAR_S_NOUNS,
    VERB_BASES,
)

_VOWELS = set("aeiou")
_O_ES_NOUNS = frozenset("tomato potato hero echo torpedo veto mosquito volcano buffalo domino mango".split())
_SINGULAR_IRREGULAR = {singular: plural for plural, singular in IRREGULAR_PLURALS.items()}


def singularize(noun: str) -> str:
    """The singular of ``noun`` ("cherries" -> "cherry", "mice" -> "mouse"); a singular noun comes back unchanged."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun in INVARIANT_NOUNS or noun in SINGULAR_S_NOUNS or noun in _SINGULAR_IRREGULAR or len(noun) < 3:
        return noun
    if not noun.endswith("s") or noun.endswith(("ss", "us", "is", "'s")):
        return noun
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return noun[:-2]
    if noun.endswith("oes") and noun not in ("shoes", "toes", "canoes", "hoes", "oboes"):
        return noun[:-2]
    return noun[:-1]


def is_plural(noun: str) -> bool:
    """Whether ``noun`` is a plural form (invariant nouns like "sheep" count as singular)."""
    return singularize(noun) != noun


def pluralize(noun: str) -> str:
    """The plural of the singular ``noun`` ("cherry" -> "cherries", "mouse" -> "mice")."""
    if noun in _SINGULAR_IRREGULAR:
        return _SINGULAR_IRREGULAR[noun]
    if noun in INVARIANT_NOUNS or is_plural(noun):
        return noun
    if noun.endswith("y") and len(noun) > 2 and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "z", "ch", "sh")) or noun in _O_ES_NOUNS:
        return noun + "es"
    return noun + "s"


def _double_final_consonant(stem: str) -> bool:
    """One-syllable consonant-vowel-consonant stems double the last letter before -ing ("sit" -> "sitting")."""
    if len(stem) < 3 or stem[-1] in _VOWELS or stem[-1] in "wxy":
        return False
    vowel_groups = sum(1 for i, c in enumerate(stem) if c in _VOWELS and (i == 0 or stem[i - 1] not in _VOWELS))
    return vowel_groups == 1 and stem[-2] in _VOWELS and stem[-3] not in _VOWELS


def _base_candidates(word: str) -> list[str]:
    """Possible base forms of an inflected verb form, most likely first."""
    out = [word]
    if word.endswith("ied"):
        out.append(word[:-3] + "y")
    if word.endswith("ies"):
        out.append(word[:-3] + "y")
    if word.endswith("ed"):
        out += [word[:-2], word[:-1]]
        if len(word) > 4 and word[-3] == word[-4]:
            out.append(word[:-3])
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s"):
        out.append(word[:-1])
    return out


def verb_base(word: str) -> str | None:
    """The base form of ``word`` if it is a form of a known verb (``lexicon.VERB_BASES``), else None."""
    for candidate in _base_candidates(word):
        if candidate in VERB_BASES:
            return candidate
    return None


def ing_form(word: str) -> str:
    """The -ing form of a verb form: "sat" -> "sitting", "floated" -> "floating", "stirs" -> "stirring"."""
    if word in IRREGULAR_VERBS:
        return IRREGULAR_VERBS[word]
    if word.endswith("ing"):
        return word
    base = verb_base(word)
    if base is None:
        if word.endswith("ied"):
            return word[:-3] + "ying"
        if word.endswith("ed"):
            # "provided" -> "providing", "stirred" -> "stirring": dropping -ed keeps any doubled consonant
            return word[:-2] + "ing"
        if word.endswith(("ches", "shes", "sses", "xes")):
            base = word[:-2]
        elif word.endswith("ies"):
            base = word[:-3] + "y"
        elif word.endswith("s") and not word.endswith("ss"):
            base = word[:-1]
        else:
            base = word
    if base.endswith("ie"):
        return base[:-2] + "ying"
    if base.endswith("e") and not base.endswith(("ee", "ye", "oe")) and len(base) > 2:
        return base[:-1] + "ing"
    if _double_final_consonant(base):
        return base + base[-1] + "ing"
    return base + "ing"
