"""Pillow rendering of scenes: one image per scene, labeled grids of images for browsing, PNG files.

Each object fills most of its cell: a solid shape (``plain``), or a pale tint of its color crossed by diagonal
stripes (``striped``) or covered by a grid of dots (``dotted``) in the full color, always with a darker outline.
Drawing happens at 4× the final size and is downsampled, so edges stay smooth at 64–128 px.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from silmm_fast.loop.world.scene import GRID, Obj, Scene

RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 196, 0),
    "purple": (140, 60, 190),
    "orange": (255, 127, 14),
}
"""The RGB value each color name is drawn with."""

BACKGROUND = (248, 248, 246)
GRID_LINE = (214, 214, 210)
_SUPERSAMPLE = 4
MIN_SIZE = 32


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _outline(shape: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]] | None:
    """Polygon of ``shape`` inside the box (None for the circle, drawn as an ellipse)."""
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.86  # a full-box square looks much heavier than the circle beside it
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        r *= 1.12  # a star covers less of its box than the other shapes; enlarge it so its pattern stays visible
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.5
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + 0.1 * r + rad * math.sin(ang)))
        return pts
    # hexagon, flat top and bottom
    return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]


def _pattern(obj: Obj, box: tuple[float, float, float, float], scale: float) -> Image.Image:
    """A box-sized RGB image holding the object's texture in its color."""
    x0, y0, x1, y1 = box
    w, h = math.ceil(x1 - x0) + 2, math.ceil(y1 - y0) + 2
    color = RGB[obj.color]
    if obj.texture == "plain":
        return Image.new("RGB", (w, h), color)
    img = Image.new("RGB", (w, h), _mix(color, (255, 255, 255), 0.78))
    draw = ImageDraw.Draw(img)
    if obj.texture == "striped":
        period = 6.0 * scale
        width = round(period * 0.45)
        k = -h
        while k < w + h:
            draw.line([(k, 0), (k + h, h)], fill=color, width=width)
            k += period
    else:  # dotted
        step = 5.0 * scale
        rad = step * 0.32
        y = step / 2
        row = 0
        while y < h + step:
            x = step / 2 + (step / 2 if row % 2 else 0)
            while x < w + step:
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=color)
                x += step
            y += step * 0.87
            row += 1
    return img


def _check_size(size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"size: expected an int, got {type(size).__name__}")
    if size < MIN_SIZE:
        raise ValueError(f"size: expected >= {MIN_SIZE} pixels, got {size}")
    return size


def render(scene: Scene, size: int = 96) -> Image.Image:
    """An RGB ``size``×``size`` image of ``scene`` on a faint 3×3 grid (``Scene.blank()`` gives the bare grid).

    Raises:
        TypeError: ``scene`` is not a ``Scene`` or ``size`` not an int.
        ValueError: ``size`` < 32.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a silmm_fast.loop.world.Scene, got {type(scene).__name__}")
    size = _check_size(size)
    big = size * _SUPERSAMPLE
    scale = big / 96  # pattern and line widths are tuned for 96 px and grow with size
    cell = big / GRID
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k in range(1, GRID):
        p = round(k * cell)
        draw.line([(p, 0), (p, big)], fill=GRID_LINE, width=max(1, round(scale)))
        draw.line([(0, p), (big, p)], fill=GRID_LINE, width=max(1, round(scale)))
    margin = cell * 0.13
    for o in scene.objects:
        box = (o.col * cell + margin, o.row * cell + margin, (o.col + 1) * cell - margin, (o.row + 1) * cell - margin)
        poly = _outline(o.shape, *box)
        ox, oy = math.floor(box[0]) - 1, math.floor(box[1]) - 1
        pattern = _pattern(o, (ox, oy, box[2] + 1, box[3] + 1), scale)
        mask = Image.new("L", pattern.size, 0)
        mdraw = ImageDraw.Draw(mask)
        local_box = [box[0] - ox, box[1] - oy, box[2] - ox, box[3] - oy]
        if poly is None:
            mdraw.ellipse(local_box, fill=255)
        else:
            mdraw.polygon([(x - ox, y - oy) for x, y in poly], fill=255)
        canvas.paste(pattern, (ox, oy), mask)
        edge = _mix(RGB[o.color], (0, 0, 0), 0.35)
        width = max(2, round(1.6 * scale))
        if poly is None:
            draw.ellipse(box, outline=edge, width=width)
        else:
            draw.polygon(poly, outline=edge, width=width)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def render_tokens(tokens: Sequence[int], size: int = 96) -> Image.Image:
    """Render an image-token sequence of ``ImageTokenizer`` (decoded leniently: extra objects past four are
    dropped, no objects gives the bare grid). Raises ValueError for a malformed sequence, like ``decode``."""
    from silmm_fast.loop.world.tokenizer import ImageTokenizer

    return render(ImageTokenizer().decode(tokens, strict=False), size=size)


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: float) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        words = para.split()
        line = ""
        for word in words:
            trial = f"{line} {word}".strip()
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def render_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    tile_size: int | None = None,
    title: str | None = None,
    font_size: int = 11,
) -> Image.Image:
    """One RGB image laying ``images`` out in a grid, each tile with its caption (wrapped to the tile width; "\\n"
    breaks lines) underneath, and an optional ``title`` line on top. Used to browse candidate generations.

    Args:
        images: PIL images (resized to ``tile_size`` squares when given, else all must share one size).
        captions: one str per image, or None for none.
        columns: tiles per row (default: ceil(sqrt(n))).
        tile_size: side of each tile in pixels.
        title: text above the grid.
        font_size: caption font size in pixels.

    Raises:
        TypeError / ValueError: empty ``images``, a non-image element, captions of another length, sizes that
            differ without ``tile_size``, non-positive ``columns`` / ``tile_size`` / ``font_size``.
    """
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise TypeError(f"images: expected a sequence of PIL images, got {type(images).__name__}")
    if not images:
        raise ValueError("images: expected at least one image, got none")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"images[{i}]: expected a PIL.Image.Image, got {type(im).__name__}")
    if captions is not None:
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(f"captions: expected a sequence of str, got {type(captions).__name__}")
        if len(captions) != len(images):
            raise ValueError(f"captions: expected {len(images)} captions (one per image), got {len(captions)}")
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TypeError(f"captions[{i}]: expected a str, got {type(c).__name__}")
    for name, value in (("columns", columns), ("tile_size", tile_size), ("font_size", font_size)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    if tile_size is not None:
        tiles = [im.convert("RGB").resize((tile_size, tile_size), Image.Resampling.LANCZOS) for im in images]
    else:
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"images: sizes differ {sorted(sizes)}; pass tile_size to resize them")
        tiles = [im.convert("RGB") for im in images]
    tw, th = tiles[0].size
    cols = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    font = _font(font_size)
    line_h = font_size + 3
    pad = 6
    wrapped = [_wrap(c, font, tw) for c in captions] if captions is not None else [[] for _ in tiles]
    cap_h = max(len(w) for w in wrapped) * line_h + (pad // 2 if captions is not None else 0)
    width = cols * tw + (cols + 1) * pad
    title_lines = _wrap(title, font, width - 2 * pad) if title else []
    top = pad + len(title_lines) * (line_h + 2)
    height = top + rows * (th + cap_h + pad)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad // 2 + i * (line_h + 2)), line, fill=(0, 0, 0), font=font)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        r, c = divmod(i, cols)
        x = pad + c * (tw + pad)
        y = top + r * (th + cap_h + pad)
        out.paste(tile, (x, y))
        draw.rectangle([x - 1, y - 1, x + tw, y + th], outline=(190, 190, 190))
        for k, line in enumerate(lines):
            draw.text((x, y + th + pad // 2 + k * line_h), line, fill=(30, 30, 30), font=font)
    return out


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as a PNG to ``path`` (parent folders are created); returns the path."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL.Image.Image, got {type(image).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    image.save(p, format="PNG")
    return p
