"""Compositional prompts of the shapes world, their atomic constraints and their yes/no questions.

Categories (T2I-CompBench++ names, restricted to what the world can show):

- ``color``: two or three objects with distinct shapes and distinct colors, "a red circle and a blue square".
- ``shape``: two or three objects with distinct shapes sharing one color or texture, "a green star and a green
  hexagon" (only the shapes tell them apart).
- ``texture``: two or three objects with distinct shapes and distinct textures, "a dotted triangle and a plain
  hexagon".
- ``spatial``: two objects and a 2D relation, "a red circle to the left of a striped square" (at most one of the
  two names both a color and a texture).
- ``numeracy``: counts one to four of one or two kinds, "three green stars", "two circles and one dotted star".
- ``complex``: mixtures: two fully described objects in a relation ("a striped red circle above a plain blue
  star"), a count plus an attribute-bound object ("two red circles and a dotted blue square"), or three objects
  with a relation between two of them ("a red circle to the left of a blue star and a dotted square").

Every object description (``Desc``) names a shape, optionally a color and a texture (word order: texture, color,
shape). Shapes within one prompt are distinct, so two descriptions never match the same object.

Constraints (``Constraint``), checked against a ``Scene``:

- ``exists``: some object matches the description.
- ``relation``: some object x matching ``subject`` and a different object y matching ``other`` stand in the
  relation, read on grid cells: "left" means x.col < y.col, "right" x.col > y.col, "above" x.row < y.row,
  "below" x.row > y.row (rows count from the top; the other coordinate is free).
- ``count``: exactly ``count`` objects match the description.

Train / held-out split (like T2I-CompBench's "unseen" split): an attribute pair is a (shape, color) or a
(shape, texture) named together in one description. The pair is held out when
``(SHAPES.index(shape) + COLORS.index(color)) % 5 == 0`` (resp. ``TEXTURES.index(texture)``): circle–red,
circle–orange, square–purple, triangle–yellow, star–blue, hexagon–green, circle–plain, hexagon–striped,
star–dotted (``HELDOUT_PAIRS``). Train prompts contain no held-out pair; every held-out prompt contains at least
one, so no held-out prompt's new combination ever appears in a training prompt.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, replace

from silmm_fast.loop.world.scene import COLORS, GRID, MAX_OBJECTS, SHAPES, TEXTURES, Obj, Scene, check_rng

CATEGORIES: tuple[str, ...] = ("color", "shape", "texture", "spatial", "numeracy", "complex")
SPLITS: tuple[str, ...] = ("train", "heldout")
KINDS: tuple[str, ...] = ("exists", "relation", "count")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
"""``NUMBER_WORDS[n - 1]`` spells n."""
QUESTION_WORDS: tuple[str, ...] = ("is", "there", "are", "exactly", "the", "?")
"""The words a question of ``questions_for`` may use beyond its prompt's: every other word of each question (the
object descriptions, relation phrases, counts and articles) is copied from the prompt."""


def _heldout(shape: str, attribute: str) -> bool:
    table = COLORS if attribute in COLORS else TEXTURES
    return (SHAPES.index(shape) + table.index(attribute)) % 5 == 0


HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (s, a) for s in SHAPES for a in COLORS + TEXTURES if _heldout(s, a)
)
"""(shape, color) and (shape, texture) pairs that appear only in held-out prompts."""


def _plural(shape: str) -> str:
    return shape + "s"


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Desc:
    """A described kind of object: a ``shape`` and optionally a ``color`` and a ``texture`` (None = any)."""

    shape: str
    color: str | None = None
    texture: str | None = None

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, COLORS),
            ("texture", self.texture, TEXTURES),
        ):
            if value is None and name != "shape":
                continue
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a str, one of {choices}, got {type(value).__name__}")
            if value not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {value!r}")

    def matches(self, obj: Obj) -> bool:
        """Whether ``obj`` has every attribute this description names."""
        return (
            obj.shape == self.shape
            and (self.color is None or obj.color == self.color)
            and (self.texture is None or obj.texture == self.texture)
        )

    def phrase(self, plural: bool = False) -> str:
        """Noun phrase without article: ``"striped red circle"`` (``"striped red circles"`` when ``plural``)."""
        words = [w for w in (self.texture, self.color) if w is not None]
        words.append(_plural(self.shape) if plural else self.shape)
        return " ".join(words)

    def indefinite(self) -> str:
        """The phrase with its indefinite article: ``"a red circle"``, ``"an orange star"``."""
        p = self.phrase()
        return f"{_article(p)} {p}"

    def pairs(self) -> list[tuple[str, str]]:
        """The attribute pairs this description names: (shape, color) and/or (shape, texture)."""
        return [(self.shape, a) for a in (self.color, self.texture) if a is not None]


def _check_desc(name: str, value: object) -> Desc:
    if not isinstance(value, Desc):
        raise TypeError(f"{name}: expected a Desc, got {type(value).__name__}")
    return value


def relation_holds(a: Obj, relation: str, b: Obj) -> bool:
    """Whether ``a`` stands ``relation`` ("left", "right", "above", "below") of ``b`` on the grid."""
    if relation == "left":
        return a.col < b.col
    if relation == "right":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    return a.row > b.row


@dataclass(frozen=True)
class Constraint:
    """One atomic, checkable fact about a scene (see the module docstring for the semantics).

    Build with ``Constraint.exists(desc)``, ``Constraint.related(subject, relation, other)`` or
    ``Constraint.count_of(desc, n)``. ``kind`` is one of ``KINDS``; ``relation`` (one of ``RELATIONS``) and
    ``other`` are set only for ``"relation"``, ``count`` (1..4) only for ``"count"``.
    """

    kind: str
    subject: Desc
    relation: str | None = None
    other: Desc | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        _check_desc("subject", self.subject)
        if self.kind == "relation":
            if self.relation not in RELATIONS:
                raise ValueError(f"relation: expected one of {RELATIONS}, got {self.relation!r}")
            _check_desc("other", self.other)
        elif self.relation is not None or self.other is not None:
            raise ValueError(f"relation / other: only a 'relation' constraint has them (kind={self.kind!r})")
        if self.kind == "count":
            if not isinstance(self.count, int) or isinstance(self.count, bool):
                raise TypeError(f"count: expected an int, got {type(self.count).__name__}")
            if not 1 <= self.count <= MAX_OBJECTS:
                raise ValueError(f"count: expected 1 to {MAX_OBJECTS}, got {self.count}")
        elif self.count is not None:
            raise ValueError(f"count: only a 'count' constraint has one (kind={self.kind!r})")

    @classmethod
    def exists(cls, desc: Desc) -> Constraint:
        """Some object matches ``desc``."""
        return cls("exists", desc)

    @classmethod
    def related(cls, subject: Desc, relation: str, other: Desc) -> Constraint:
        """An object matching ``subject`` is ``relation`` ("left", "right", "above", "below") of another matching
        ``other``."""
        return cls("relation", subject, relation=relation, other=other)

    @classmethod
    def count_of(cls, desc: Desc, n: int) -> Constraint:
        """Exactly ``n`` objects match ``desc``."""
        return cls("count", desc, count=n)

    def holds(self, scene: Scene) -> bool:
        """Whether ``scene`` satisfies this constraint (``Scene.blank()`` satisfies none)."""
        if not isinstance(scene, Scene):
            raise TypeError(f"scene: expected a silmm_fast.loop.world.Scene, got {type(scene).__name__}")
        objs = scene.objects
        if self.kind == "exists":
            return any(self.subject.matches(o) for o in objs)
        if self.kind == "count":
            return sum(self.subject.matches(o) for o in objs) == self.count
        return any(
            a is not b and self.subject.matches(a) and self.other.matches(b) and relation_holds(a, self.relation, b)
            for a in objs
            for b in objs
        )

    def question(self) -> str:
        """The yes/no question asking exactly this constraint, e.g. ``"is there a red circle?"``."""
        if self.kind == "exists":
            return f"is there {self.subject.indefinite()}?"
        if self.kind == "count":
            if self.count == 1:
                return f"is there exactly one {self.subject.phrase()}?"
            return f"are there exactly {NUMBER_WORDS[self.count - 1]} {self.subject.phrase(plural=True)}?"
        return f"is the {self.subject.phrase()} {RELATION_PHRASES[self.relation]} the {self.other.phrase()}?"

    def descs(self) -> list[Desc]:
        """The descriptions this constraint mentions."""
        return [self.subject] if self.other is None else [self.subject, self.other]


@dataclass(frozen=True)
class Question:
    """A yes/no question (``text``) whose ground-truth answer is ``constraint.holds(scene)``."""

    text: str
    constraint: Constraint

    def answer(self, scene: Scene) -> bool:
        """The ground-truth answer about ``scene``."""
        return self.constraint.holds(scene)


@dataclass(frozen=True)
class Prompt:
    """A compositional prompt: its ``text``, its ``category`` (one of ``CATEGORIES``) and the atomic
    ``constraints`` an image must meet. ``constraints`` may be any iterable; it is stored as a tuple."""

    text: str
    category: str
    constraints: tuple[Constraint, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"text: expected a str, got {type(self.text).__name__}")
        _check_category(self.category)
        cons = tuple(self.constraints)
        if not cons:
            raise ValueError("constraints: expected at least one Constraint, got none")
        for i, c in enumerate(cons):
            if not isinstance(c, Constraint):
                raise TypeError(f"constraints[{i}]: expected a Constraint, got {type(c).__name__}")
        object.__setattr__(self, "constraints", cons)

    def questions(self) -> list[Question]:
        """Ground-truth decomposition into yes/no questions: one per constraint, in order."""
        return [Question(c.question(), c) for c in self.constraints]

    def check(self, scene: Scene) -> list[bool]:
        """One bool per constraint: whether ``scene`` meets it."""
        return [c.holds(scene) for c in self.constraints]

    def satisfied_by(self, scene: Scene) -> bool:
        """Whether ``scene`` meets every constraint."""
        return all(self.check(scene))

    def entities(self) -> list[Desc]:
        """The objects the prompt asks for, one ``Desc`` per object (a count of n gives n entries); a description
        that only a relation mentions adds one object."""
        out: list[Desc] = []
        for c in self.constraints:
            if c.kind == "exists" and c.subject not in out:
                out.append(c.subject)
            elif c.kind == "count":
                out.extend([c.subject] * c.count)
        for c in self.constraints:
            for d in c.descs():
                if d not in out:
                    out.append(d)
        return out

    @property
    def n_objects(self) -> int:
        """How many objects the prompt asks for (``len(self.entities())``)."""
        return len(self.entities())

    def pairs(self) -> set[tuple[str, str]]:
        """Every attribute pair the prompt's descriptions name."""
        return {p for c in self.constraints for d in c.descs() for p in d.pairs()}

    def split(self) -> str:
        """``"heldout"`` if the prompt names a held-out attribute pair, else ``"train"``."""
        return "heldout" if self.pairs() & HELDOUT_PAIRS else "train"


def _check_category(category: object) -> str:
    if category not in CATEGORIES:
        raise ValueError(f"category: expected one of {CATEGORIES}, got {category!r}")
    return category  # type: ignore[return-value]


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return split  # type: ignore[return-value]


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _maybe(rng: random.Random, p: float, values: tuple[str, ...]) -> str | None:
    return rng.choice(values) if rng.random() < p else None


def _count_phrase(desc: Desc, n: int) -> str:
    return f"{NUMBER_WORDS[n - 1]} {desc.phrase(plural=n > 1)}"


def _full(desc: Desc) -> bool:
    return desc.color is not None and desc.texture is not None


def _draw(category: str, rng: random.Random) -> Prompt:
    """One prompt of ``category`` with attributes drawn uniformly (no split rule applied)."""
    if category in ("color", "shape", "texture"):
        k = 2 if rng.random() < 0.7 else 3
        shapes = rng.sample(SHAPES, k)
        if category == "color":
            descs = [Desc(s, color=c) for s, c in zip(shapes, rng.sample(COLORS, k))]
        elif category == "texture":
            descs = [Desc(s, texture=t) for s, t in zip(shapes, rng.sample(TEXTURES, k))]
        elif rng.random() < 0.6:
            color = rng.choice(COLORS)
            descs = [Desc(s, color=color) for s in shapes]
        else:
            texture = rng.choice(TEXTURES)
            descs = [Desc(s, texture=texture) for s in shapes]
        return Prompt(_join([d.indefinite() for d in descs]), category, [Constraint.exists(d) for d in descs])

    if category == "spatial":
        a, b = (Desc(s, _maybe(rng, 0.5, COLORS), _maybe(rng, 0.3, TEXTURES)) for s in rng.sample(SHAPES, 2))
        if _full(a) and _full(b):  # two fully described objects in a relation is the complex category's template
            b = replace(b, texture=None)
        rel = rng.choice(RELATIONS)
        text = f"{a.indefinite()} {RELATION_PHRASES[rel]} {b.indefinite()}"
        return Prompt(text, category, [Constraint.exists(a), Constraint.exists(b), Constraint.related(a, rel, b)])

    if category == "numeracy":

        def kind(shape: str) -> Desc:
            r = rng.random()
            if r < 0.4:
                return Desc(shape)
            if r < 0.8:
                return Desc(shape, color=rng.choice(COLORS))
            return Desc(shape, texture=rng.choice(TEXTURES))

        if rng.random() < 0.7:
            groups = [(kind(rng.choice(SHAPES)), rng.randint(1, MAX_OBJECTS))]
        else:
            n1 = rng.randint(1, MAX_OBJECTS - 1)
            s1, s2 = rng.sample(SHAPES, 2)
            groups = [(kind(s1), n1), (kind(s2), rng.randint(1, MAX_OBJECTS - n1))]
        text = _join([_count_phrase(d, n) for d, n in groups])
        return Prompt(text, category, [Constraint.count_of(d, n) for d, n in groups])

    # complex
    template = rng.randrange(3)
    if template == 0:
        a, b = (Desc(s, rng.choice(COLORS), rng.choice(TEXTURES)) for s in rng.sample(SHAPES, 2))
        rel = rng.choice(RELATIONS)
        text = f"{a.indefinite()} {RELATION_PHRASES[rel]} {b.indefinite()}"
        return Prompt(text, category, [Constraint.exists(a), Constraint.exists(b), Constraint.related(a, rel, b)])
    if template == 1:
        s1, s2 = rng.sample(SHAPES, 2)
        group = Desc(s1, color=rng.choice(COLORS))
        n = rng.randint(2, MAX_OBJECTS - 1)
        single = Desc(s2, rng.choice(COLORS), _maybe(rng, 0.6, TEXTURES))
        text = f"{_count_phrase(group, n)} and {single.indefinite()}"
        return Prompt(text, category, [Constraint.count_of(group, n), Constraint.exists(single)])
    s1, s2, s3 = rng.sample(SHAPES, 3)
    a = Desc(s1, color=rng.choice(COLORS))
    b = Desc(s2, color=rng.choice(COLORS))
    c = Desc(s3, texture=rng.choice(TEXTURES))
    rel = rng.choice(RELATIONS)
    text = f"{a.indefinite()} {RELATION_PHRASES[rel]} {b.indefinite()} and {c.indefinite()}"
    cons = [Constraint.exists(a), Constraint.exists(b), Constraint.related(a, rel, b), Constraint.exists(c)]
    return Prompt(text, category, cons)


_MAX_DRAWS = 10_000


def sample_prompt(category: str, rng: random.Random | int, split: str = "train") -> Prompt:
    """A random prompt of ``category`` from ``split`` ("train": no held-out attribute pair; "heldout": at least
    one; see the module docstring).

    Raises:
        ValueError: unknown ``category`` or ``split``.
        TypeError: ``rng`` is not a ``random.Random`` / int seed.
    """
    category = _check_category(category)
    split = _check_split(split)
    rng = check_rng("rng", rng)
    for _ in range(_MAX_DRAWS):
        p = _draw(category, rng)
        if p.split() == split:
            return p
    raise RuntimeError(f"no {split} prompt of category {category!r} in {_MAX_DRAWS} draws")  # pragma: no cover


def prompt_split(seed: int, n_per_category: int) -> dict[str, list[Prompt]]:
    """Deterministic prompt sets ``{"train": [...], "heldout": [...]}``, ``n_per_category`` distinct prompts
    (distinct texts) per category in ``CATEGORIES`` order. The two sets never share a prompt, and no held-out
    prompt's held-out attribute pair occurs in any train prompt. Each (seed, split, category) has its own random
    stream, so the prompts of one category don't depend on ``n_per_category`` of another.

    Raises:
        TypeError: ``seed`` or ``n_per_category`` is not an int.
        ValueError: ``n_per_category`` < 1, or more than the category has distinct prompts in a split.
    """
    for name, value in (("seed", seed), ("n_per_category", n_per_category)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if n_per_category < 1:
        raise ValueError(f"n_per_category: expected >= 1, got {n_per_category}")
    out: dict[str, list[Prompt]] = {}
    for split in SPLITS:
        prompts: list[Prompt] = []
        for category in CATEGORIES:
            # the stream's name is part of the prompt sets' identity (every run's held-out prompts): it keeps the
            # package's first path, whatever the module is called now
            rng = random.Random(f"silmm_fast.world/{seed}/{split}/{category}")
            seen: dict[str, Prompt] = {}
            misses = 0
            while len(seen) < n_per_category:
                p = sample_prompt(category, rng, split)
                if p.text in seen:
                    misses += 1
                    if misses > 5000:  # this many draws in a row with nothing new: the pool is used up
                        raise ValueError(
                            f"n_per_category: {category!r} has only about {len(seen)} distinct {split} prompts, "
                            f"asked for {n_per_category}"
                        )
                    continue
                seen[p.text] = p
                misses = 0
            prompts.extend(seen.values())
        out[split] = prompts
    return out


def questions_for(prompt: Prompt) -> list[Question]:
    """Ground-truth decomposition of ``prompt`` into yes/no questions (one per constraint, in order)."""
    if not isinstance(prompt, Prompt):
        raise TypeError(f"prompt: expected a Prompt, got {type(prompt).__name__}")
    return prompt.questions()


def answer(question: Question, scene: Scene) -> bool:
    """Ground-truth answer of ``question`` about ``scene``."""
    if not isinstance(question, Question):
        raise TypeError(f"question: expected a Question, got {type(question).__name__}")
    return question.answer(scene)


# ---------------------------------------------------------------------------------------------------------------
# Scenes for prompts: satisfying ones and near misses.


def _fill(desc: Desc, rng: random.Random, row: int, col: int) -> Obj:
    return Obj(desc.shape, desc.color or rng.choice(COLORS), desc.texture or rng.choice(TEXTURES), row, col)


def canonical_scene(prompt: Prompt) -> Scene:
    """The one canonical scene of ``prompt``: its objects (``prompt.entities()``, in order) in the first cells, in
    row-major order, where every constraint holds (cell tuples tried in lexicographic order), with unnamed attributes
    set to the first color and texture (``COLORS[0]``, ``TEXTURES[0]``). A deterministic target for a model that
    regresses one image per prompt (the continuous variant): a random layout would leave it the average of all
    layouts, in which no cell is clearly occupied. The discrete bootstrap also uses it for most of its generation
    targets (``SyntheticData(canonical_prob=...)``).

    Raises:
        ValueError: the prompt's constraints cannot all be met by such a scene.
    """
    if not isinstance(prompt, Prompt):
        raise TypeError(f"prompt: expected a Prompt, got {type(prompt).__name__}")
    entities = prompt.entities()
    if len(entities) > MAX_OBJECTS:
        raise ValueError(f"prompt: asks for {len(entities)} objects, a scene holds at most {MAX_OBJECTS}")
    for cells in itertools.permutations(range(GRID * GRID), len(entities)):
        objs = [
            Obj(d.shape, d.color or COLORS[0], d.texture or TEXTURES[0], c // GRID, c % GRID)
            for d, c in zip(entities, cells)
        ]
        scene = Scene(tuple(objs))
        if prompt.satisfied_by(scene):
            return scene
    raise ValueError(f"prompt: no canonical scene meets every constraint of {prompt.text!r}")


def scene_for_prompt(prompt: Prompt, rng: random.Random | int, distractors: int = 0) -> Scene:
    """A random scene that meets every constraint of ``prompt``: one object per ``prompt.entities()`` entry,
    unnamed attributes drawn at random, cells drawn at random until every relation holds. ``distractors`` extra
    objects (fewer if the grid has no room for them within four objects) get shapes the prompt never mentions, so
    they cannot match any description and never break a constraint.

    Raises:
        ValueError: the prompt asks for more than four objects or its constraints cannot all be met.
    """
    if not isinstance(prompt, Prompt):
        raise TypeError(f"prompt: expected a Prompt, got {type(prompt).__name__}")
    rng = check_rng("rng", rng)
    if not isinstance(distractors, int) or isinstance(distractors, bool):
        raise TypeError(f"distractors: expected an int, got {type(distractors).__name__}")
    if distractors < 0:
        raise ValueError(f"distractors: expected >= 0, got {distractors}")
    entities = prompt.entities()
    if len(entities) > MAX_OBJECTS:
        raise ValueError(f"prompt: asks for {len(entities)} objects, a scene holds at most {MAX_OBJECTS}")
    used = {d.shape for d in entities}
    spare = [s for s in SHAPES if s not in used]
    n_extra = min(distractors, MAX_OBJECTS - len(entities)) if spare else 0
    for _ in range(1000):
        cells = rng.sample(range(GRID * GRID), len(entities) + n_extra)
        objs = [_fill(d, rng, c // GRID, c % GRID) for d, c in zip(entities, cells)]
        objs += [
            Obj(rng.choice(spare), rng.choice(COLORS), rng.choice(TEXTURES), c // GRID, c % GRID)
            for c in cells[len(entities) :]
        ]
        scene = Scene(tuple(objs))
        if prompt.satisfied_by(scene):
            return scene
    raise ValueError(f"prompt: found no scene meeting every constraint of {prompt.text!r}")


def _edits(scene: Scene) -> list[Scene]:
    """Every scene one edit away: change one attribute of one object, move it, remove it, or add one object."""
    objs = list(scene.objects)
    out = []
    for i, o in enumerate(objs):
        rest = objs[:i] + objs[i + 1 :]
        for s in SHAPES:
            if s != o.shape:
                out.append(Scene(rest + [Obj(s, o.color, o.texture, o.row, o.col)]))
        for c in COLORS:
            if c != o.color:
                out.append(Scene(rest + [Obj(o.shape, c, o.texture, o.row, o.col)]))
        for t in TEXTURES:
            if t != o.texture:
                out.append(Scene(rest + [Obj(o.shape, o.color, t, o.row, o.col)]))
        for r, c in scene.free_cells():
            out.append(Scene(rest + [Obj(o.shape, o.color, o.texture, r, c)]))
        if rest:
            out.append(Scene(rest))
    if len(objs) < MAX_OBJECTS:
        for r, c in scene.free_cells():
            for s in SHAPES:
                for col in COLORS:
                    for t in TEXTURES:
                        out.append(Scene(objs + [Obj(s, col, t, r, c)]))
    return out


def random_edit(scene: Scene, rng: random.Random | int) -> Scene | None:
    """One random scene of the one-edit neighbourhood ``_edits`` lists, drawn without listing it: change an attribute
    of an object, move it to a free cell, remove it (None when it is the only one) or add a random object."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a silmm_fast.loop.world.Scene, got {type(scene).__name__}")
    rng = check_rng("rng", rng)
    objs = list(scene.objects)
    kind = rng.choice(("attribute", "move", "remove", "add")) if objs else "add"
    free = scene.free_cells()
    if kind == "add" and len(objs) >= MAX_OBJECTS or kind == "move" and not free:
        kind = "attribute"
    if kind == "add":
        row, col = rng.choice(free)
        return Scene([*objs, Obj(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(TEXTURES), row, col)])
    i = rng.randrange(len(objs))
    o, rest = objs[i], objs[:i] + objs[i + 1 :]
    if kind == "remove":
        return Scene(rest) if rest else None
    if kind == "move":
        row, col = rng.choice(free)
        return Scene([*rest, Obj(o.shape, o.color, o.texture, row, col)])
    shape, color, texture = o.shape, o.color, o.texture
    attr = rng.choice(("shape", "color", "texture"))
    if attr == "shape":
        shape = rng.choice([x for x in SHAPES if x != shape])
    elif attr == "color":
        color = rng.choice([x for x in COLORS if x != color])
    else:
        texture = rng.choice([x for x in TEXTURES if x != texture])
    return Scene([*rest, Obj(shape, color, texture, o.row, o.col)])


def _swap(a: Obj, b: Obj, attr: str) -> tuple[Obj, Obj]:
    return replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)})


def _near_misses(prompt: Prompt, scene: Scene, rng: random.Random) -> list[Scene]:
    """Typed near misses of ``scene`` for ``prompt``: attribute swaps between described objects, swapped cells of
    related objects, one object too many / too few for a count, a described object with a wrong attribute."""
    objs = list(scene.objects)
    described = [o for o in objs if any(d.matches(o) for c in prompt.constraints for d in c.descs())]
    out: list[Scene] = []
    for i, a in enumerate(described):
        for b in described[i + 1 :]:
            for attr in ("color", "texture", "shape"):
                if getattr(a, attr) != getattr(b, attr):
                    na, nb = _swap(a, b, attr)
                    out.append(Scene([o for o in objs if o is not a and o is not b] + [na, nb]))
    for c in prompt.constraints:
        if c.kind == "relation":
            for a in objs:
                for b in objs:
                    if a is not b and c.subject.matches(a) and c.other.matches(b):
                        moved_a = Obj(a.shape, a.color, a.texture, b.row, b.col)
                        moved_b = Obj(b.shape, b.color, b.texture, a.row, a.col)
                        out.append(Scene([o for o in objs if o is not a and o is not b] + [moved_a, moved_b]))
        if c.kind == "count":
            matching = [o for o in objs if c.subject.matches(o)]
            if matching and len(objs) > 1:
                drop = rng.choice(matching)
                out.append(Scene([o for o in objs if o is not drop]))
            if len(objs) < MAX_OBJECTS:
                r, col = rng.choice(scene.free_cells())
                out.append(Scene(objs + [_fill(c.subject, rng, r, col)]))
    for o in described:
        rest = [x for x in objs if x is not o]
        out.append(
            Scene(rest + [Obj(rng.choice([s for s in SHAPES if s != o.shape]), o.color, o.texture, o.row, o.col)])
        )
        out.append(
            Scene(rest + [Obj(o.shape, rng.choice([c for c in COLORS if c != o.color]), o.texture, o.row, o.col)])
        )
        other_t = rng.choice([t for t in TEXTURES if t != o.texture])
        out.append(Scene(rest + [Obj(o.shape, o.color, other_t, o.row, o.col)]))
    return out


def corrupt_scene(prompt: Prompt, scene: Scene, rng: random.Random | int) -> Scene:
    """A near miss of ``scene`` that fails at least one constraint of ``prompt``.

    Picks at random among typed near misses that fail the prompt (two described objects swap a color, texture or
    shape; two related objects swap cells; a counted kind gets one object more or fewer; one described object gets
    a wrong shape, color or texture). If none fails (e.g. the scene repeats a described object), any single edit
    that fails is used; failing that, every object's shape is changed to one the prompt does not name.
    """
    if not isinstance(prompt, Prompt):
        raise TypeError(f"prompt: expected a Prompt, got {type(prompt).__name__}")
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a silmm_fast.loop.world.Scene, got {type(scene).__name__}")
    rng = check_rng("rng", rng)
    for candidates in (lambda: _near_misses(prompt, scene, rng), lambda: _edits(scene)):
        failing = [s for s in candidates() if not prompt.satisfied_by(s)]
        if failing:
            return rng.choice(failing)
    named = {d.shape for c in prompt.constraints for d in c.descs()}
    spare = [s for s in SHAPES if s not in named]
    if not spare:  # a hand-made prompt naming every shape: only the blank scene is sure to fail it
        return Scene.blank()
    objs = [Obj(rng.choice(spare), o.color, o.texture, o.row, o.col) for o in scene.objects]
    return Scene(objs or [Obj(rng.choice(spare), rng.choice(COLORS), rng.choice(TEXTURES), 0, 0)])


# ---------------------------------------------------------------------------------------------------------------
# Questions about scenes, for balanced VQA data.


def _random_desc(rng: random.Random, shape: str | None = None, color: str | None = None, texture: str | None = None):
    """A description of ``shape`` (random if None) naming ``color`` / ``texture`` each with probability 1/2 (random
    values where None is given)."""
    return Desc(
        shape or rng.choice(SHAPES),
        (color or rng.choice(COLORS)) if rng.random() < 0.5 else None,
        (texture or rng.choice(TEXTURES)) if rng.random() < 0.5 else None,
    )


def _check_n(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    return n


def _collect(scene: Scene, rng: random.Random, n: int, want: bool, draw) -> list[Question]:
    out: dict[str, Question] = {}
    for _ in range(200 * max(n, 1)):
        if len(out) == n:
            break
        c = draw()
        if c is not None and c.holds(scene) == want:
            out.setdefault(c.question(), Question(c.question(), c))
    return list(out.values())


def positive_questions(scene: Scene, rng: random.Random | int, n: int = 1) -> list[Question]:
    """Up to ``n`` distinct questions whose answer about ``scene`` is yes: an object described with some of its
    attributes exists, two objects stand in a relation they do stand in, or a kind's exact count (fewer than ``n``
    only when the scene has fewer such facts; none for ``Scene.blank()``)."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a silmm_fast.loop.world.Scene, got {type(scene).__name__}")
    rng = check_rng("rng", rng)
    n = _check_n(n)
    if not scene.objects:
        return []

    def draw() -> Constraint:
        a = rng.choice(scene.objects)
        da = _random_desc(rng, a.shape, a.color, a.texture)
        kind = rng.choice(KINDS)
        if kind == "relation" and len(scene) > 1:
            b = rng.choice([o for o in scene.objects if o is not a])
            rel = rng.choice([r for r in RELATIONS if relation_holds(a, r, b)] or RELATIONS)
            return Constraint.related(da, rel, _random_desc(rng, b.shape, b.color, b.texture))
        if kind == "count":
            return Constraint.count_of(da, sum(da.matches(o) for o in scene.objects))
        return Constraint.exists(da)

    return _collect(scene, rng, n, True, draw)


def negative_questions(scene: Scene, rng: random.Random | int, n: int = 1) -> list[Question]:
    """Up to ``n`` distinct questions whose answer about ``scene`` is no, mostly near misses: an object of the scene
    with one attribute changed, two of its objects in the opposite relation, a kind's count off by one; the rest
    ask about random descriptions absent from the scene."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a silmm_fast.loop.world.Scene, got {type(scene).__name__}")
    rng = check_rng("rng", rng)
    n = _check_n(n)

    def draw() -> Constraint | None:
        kind = rng.choice(KINDS)
        if not scene.objects or rng.random() < 0.25:
            d = _random_desc(rng)
            if kind == "count":
                return Constraint.count_of(d, rng.randint(1, MAX_OBJECTS))
            if kind == "relation":
                return Constraint.related(d, rng.choice(RELATIONS), _random_desc(rng))
            return Constraint.exists(d)
        a = rng.choice(scene.objects)
        da = _random_desc(rng, a.shape, a.color, a.texture)
        if kind == "count":
            actual = sum(da.matches(o) for o in scene.objects)
            wrong = [k for k in (actual - 1, actual + 1) if 1 <= k <= MAX_OBJECTS]
            return Constraint.count_of(da, rng.choice(wrong)) if wrong else None
        if kind == "relation" and len(scene) > 1:
            b = rng.choice([o for o in scene.objects if o is not a])
            return Constraint.related(da, rng.choice(RELATIONS), _random_desc(rng, b.shape, b.color, b.texture))
        attr = rng.choice(("shape", "color", "texture"))
        if attr == "shape":
            da = replace(da, shape=rng.choice([s for s in SHAPES if s != a.shape]))
        elif attr == "color":
            da = replace(da, color=rng.choice([c for c in COLORS if c != a.color]))
        else:
            da = replace(da, texture=rng.choice([t for t in TEXTURES if t != a.texture]))
        return Constraint.exists(da)

    return _collect(scene, rng, n, False, draw)


# ---------------------------------------------------------------------------------------------------------------
# Text.

_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize_text(text: str) -> list[str]:
    """Lowercase words of ``text``; each punctuation mark ("?", ",") is a word of its own.

    ``tokenize_text("Is there a red circle?") == ["is", "there", "a", "red", "circle", "?"]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    return _TOKEN_RE.findall(text.lower())


WORDS: list[str] = sorted(
    set(SHAPES)
    | {_plural(s) for s in SHAPES}
    | set(COLORS)
    | set(TEXTURES)
    | set(NUMBER_WORDS)
    | {w for phrase in RELATION_PHRASES.values() for w in phrase.split()}
    | {"a", "an", "and", ",", "?", "is", "are", "there", "exactly", "the"}
)
"""Every word a prompt or question of the world can contain (the text vocabulary), sorted."""


# ---------------------------------------------------------------------------------------------------------------
# Parsing prompt text back into constraints.


def _parse_desc(words: list[str], i: int, plural: bool) -> tuple[Desc, int]:
    texture = color = None
    if i < len(words) and words[i] in TEXTURES:
        texture, i = words[i], i + 1
    if i < len(words) and words[i] in COLORS:
        color, i = words[i], i + 1
    nouns = {(_plural(s) if plural else s): s for s in SHAPES}
    if i >= len(words) or words[i] not in nouns:
        got = words[i] if i < len(words) else "the end of the text"
        raise ValueError(f"text: expected {'a plural' if plural else 'a'} shape noun at word {i}, got {got!r}")
    return Desc(nouns[words[i]], color, texture), i + 1


def _parse_item(words: list[str], i: int) -> tuple[Constraint, int]:
    """``a|an <desc>`` (exists) or ``<number> <desc>`` (count) starting at word ``i``."""
    if i < len(words) and words[i] in ("a", "an"):
        desc, j = _parse_desc(words, i + 1, plural=False)
        if words[i] != _article(desc.phrase()):
            raise ValueError(f"text: expected {_article(desc.phrase())!r} before {desc.phrase()!r}, got {words[i]!r}")
        return Constraint.exists(desc), j
    if i < len(words) and words[i] in NUMBER_WORDS:
        n = NUMBER_WORDS.index(words[i]) + 1
        desc, j = _parse_desc(words, i + 1, plural=n > 1)
        return Constraint.count_of(desc, n), j
    got = words[i] if i < len(words) else "the end of the text"
    raise ValueError(f"text: expected 'a', 'an' or a number word at word {i}, got {got!r}")


def _parse_relation(words: list[str], i: int) -> tuple[str | None, int]:
    for rel, phrase in RELATION_PHRASES.items():
        p = phrase.split()
        if words[i : i + len(p)] == p:
            return rel, i + len(p)
    return None, i


def _infer_category(constraints: list[Constraint]) -> str:
    kinds = [c.kind for c in constraints]
    items = [c for c in constraints if c.kind != "relation"]
    descs = [c.subject for c in items]
    if "relation" in kinds:
        spatial = len(items) == 2 and "count" not in kinds and not all(_full(d) for d in descs)
        return "spatial" if spatial else "complex"
    if "count" in kinds:
        return "numeracy" if all(k == "count" for k in kinds) else "complex"
    if len(descs) >= 2:
        colors = [d.color for d in descs]
        textures = [d.texture for d in descs]
        if None not in colors and set(textures) == {None}:
            if len(set(colors)) == len(colors):
                return "color"
            if len(set(colors)) == 1:
                return "shape"
        if None not in textures and set(colors) == {None}:
            if len(set(textures)) == len(textures):
                return "texture"
            if len(set(textures)) == 1:
                return "shape"
    raise ValueError("text: a list of objects that fits no category's grammar; pass category explicitly")


def parse_prompt(text: str, category: str | None = None) -> Prompt:
    """Parse prompt text of the world's grammar back into a ``Prompt`` (inverse of ``sample_prompt``'s text).

    The grammar: items joined by ``","`` / ``"and"``, each ``a|an [texture] [color] shape`` (a thing that exists)
    or ``<one..four> [texture] [color] shape(s)`` (an exact count); an item may be followed by a relation phrase
    ("to the left of", "to the right of", "above", "below") and a second ``a|an`` item. Shapes must be distinct
    across items and the prompt may ask for at most four objects. Constraints come out in the order
    ``sample_prompt`` makes them. ``category`` defaults to the one the grammar implies: a relation between two
    objects (not both fully described) is spatial; counts alone are numeracy; any other mix with a relation or a
    count is complex; a plain list is color (distinct colors), texture (distinct textures) or shape (one shared
    color or texture).

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: ``text`` is outside the grammar (the message names the offending word), or an unknown
            ``category``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    if category is not None:
        _check_category(category)
    words = tokenize_text(text)
    if not words:
        raise ValueError("text: expected a prompt, got no words")
    constraints: list[Constraint] = []
    i = 0
    while True:
        first, i = _parse_item(words, i)
        rel, i = _parse_relation(words, i)
        if rel is None:
            constraints.append(first)
        else:
            second, i = _parse_item(words, i)
            if first.kind != "exists" or second.kind != "exists":
                raise ValueError("text: a relation links two single objects ('a ...'), not counts")
            constraints += [first, second, Constraint.related(first.subject, rel, second.subject)]
        if i == len(words):
            break
        if words[i] not in (",", "and"):
            raise ValueError(f"text: expected ',', 'and', a relation or the end at word {i}, got {words[i]!r}")
        i += 1
    shapes = [c.subject.shape for c in constraints if c.kind != "relation"]
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"text: each shape may be named once per prompt, got {shapes}")
    prompt = Prompt(text, category or _infer_category(constraints), constraints)
    if prompt.n_objects > MAX_OBJECTS:
        raise ValueError(f"text: asks for {prompt.n_objects} objects, a scene holds at most {MAX_OBJECTS}")
    return prompt
