"""The word shift of the input embedding: against a per-position float64 reference, zero at initialization, only
question tokens taking it, image tokens and pads giving nothing, left padding and KV-cached continuations computing
what the whole row computes."""

import pytest
import torch
from torch import nn

from silmm_fast.loop.models.image_embedding import ImageEmbedding
from silmm_fast.loop.models.shapes_lmm import ShapesLMMConfig
from silmm_fast.loop.models.vocab import JointVocab
from silmm_fast.loop.models.word_shift import WordShift

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vocab():
    config = ShapesLMMConfig.for_world()
    return JointVocab(config.words, config.categories, config.num_image_tokens)


def _shift(vocab, shift=2, structured=False, dtype=torch.float32):
    torch.manual_seed(0)
    inner = nn.Embedding(vocab.size, 8)
    if structured:
        inner = ImageEmbedding(inner, vocab, words=True, cells=True, init_std=1.0)
    embed = WordShift(inner, vocab, shift).to(dtype)
    with torch.no_grad():
        for m in embed.maps:
            m.weight.normal_()
    return embed


def _reference(embed, vocab, ids):
    """Per position: the inner embedding, plus at the tokens of a question ("<q>" through "<a>") the maps of the
    tokens 1..shift places back that are neither image tokens nor pads (float64)."""
    out = embed.inner(ids).double()
    table = embed.base.weight.double()
    gives = (ids < embed.image_offset) & (ids != embed.pad)
    for b in range(ids.shape[0]):
        inside = False
        for t in range(ids.shape[1]):
            inside = inside or int(ids[b, t]) == vocab.q
            if inside:
                for i, m in enumerate(embed.maps, start=1):
                    if t - i >= 0 and gives[b, t - i]:
                        out[b, t] += m.weight.double() @ table[ids[b, t - i]]
            inside = inside and int(ids[b, t]) != vocab.a
    return out


def _row(vocab, *words):
    return [vocab.token_id(w) if isinstance(w, str) else w for w in words]


def test_matches_the_reference_inside_questions_only(vocab):
    embed = _shift(vocab, shift=2, dtype=torch.float64)
    img = vocab.image_offset + 7
    ids = torch.tensor(
        [
            _row(vocab, "<bos>", "<img>", img, img, "</img>", "<q>", "is", "there", "a", "red", "circle", "<a>", "yes"),
            _row(
                vocab,
                "<pad>",
                "<pad>",
                "<bos>",
                "<q>",
                "red",
                img,
                "circle",
                "?",
                "<a>",
                "red",
                "<pad>",
                "<pad>",
                "<pad>",
            ),
            _row(
                vocab,
                "<bos>",
                "<gen>",
                "a",
                "red",
                "circle",
                "<img>",
                img,
                img,
                "<pad>",
                "<pad>",
                "<pad>",
                "<pad>",
                "<pad>",
            ),
        ]
    )
    out = embed(ids)
    torch.testing.assert_close(out, _reference(embed, vocab, ids), rtol=1e-12, atol=1e-12)
    plain = embed.inner(ids)
    inside = embed.in_question(ids)
    assert inside[0].tolist() == [False] * 5 + [True] * 7 + [False]
    assert torch.equal(out[~inside], plain[~inside])  # a prompt, an image, an answer take nothing
    assert not torch.allclose(out[0, 6:12], plain[0, 6:12])  # a question's tokens do
    # an image token gives nothing: "circle" right after one takes only "red", two places back
    torch.testing.assert_close(out[1, 6], plain[1, 6] + embed.maps[1](embed.base.weight[vocab.token_id("red")]))


def test_starts_as_the_plain_embedding(vocab):
    inner = nn.Embedding(vocab.size, 8)
    embed = WordShift(inner, vocab, 3)
    ids = torch.tensor([_row(vocab, "<bos>", "<q>", "is", "there", "a", "red", "circle", "<a>")])
    assert torch.equal(embed(ids), inner(ids)) and embed.shift == 3


@pytest.mark.parametrize("structured", [False, True])
def test_left_padding_and_continuations_compute_the_whole_row(vocab, structured):
    embed = _shift(vocab, shift=2, structured=structured)
    img = vocab.image_offset + 11
    row = _row(vocab, "<bos>", "<img>", img, img, img, "</img>", "<q>", "is", "there", "a", "red", "circle", "<a>")
    whole = embed(torch.tensor([row]))
    padded = embed(torch.tensor([[vocab.pad] * 3 + row]))[:, 3:]
    torch.testing.assert_close(padded, whole)
    for cut in (1, 2, 5, 6):  # a cached prefix, then the rest (each question whole) given the ids just before it
        images = torch.tensor([sum(t >= vocab.image_offset for t in row[:cut])])
        rest = embed(torch.tensor([row[cut:]]), images, torch.tensor([row[:cut]]))
        torch.testing.assert_close(rest, whole[:, cut:])
    # without `previous` the question's "<q>" would miss the "</img>" before it
    alone = embed(torch.tensor([row[6:]]), torch.tensor([3]))
    assert not torch.allclose(alone[:, 0], whole[:, 6]) and torch.allclose(alone[:, 2:], whole[:, 8:])


def test_bad_shift(vocab):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="shift"):
            WordShift(nn.Embedding(vocab.size, 8), vocab, bad)
