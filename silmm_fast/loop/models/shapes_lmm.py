"""ShapesLMM: the tiny multimodal model of the built-in shapes world, able to run every SILMM step itself.

A ``transformers.LlamaForCausalLM`` built in code from a small ``LlamaConfig`` over the joint vocabulary of
``silmm_fast.loop.models.vocab`` (words, special tokens, image tokens). The continuous variant adds L learned query-slot
embeddings appended after the prompt and a linear feature head (hidden → D) read at the slot positions.

Batching conventions, shared by every method:
- prompts are left-padded, with an attention mask and position ids counted from each row's first real token, so a
  padded row computes exactly what the same row would compute alone;
- autoregressive decoding runs one batched loop with the model's KV cache (``DynamicCache``);
- image tokens are exchanged as indices of the world's ``ImageTokenizer`` alphabet, in [0, num_image_tokens);
  only ``image_logprob_inputs`` speaks joint-vocabulary ids (its labels feed ``fused_linear_logprobs``).

In the continuous variant the model still *reads* images as tokens: an image's feature matrix is decoded to a scene
by the world's ``FeatureCodec`` and re-encoded by the ``ImageTokenizer`` before it is judged (``answer``), the way
a real continuous LMM looks at the rendered image through its vision encoder.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaModel

from silmm_fast._validate import (
    check_count,
    check_image_tokens,
    check_noise,
    check_prompts,
    check_sampling,
    images_per_prompt,
)
from silmm_fast.loop.models.batching import left_pad
from silmm_fast.loop.models.image_embedding import ImageEmbedding
from silmm_fast.loop.models.image_head import FactoredImageHead
from silmm_fast.loop.models.vocab import JointVocab
from silmm_fast.loop.models.word_shift import WordShift

VARIANTS = ("discrete", "continuous")
IMAGE_EMBEDDINGS = ("atomic", "structured")
IMAGE_HEADS = ("atomic", "factored")
# transformers renamed LlamaModel.forward's `past_key_values` to `cache` (the old name warns in 5.24, goes in 5.40).
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _tokenize(text: str) -> list[str]:
    from silmm_fast.loop.world.prompts import tokenize_text

    return tokenize_text(text)


@dataclass(frozen=True)
class ShapesLMMConfig:
    """Architecture of a ShapesLMM and the world it speaks about.

    The world fields (``words``, ``categories``, ``num_image_tokens``, ``image_seq_len``, ``feature_dim``,
    ``feature_slots``) fix the vocabulary and the output shapes; ``ShapesLMMConfig.for_world`` fills them from the
    built-in world. The remaining fields size the Llama decoder; ``image_embedding`` says how an image token is
    embedded: ``"atomic"`` (one learned vector per token) or ``"structured"`` (that vector plus the embeddings of
    the words naming its shape, color and texture plus a learned vector of its cell: ``models.image_embedding``);
    ``image_head`` how the discrete variant scores the image tokens it draws: ``"atomic"`` (one row of ``lm_head`` per
    token) or ``"factored"`` (a token showing an object scores by the sum of vectors of its shape, color and texture,
    so it can be drawn before it was ever a target: ``models.image_head``); ``word_shift`` how many preceding tokens
    each token of a question takes in through learned maps of their embeddings (0: none; ``models.word_shift``);
    ``feature_slot_start`` where the continuous variant's query slots sit: 0 right after the prompt, so that a slot
    sees the prompt's words at offsets that change with the prompt's length, or a fixed position (slot j at
    ``feature_slot_start + j``, every prompt shorter than it), so that a slot sees the n-th word of every prompt at
    the same offset.
    """

    words: tuple[str, ...]
    categories: tuple[str, ...]
    num_image_tokens: int
    image_seq_len: int = 9
    variant: str = "discrete"
    feature_dim: int = 0
    feature_slots: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 160
    image_embedding: str = "atomic"
    image_head: str = "atomic"
    word_shift: int = 0
    feature_slot_start: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(self.words))
        object.__setattr__(self, "categories", tuple(self.categories))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.image_embedding not in IMAGE_EMBEDDINGS:
            raise ValueError(f"image_embedding: expected one of {IMAGE_EMBEDDINGS}, got {self.image_embedding!r}")
        if self.image_head not in IMAGE_HEADS:
            raise ValueError(f"image_head: expected one of {IMAGE_HEADS}, got {self.image_head!r}")
        if self.image_head != "atomic" and self.variant != "discrete":
            raise ValueError(f"image_head: {self.image_head!r} needs the discrete variant, which draws image tokens")
        for name in ("num_image_tokens", "image_seq_len", "hidden_size", "intermediate_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of hidden_size={self.hidden_size}")
        if not isinstance(self.word_shift, int) or isinstance(self.word_shift, bool) or self.word_shift < 0:
            raise ValueError(f"word_shift: expected an int >= 0, got {self.word_shift!r}")
        start = self.feature_slot_start
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"feature_slot_start: expected an int >= 0, got {start!r}")
        if start and start + self.feature_slots > self.max_positions:
            raise ValueError(
                f"feature_slot_start: {start} + feature_slots {self.feature_slots} exceeds max_positions "
                f"{self.max_positions}"
            )
        if self.variant == "continuous" and (self.feature_dim < 1 or self.feature_slots < 1):
            raise ValueError("feature_dim, feature_slots: the continuous variant needs both positive")

    @classmethod
    def for_world(cls, variant: str = "discrete", **sizes: int | str) -> ShapesLMMConfig:
        """A config over the built-in shapes world (its words, categories, image tokens and feature codec)."""
        from silmm_fast.loop.world.prompts import CATEGORIES, WORDS
        from silmm_fast.loop.world.tokenizer import FeatureCodec, ImageTokenizer

        tok = ImageTokenizer()
        codec = FeatureCodec()
        return cls(
            words=tuple(WORDS),
            categories=tuple(CATEGORIES),
            num_image_tokens=tok.num_tokens,
            image_seq_len=tok.seq_len,
            variant=variant,
            feature_dim=codec.dim if variant == "continuous" else 0,
            feature_slots=codec.seq_len if variant == "continuous" else 0,
            **sizes,
        )

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["words"], d["categories"] = list(self.words), list(self.categories)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShapesLMMConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)


def detokenize(words: Sequence[str]) -> str:
    """Words back to text: spaces between words, none before punctuation ("circle ?" → "circle?")."""
    text = ""
    for w in words:
        text += w if (not text or not w[0].isalnum()) else " " + w
    return text


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: greedy when ``temperature`` is 0, else nucleus (top-p) sampling by an
    inverse-CDF draw with one uniform number per row, through ``silmm_fast.sample_tokens``.

    Each row b draws with its own ``noise[b]`` in [0, 1) (float [B]; default ``torch.rand(B, generator=generator)``),
    so a row's token depends only on its logits and its noise, never on the other rows of the batch (the rules, ties
    included, are ``sample_tokens``'). Disallowed tokens should already be at -inf (never drawn). Returns LongTensor
    [B].
    """
    from silmm_fast.ops.sampling import sample_tokens

    if temperature == 0:
        return logits.argmax(-1)
    rows = logits.shape[0]
    if noise is None:
        device = generator.device if generator is not None else logits.device
        noise = torch.rand(rows, generator=generator, device=device, dtype=torch.float64)
    elif noise.shape != (rows,):
        raise ValueError(f"noise: expected shape [{rows}] (one uniform number per row), got {tuple(noise.shape)}")
    return sample_tokens(logits, temperature=temperature, top_p=top_p, noise=noise.to(logits.device))


class ShapesLMM(nn.Module):
    """The tiny LMM of the shapes world (see the module docstring).

    Attributes:
        config: the ``ShapesLMMConfig``.
        vocab: the ``JointVocab``.
        lm: the wrapped ``LlamaForCausalLM`` (``self.model`` is its decoder, so ``silmm_fast.dropdiv(self, ...)``
            finds ``self.model.layers[i].mlp``).
        query_slots: [L, H] learned slot embeddings (continuous variant only).
        feature_head: ``nn.Linear(H, D)`` (continuous variant only).
    """

    def __init__(self, config: ShapesLMMConfig) -> None:
        super().__init__()
        if not isinstance(config, ShapesLMMConfig):
            raise TypeError(f"config: expected a ShapesLMMConfig, got {type(config).__name__}")
        self.config = config
        self.vocab = JointVocab(config.words, config.categories, config.num_image_tokens)
        v = self.vocab
        llama = LlamaConfig(
            vocab_size=v.size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_positions,
            tie_word_embeddings=False,
            pad_token_id=v.pad,
            bos_token_id=v.bos,
            eos_token_id=v.eos,
        )
        self.lm = LlamaForCausalLM(llama)
        if config.image_embedding == "structured":
            self.lm.model.embed_tokens = ImageEmbedding(
                self.lm.model.embed_tokens, self.vocab, words=True, cells=True, init_std=llama.initializer_range
            )
        if config.word_shift:
            self.lm.model.embed_tokens = WordShift(self.lm.model.embed_tokens, self.vocab, config.word_shift)
        if config.variant == "continuous":
            self.query_slots = nn.Parameter(torch.randn(config.feature_slots, config.hidden_size) * 0.02)
            self.feature_head = nn.Linear(config.hidden_size, config.feature_dim)
        # Masks over the vocabulary for constrained decoding: image positions, prompt words, questions.
        image_mask = torch.zeros(v.size, dtype=torch.bool)
        image_mask[v.image_offset :] = True
        word_mask = torch.zeros(v.size, dtype=torch.bool)
        word_mask[list(v.word_ids)] = True
        self.register_buffer("_image_allowed", image_mask, persistent=False)
        self.register_buffer("_write_allowed", word_mask.clone().index_fill_(0, torch.tensor([v.eos]), True), False)
        self.register_buffer("_dec_allowed", word_mask.index_fill_(0, torch.tensor([v.eos, v.sep]), True), False)
        if config.image_head == "factored":
            self.lm.lm_head = FactoredImageHead(self.lm.lm_head, v, init_std=llama.initializer_range)

    # ------------------------------------------------------------------ plumbing

    @property
    def model(self) -> LlamaModel:
        """The Llama decoder stack (``self.lm.model``): ``model.layers[i].mlp`` is where DropDiv adds dropout."""
        return self.lm.model

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.lm.lm_head.weight.device

    def prompt_ids(self, prompt: str) -> list[int]:
        """Joint-vocabulary ids of a prompt's words; ValueError naming an unknown word."""
        words = _tokenize(prompt)
        if not words:
            raise ValueError(f"prompts: empty prompt {prompt!r}")
        return self.vocab.encode_words(words)

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batching.left_pad`` with this model's pad id, on its device."""
        return left_pad(seqs, self.vocab.pad, self.device)

    def _check_image_tokens(self, image_tokens: object, name: str = "image_tokens") -> torch.Tensor:
        c = self.config
        return check_image_tokens(image_tokens, c.image_seq_len, c.num_image_tokens, name).to(self.device)

    def _require(self, variant: str, method: str) -> None:
        if self.config.variant != variant:
            raise ValueError(f"{method}: needs the {variant} variant, this model is {self.config.variant}")

    def _embed(
        self, ids: torch.Tensor, images_before: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Input embeddings of ``ids`` [B, T] continuing rows that already hold ``images_before`` [B] image tokens
        (which only a structured image embedding needs to know) and end in the ids ``previous`` [B, P] (which only a
        word shift needs, at a question's first tokens; decoding never writes a question, so it gives none)."""
        embed = self.lm.model.embed_tokens
        if isinstance(embed, WordShift):
            return embed(ids, images_before, previous)
        return embed(ids, images_before) if isinstance(embed, ImageEmbedding) else embed(ids)

    @torch.no_grad()
    def _decode(
        self,
        prefixes: Sequence[Sequence[int]],
        max_new_tokens: int,
        allowed: torch.Tensor,
        *,
        repeat: int = 1,
        stop_id: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Batched KV-cached decoding of ``max_new_tokens`` after each prefix (each repeated ``repeat`` times).

        ``allowed`` (bool) says which tokens may be drawn: [V] for every row, or [B, V] one row per prefix.

        ``noise`` [B * repeat, max_new_tokens] uniform in [0, 1): row r samples its step-t token with ``noise[r, t]``
        (``sample_next``), so each row's draws are its own; without it the rows draw from ``generator``.
        Returns [B * repeat, T'] new ids, T' <= max_new_tokens; after ``stop_id`` a row holds <pad>.
        """
        if noise is not None:
            check_noise(noise, (len(prefixes) * repeat, max_new_tokens), generator)
        ids, mask, pos = self._left_pad(prefixes)
        cache = DynamicCache(config=self.lm.config)
        hidden = self.lm.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, **{_CACHE_KW: cache}, use_cache=True
        ).last_hidden_state[:, -1]
        # image tokens each row holds so far: a structured embedding gives a new image token the next cell
        seen = (ids >= self.vocab.image_offset).sum(1)
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
            mask, pos, hidden, seen = (t.repeat_interleave(repeat, dim=0) for t in (mask, pos, hidden, seen))
        next_pos = pos[:, -1:] + 1
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        out = []
        blocked = ~(allowed.repeat_interleave(repeat, dim=0) if allowed.dim() == 2 else allowed)
        for step in range(max_new_tokens):
            logits = self.lm.lm_head(hidden).float().masked_fill(blocked, float("-inf"))
            step_noise = None if noise is None else noise[:, step]
            tok = sample_next(logits, temperature, top_p, generator, step_noise)
            tok = tok.masked_fill(done, self.vocab.pad)
            out.append(tok)
            if stop_id is not None:
                done = done | (tok == stop_id)
                if bool(done.all()):
                    break
            if step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            embeds = self._embed(tok[:, None], seen)
            hidden = self.lm.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=next_pos, **{_CACHE_KW: cache}, use_cache=True
            ).last_hidden_state[:, -1]
            next_pos = next_pos + 1
            seen = seen + (tok >= self.vocab.image_offset).long()
        return torch.stack(out, dim=1)

    # ------------------------------------------------------------------ SILMM step 1: prompts

    def write_prompts(
        self,
        categories: Sequence[str],
        n: int,
        temperature: float = 1.0,
        top_p: float = 0.95,
        generator: torch.Generator | None = None,
        max_new_tokens: int = 32,
        noise: torch.Tensor | None = None,
    ) -> list[str]:
        """The model writes ``n`` prompts per category ("<write> <cat:C>" → words <eos>).

        Returns ``len(categories) * n`` strings, category-major (all of ``categories[0]`` first). A prompt that runs
        out of ``max_new_tokens`` before <eos> is returned as written so far. ``noise`` [len(categories), n,
        max_new_tokens] uniform in [0, 1) gives each prompt its own draws (``sample_next``), so a prompt does not
        depend on which others are written in the same call; otherwise all draw from ``generator``.
        """
        if isinstance(categories, str) or not isinstance(categories, Sequence) or not categories:
            raise TypeError("categories: expected a non-empty list of category names")
        for c in categories:
            if c not in self.vocab.categories:
                raise ValueError(f"categories: unknown category {c!r}, expected one of {self.vocab.categories}")
        check_count("n", n)
        check_sampling(temperature, top_p)
        v = self.vocab
        if noise is not None:
            check_noise(noise, (len(categories), n, max_new_tokens), generator)
        prefixes = [[v.bos, v.write, v.token_id(v.category_token(c))] for c in categories]
        new = self._decode(
            prefixes,
            max_new_tokens,
            self._write_allowed,
            repeat=n,
            stop_id=v.eos,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            noise=None if noise is None else noise.reshape(-1, *noise.shape[2:]),
        )
        texts = []
        for row in new.tolist():
            words = [v.text_tokens[i] for i in row if i not in (v.eos, v.pad)]
            texts.append(detokenize(words))
        return texts

    # ------------------------------------------------------------------ SILMM step 2: images (discrete)

    def generate_images(
        self,
        prompts: Sequence[str],
        n_samples: int = 1,
        top_p: float = 0.9,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample ``n_samples`` images per prompt: LongTensor [P, n_samples, image_seq_len] of image-token indices
        in [0, num_image_tokens).

        Each prompt "<bos> <gen> words <img>" is encoded once; its KV cache is repeated over the samples and the
        image positions are decoded in one batched loop, sampling only among image tokens (nucleus sampling;
        ``temperature=0`` gives greedy decoding). ``noise`` [P, n_samples, image_seq_len] uniform in [0, 1) gives
        every sample its own draws (``sample_next``): a prompt's images then depend only on the model, the prompt and
        its noise, not on the other prompts of the call; without it all samples draw from ``generator``.
        """
        self._require("discrete", "generate_images")
        prompts = check_prompts(prompts)
        check_count("n_samples", n_samples)
        check_sampling(temperature, top_p)
        v = self.vocab
        if noise is not None:
            check_noise(noise, (len(prompts), n_samples, self.config.image_seq_len), generator)
        prefixes = [[v.bos, v.gen, *self.prompt_ids(p), v.img] for p in prompts]
        new = self._decode(
            prefixes,
            self.config.image_seq_len,
            self._image_allowed,
            repeat=n_samples,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            noise=None if noise is None else noise.reshape(-1, *noise.shape[2:]),
        )
        return (new - v.image_offset).view(len(prompts), n_samples, self.config.image_seq_len)

    def image_logprob_inputs(
        self, prompts: Sequence[str], image_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the DPO step needs to score images under this model without materializing logits.

        Args:
            prompts: B prompts (or P prompts when ``image_tokens`` is [P, n, S]: each prompt serves its n images).
            image_tokens: [B, S] or [P, n, S] image-token indices in [0, num_image_tokens).

        Returns:
            hidden: [B', S, H] (B' = B or P·n) the states entering ``lm_head`` at the positions that predict the image
                tokens, differentiable w.r.t. the model;
            head_weight: [V, H] ``lm_head.weight``;
            labels: [B', S] joint-vocabulary ids of the image tokens.
            ``fused_linear_logprobs(hidden, head_weight, labels)`` is then each image's log-likelihood under the model
            (a softmax over the full vocabulary, equal to log-probs from a plain forward).
        """
        self._require("discrete", "image_logprob_inputs")
        prompts = check_prompts(prompts)
        prompts, tokens = images_per_prompt(prompts, self._check_image_tokens(image_tokens), self.config.image_seq_len)
        v = self.vocab
        labels = tokens + v.image_offset
        s = self.config.image_seq_len
        # The last image token is only a label: the inputs stop one position before it.
        seqs = [[v.bos, v.gen, *self.prompt_ids(p), v.img, *lab[:-1]] for p, lab in zip(prompts, labels.tolist())]
        ids, mask, pos = self._left_pad(seqs)
        hidden = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -s:]
        return hidden, self.lm.lm_head.weight, labels

    # ------------------------------------------------------------------ SILMM step 2: features (continuous)

    def feature_forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Feature matrices [P, L, D] of the prompts, differentiable: "<bos> <gen> words <img>" then the L query
        slots, feature head on the slot positions."""
        self._require("continuous", "feature_forward")
        prompts = check_prompts(prompts)
        v = self.vocab
        ids, mask, pos = self._left_pad([[v.bos, v.gen, *self.prompt_ids(p), v.img] for p in prompts])
        n_slots = self.config.feature_slots
        embeds = self.lm.model.embed_tokens(ids)
        embeds = torch.cat([embeds, self.query_slots.unsqueeze(0).expand(len(prompts), -1, -1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, n_slots)], dim=1)
        start = self.config.feature_slot_start
        if start:
            lengths = pos[:, -1] + 1
            if int(lengths.max()) > start:
                i = int(lengths.argmax())
                raise ValueError(
                    f"prompts: prompt {i} takes {int(lengths[i])} positions, more than feature_slot_start={start}"
                )
            first = torch.full_like(pos[:, -1:], start)
        else:
            first = pos[:, -1:] + 1
        pos = torch.cat([pos, first + torch.arange(n_slots, device=pos.device)], dim=1)
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        return self.feature_head(hidden[:, -n_slots:])

    @torch.no_grad()
    def generate_features(self, prompts: Sequence[str], n_samples: int = 1) -> torch.Tensor:
        """``n_samples`` feature matrices per prompt, [P, n_samples, L, D], without grad.

        The samples differ only when something stochastic is active in the forward pass (``silmm_fast.dropdiv``);
        without it they are identical copies.
        """
        prompts = check_prompts(prompts)
        check_count("n_samples", n_samples)
        feats = self.feature_forward([p for p in prompts for _ in range(n_samples)])
        return feats.view(len(prompts), n_samples, *feats.shape[1:])

    # ------------------------------------------------------------------ SILMM step 3: questions

    def decompose(self, prompts: Sequence[str], max_new_tokens: int = 96, copy_words: bool = True) -> list[list[str]]:
        """Greedy decomposition of each prompt into yes/no questions: "<dec> words <sep>" → q1 <sep> q2 … <eos>.

        With ``copy_words`` (the default) a question may use only its prompt's words and the question templates' own
        (``silmm_fast.loop.world.QUESTION_WORDS``), as every ground-truth question does: the model still chooses which
        words, in which order, but cannot put a word the prompt never said in place of one it did (free decoding can
        write "is there a blue triangle?" for "a blue star", or "left" for "right").
        Without it, any word of the vocabulary may be drawn.

        Returns one list of question strings per prompt (empty questions dropped).
        """
        prompts = check_prompts(prompts)
        check_count("max_new_tokens", max_new_tokens)
        if not isinstance(copy_words, bool):
            raise TypeError(f"copy_words: expected a bool, got {copy_words!r}")
        v = self.vocab
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        prefixes = [[v.bos, v.dec, *ids, v.sep] for ids in prompt_ids]
        allowed = self._dec_allowed
        if copy_words:
            from silmm_fast.loop.world.prompts import QUESTION_WORDS

            allowed = torch.zeros(len(prompts), v.size, dtype=torch.bool, device=self.device)
            allowed[:, v.encode_words(QUESTION_WORDS) + [v.sep, v.eos]] = True
            for row, ids in zip(allowed, prompt_ids):
                row[ids] = True
        new = self._decode(prefixes, max_new_tokens, allowed, stop_id=v.eos)
        result = []
        for row in new.tolist():
            questions, words = [], []
            for i in row:
                if i in (v.sep, v.eos, v.pad):
                    if words:
                        questions.append(detokenize(words))
                    words = []
                    if i != v.sep:
                        break
                else:
                    words.append(v.text_tokens[i])
            if words:
                questions.append(detokenize(words))
            result.append(questions)
        return result

    # ------------------------------------------------------------------ SILMM step 4: answers

    def image_prefix_ids(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[I, S + 3] ids of "<bos> <img> t1 … tS </img>" for image-token indices [I, S]."""
        tokens = self._check_image_tokens(image_tokens)
        v = self.vocab
        n = tokens.shape[0]
        head = torch.tensor([v.bos, v.img], device=tokens.device).expand(n, 2)
        tail = torch.full((n, 1), v.img_close, device=tokens.device)
        return torch.cat([head, tokens + v.image_offset, tail], dim=1)

    def question_ids(self, question: str) -> list[int]:
        """Ids of "<q> words <a>" for one question."""
        words = _tokenize(question)
        if not words:
            raise ValueError(f"questions: empty question {question!r}")
        return [self.vocab.q, *self.vocab.encode_words(words), self.vocab.a]

    @torch.no_grad()
    def answer(
        self, image_tokens: torch.Tensor, questions: Sequence[Sequence[str]], images_per_chunk: int = 256
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """p(yes) and p(no) of every question about every image.

        Args:
            image_tokens: [I, S] image-token indices.
            questions: I lists of question strings (``questions[i]`` are asked about image i).
            images_per_chunk: images encoded per forward pass (bounds memory).

        Returns:
            (p_yes, p_no): two lists of I float32 tensors of shape [M_i]; each probability is a softmax over the full
            vocabulary at the answer position. Each image's prefix "<bos> <img> tokens </img>" is encoded once and its
            KV cache is shared by all of that image's questions.
        """
        tokens = self._check_image_tokens(image_tokens)
        if tokens.dim() != 2:
            raise ValueError(
                f"image_tokens: expected shape [I, {self.config.image_seq_len}], got {tuple(tokens.shape)}"
            )
        if isinstance(questions, str) or not isinstance(questions, Sequence) or len(questions) != tokens.shape[0]:
            raise ValueError(f"questions: expected a list of {tokens.shape[0]} lists of questions (one per image)")
        for i, qs in enumerate(questions):
            if isinstance(qs, str) or not isinstance(qs, Sequence) or not all(isinstance(q, str) for q in qs):
                raise TypeError(f"questions[{i}]: expected a list of str")
        check_count("images_per_chunk", images_per_chunk)
        p_yes: list[torch.Tensor] = []
        p_no: list[torch.Tensor] = []
        for start in range(0, tokens.shape[0], images_per_chunk):
            chunk = tokens[start : start + images_per_chunk]
            qs = questions[start : start + images_per_chunk]
            yes, no = self._answer_chunk(chunk, qs)
            p_yes.extend(yes)
            p_no.extend(no)
        return p_yes, p_no

    def _answer_chunk(
        self, tokens: torch.Tensor, questions: Sequence[Sequence[str]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        v = self.vocab
        counts = [len(qs) for qs in questions]
        flat = [self.question_ids(q) for qs in questions for q in qs]
        if not flat:
            empty = torch.zeros(0, device=self.device)
            return [empty] * len(counts), [empty] * len(counts)
        prefix = self.image_prefix_ids(tokens)
        cache = DynamicCache(config=self.lm.config)
        self.lm.model(input_ids=prefix, **{_CACHE_KW: cache}, use_cache=True)
        owner = torch.repeat_interleave(
            torch.arange(len(counts), device=self.device), torch.tensor(counts).to(self.device)
        )
        cache.batch_select_indices(owner)
        # Questions are right-padded: causal attention keeps the pads (after the last real token) out of the answer.
        lengths = torch.tensor([len(q) for q in flat], device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(flat), width), v.pad, dtype=torch.long)
        for r, q in enumerate(flat):
            ids[r, : len(q)] = torch.tensor(q)
        pos = prefix.shape[1] + torch.arange(width, device=self.device).expand(len(flat), -1)
        n_images = torch.full((len(flat),), tokens.shape[1], device=self.device)
        embeds = self._embed(ids.to(self.device), n_images, prefix[owner])
        hidden = self.lm.model(
            inputs_embeds=embeds, position_ids=pos, **{_CACHE_KW: cache}, use_cache=True
        ).last_hidden_state
        last = hidden[torch.arange(len(flat), device=self.device), lengths - 1]
        probs = torch.softmax(self.lm.lm_head(last).float(), dim=-1)
        yes = probs[:, v.yes].split(counts)
        no = probs[:, v.no].split(counts)
        return list(yes), list(no)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the directory ``path`` (created if missing)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: t.detach().contiguous().cpu() for k, t in self.state_dict().items()}
        tmp_w, tmp_c = path / (WEIGHTS_FILE + ".tmp"), path / (CONFIG_FILE + ".tmp")
        save_file(state, str(tmp_w))
        tmp_c.write_text(json.dumps(self.config.to_dict(), indent=1))
        os.replace(tmp_w, path / WEIGHTS_FILE)
        os.replace(tmp_c, path / CONFIG_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ShapesLMM:
        """Load a model written by ``save``; FileNotFoundError naming the missing file."""
        path = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"path: {path / name} does not exist (not a saved ShapesLMM)")
        config = ShapesLMMConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE), device=str(device)))
        return model.to(device).eval()
