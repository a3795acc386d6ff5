"""The word shift of a ShapesLMM's input embedding: inside a question, each word also carries the words before it.

A question like "is there a red circle?" is answered by looking, at the word "circle", for an object that is a red
circle. The decoder can only do that once "red" has reached the position of "circle"; before that, the lookup at
"circle" finds every circle, and a model trained from scratch settles on checking each word on its own ("red"
somewhere, a circle somewhere), which answers yes beside a red star and a purple circle (docs/results.md has the
measurements).

``WordShift`` wraps the model's token embedding (a plain ``nn.Embedding`` or the structured ``ImageEmbedding``) and
adds, at every token of a question (from its ``open`` token through its ``close`` token: "<q> … <a>"),
``sum_i W_i · e(token i places back)`` over the ``shift`` tokens before it, with learned ``W_i`` that start at zero
(a fresh model starts as without it). Image tokens and pads give nothing: an image token stays the embedding of its
object alone. Only questions take the shift: over every word it would also change how the model reads the prompts
it draws and decomposes, for the worse.

A KV-cached continuation embeds its new ids with ``previous``: the ids just before them in each row. A question
is given whole within one call (training sequences are; ``ShapesLMM.answer`` feeds each question, from its "<q>",
as one continuation), so ``previous`` only supplies the words a question's first tokens take in.
"""

from __future__ import annotations

import torch
from torch import nn

from silmm_fast.loop.models.image_embedding import ImageEmbedding
from silmm_fast.loop.models.vocab import JointVocab


class WordShift(nn.Module):
    """``inner`` (the token embedding) plus, inside questions, learned maps of the ``shift`` preceding tokens.

    Args:
        inner: the model's token embedding (``nn.Embedding`` or ``ImageEmbedding``).
        vocab: the joint vocabulary (image tokens, the pad, and the "<q>" / "<a>" tokens that open and close a
            question).
        shift: how many preceding tokens each question token takes in (>= 1).
    """

    def __init__(self, inner: nn.Module, vocab: JointVocab, shift: int) -> None:
        super().__init__()
        if not isinstance(shift, int) or isinstance(shift, bool) or shift < 1:
            raise ValueError(f"shift: expected a positive int, got {shift!r}")
        self.inner = inner
        self.image_offset, self.pad = vocab.image_offset, vocab.pad
        self.open, self.close = vocab.q, vocab.a
        dim = self.base.embedding_dim
        self.maps = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(shift))
        for m in self.maps:
            nn.init.zeros_(m.weight)

    @property
    def base(self) -> nn.Embedding:
        """The plain token embedding inside ``inner`` (what a token gives to the question tokens after it)."""
        return self.inner.base if isinstance(self.inner, ImageEmbedding) else self.inner

    @property
    def shift(self) -> int:
        """How many preceding tokens each question token takes in."""
        return len(self.maps)

    def in_question(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool [B, T]: the positions of ``ids`` from a "<q>" through the next "<a>" (both included)."""
        opened = (ids == self.open).long().cumsum(-1)
        closed = (ids == self.close).long()
        return (opened - closed.cumsum(-1) + closed) > 0

    def forward(
        self, ids: torch.Tensor, images_before: torch.Tensor | None = None, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings [B, T, H] of ``ids`` [B, T]. ``images_before`` goes to an ``ImageEmbedding`` (see there);
        ``previous`` [B, P] holds the ids just before ``ids[:, 0]`` in each row (default: none, the row starts
        here); its last ``shift`` columns are used, and a row with fewer real ids pads them with the pad id."""
        emb = self.inner(ids, images_before) if isinstance(self.inner, ImageEmbedding) else self.inner(ids)
        takes = self.in_question(ids)
        if not bool(takes.any()):
            return emb
        k = self.shift
        if previous is None:
            previous = ids.new_full((ids.shape[0], k), self.pad)
        elif previous.shape[1] < k:
            fill = previous.new_full((previous.shape[0], k - previous.shape[1]), self.pad)
            previous = torch.cat([fill, previous], dim=1)
        history = torch.cat([previous[:, -k:].to(ids.device), ids], dim=1)
        gives = (history < self.image_offset) & (history != self.pad)
        given = self.base(history) * gives[..., None].to(emb.dtype)
        t = ids.shape[1]
        shifted = sum(m(given[:, k - i : k - i + t]) for i, m in enumerate(self.maps, start=1))
        return emb + shifted * takes[..., None].to(emb.dtype)
