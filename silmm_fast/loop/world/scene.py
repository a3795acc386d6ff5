"""Scenes of the shapes world: up to four objects on a 3×3 grid, each with a shape, a color and a texture.

A scene is a value: ``Scene`` keeps its objects sorted row-major by cell, so two scenes holding the same objects
compare equal whatever order they were listed in, and ``ImageTokenizer.encode`` / ``decode`` round-trip exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GRID = 3
"""Cells per side of the scene grid (GRID × GRID cells, row 0 at the top, column 0 at the left)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
"""Surface patterns; ``"plain"`` is a solid fill."""

MIN_OBJECTS = 1
MAX_OBJECTS = 4


def check_rng(name: str, rng: object) -> random.Random:
    """Return ``rng`` as a ``random.Random``; an int is taken as a seed. Anything else raises TypeError."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"{name}: expected a random.Random (or an int seed), got {type(rng).__name__}")


def _check_attr(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_cell(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int in [0, {GRID}), got {type(value).__name__}")
    if not 0 <= value < GRID:
        raise ValueError(f"{name}: expected an int in [0, {GRID}), got {value}")


@dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``color`` in COLORS, ``texture`` in TEXTURES, at cell (``row``, ``col``)."""

    shape: str
    color: str
    texture: str
    row: int
    col: int

    def __post_init__(self) -> None:
        _check_attr("shape", self.shape, SHAPES)
        _check_attr("color", self.color, COLORS)
        _check_attr("texture", self.texture, TEXTURES)
        _check_cell("row", self.row)
        _check_cell("col", self.col)

    @property
    def cell(self) -> int:
        """Row-major cell index, ``row * GRID + col``."""
        return self.row * GRID + self.col

    def describe(self) -> str:
        """Full noun phrase without article, e.g. ``"striped red circle"``."""
        return f"{self.texture} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An image of the world: 1–4 objects (``MIN_OBJECTS``..``MAX_OBJECTS``), at most one per cell.

    ``objects`` may be given as any iterable of ``Obj``; it is stored as a tuple sorted row-major by cell.
    ``Scene.blank()`` is the one scene without objects: it never comes out of the world's samplers, only from a
    lenient decode of a generated image with nothing in it (it satisfies no prompt).

    Raises:
        TypeError: an element of ``objects`` is not an ``Obj``.
        ValueError: no objects, more than four, or two objects in one cell.
    """

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        objs = self.objects
        if isinstance(objs, Obj) or not hasattr(objs, "__iter__"):
            raise TypeError(f"objects: expected an iterable of Obj, got {type(objs).__name__}")
        objs = tuple(objs)
        for i, o in enumerate(objs):
            if not isinstance(o, Obj):
                raise TypeError(f"objects[{i}]: expected an Obj, got {type(o).__name__}")
        if not MIN_OBJECTS <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"objects: expected {MIN_OBJECTS} to {MAX_OBJECTS} objects, got {len(objs)}")
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            dup = next(c for c in cells if cells.count(c) > 1)
            raise ValueError(
                f"objects: at most one object per cell, cell (row={dup // GRID}, col={dup % GRID}) has more"
            )
        object.__setattr__(self, "objects", tuple(sorted(objs, key=lambda o: o.cell)))

    @classmethod
    def blank(cls) -> Scene:
        """The empty scene (no objects): what a generated image with nothing decodable in it shows."""
        scene = object.__new__(cls)
        object.__setattr__(scene, "objects", ())
        return scene

    def __len__(self) -> int:
        return len(self.objects)

    def at(self, row: int, col: int) -> Obj | None:
        """The object in cell (``row``, ``col``), or None when the cell is empty."""
        _check_cell("row", row)
        _check_cell("col", col)
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None

    def free_cells(self) -> list[tuple[int, int]]:
        """Empty cells as (row, col), row-major."""
        used = {o.cell for o in self.objects}
        return [(c // GRID, c % GRID) for c in range(GRID * GRID) if c not in used]

    def describe(self) -> str:
        """Human-readable listing, e.g. ``"striped red circle @(0,1); plain blue star @(2,2)"``."""
        if not self.objects:
            return "(blank)"
        return "; ".join(f"{o.describe()} @({o.row},{o.col})" for o in self.objects)


def random_obj(rng: random.Random, row: int, col: int) -> Obj:
    """An object with uniformly random shape, color and texture at (``row``, ``col``)."""
    rng = check_rng("rng", rng)
    return Obj(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(TEXTURES), row, col)


def random_scene(rng: random.Random | int, n_objects: int | None = None) -> Scene:
    """A uniformly random scene: ``n_objects`` (default: uniform in 1..4) objects with random attributes in
    distinct random cells.

    Raises:
        TypeError: ``rng`` is not a ``random.Random`` / int seed, or ``n_objects`` is not an int.
        ValueError: ``n_objects`` outside 1..4.
    """
    rng = check_rng("rng", rng)
    if n_objects is None:
        n_objects = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    elif not isinstance(n_objects, int) or isinstance(n_objects, bool):
        raise TypeError(f"n_objects: expected an int or None, got {type(n_objects).__name__}")
    if not MIN_OBJECTS <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects: expected {MIN_OBJECTS} to {MAX_OBJECTS}, got {n_objects}")
    cells = rng.sample(range(GRID * GRID), n_objects)
    return Scene(tuple(random_obj(rng, c // GRID, c % GRID) for c in cells))
