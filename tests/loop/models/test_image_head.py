"""The factored image-token head: effective rows, the factorization identity, and its place in a ShapesLMM."""

import pytest
import torch
from torch import nn

from silmm_fast.loop.models.image_head import FactoredImageHead
from silmm_fast.loop.models.shapes_lmm import ShapesLMM, ShapesLMMConfig
from silmm_fast.loop.models.vocab import JointVocab
from silmm_fast.loop.world import CATEGORIES, COLORS, SHAPES, TEXTURES, WORDS, ImageTokenizer


def _head(hidden: int = 8, seed: int = 0) -> tuple[FactoredImageHead, JointVocab]:
    torch.manual_seed(seed)
    vocab = JointVocab(WORDS, CATEGORIES, ImageTokenizer().num_tokens)
    head = FactoredImageHead(nn.Linear(hidden, vocab.size, bias=False), vocab, init_std=1.0)
    return head, vocab


def _row(vocab: JointVocab, shape: str, color: str, texture: str) -> int:
    tok = ImageTokenizer()
    k = next(k for k in range(tok.num_tokens) if tok.attributes_of(k) == (shape, color, texture))
    return vocab.image_offset + k


def test_object_rows_are_sums_of_attribute_vectors_and_other_rows_are_the_base():
    head, vocab = _head()
    w, a = head.weight.detach(), head.attributes.detach()
    row = _row(vocab, "circle", "red", "striped")
    want = a[SHAPES.index("circle")] + a[len(SHAPES) + COLORS.index("red")]
    want = want + a[len(SHAPES) + len(COLORS) + TEXTURES.index("striped")]
    torch.testing.assert_close(w[row], want)
    empty = vocab.image_offset  # image token 0: the empty cell keeps its own row, as do words and special tokens
    for r in (empty, vocab.token_id("red"), vocab.bos):
        torch.testing.assert_close(w[r], head.base.weight.detach()[r])
    assert int(head.object_rows.sum()) == ImageTokenizer().num_tokens - 1
    h = torch.randn(3, 8)
    torch.testing.assert_close(head(h), h @ w.T)


def test_factorization_lets_an_unseen_combination_score_like_its_parts():
    # logit(red circle) - logit(red star) does not depend on the color: what is learned about drawing circles
    # instead of stars reaches the red circle even if only blue circles were ever targets
    head, vocab = _head(seed=1)
    logits = head(torch.randn(5, 8)).detach()
    for texture in TEXTURES:
        red = logits[:, _row(vocab, "circle", "red", texture)] - logits[:, _row(vocab, "star", "red", texture)]
        blue = logits[:, _row(vocab, "circle", "blue", texture)] - logits[:, _row(vocab, "star", "blue", texture)]
        torch.testing.assert_close(red, blue)


def test_training_other_combinations_raises_an_unseen_one():
    head, vocab = _head(seed=2)
    h = torch.randn(16, 8)
    unseen, seen = (
        _row(vocab, "circle", "red", "plain"),
        [
            _row(vocab, "circle", "blue", "plain"),
            _row(vocab, "star", "red", "plain"),
        ],
    )
    before = torch.log_softmax(head(h), -1)[:, unseen].mean()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(30):
        logp = torch.log_softmax(head(h), -1)
        loss = -logp[:, seen].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.log_softmax(head(h), -1)[:, unseen].mean()
    assert after > before + 1.0, (float(before), float(after))


def test_factored_head_in_a_shapes_lmm_and_bad_input():
    config = ShapesLMMConfig.for_world(
        "discrete", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, image_head="factored"
    )
    model = ShapesLMM(config).eval()
    assert isinstance(model.lm.lm_head, FactoredImageHead)
    ids = torch.tensor([[model.vocab.bos, model.vocab.gen, model.vocab.img]])
    out = model.lm(input_ids=ids)
    hidden = model.lm.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out.logits, hidden @ model.lm.lm_head.weight.T)
    with pytest.raises(ValueError, match="image_head"):
        ShapesLMMConfig.for_world("discrete", image_head="tied")
    with pytest.raises(ValueError, match="image_head.*discrete"):
        ShapesLMMConfig.for_world("continuous", image_head="factored")
    with pytest.raises(ValueError, match="bias"):
        FactoredImageHead(nn.Linear(8, model.vocab.size), model.vocab)
