"""Randomly initialized Janus models built in code, with a word-level tokenizer: for tests, smoke runs and
benchmarks on machines without checkpoints (nothing is downloaded).

``random_janus("tiny")`` builds in well under a second on a CPU: a 2-layer decoder of width 32, 16 image tokens
from a 64-entry codebook, 32×32 images. ``random_janus("janus-pro-1b")`` has Janus-Pro-1B's shapes (24 layers of width
2048, 576 image tokens, a 16,384-entry codebook, 384×384 images) with random weights: meant for a GPU.

Shape rules of ``JanusConfig`` that the presets follow: ``num_image_tokens == (image_size / patch_size)²``; the vision
and VQ projection sizes and ``image_token_embed_dim`` equal the text hidden size; ``base_channels`` and
``latent_channels`` are multiples of 32; the VQ decoder upsamples ``len(channel_multiplier) − 1`` times from the
token grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from silmm_fast.loop.adapters.janus import DEFAULT_IMAGE_TOKENS, JanusAdapter, JanusOptions

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", *DEFAULT_IMAGE_TOKENS.values())
_WORDS = re.compile(r"\n|\w+|[^\w\s]")


@dataclass(frozen=True)
class JanusPreset:
    """Sizes of a random Janus model (text decoder, vision encoder, VQ model)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # at least the tokenizer's size; padded with filler tokens
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    codebook: int
    vq_base_channels: int
    vq_latent_channels: int
    vq_channel_multiplier: tuple[int, ...]
    vq_res_blocks: int
    initializer_range: float = 0.02

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS: dict[str, JanusPreset] = {
    # Large initializer_range: random weights whose greedy image tokens vary along the sequence (tests compare
    # token streams; with the default 0.02 every position picks the same token).
    "tiny": JanusPreset(32, 64, 2, 4, 2, 0, 32, 1, 4, 32, 8, 64, 32, 32, (1, 1, 1, 1), 1, initializer_range=0.5),
    "small": JanusPreset(256, 688, 4, 4, 4, 0, 128, 2, 4, 64, 8, 1024, 32, 64, (1, 1, 1, 1), 1),
    "janus-pro-1b": JanusPreset(
        2048, 5632, 24, 16, 16, 102400, 1024, 24, 16, 384, 16, 16384, 128, 256, (1, 1, 2, 2, 4), 2
    ),
}


def _template_words() -> list[str]:
    """Every word the adapter's own templates and the built-in world's prompts and questions use."""
    from silmm_fast.loop.adapters import prompting
    from silmm_fast.loop.world.prompts import WORDS

    texts = [prompting.prompt_instruction(c) for c in prompting.CATEGORY_GOALS]
    texts += [prompting.decompose_instruction("x"), JanusOptions().judge_question, "Answer: Yes No yes no"]
    words = set(WORDS) | set("<|>:;.,?!'\"-()[]{}/")
    for t in texts:
        words.update(_WORDS.findall(t))
    return sorted(words)


def word_tokenizer(words: list[str] | None = None, vocab_size: int | None = None):
    """A word-level ``PreTrainedTokenizerFast``: one id per word, punctuation mark and line break, BOS prepended,
    Janus's special tokens (pad, unk, bos, eos, image placeholder, begin / end of image).

    Args:
        words: the vocabulary (default: the words of the adapter's templates and of the built-in world).
        vocab_size: pad the vocabulary with filler tokens up to this size.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = _template_words() if words is None else list(words)
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<filler_{i}>"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="isolated"),
        ]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=dict(DEFAULT_IMAGE_TOKENS),
    )


def janus_config(preset: JanusPreset, tokenizer):
    """The ``JanusConfig`` of ``preset`` over ``tokenizer``'s ids."""
    from transformers import JanusConfig

    p = preset
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in DEFAULT_IMAGE_TOKENS.items()}
    return JanusConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=max(p.vocab, len(tokenizer)),
            hidden_size=p.hidden,
            intermediate_size=p.intermediate,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            num_key_value_heads=p.kv_heads,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=p.initializer_range,
        ),
        vision_config=dict(
            hidden_size=p.vision_hidden,
            num_hidden_layers=p.vision_layers,
            num_attention_heads=p.vision_heads,
            image_size=p.image_size,
            patch_size=p.patch_size,
            projection_dim=p.hidden,
            num_image_tokens=p.num_image_tokens,
            initializer_range=p.initializer_range,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=p.codebook,
            latent_channels=p.vq_latent_channels,
            base_channels=p.vq_base_channels,
            channel_multiplier=list(p.vq_channel_multiplier),
            num_res_blocks=p.vq_res_blocks,
            projection_dim=p.hidden,
            image_token_embed_dim=p.hidden,
            initializer_range=p.initializer_range,
        ),
        image_token_id=ids["image_token"],
        initializer_range=p.initializer_range,
    )


def random_janus(
    preset: str | JanusPreset = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    options: JanusOptions | None = None,
) -> JanusAdapter:
    """A ``JanusAdapter`` over a randomly initialized ``JanusForConditionalGeneration`` (weights from ``seed``)
    built directly on ``device``, with ``word_tokenizer()`` and the generation config ``generate`` needs (BOS,
    pad and begin-of-image ids)."""
    from transformers import JanusForConditionalGeneration

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)} or a JanusPreset, got {preset!r}")
        preset = PRESETS[preset]
    tokenizer = word_tokenizer(vocab_size=preset.vocab or None)
    config = janus_config(preset, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = JanusForConditionalGeneration(config)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.eos_token_id = (
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    gen.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKENS["boi_token"])}
    return JanusAdapter(model, tokenizer, chat_template=chat_template, options=options)
