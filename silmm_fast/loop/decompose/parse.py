"""Parse tagged tokens into entities (noun phrases with count and attributes) and relations between them.

One left-to-right pass per sentence with a little state:

- a noun phrase is ``[determiner | number]* (attribute | noun | modifier)* head`` plus an optional ``of`` complement
  ("a rectangular slice of bread");
- coordinated noun phrases ("a red car and a pink elephant", "one girl, two sofas and three peaches") form a group;
- a spatial phrase after a group relates every member to the next group ("a cup on the left of a cat");
- a verb relates the clause subject to its object ("a man is holding a pen and jotting down notes"); particles,
  prepositions and infinitives join the verb's wording ("playing with", "trying to beat");
- "with" / "has" give a "have" relation, and "is red" / "feeling curious" give predicate adjectives;
- negation: a noun phrase after "no", "none of", "not", "without", "neither" / "nor" or a negated "have" ("does
  not have") is marked ``negated`` (the image must not show it); a negated verb or spatial phrase ("is not on",
  "not holding") relates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from silmm_fast.loop.decompose.inflect import ing_form, is_plural, singularize, verb_base
from silmm_fast.loop.decompose.lexicon import (
    ATTRIBUTE_NOUNS,
    ING_MODIFIERS,
    ING_NOUNS,
    NOUNLIKE_VERBS,
    PLURAL_DETERMINERS,
)
from silmm_fast.loop.decompose.tokens import (
    ADV,
    ATTR,
    AUX,
    CLAUSE,
    CONJ,
    DET,
    ED,
    HAVE,
    ING,
    NEG,
    NOUN,
    NUM,
    PARTICLE,
    PREP,
    PRON,
    PUNCT,
    REL,
    RELPRON,
    VERB,
    Token,
    tokenize,
)

SPATIAL, ACTION, HAVE_RELATION = "spatial", "action", "have"
_NOMINAL = (ATTR, NOUN, VERB)
_DEFINITE = frozenset("the this that these those his her their its my our your".split())
_POSITION_NOUNS = frozenset("back front top bottom side left right inside outside middle center".split())
_SENTENCE_END = frozenset(".;:!?")


@dataclass
class Entity:
    """A noun phrase: ``words`` are its modifiers and head as written (no determiner), ``head`` its head noun.

    ``count`` is the number written before it (None for "a" / "the" / none); ``attributes`` maps a category (color,
    shape, size, texture, other) to the attribute words of that category; ``complement`` is an "of ..." tail
    ("of bread"); ``predicates`` are adjectives said of it later ("the sky is blue"); ``negated`` marks a thing the
    prompt says is absent ("no dogs", "without a hat").
    """

    words: list[str]
    head: str
    count: int | None = None
    plural: bool = False
    attributes: dict[str, list[str]] = field(default_factory=dict)
    complement: str = ""
    predicates: list[str] = field(default_factory=list)
    definite: bool = False
    negated: bool = False

    @property
    def lemma(self) -> str:
        """The singular of the head noun."""
        return singularize(self.head)


@dataclass(frozen=True)
class Relation:
    """``subject`` (an entity index) ``predicate`` ``obj`` (an entity index, or None for "the dog is barking")."""

    subject: int
    predicate: str
    obj: int | None
    kind: str


@dataclass
class Parse:
    """Entities in order of appearance and the relations between them."""

    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)


def _tag(tokens: list[Token], i: int) -> str | None:
    return tokens[i].tag if 0 <= i < len(tokens) else None


def _nominal_ahead(tokens: list[Token], j: int) -> bool:
    """Whether a noun-phrase word follows at ``j``, past any -ing / -ed modifiers ("the burning building")."""
    while _tag(tokens, j) in (ING, ED):
        if tokens[j].tag == ING and tokens[j].text in ING_NOUNS:
            return True
        j += 1
    return _tag(tokens, j) in _NOMINAL


def _verb_ends_phrase(previous_noun: str, tokens: list[Token], j: int) -> bool:
    """Whether the verb-like word at ``j``, right after the noun ``previous_noun``, is the clause's verb."""
    word, nxt = tokens[j].text, (tokens[j + 1] if j + 1 < len(tokens) else None)
    strong = nxt is None or nxt.tag in (DET, NUM, PRON, PARTICLE, ADV)
    prep = nxt is not None and (nxt.tag == REL or (nxt.tag == PREP and nxt.text != "of"))
    weak = nxt is None or nxt.tag in (PUNCT, CONJ, CLAUSE)
    nounlike = verb_base(word) in NOUNLIKE_VERBS
    if verb_base(word) == word:  # bare form: agrees with a plural subject ("the clouds drift over")
        if is_plural(previous_noun):
            return strong or prep or (weak and not nounlike)
        if not nounlike:  # "the wooden spoon simmer on the stove"
            return strong or prep
        return nxt is not None and nxt.tag in (DET, NUM, PRON)  # "the glass photo display the trophy"
    if is_plural(previous_noun):  # an -s form does not follow a plural subject: a compound ("tea bags")
        return False
    return strong or prep or (weak and not nounlike)


def _read_adjectives(tokens: list[Token], i: int) -> tuple[list[str], int]:
    """Adjectives used as a predicate ("red", "black and white") at ``i``; empty when a noun follows them."""
    words, j = [], i
    while _tag(tokens, j) == ATTR:
        words.append(tokens[j].text)
        j += 1
        if _tag(tokens, j) in (CONJ, PUNCT) and tokens[j].text in ("and", ",") and _tag(tokens, j + 1) == ATTR:
            j += 1
    if not words or _tag(tokens, j) in (NOUN, VERB, ING, ED):
        return [], i
    return words, j


def read_noun_phrase(tokens: list[Token], i: int) -> tuple[Entity | None, int]:
    """The noun phrase starting at ``i`` and the index after it; (None, i) if none starts there."""
    start, count, plural_det, has_det, definite, negated = i, None, False, False, False, False
    while _tag(tokens, i) in (DET, NUM):
        has_det = True
        definite = definite or tokens[i].text in _DEFINITE
        negated = negated or tokens[i].text == "no"
        if tokens[i].tag == NUM:
            count = int(tokens[i].value)
        plural_det = plural_det or tokens[i].text in PLURAL_DETERMINERS
        i += 1
    run: list[Token] = []  # modifiers and nouns
    has_noun = False
    while i < len(tokens):
        tok = tokens[i]
        nxt_tag = _tag(tokens, i + 1)
        if tok.tag in (ATTR, NOUN):
            pass
        elif tok.tag == VERB:
            if has_noun and _verb_ends_phrase(run[-1].text, tokens, i):
                break
        elif tok.tag == ING:
            noun = tok.text in ING_NOUNS and (has_det or run) and nxt_tag not in (DET, NUM, PRON)
            if noun and has_noun and nxt_tag in (REL, PREP, PARTICLE, ADV):
                noun = False  # "a child drawing on the wall"
            if not noun and (has_noun or not (_nominal_ahead(tokens, i + 1) or has_det or run)):
                break
        elif tok.tag == ED:
            # a participle before its noun ("a tiled floor"), or a noun ending in -ed ("a white dove", "seaweed")
            if has_noun or not (_nominal_ahead(tokens, i + 1) or has_det or run):
                break
        elif has_det and not run and tok.text in _POSITION_NOUNS:  # "lying on its back"
            pass
        elif tok.tag in (CONJ, PUNCT) and tok.text in ("and", ",") and run and run[-1].tag == ATTR:
            # "black and white tile", "the warm, summer sun", "a blue, black, and white floor"
            if tok.text == "," and nxt_tag == CONJ and _tag(tokens, i + 2) == ATTR:
                i += 1
                continue
            if nxt_tag != ATTR and not (tok.text == "," and nxt_tag in (NOUN, ING, ED)):
                break
            if tok.text == "and":
                run.append(tok)
            i += 1
            continue
        else:
            break
        run.append(tok)
        has_noun = has_noun or tok.tag != ATTR
        i += 1
    # the head is the last noun; trailing adjectives belong to a predicate, not to this phrase
    last_noun = max((k for k, tok in enumerate(run) if tok.tag != ATTR and tok.tag != CONJ), default=None)
    if last_noun is None:
        attrs = [tok for tok in run if tok.tag == ATTR]
        if not attrs or not (has_det or attrs[-1].text in ATTRIBUTE_NOUNS):
            return None, start
        last_noun = len(run) - 1  # "a red orange", "a glass": the attribute word is the noun
    else:
        i -= len(run) - 1 - last_noun
        run = run[: last_noun + 1]
    head = run[-1].text
    entity = Entity(words=[tok.text for tok in run], head=head, count=count, definite=definite, negated=negated)
    entity.plural = (count or 1) > 1 or plural_det or is_plural(head)
    for tok in run[:-1]:
        if tok.tag == ATTR:
            entity.attributes.setdefault(tok.category or "other", []).append(tok.text)
    if run[-1].tag == ATTR and run[-1].text not in ATTRIBUTE_NOUNS and len(run) == 1:
        entity.attributes.setdefault(run[-1].category or "other", [])
    # "X of Y" is one thing: "a slice of bread", "a group of people", "the hues of the setting sun"
    if _tag(tokens, i) == PREP and tokens[i].text == "of":
        inner, after = read_noun_phrase(tokens, i + 1)
        if inner is not None:
            determiners = [tok.text for tok in tokens[i + 1 : after] if tok.tag in (DET, NUM)][:1]
            entity.complement = " ".join(["of", *determiners, *inner.words]) + (
                " " + inner.complement if inner.complement else ""
            )
            if _tag(tokens, after) == CONJ and _tag(tokens, after + 1) in (ATTR, NOUN):  # "of joy and excitement"
                other, end = read_noun_phrase(tokens, after + 1)
                if other is not None:
                    entity.complement += f" {tokens[after].text} " + " ".join(other.words)
                    after = end
            for category, words in inner.attributes.items():
                entity.attributes.setdefault(category, []).extend(words)
            i = after
    return entity, i


@dataclass
class _State:
    """Where one sentence's pass stands."""

    clause_subject: list[int] = field(default_factory=list)
    group: list[int] = field(default_factory=list)  # the latest coordinated noun phrases
    group_is_object: bool = False
    pending: tuple[list[int], str, str] | None = None  # (subjects, predicate, kind) waiting for objects
    previous: str = "start"  # what came last: start, np, conj, punct, clause, aux, verb, rel
    aux: str = ""  # the latest auxiliary ("is", "being")
    located: bool = False  # whether the latest group is the object of a preposition ("on the mat")
    verb_closed: bool = False  # whether the latest construct was a verb without an object ("is barking")
    negated: bool = False  # a negation waits for what it negates: the next noun phrase, verb or relation

    def subjects(self) -> list[int]:
        """Who a verb or a relation after an auxiliary is about."""
        if self.group and not self.group_is_object:
            return list(self.group)
        return list(self.clause_subject or self.group)


def _is_verb_here(tokens: list[Token], i: int, state: _State) -> bool:
    tok, nxt_tag = tokens[i], _tag(tokens, i + 1)
    if tok.tag == VERB:
        coordinated = state.previous == "conj" and state.verb_closed  # "the umbrella opens and closes"
        return state.previous in ("np", "aux") or _tag(tokens, i - 1) == PRON or coordinated
    if tok.tag == ING:
        if state.previous == "aux":
            return True
        if tok.text in ING_NOUNS and nxt_tag not in (DET, NUM, PRON, ATTR, PREP, REL, PARTICLE):
            return False  # "a painting and a vase"
        modifier = tok.text in ING_MODIFIERS and nxt_tag in _NOMINAL
        return state.previous in ("np", "conj", "punct", "verb", "clause") and not modifier
    if tok.tag == ED:
        if state.previous in ("np", "aux") or _tag(tokens, i - 1) == PRON:
            return True
        return state.previous in ("conj", "punct") and nxt_tag in (None, DET, PREP, REL, PARTICLE, ADV, PUNCT)
    return False


def _read_verb(tokens: list[Token], i: int, after_aux: str | None) -> tuple[str, int]:
    """The verb at ``i`` with particles, an infinitive and a preposition joined to it.

    Active forms become -ing forms ("sat" -> "sitting"); a participle after an auxiliary stays as written, being
    passive or adjectival ("is cuddled up", "is being played").
    """
    tok = tokens[i]
    if tok.tag == ED and after_aux is not None:
        words = ["being", tok.text] if after_aux == "being" else [tok.text]
    else:
        words = [ing_form(tok.text)]
    i += 1
    while True:
        tag = _tag(tokens, i)
        if tag == ADV:
            i += 1
        elif tag == PARTICLE and _tag(tokens, i + 1) != PUNCT:
            words.append(tokens[i].text)
            i += 1
        elif tag == PREP and tokens[i].text == "to" and _tag(tokens, i + 1) in (VERB, NOUN):
            words += ["to", tokens[i + 1].text]  # "trying to beat their record"
            i += 2
        else:
            break
    if _tag(tokens, i) in (REL, PREP) and tokens[i].text != "of":
        words.append(tokens[i].text)
        i += 1
    return " ".join(words), i


def _parse_sentence(tokens: list[Token], out: Parse) -> None:
    state, i = _State(), 0

    def relate(subjects: list[int], predicate: str, obj: int | None, kind: str) -> None:
        for subject in subjects:
            if subject != obj:
                out.relations.append(Relation(subject, predicate, obj, kind))

    while i < len(tokens):
        tok = tokens[i]
        verb_before = state.verb_closed
        if tok.tag != CONJ and not (tok.tag in (ING, ED, VERB) and _is_verb_here(tokens, i, state)):
            state.verb_closed = False
        if tok.tag in (ING, ED, VERB) and _is_verb_here(tokens, i, state):
            subjects = [] if state.negated else state.subjects()  # "is not holding": nothing to ask
            state.negated = False
            predicate, i = _read_verb(tokens, i, state.aux if state.previous == "aux" else None)
            adjectives, after = _read_adjectives(tokens, i)
            if not adjectives and _tag(tokens, i) == ED and not _nominal_ahead(tokens, i + 1):
                adjectives, after = [tokens[i].text], i + 1  # "feeling awe-inspired"
            if adjectives:  # "feeling curious", "stood tall next to ..."
                predicate, i = predicate + " " + " ".join(adjectives), after
                if _tag(tokens, i) in (REL, PREP) and tokens[i].text != "of":
                    predicate, i = predicate + " " + tokens[i].text, i + 1
            if read_noun_phrase(tokens, i)[0] is not None:
                state.pending = (subjects, predicate, ACTION)
            else:
                relate(subjects, predicate, None, ACTION)
                state.pending = None
            state.verb_closed = state.pending is None
            state.group, state.group_is_object = subjects, False
            state.previous = "verb"
            continue
        if tok.tag == AUX:
            adjectives, after = _read_adjectives(tokens, i + 1)
            if adjectives:  # "the sky is blue"
                for subject in state.subjects():
                    out.entities[subject].predicates.extend(adjectives)
                i = after
            else:
                i += 1
            state.pending, state.previous, state.aux = None, "aux", tok.text
            continue
        if tok.tag == HAVE:
            # "does not have a hat": no relation, and the negation passes on to the object (no hat)
            state.pending = ([] if state.negated else state.subjects(), "have", HAVE_RELATION)
            state.previous = "verb"
            i += 1
            continue
        if tok.tag in (REL, PREP):
            if state.negated or tok.text == "without":
                # "not on the sofa" relates nothing; "without a hat" negates the hat
                state.pending, state.previous, state.negated = ([], tok.text, ACTION), "rel", tok.text == "without"
                i += 1
                continue
            if tok.text == "with" and state.previous == "np":
                state.pending = (list(state.group), "have", HAVE_RELATION)
            elif tok.tag == REL:
                subjects = list(state.group) if state.previous == "np" else state.subjects()
                if state.previous == "np" and state.group_is_object and state.located and state.pending:
                    subjects = state.pending[0]  # "the pyramid was suspended in mid-air next to the prism"
                state.pending = (subjects, str(tok.value), SPATIAL)
            else:  # "for", "from", "about", ...: what follows is not a subject, and no question is asked
                state.pending = ([], tok.text, ACTION)
            state.previous = "rel"
            i += 1
            continue
        if tok.tag in (DET, NUM, ATTR, NOUN, VERB, ING, ED):
            entity, after = read_noun_phrase(tokens, i)
            if entity is None:
                i += 1
                continue
            index = len(out.entities)
            entity.negated = entity.negated or state.negated
            state.negated = False
            out.entities.append(entity)
            starts_clause = _tag(tokens, after) in (AUX, HAVE, VERB, ED) and state.previous in ("conj", "clause")
            if state.previous == "punct" and state.group_is_object and state.group and state.pending is not None:
                if out.entities[state.group[-1]].definite != entity.definite:  # an aside: ", a natural wonder"
                    state.pending, state.group, state.group_is_object = ([], ",", ACTION), [], True
            if state.pending is not None and not starts_clause:
                subjects, predicate, kind = state.pending
                relate(subjects, predicate, index, kind)
                state.located = kind == SPATIAL or _tag(tokens, i - 1) in (REL, PREP)
                if state.previous in ("conj", "punct") and state.group_is_object:
                    state.group.append(index)
                else:
                    state.group = [index]
                state.group_is_object = True
            elif (
                state.previous in ("conj", "punct")
                and state.group
                and not state.group_is_object
                and not (starts_clause and verb_before)
            ):
                state.group.append(index)
            else:
                state.pending = None
                state.group, state.group_is_object = [index], False
                if not state.clause_subject or state.previous in ("start", "clause") or starts_clause:
                    state.clause_subject = [index]
            state.previous = "np"
            i = after
            continue
        if tok.tag == PARTICLE and _tag(tokens, i + 1) in (DET, NUM):
            state.pending, state.previous = ([], tok.text, ACTION), "rel"
            i += 1
            continue
        if tok.tag == PRON:
            if state.pending is not None:
                state.group, state.group_is_object = [], True
            else:
                state.group, state.group_is_object = [], False
            state.previous = "np"
        elif tok.tag == CONJ:
            state.previous, state.negated = "conj", tok.text == "nor"  # "neither a cat nor a dog"
            i += 1
            continue
        elif tok.tag == NEG:
            state.negated = True
            i += 1
            continue
        elif tok.tag == CLAUSE:
            state.pending, state.previous = None, "clause"
        elif tok.tag == RELPRON:
            state.pending, state.previous = None, "aux"
        elif tok.tag == PUNCT:
            state.previous, state.negated = "punct", False
        i += 1


def parse(prompt: str) -> Parse:
    """Entities and relations of ``prompt``; sentences are parsed independently."""
    out = Parse()
    sentence: list[Token] = []
    for tok in [*tokenize(prompt), Token(".", PUNCT)]:
        if tok.tag == PUNCT and tok.text in _SENTENCE_END:
            if sentence:
                _parse_sentence(sentence, out)
            sentence = []
        else:
            sentence.append(tok)
    return out
