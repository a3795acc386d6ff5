"""Exact scene ⇄ image representations: discrete tokens (``ImageTokenizer``) and feature matrices (``FeatureCodec``).

Discrete mapping (one token per cell, cells in row-major order, ``seq_len = GRID * GRID = 9``):

    token(empty cell)                 = 0
    token(shape s, color c, texture t) = 1 + (s * len(COLORS) + c) * len(TEXTURES) + t

with s, c, t the indices into ``SHAPES``, ``COLORS``, ``TEXTURES``; so ``num_tokens = 1 + 5 * 6 * 3 = 91``.
Token ids are local to the image vocabulary (0 .. num_tokens - 1); a model with a joint vocabulary adds its own
offset.

Continuous mapping (``FeatureCodec``): each cell is a row of an [L, D] matrix,
``[presence ; shape embedding ; color embedding ; texture embedding]``, with fixed, seeded, orthonormal
per-attribute tables; an empty cell is all zeros. Decoding takes presence > 0.5 as "an object is here" and the
nearest table entry (largest dot product) per attribute block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from silmm_fast.loop.world.scene import COLORS, GRID, MAX_OBJECTS, SHAPES, TEXTURES, Obj, Scene


def _check_scene(name: str, scene: object) -> Scene:
    if not isinstance(scene, Scene):
        raise TypeError(f"{name}: expected a silmm_fast.loop.world.Scene, got {type(scene).__name__}")
    return scene


def _check_strict(strict: object) -> bool:
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {type(strict).__name__}")
    return strict


def _finish(objs: list[Obj], strict: bool, name: str) -> Scene:
    """Build the decoded scene: strict mode wants 1..4 objects; lenient mode keeps the first four (row-major) and
    gives ``Scene.blank()`` for none."""
    if strict:
        if not objs:
            raise ValueError(f"{name}: decodes to a scene with no objects (strict=True wants 1 to {MAX_OBJECTS})")
        if len(objs) > MAX_OBJECTS:
            raise ValueError(
                f"{name}: decodes to {len(objs)} objects, more than {MAX_OBJECTS} (strict=True; "
                "strict=False keeps the first four in row-major order)"
            )
        return Scene(tuple(objs))
    if not objs:
        return Scene.blank()
    return Scene(tuple(objs[:MAX_OBJECTS]))


class ImageTokenizer:
    """Scene ⇄ token-sequence mapping, one token per grid cell in row-major order (see the module docstring).

    ``num_tokens`` = 1 + |SHAPES|·|COLORS|·|TEXTURES| (id 0 = empty cell); ``seq_len`` = GRID·GRID.
    """

    EMPTY = 0

    def __init__(self) -> None:
        self.num_tokens: int = 1 + len(SHAPES) * len(COLORS) * len(TEXTURES)
        self.seq_len: int = GRID * GRID

    def __repr__(self) -> str:
        return f"ImageTokenizer(num_tokens={self.num_tokens}, seq_len={self.seq_len})"

    def token_of(self, shape: str, color: str, texture: str) -> int:
        """The token id of an object with these attributes (validated like ``Obj``)."""
        o = Obj(shape, color, texture, 0, 0)
        s, c, t = SHAPES.index(o.shape), COLORS.index(o.color), TEXTURES.index(o.texture)
        return 1 + (s * len(COLORS) + c) * len(TEXTURES) + t

    def attributes_of(self, token: int) -> tuple[str, str, str] | None:
        """(shape, color, texture) of an object token, None for the empty token.

        Raises:
            ValueError: ``token`` outside [0, num_tokens).
        """
        if not isinstance(token, int) or isinstance(token, bool):
            raise TypeError(f"token: expected an int, got {type(token).__name__}")
        if not 0 <= token < self.num_tokens:
            raise ValueError(f"token: expected an id in [0, {self.num_tokens}), got {token}")
        if token == self.EMPTY:
            return None
        k = token - 1
        t = k % len(TEXTURES)
        k //= len(TEXTURES)
        return SHAPES[k // len(COLORS)], COLORS[k % len(COLORS)], TEXTURES[t]

    def encode(self, scene: Scene) -> list[int]:
        """Token ids of ``scene``: a list of ``seq_len`` ints, cell (r, c) at index r * GRID + c."""
        scene = _check_scene("scene", scene)
        tokens = [self.EMPTY] * self.seq_len
        for o in scene.objects:
            tokens[o.cell] = self.token_of(o.shape, o.color, o.texture)
        return tokens

    def encode_batch(self, scenes: Sequence[Scene]) -> torch.Tensor:
        """LongTensor [B, seq_len] of the token ids of each scene."""
        if isinstance(scenes, Scene) or not isinstance(scenes, Sequence):
            raise TypeError(f"scenes: expected a sequence of Scene, got {type(scenes).__name__}")
        out = torch.zeros(len(scenes), self.seq_len, dtype=torch.long)
        for i, s in enumerate(scenes):
            out[i] = torch.tensor(self.encode(_check_scene(f"scenes[{i}]", s)))
        return out

    def _as_ids(self, tokens: object) -> list[int]:
        if isinstance(tokens, torch.Tensor):
            if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
                raise TypeError(f"tokens: expected an integer tensor, got dtype {tokens.dtype}")
            if tokens.dim() != 1:
                raise ValueError(f"tokens: expected shape [{self.seq_len}], got {tuple(tokens.shape)}")
            return [int(t) for t in tokens.tolist()]
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise TypeError(f"tokens: expected a sequence of ints or a 1-D integer tensor, got {type(tokens).__name__}")
        ids = []
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int):
                if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.dtype.is_floating_point:
                    t = int(t)
                else:
                    raise TypeError(f"tokens[{i}]: expected an int, got {type(t).__name__}")
            ids.append(t)
        return ids

    def decode(self, tokens: Sequence[int] | torch.Tensor, strict: bool = True) -> Scene:
        """The scene a token sequence shows.

        ``tokens``: ``seq_len`` ids (list / tuple of ints or a 1-D integer tensor), each in [0, num_tokens).
        With ``strict=True`` the sequence must hold 1 to 4 objects. With ``strict=False`` (for model samples) more
        than four objects are cut to the first four in row-major order, and no object gives ``Scene.blank()``.

        Raises:
            TypeError: ``tokens`` is not a sequence of ints / an integer tensor.
            ValueError: wrong length or an id out of range (both modes); zero or more than four objects
                (strict mode only).
        """
        strict = _check_strict(strict)
        ids = self._as_ids(tokens)
        if len(ids) != self.seq_len:
            raise ValueError(f"tokens: expected {self.seq_len} ids (one per cell), got {len(ids)}")
        objs = []
        for i, t in enumerate(ids):
            if not 0 <= t < self.num_tokens:
                raise ValueError(f"tokens[{i}]: expected an id in [0, {self.num_tokens}), got {t}")
            attrs = self.attributes_of(t)
            if attrs is not None:
                objs.append(Obj(*attrs, i // GRID, i % GRID))
        return _finish(objs, strict, "tokens")

    def decode_batch(self, tokens: torch.Tensor | Sequence[Sequence[int]], strict: bool = True) -> list[Scene]:
        """``decode`` for each row of a [B, seq_len] integer tensor or a list of sequences."""
        if isinstance(tokens, torch.Tensor) and tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape [B, {self.seq_len}], got {tuple(tokens.shape)}")
        return [self.decode(t, strict=strict) for t in tokens]


class FeatureCodec:
    """Scene ⇄ feature matrix [L, D] (L = GRID·GRID cells, row-major) for continuous image models.

    Row layout: column 0 is presence (1.0 for an object, 0.0 for an empty cell, whose row is all zeros), then three
    blocks holding the shape, color and texture embeddings. ``dim - 1`` columns are split between the blocks as
    evenly as possible (block sizes differ by at most one; the shape block is first). Each table has orthonormal
    rows drawn from a ``torch.Generator`` seeded with ``seed``, so the codec is the same in every process.

    Args:
        dim: D; every block must be at least as wide as the largest table (6 values) so that the tables can be
            orthonormal, hence D >= 19. The default D = 48 gives blocks of 16 / 16 / 15 columns (``blocks``).
        seed: seed of the embedding tables.
    """

    def __init__(self, dim: int = 48, seed: int = 0) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        widths = [(dim - 1) // 3 + (1 if i < (dim - 1) % 3 else 0) for i in range(3)]
        need = max(len(SHAPES), len(COLORS), len(TEXTURES))
        if min(widths) < need:
            raise ValueError(f"dim: expected at least {1 + 3 * need} (each attribute block >= {need} wide), got {dim}")
        self.dim: int = dim
        self.seq_len: int = GRID * GRID
        self.seed: int = seed
        gen = torch.Generator().manual_seed(seed)
        self.blocks: tuple[tuple[int, int], ...] = ()
        self.tables: tuple[torch.Tensor, ...] = ()
        start = 1
        for width, names in zip(widths, (SHAPES, COLORS, TEXTURES)):
            q, _ = torch.linalg.qr(torch.randn(width, len(names), generator=gen, dtype=torch.float64))
            self.tables += (q.T.to(torch.float32).contiguous(),)  # [n_values, width], orthonormal rows
            self.blocks += ((start, start + width),)
            start += width

    def __repr__(self) -> str:
        return f"FeatureCodec(dim={self.dim}, seq_len={self.seq_len}, seed={self.seed})"

    def encode(self, scene: Scene) -> torch.Tensor:
        """float32 [L, D] features of ``scene`` (see the class docstring for the row layout)."""
        scene = _check_scene("scene", scene)
        out = torch.zeros(self.seq_len, self.dim)
        for o in scene.objects:
            out[o.cell, 0] = 1.0
            for (lo, hi), table, names, value in zip(
                self.blocks, self.tables, (SHAPES, COLORS, TEXTURES), (o.shape, o.color, o.texture)
            ):
                out[o.cell, lo:hi] = table[names.index(value)]
        return out

    def encode_batch(self, scenes: Sequence[Scene]) -> torch.Tensor:
        """float32 [B, L, D] features of each scene."""
        if isinstance(scenes, Scene) or not isinstance(scenes, Sequence):
            raise TypeError(f"scenes: expected a sequence of Scene, got {type(scenes).__name__}")
        if not scenes:
            return torch.zeros(0, self.seq_len, self.dim)
        return torch.stack([self.encode(_check_scene(f"scenes[{i}]", s)) for i, s in enumerate(scenes)])

    def decode(self, features: torch.Tensor, strict: bool = True) -> Scene:
        """The scene a feature matrix shows: cells with presence > 0.5 hold an object whose attributes are the
        nearest (largest dot product) entries of the tables. ``strict`` as in ``ImageTokenizer.decode``.

        Raises:
            TypeError: ``features`` is not a floating tensor.
            ValueError: shape not [L, D]; NaN / Inf values; zero or more than four objects (strict mode only).
        """
        strict = _check_strict(strict)
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features: expected a torch.Tensor, got {type(features).__name__}")
        if not features.dtype.is_floating_point:
            raise TypeError(f"features: expected a floating dtype, got {features.dtype}")
        if tuple(features.shape) != (self.seq_len, self.dim):
            raise ValueError(f"features: expected shape [{self.seq_len}, {self.dim}], got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float32)
        if not torch.isfinite(f).all():
            raise ValueError("features: contains NaN or Inf")
        present = (f[:, 0] > 0.5).tolist()
        picks = [(f[:, lo:hi] @ table.T).argmax(dim=1).tolist() for (lo, hi), table in zip(self.blocks, self.tables)]
        objs = [
            Obj(SHAPES[picks[0][i]], COLORS[picks[1][i]], TEXTURES[picks[2][i]], i // GRID, i % GRID)
            for i in range(self.seq_len)
            if present[i]
        ]
        return _finish(objs, strict, "features")

    def decode_batch(self, features: torch.Tensor, strict: bool = True) -> list[Scene]:
        """``decode`` for each [L, D] matrix of a [B, L, D] tensor."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features: expected a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 3:
            raise ValueError(f"features: expected shape [B, {self.seq_len}, {self.dim}], got {tuple(features.shape)}")
        return [self.decode(f, strict=strict) for f in features]
