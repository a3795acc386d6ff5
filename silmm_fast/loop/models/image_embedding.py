"""The structured image-token embedding of a ShapesLMM: what an image token tells the model about its cell.

Real LMMs read images through a vision encoder whose features already describe what is where (Janus even keeps the
understanding encoder apart from the generation tokenizer). The built-in model's counterpart is this embedding: an
image token's learned vector, plus the embeddings of the words naming its shape, color and texture (``words``), plus
a learned vector of its grid cell (``cells``), so a fresh model learns to answer questions about images quickly
(docs/results.md). A Llama decoder carries no absolute position in its residual stream (RoPE only tilts attention
scores), so without ``cells`` an image token does not know which cell it holds.

A token's cell is its index among the image tokens of its row (every sequence holds at most one image), counted
from ``images_before`` — the image tokens a KV cache already holds for that row when the ids are a continuation.
"""

from __future__ import annotations

import torch
from torch import nn

from silmm_fast.loop.models.vocab import JointVocab


class ImageEmbedding(nn.Module):
    """``base`` (the model's token embedding) plus, at image tokens, attribute words and / or cell vectors.

    Args:
        base: the token embedding (``nn.Embedding`` over the joint vocabulary); words are embedded by it alone.
        vocab: the joint vocabulary (image token k has id ``vocab.image_offset + k``).
        words: add the embeddings of the three words naming the token's shape, color and texture (nothing for the
            empty-cell token).
        cells: add a learned vector per grid cell.
        init_std: standard deviation of the cell vectors' initialization.
    """

    def __init__(self, base: nn.Embedding, vocab: JointVocab, words: bool, cells: bool, init_std: float = 0.02):
        super().__init__()
        from silmm_fast.loop.world.tokenizer import ImageTokenizer

        self.base = base
        tokenizer = ImageTokenizer()
        self.image_offset, self.num_image_tokens = vocab.image_offset, tokenizer.num_tokens
        table = None
        if words:
            table = torch.zeros(tokenizer.num_tokens, 3, dtype=torch.long)
            for k in range(tokenizer.num_tokens):
                attributes = tokenizer.attributes_of(k)
                if attributes is not None:
                    table[k] = torch.tensor([vocab.token_id(w) for w in attributes])
        self.register_buffer("words", table, persistent=False)  # None: no words added
        self.register_buffer("has_words", None if table is None else table.ne(0).any(-1), persistent=False)
        self.cells = nn.Embedding(tokenizer.seq_len, base.embedding_dim) if cells else None
        if self.cells is not None:
            nn.init.normal_(self.cells.weight, std=init_std)

    def forward(self, ids: torch.Tensor, images_before: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings [B, T, H] of ``ids`` [B, T]; ``images_before`` [B] (default zeros): image tokens preceding
        ``ids[:, 0]`` in each row, so the first image token of ``ids`` sits in that cell."""
        emb = self.base(ids)
        is_image = ids >= self.image_offset
        if not bool(is_image.any()):
            return emb
        local = (ids - self.image_offset).clamp(0, self.num_image_tokens - 1)
        added = torch.zeros_like(emb)
        if self.words is not None:
            words = self.base(self.words[local]).sum(-2)
            added = added + words * self.has_words[local, None].to(emb.dtype)
        if self.cells is not None:
            cell = is_image.long().cumsum(-1) - 1
            if images_before is not None:
                cell = cell + images_before.to(cell.device)[:, None]
            added = added + self.cells(cell.clamp(0, self.cells.num_embeddings - 1))
        return torch.where(is_image[..., None], emb + added, emb)
