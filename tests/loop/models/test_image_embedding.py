"""The structured image-token embedding: attribute words and cell vectors added at image tokens only, cells counted
within each row and continued across a KV cache."""

import pytest
import torch
from torch import nn

from silmm_fast.loop.models.image_embedding import ImageEmbedding
from silmm_fast.loop.models.shapes_lmm import ShapesLMMConfig
from silmm_fast.loop.models.vocab import JointVocab
from silmm_fast.loop.world import ImageTokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vocab():
    config = ShapesLMMConfig.for_world()
    return JointVocab(config.words, config.categories, config.num_image_tokens)


def _embedding(vocab, words, cells):
    torch.manual_seed(0)
    return ImageEmbedding(nn.Embedding(vocab.size, 16), vocab, words=words, cells=cells)


def test_words_add_the_attribute_words_of_object_tokens_only(vocab):
    embed = _embedding(vocab, words=True, cells=False)
    tokenizer = ImageTokenizer()
    red_circle = tokenizer.token_of("circle", "red", "striped")
    ids = torch.tensor([[vocab.token_id("red"), vocab.image_offset + red_circle, vocab.image_offset]])
    out = embed(ids)[0]
    table = embed.base.weight
    assert torch.equal(out[0], table[vocab.token_id("red")])  # words are untouched
    words = sum(table[vocab.token_id(w)] for w in ("circle", "red", "striped"))
    expected = table[vocab.image_offset + red_circle] + words
    torch.testing.assert_close(out[1], expected)
    assert torch.equal(out[2], table[vocab.image_offset])  # the empty cell gets nothing added


def test_cells_count_image_tokens_per_row_and_continue_after_images_before(vocab):
    embed = _embedding(vocab, words=False, cells=True)
    empty = vocab.image_offset
    ids = torch.tensor([[vocab.bos, vocab.img, empty, empty, empty], [vocab.pad, vocab.pad, vocab.img, empty, empty]])
    out = embed(ids)
    table, cells = embed.base.weight, embed.cells.weight
    assert torch.equal(out[0, 0], table[vocab.bos]) and torch.equal(out[1, 0], table[vocab.pad])
    for cell in range(3):
        torch.testing.assert_close(out[0, 2 + cell], table[empty] + cells[cell])
    for cell in range(2):  # left padding does not shift the cells
        torch.testing.assert_close(out[1, 3 + cell], table[empty] + cells[cell])
    # one token at a time, as a KV-cached decoder feeds them, lands in the same cells as the whole row
    steps = [embed(ids[:1, t : t + 1], torch.tensor([max(0, t - 2)])) for t in range(2, 5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), out[:1, 2:])
    # text-only ids pass straight through
    assert torch.equal(embed(ids[:, :2]), table[ids[:, :2]])
