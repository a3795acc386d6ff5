"""Scenes of the shapes world and their rendering."""

import random

import pytest
from PIL import Image

from silmm_fast.loop.world import (
    COLORS,
    GRID,
    SHAPES,
    TEXTURES,
    Obj,
    Scene,
    random_scene,
    render,
    render_grid,
    render_tokens,
    save_png,
)
from silmm_fast.loop.world.render import BACKGROUND, RGB
from silmm_fast.loop.world.tokenizer import ImageTokenizer


def test_vocabulary_sizes():
    assert GRID == 3
    assert len(SHAPES) >= 5 and len(COLORS) >= 6 and len(TEXTURES) >= 3
    assert "plain" in TEXTURES
    assert set(RGB) == set(COLORS)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(shape="cube"), ValueError, "shape"),
        (dict(shape=3), TypeError, "shape"),
        (dict(color="teal"), ValueError, "color"),
        (dict(texture="wooden"), ValueError, "texture"),
        (dict(row=3), ValueError, "row"),
        (dict(col=-1), ValueError, "col"),
        (dict(row=True), TypeError, "row"),
        (dict(col=1.0), TypeError, "col"),
    ],
)
def test_obj_rejects_bad_attributes(kwargs, exc, name):
    base = dict(shape="circle", color="red", texture="plain", row=0, col=0)
    with pytest.raises(exc, match=name):
        Obj(**{**base, **kwargs})


def test_scene_validation():
    a = Obj("circle", "red", "plain", 0, 0)
    with pytest.raises(ValueError, match="objects"):
        Scene(())
    with pytest.raises(ValueError, match="objects"):
        Scene([Obj("star", "blue", "dotted", r, c) for r, c in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]])
    with pytest.raises(ValueError, match="one object per cell"):
        Scene([a, Obj("star", "blue", "dotted", 0, 0)])
    with pytest.raises(TypeError, match=r"objects\[1\]"):
        Scene([a, "star"])
    with pytest.raises(TypeError, match="objects"):
        Scene(a)


def test_scene_is_a_value_sorted_row_major():
    a = Obj("circle", "red", "plain", 2, 1)
    b = Obj("star", "blue", "dotted", 0, 2)
    c = Obj("hexagon", "green", "striped", 1, 0)
    s1, s2 = Scene([a, b, c]), Scene((c, a, b))
    assert s1 == s2 and hash(s1) == hash(s2)
    assert s1.objects == (b, c, a)
    assert s1.at(2, 1) == a and s1.at(1, 1) is None
    assert len(s1) == 3 and (1, 1) in s1.free_cells() and (0, 2) not in s1.free_cells()
    assert "dotted blue star @(0,2)" in s1.describe()


def test_blank_scene():
    blank = Scene.blank()
    assert len(blank) == 0 and blank == Scene.blank()
    assert len(blank.free_cells()) == GRID * GRID


def test_random_scene_is_valid_and_deterministic():
    counts = set()
    for seed in range(200):
        s = random_scene(random.Random(seed))
        assert 1 <= len(s) <= 4
        counts.add(len(s))
        assert s == random_scene(seed)
    assert counts == {1, 2, 3, 4}
    assert len(random_scene(random.Random(0), n_objects=4)) == 4


def test_random_scene_bad_input():
    with pytest.raises(ValueError, match="n_objects"):
        random_scene(random.Random(0), n_objects=5)
    with pytest.raises(ValueError, match="n_objects"):
        random_scene(random.Random(0), n_objects=0)
    with pytest.raises(TypeError, match="n_objects"):
        random_scene(random.Random(0), n_objects=2.0)
    with pytest.raises(TypeError, match="rng"):
        random_scene("seed")


# --- rendering ----------------------------------------------------------------------------------------------------


def _cell(img: Image.Image, row: int, col: int) -> Image.Image:
    c = img.size[0] / GRID
    return img.crop((round(col * c), round(row * c), round((col + 1) * c), round((row + 1) * c)))


def test_render_size_and_mode():
    s = random_scene(3)
    for size in (64, 96, 129):
        img = render(s, size=size)
        assert img.size == (size, size) and img.mode == "RGB"


def test_render_distinct_scenes_give_distinct_images():
    images = {}
    for shape in SHAPES:
        for color in COLORS:
            for texture in TEXTURES:
                img = render(Scene([Obj(shape, color, texture, 1, 1)]), size=64)
                images[(shape, color, texture)] = img.tobytes()
    assert len(set(images.values())) == len(images)
    moved = render(Scene([Obj("circle", "red", "plain", 0, 2)]), size=64).tobytes()
    assert moved != images[("circle", "red", "plain")]


def test_render_draws_colors_and_patterns_in_the_right_cell():
    img = render(
        Scene([Obj("square", "blue", "plain", 0, 0), Obj("square", "red", "striped", 2, 2)]),
        size=96,
    )
    center = _cell(img, 0, 0).getpixel((16, 16))
    assert max(abs(a - b) for a, b in zip(center, RGB["blue"])) < 10
    assert img.getpixel((48, 48)) == BACKGROUND  # the empty middle cell
    striped = [px for _, px in _cell(img, 2, 2).crop((8, 8, 24, 24)).getcolors(4096)]
    near_red = [p for p in striped if max(abs(a - b) for a, b in zip(p, RGB["red"])) < 30]
    pale = [p for p in striped if min(p) > 200]
    assert near_red and pale  # stripes of the color over a pale tint


def test_render_blank_scene_is_the_bare_grid():
    img = render(Scene.blank(), size=96)
    colors = img.getcolors(4096)
    assert max(colors)[1] == BACKGROUND
    assert all(max(px) - min(px) <= 6 for _, px in colors)  # greys only: background and grid lines
    assert any(max(px) < 230 for _, px in colors)  # the grid lines are there


def test_render_tokens_matches_render():
    s = random_scene(5)
    assert render_tokens(ImageTokenizer().encode(s), size=64).tobytes() == render(s, size=64).tobytes()


def test_render_bad_input():
    with pytest.raises(TypeError, match="scene"):
        render([Obj("circle", "red", "plain", 0, 0)])
    with pytest.raises(ValueError, match="size"):
        render(random_scene(0), size=16)
    with pytest.raises(TypeError, match="size"):
        render(random_scene(0), size=64.0)


def test_render_grid_layout_and_captions():
    images = [render(random_scene(i), size=64) for i in range(5)]
    captions = [f"candidate {i}\nscore 0.{i}" for i in range(5)]
    grid = render_grid(images, captions, columns=3, title="a red circle to the left of a blue square")
    assert grid.mode == "RGB"
    assert grid.size[0] >= 3 * 64 and grid.size[1] >= 2 * 64 + 2 * 2 * 11
    bare = render_grid(images, columns=3)
    assert bare.size[1] < grid.size[1]
    resized = render_grid(images + [render(random_scene(9), size=96)], tile_size=48, columns=6)
    assert resized.size[0] >= 6 * 48


def test_render_grid_bad_input():
    images = [render(random_scene(i), size=64) for i in range(2)]
    with pytest.raises(ValueError, match="captions"):
        render_grid(images, ["only one"])
    with pytest.raises(ValueError, match="images"):
        render_grid([])
    with pytest.raises(ValueError, match="tile_size"):
        render_grid([images[0], render(random_scene(0), size=96)])
    with pytest.raises(ValueError, match="columns"):
        render_grid(images, columns=0)
    with pytest.raises(TypeError, match=r"images\[1\]"):
        render_grid([images[0], "x"])


def test_save_png_round_trip(tmp_path):
    img = render(random_scene(7), size=80)
    path = save_png(img, tmp_path / "sub" / "scene.png")
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == (80, 80)
        assert back.convert("RGB").tobytes() == img.tobytes()
    with pytest.raises(TypeError, match="image"):
        save_png("not an image", tmp_path / "x.png")
