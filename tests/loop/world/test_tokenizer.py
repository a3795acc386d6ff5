"""Exact scene ⇄ tokens and scene ⇄ features round trips, and malformed input."""

import random

import pytest
import torch

from silmm_fast.loop.world import COLORS, SHAPES, TEXTURES, FeatureCodec, ImageTokenizer, Obj, Scene, random_scene


@pytest.fixture(scope="module")
def tok():
    return ImageTokenizer()


@pytest.fixture(scope="module")
def codec():
    return FeatureCodec()


def _scenes(n=300, seed=0):
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


# --- ImageTokenizer -----------------------------------------------------------------------------------------------


def test_sizes_and_documented_mapping(tok):
    assert tok.num_tokens == 1 + len(SHAPES) * len(COLORS) * len(TEXTURES) == 91
    assert tok.seq_len == 9
    # token = 1 + (shape * |C| + color) * |T| + texture; cell (r, c) at index r * 3 + c
    assert tok.token_of("circle", "red", "plain") == 1
    assert tok.token_of("square", "green", "dotted") == 1 + (1 * 6 + 1) * 3 + 2
    s = Scene([Obj("square", "green", "dotted", 1, 2)])
    assert tok.encode(s) == [0, 0, 0, 0, 0, 24, 0, 0, 0]


def test_every_token_decodes_to_its_attributes(tok):
    seen = set()
    for t in range(1, tok.num_tokens):
        attrs = tok.attributes_of(t)
        assert tok.token_of(*attrs) == t
        seen.add(attrs)
    assert len(seen) == tok.num_tokens - 1 and tok.attributes_of(0) is None


def test_round_trip(tok):
    for s in _scenes():
        ids = tok.encode(s)
        assert len(ids) == tok.seq_len and all(0 <= i < tok.num_tokens for i in ids)
        assert sum(i != 0 for i in ids) == len(s)
        assert tok.decode(ids) == s
        assert tok.decode(torch.tensor(ids)) == s
        assert tok.decode(tuple(ids), strict=False) == s


def test_batch_round_trip(tok):
    scenes = _scenes(20, seed=1)
    batch = tok.encode_batch(scenes)
    assert batch.shape == (20, 9) and batch.dtype == torch.long
    assert tok.decode_batch(batch) == scenes
    assert tok.decode_batch(batch.tolist()) == scenes


@pytest.mark.parametrize(
    "tokens, match",
    [
        ([0] * 8 + [1, 1], "expected 9 ids"),
        ([1] * 8, "expected 9 ids"),
        ([0] * 8 + [91], r"tokens\[8\].*\[0, 91\)"),
        ([-1] + [0] * 8, r"tokens\[0\]"),
        ([0] * 9, "no objects"),
        ([1, 2, 3, 4, 5, 0, 0, 0, 0], "more than 4"),
    ],
)
def test_strict_decode_rejects_malformed(tok, tokens, match):
    with pytest.raises(ValueError, match=match):
        tok.decode(tokens)


def test_lenient_decode(tok):
    five = [1, 0, 2, 3, 0, 4, 5, 0, 0]
    s = tok.decode(five, strict=False)
    assert len(s) == 4 and s.at(2, 0) is None  # the fifth object in row-major order is dropped
    assert tok.encode(s) == [1, 0, 2, 3, 0, 4, 0, 0, 0]
    assert tok.decode([0] * 9, strict=False) == Scene.blank()
    with pytest.raises(ValueError, match="tokens"):
        tok.decode([0] * 8, strict=False)  # a wrong length never decodes
    with pytest.raises(ValueError, match="tokens"):
        tok.decode([0] * 8 + [200], strict=False)


def test_decode_type_errors(tok):
    with pytest.raises(TypeError, match="tokens"):
        tok.decode(torch.zeros(9))
    with pytest.raises(TypeError, match=r"tokens\[2\]"):
        tok.decode([0, 0, 1.0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(TypeError, match="tokens"):
        tok.decode("012345678")
    with pytest.raises(ValueError, match="tokens"):
        tok.decode(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="strict"):
        tok.decode([1] + [0] * 8, strict=None)
    with pytest.raises(TypeError, match="scene"):
        tok.encode([1, 0, 0])
    with pytest.raises(ValueError, match="token"):
        tok.attributes_of(91)


# --- FeatureCodec -------------------------------------------------------------------------------------------------


def test_codec_layout(codec):
    assert codec.dim == 48 and codec.seq_len == 9
    assert codec.blocks == ((1, 17), (17, 33), (33, 48))
    for table, names in zip(codec.tables, (SHAPES, COLORS, TEXTURES)):
        gram = table @ table.T
        assert table.shape[0] == len(names)
        assert torch.allclose(gram, torch.eye(len(names)), atol=1e-5)  # orthonormal rows
    s = Scene([Obj("star", "orange", "striped", 0, 1)])
    f = codec.encode(s)
    assert f.shape == (9, 48) and f.dtype == torch.float32
    assert f[1, 0] == 1.0 and f[0].abs().sum() == 0 and f[2:].abs().sum() == 0
    assert torch.equal(f[1, 17:33], codec.tables[1][COLORS.index("orange")])


def test_codec_round_trip(codec):
    scenes = _scenes(200, seed=2)
    for s in scenes:
        assert codec.decode(codec.encode(s)) == s
    batch = codec.encode_batch(scenes)
    assert batch.shape == (200, 9, 48)
    assert codec.decode_batch(batch) == scenes
    assert codec.decode_batch(batch.double()) == scenes


def test_codec_decodes_noisy_features(codec):
    gen = torch.Generator().manual_seed(0)
    scenes = _scenes(50, seed=3)
    feats = codec.encode_batch(scenes)
    noisy = feats + 0.08 * torch.randn(feats.shape, generator=gen)
    assert codec.decode_batch(noisy) == scenes


def test_codec_is_seeded():
    a, b, c = FeatureCodec(48, seed=0), FeatureCodec(48, seed=0), FeatureCodec(48, seed=1)
    s = random_scene(0)
    assert torch.equal(a.encode(s), b.encode(s))
    assert not torch.equal(a.encode(s), c.encode(s))
    small = FeatureCodec(19)
    assert small.decode(small.encode(s)) == s


def test_codec_lenient_and_errors(codec):
    f = codec.encode_batch(_scenes(2, seed=4))[0].clone()
    f[:, 0] = 1.0  # all nine cells claim an object
    with pytest.raises(ValueError, match="more than 4"):
        codec.decode(f)
    assert len(codec.decode(f, strict=False)) == 4
    assert codec.decode(torch.zeros(9, 48), strict=False) == Scene.blank()
    with pytest.raises(ValueError, match="no objects"):
        codec.decode(torch.zeros(9, 48))
    with pytest.raises(ValueError, match="features"):
        codec.decode(torch.zeros(9, 47))
    with pytest.raises(TypeError, match="features"):
        codec.decode(torch.zeros(9, 48, dtype=torch.long))
    bad = torch.zeros(9, 48)
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        codec.decode(bad)
    with pytest.raises(ValueError, match="dim"):
        FeatureCodec(18)
    with pytest.raises(TypeError, match="dim"):
        FeatureCodec(48.0)
    with pytest.raises(ValueError, match="features"):
        codec.decode_batch(torch.zeros(9, 48))
