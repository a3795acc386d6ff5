"""``ShapesAdapter``: the built-in world's ``ShapesLMM`` seen through the adapter protocol.

``ShapesLMM`` already has every SILMM step with the protocol's signatures; the wrapper adds what it lacks:
``decode_images`` (the world's renderer draws an image from its tokens), ``image_seq_len``, an
``image_logprob_inputs`` that returns an ``ImageLogprobInputs`` (its head has no bias), ``Sourced`` results for
``write_prompts`` / ``decompose`` (all written by the model) and the layer lookups ``decoder_layers`` /
``dropdiv_mlps``. Everything else is delegated unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from silmm_fast.loop.adapters.protocol import ImageLogprobInputs, RemembersSources, Sourced
from silmm_fast.loop.models.shapes_lmm import ShapesLMM


class ShapesAdapter(RemembersSources, nn.Module):
    """A ``ShapesLMM`` that implements ``ModelAdapter`` (and ``ContinuousAdapter`` for the continuous variant).

    Args:
        model: the ``ShapesLMM`` (kept as ``self.model``; its parameters are this module's parameters).
        image_size: side in pixels of the images ``decode_images`` renders.
    """

    def __init__(self, model: ShapesLMM, image_size: int = 96) -> None:
        super().__init__()
        if not isinstance(model, ShapesLMM):
            raise TypeError(f"model: expected a ShapesLMM, got {type(model).__name__}")
        self.model = model
        self.image_size = image_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_seq_len(self) -> int:
        """T, the world's image tokens per image."""
        return self.model.config.image_seq_len

    def decoder_layers(self) -> nn.ModuleList:
        """The Llama decoder blocks, in depth order."""
        return self.model.model.layers

    def dropdiv_mlps(self) -> list[nn.Module]:
        """The decoder layers' MLPs, in depth order (where ``silmm_fast.dropdiv`` adds dropout)."""
        return [layer.mlp for layer in self.decoder_layers()]

    def write_prompts(
        self,
        categories: Sequence[str],
        n: int,
        temperature: float = 1.0,
        top_p: float = 0.95,
        generator: torch.Generator | None = None,
        max_new_tokens: int = 32,
        noise: torch.Tensor | None = None,
    ) -> Sourced:
        """``ShapesLMM.write_prompts``; every prompt is the model's."""
        texts = self.model.write_prompts(categories, n, temperature, top_p, generator, max_new_tokens, noise)
        return self.remember("prompts", Sourced(texts))

    def generate_images(
        self,
        prompts: Sequence[str],
        n_samples: int = 1,
        top_p: float = 0.9,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model.generate_images(prompts, n_samples, top_p, temperature, generator, noise)

    def decode_images(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """uint8 [..., image_size, image_size, 3]: the world's rendering of each token sequence (lenient decoding)."""
        from silmm_fast.loop.world.render import render_tokens

        if not isinstance(image_tokens, torch.Tensor) or image_tokens.dtype.is_floating_point:
            raise TypeError("image_tokens: expected an integer tensor [..., image_seq_len]")
        tokens = image_tokens.long().cpu()
        if tokens.dim() < 1 or tokens.shape[-1] != self.model.config.image_seq_len:
            raise ValueError(
                f"image_tokens: expected shape [..., {self.model.config.image_seq_len}], got {tuple(tokens.shape)}"
            )
        flat = tokens.reshape(-1, tokens.shape[-1])
        pixels = [np.asarray(render_tokens(t.tolist(), size=self.image_size).convert("RGB")) for t in flat]
        out = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, self.image_size, self.image_size, 3)
        return out.to(torch.uint8).view(*tokens.shape[:-1], *out.shape[1:])

    def decompose(self, prompts: Sequence[str], max_new_tokens: int = 96) -> Sourced:
        """``ShapesLMM.decompose``; every question list is the model's."""
        return self.remember("questions", Sourced(self.model.decompose(prompts, max_new_tokens)))

    def answer(
        self, image_tokens: torch.Tensor, questions: Sequence[Sequence[str]], images_per_chunk: int = 256
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.model.answer(image_tokens, questions, images_per_chunk)

    def image_logprob_inputs(self, prompts: Sequence[str], image_tokens: torch.Tensor) -> ImageLogprobInputs:
        hidden, weight, labels = self.model.image_logprob_inputs(prompts, image_tokens)
        return ImageLogprobInputs(hidden, weight, labels)

    def feature_forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.feature_forward(prompts)

    def generate_features(self, prompts: Sequence[str], n_samples: int = 1) -> torch.Tensor:
        return self.model.generate_features(prompts, n_samples)

    def save(self, path: str | os.PathLike) -> None:
        """``ShapesLMM.save``: ``config.json`` and ``model.safetensors`` in the directory ``path``."""
        self.model.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ShapesAdapter:
        """``ShapesLMM.load``, wrapped."""
        return cls(ShapesLMM.load(path, device=device))
