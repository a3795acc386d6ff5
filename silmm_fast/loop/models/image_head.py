"""The factored image-token head of a discrete ShapesLMM: the output counterpart of the structured image embedding.

An atomic head gives every image token its own row of ``lm_head.weight``, so a token is only ever produced after
training has made it a target. The held-out prompts of the built-in world ask for attribute pairs that no training
prompt names ("a red circle"), so their tokens are never a generation target: their rows only ever learn to lose,
in exactly the contexts that ask for red things and for circles, and the model cannot draw what it has never drawn.

The factored head scores an image token that shows an object by the hidden state against the sum of three learned
vectors: one for its shape, one for its color, one for its texture. A red circle then scores high wherever red and
circle do, whether or not a red circle was ever a target, and what DPO teaches about drawing circles or red things
reaches every token that shows them. The empty-cell token and every word keep their own rows. The head is a
drop-in for ``lm_head``: ``weight`` is the effective [V, H] matrix (differentiable in the attribute vectors), which
is what ``fused_linear_logprobs`` and the DPO losses read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from silmm_fast.loop.models.vocab import JointVocab


class FactoredImageHead(nn.Module):
    """``lm_head`` whose rows for object-showing image tokens are sums of per-attribute vectors.

    Args:
        base: the model's ``lm_head`` (``nn.Linear(H, V)`` without bias); it keeps the rows of words, special tokens
            and the empty-cell token (its rows for object tokens are not read).
        vocab: the joint vocabulary (image token k has id ``vocab.image_offset + k``).
        init_std: standard deviation of the attribute vectors' initialization.
    """

    def __init__(self, base: nn.Linear, vocab: JointVocab, init_std: float = 0.02):
        super().__init__()
        from silmm_fast.loop.world import COLORS, SHAPES, TEXTURES
        from silmm_fast.loop.world.tokenizer import ImageTokenizer

        if base.bias is not None:
            raise ValueError("base: expected an lm_head without bias")
        self.base = base
        values = [*SHAPES, *COLORS, *TEXTURES]  # distinct words, so a value names its attribute vector
        tokenizer = ImageTokenizer()
        incidence = torch.zeros(base.out_features, len(values))
        for k in range(tokenizer.num_tokens):
            for value in tokenizer.attributes_of(k) or ():
                incidence[vocab.image_offset + k, values.index(value)] = 1.0
        self.register_buffer("incidence", incidence, persistent=False)
        self.register_buffer("object_rows", incidence.any(-1), persistent=False)
        self.attributes = nn.Parameter(torch.randn(len(values), base.in_features) * init_std)

    @property
    def weight(self) -> torch.Tensor:
        """The effective [V, H] head matrix."""
        own = self.base.weight.masked_fill(self.object_rows[:, None], 0.0)
        return own + self.incidence.to(own.dtype) @ self.attributes

    @property
    def bias(self) -> None:
        return None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of ``hidden`` [..., H]."""
        return F.linear(hidden, self.weight)
