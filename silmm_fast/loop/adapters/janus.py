"""``JanusAdapter``: transformers' ``JanusForConditionalGeneration`` (Janus / Janus-Pro) as a SILMM model adapter.

Janus has two paths through one Llama decoder: *understanding* (SigLIP vision encoder → aligner → image embeddings
in the text sequence → ``lm_head`` over text) and *generation* (text prompt + begin-of-image → the decoder predicts
image-codebook tokens with a separate head, ``generation_head`` = Linear → GELU → Linear, each sampled token fed back
through ``generation_embeddings`` + ``generation_aligner``; the VQ model decodes the tokens to pixels).

What each SILMM step runs:

- ``generate_images``: all prompts × samples in one batched decoding loop over a preallocated ``StaticCache``, with
  classifier-free guidance built the way ``JanusForConditionalGeneration.generate(generation_mode="image")`` builds
  it: the batch is doubled, conditional rows first, and the unconditional rows are the prompt ids with every token
  other than BOS and begin-of-image replaced by the pad id (same attention mask). Each step samples through
  ``silmm_fast.sample_tokens`` (``uncond + cfg_scale·(cond − uncond)``, temperature, top-k, top-p). Under greedy
  decoding the tokens equal ``generate``'s, prompt by prompt.
- ``answer``: decoded images → ``JanusImageProcessorPil`` → vision features, computed once per image; the prefix up to
  the end of the image is run once per image and its KV cache shared by that image's questions; p(yes) / p(no) are
  softmax probabilities over the whole text vocabulary at the answer position, each summed over the answer word's
  single-token spellings (``JanusOptions.yes_words`` / ``no_words``).
- ``image_logprob_inputs``: teacher forcing of the image tokens through the generation embeddings after the prompt;
  returns the activations after the head's first Linear + GELU and the last Linear (``vision_head``) as the head, so
  ``fused_linear_logprobs`` fuses that Linear (frozen-head fast path when its parameters need no gradient). The
  likelihood is the conditional model's (no guidance), the usual choice for DPO on CFG models.
- ``write_prompts`` / ``decompose``: the model answers an instruction with examples
  (``silmm_fast.loop.adapters.prompting``); outputs that do not parse fall back to rule-written prompts /
  ``silmm_fast.decompose_prompt``; both return a ``Sourced`` list whose ``sources`` say which was used.

Prompts are wrapped in the checkpoint's chat template when it has one (Janus-Pro does), else used as they are.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from silmm_fast._validate import (
    check_count,
    check_image_tokens,
    check_noise,
    check_prompts,
    check_sampling,
    images_per_prompt,
)
from silmm_fast.loop.adapters import prompting
from silmm_fast.loop.adapters.protocol import ImageLogprobInputs, RemembersSources, Sourced
from silmm_fast.loop.models.batching import left_pad
from silmm_fast.ops.sampling import sample_tokens

OPTIONS_FILE = "silmm_janus.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Janus's special tokens, used when the tokenizer does not name them itself.
DEFAULT_IMAGE_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}


@dataclass
class JanusOptions:
    """Settings of a ``JanusAdapter`` that are not part of the model (saved beside it as ``silmm_janus.json``).

    Attributes:
        cfg_scale: classifier-free guidance scale of image generation (Janus-Pro's default is 5).
        top_k: keep only the k most likely image tokens before top-p (0: all).
        generation_rows: conditional rows (prompts × samples) per batched generation loop; the loop runs twice as
            many rows with guidance. Bounds the KV cache.
        judge_rows: (image, question) rows per judge forward; images are grouped so their questions fit. Bounds the
            expanded KV cache.
        decode_batch: images per VQ decode call.
        judge_question: the text after the image in a judge prompt; ``{question}`` is replaced by the question.
        yes_words / no_words: spellings of the two answers; every spelling that is one token (alone or after a space)
            counts.
        use_chat_template: wrap prompts in the tokenizer's chat template when there is one.
    """

    cfg_scale: float = 5.0
    top_k: int = 0
    generation_rows: int = 64
    judge_rows: int = 64
    decode_batch: int = 16
    judge_question: str = "{question} Answer yes or no."
    yes_words: tuple[str, ...] = ("Yes", "yes")
    no_words: tuple[str, ...] = ("No", "no")
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        self.yes_words, self.no_words = tuple(self.yes_words), tuple(self.no_words)
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale: expected a number >= 0, got {self.cfg_scale!r}")
        for name in ("generation_rows", "judge_rows", "decode_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an int >= 0, got {self.top_k!r}")
        if "{question}" not in self.judge_question:
            raise ValueError(f"judge_question: expected a '{{question}}' field, got {self.judge_question!r}")

    @classmethod
    def from_dict(cls, d: dict) -> JanusOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"options: unknown keys {sorted(unknown)}")
        return cls(**d)


def _uniforms(rows: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """[rows] uniform numbers from ``generator`` on its own device (a CPU generator drives sampling anywhere)."""
    where = generator.device if generator is not None else device
    return torch.rand(rows, generator=generator, device=where, dtype=torch.float64).to(device)


def _missing(path: Path, names: Sequence[str], what: str) -> None:
    if not any((path / n).is_file() for n in names):
        raise FileNotFoundError(
            f"model_path: {path} has no {what} (looked for {', '.join(names)}); a Janus checkpoint directory needs "
            "config.json, the weights and the tokenizer files. Nothing is downloaded: copy a complete checkpoint "
            "there (for example one written by save_pretrained)."
        )


class JanusAdapter(RemembersSources, nn.Module):
    """A ``JanusForConditionalGeneration`` with its tokenizer and image processor, implementing ``ModelAdapter``.

    Args:
        model: the ``JanusForConditionalGeneration`` (kept as ``self.model``).
        processor: a ``JanusProcessor`` (its tokenizer, image processor and chat template are used) or a tokenizer
            that knows Janus's special tokens.
        image_processor: overrides the processor's; default (with a bare tokenizer) ``JanusImageProcessorPil`` at the
            vision encoder's input size with mean = std = 0.5 (Janus-Pro's).
        chat_template: overrides the processor's / tokenizer's chat template.
        options: a ``JanusOptions``.

    Use ``JanusAdapter.from_pretrained(path)`` for a checkpoint directory on disk.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        image_processor: Any = None,
        chat_template: str | None = None,
        options: JanusOptions | None = None,
    ) -> None:
        super().__init__()
        from transformers import JanusForConditionalGeneration

        if not isinstance(model, JanusForConditionalGeneration):
            raise TypeError(f"model: expected a JanusForConditionalGeneration, got {type(model).__name__}")
        if options is not None and not isinstance(options, JanusOptions):
            raise TypeError(f"options: expected a JanusOptions, got {type(options).__name__}")
        self.model = model
        self.options = options or JanusOptions()
        if hasattr(processor, "tokenizer") and hasattr(processor, "image_processor"):
            tokenizer = processor.tokenizer
            image_processor = image_processor or processor.image_processor
            chat_template = chat_template or getattr(processor, "chat_template", None)
        elif hasattr(processor, "convert_tokens_to_ids"):
            tokenizer = processor
        else:
            raise TypeError(f"processor: expected a JanusProcessor or a tokenizer, got {type(processor).__name__}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        vision = model.config.vision_config
        if image_processor is None:
            from transformers import JanusImageProcessorPil

            side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
            image_processor = JanusImageProcessorPil(
                size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            )
        self.image_processor = image_processor
        self._resolve_ids()
        lm = model.model.language_model
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self._newline: dict[int, bool] = {}

    # ------------------------------------------------------------------ construction

    def _token_id(self, name: str) -> int:
        token = getattr(self.tokenizer, name, None) or DEFAULT_IMAGE_TOKENS[name]
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"processor: the tokenizer has no {name} {token!r} (Janus's image special tokens)")
        return int(tid)

    def _resolve_ids(self) -> None:
        tok, gen = self.tokenizer, self.model.generation_config
        self.image_token = getattr(tok, "image_token", None) or DEFAULT_IMAGE_TOKENS["image_token"]
        self.boi_token = getattr(tok, "boi_token", None) or DEFAULT_IMAGE_TOKENS["boi_token"]
        self.image_token_id = int(self.model.config.image_token_id)
        if self._token_id("image_token") != self.image_token_id:
            raise ValueError(
                f"processor: the tokenizer's image token {self.image_token!r} is id {self._token_id('image_token')}, "
                f"the model's image_token_id is {self.image_token_id}"
            )
        gen_kwargs = getattr(gen, "generation_kwargs", None) or {}
        self.boi_id = int(gen_kwargs.get("boi_token_id", self._token_id("boi_token")))
        self.eoi_id = self._token_id("eoi_token")

        def pick(*candidates: int | None) -> int:
            for c in candidates:
                if c is not None:
                    return int(c[0] if isinstance(c, (list, tuple)) else c)
            raise ValueError(
                "processor: the tokenizer defines no pad / bos / eos token and the model's generation "
                "config none either"
            )

        self.bos_id = pick(gen.bos_token_id, tok.bos_token_id)
        self.pad_id = pick(gen.pad_token_id, tok.pad_token_id)
        self.eos_id = pick(tok.eos_token_id, gen.eos_token_id)
        self.num_image_tokens = int(self.model.config.vision_config.num_image_tokens)
        self.codebook_size = int(self.model.config.vq_config.num_embeddings)
        self.yes_ids = self._answer_ids(self.options.yes_words, "yes_words")
        self.no_ids = self._answer_ids(self.options.no_words, "no_words")

    def _answer_ids(self, words: Sequence[str], name: str) -> list[int]:
        ids: set[int] = set()
        for word in words:
            for text in (word, " " + word):
                enc = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(enc) == 1 and enc[0] != self.tokenizer.unk_token_id:
                    ids.add(int(enc[0]))
        if not ids:
            raise ValueError(f"options.{name}: none of {list(words)} is a single token of this tokenizer")
        return sorted(ids)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        options: JanusOptions | None = None,
    ) -> JanusAdapter:
        """Load a Janus checkpoint from the local directory ``path`` (``local_files_only``: nothing is downloaded).

        The directory needs ``config.json`` (a ``janus`` config), weights (``model.safetensors`` or its index, or
        ``pytorch_model.bin``) and tokenizer files (``tokenizer.json`` or ``tokenizer.model``); the image
        processor's ``preprocessor_config.json`` and a chat template (``chat_template.jinja`` / ``.json``,
        ``processor_config.json`` or in the tokenizer config) are used when present. ``dtype`` defaults to float32
        on CPU and bfloat16 elsewhere. Options saved by ``save`` are read back unless ``options`` is given.

        Raises:
            FileNotFoundError: ``path`` is not a directory, or lacks the config, the weights or the tokenizer (the
                message names the path and the files looked for).
            ValueError: ``config.json`` is not JSON or not a Janus config.
        """
        from transformers import AutoTokenizer, JanusForConditionalGeneration, JanusImageProcessorPil

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model_path: {path} is not a directory (expected a local Janus checkpoint)")
        _missing(path, ("config.json",), "config.json")
        try:
            config = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"model_path: {path / 'config.json'} is not valid JSON ({e})") from None
        if config.get("model_type") != "janus":
            raise ValueError(
                f"model_path: {path / 'config.json'} describes model_type {config.get('model_type')!r}, expected "
                "'janus' (a JanusForConditionalGeneration checkpoint)"
            )
        _missing(path, WEIGHT_FILES, "model weights")
        _missing(path, TOKENIZER_FILES, "tokenizer")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        model = JanusForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = None
        if (path / "preprocessor_config.json").is_file():
            image_processor = JanusImageProcessorPil.from_pretrained(path, local_files_only=True)
        else:
            warnings.warn(
                f"model_path: {path} has no preprocessor_config.json; judging uses JanusImageProcessorPil with "
                "Janus-Pro's normalization (mean = std = 0.5) at the vision encoder's input size",
                stacklevel=2,
            )
        if options is None and (path / OPTIONS_FILE).is_file():
            options = JanusOptions.from_dict(json.loads((path / OPTIONS_FILE).read_text()))
        return cls(
            model, tokenizer, image_processor=image_processor, chat_template=_read_chat_template(path), options=options
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> JanusAdapter:
        """``from_pretrained(path, device)``: reads a directory written by ``save``."""
        return cls.from_pretrained(path, device=device)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (safetensors), tokenizer, image processor, chat template and options into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.chat_template:
            (path / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
        options = asdict(self.options)
        options["yes_words"], options["no_words"] = list(self.options.yes_words), list(self.options.no_words)
        (path / OPTIONS_FILE).write_text(json.dumps(options, indent=1))

    # ------------------------------------------------------------------ plumbing

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_seq_len(self) -> int:
        """T, the image tokens per image (576 for Janus-Pro)."""
        return self.num_image_tokens

    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder blocks, in depth order (shared by understanding and generation)."""
        return self.model.model.language_model.layers

    def dropdiv_mlps(self) -> list[nn.Module]:
        """The decoder layers' MLPs, in depth order (where ``silmm_fast.dropdiv`` adds dropout)."""
        return [layer.mlp for layer in self.decoder_layers()]

    def _lm(self, cache: Any = None, **kwargs: Any) -> torch.Tensor:
        """Last hidden states of the language model (``cache`` passed under this transformers version's name)."""
        if cache is not None:
            kwargs[self._cache_kw] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        return self.model.model.language_model(**kwargs).last_hidden_state

    def _user_turn(self, text: str, with_image: bool = False) -> str:
        """``text`` (after an image placeholder when ``with_image``) as one user turn awaiting the reply."""
        if self.chat_template and self.options.use_chat_template:
            content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
        return f"{self.image_token}\n{text}\nAnswer:" if with_image else text

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batching.left_pad`` with this model's pad id, on its device."""
        return left_pad(seqs, self.pad_id, self.device)

    def _check_image_tokens(self, image_tokens: object, name: str = "image_tokens") -> torch.Tensor:
        return check_image_tokens(image_tokens, self.num_image_tokens, self.codebook_size, name).to(self.device)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids that start the image of ``prompt``: its user turn, then begin-of-image (BOS first when the
        tokenizer adds one), as ``JanusProcessor(text=..., generation_mode="image")`` builds them."""
        return self._encode(self._user_turn(prompt) + self.boi_token)

    # ------------------------------------------------------------------ SILMM step 2: images

    @torch.no_grad()
    def generate_images(
        self,
        prompts: Sequence[str],
        n_samples: int = 1,
        top_p: float = 0.9,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        *,
        cfg_scale: float | None = None,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Sample ``n_samples`` images per prompt: LongTensor [P, n_samples, T] of codebook indices.

        Prompts × samples run as one batch (in groups of ``options.generation_rows`` rows), doubled for guidance,
        through one decoding loop over a ``StaticCache`` sized for the prompt plus T tokens. Each sampled token takes
        one uniform number: ``noise[p, s, t]`` when ``noise`` [P, n_samples, T] is given (then a prompt's images do
        not depend on the other prompts of the call), else a draw from ``generator`` on the generator's device.
        ``cfg_scale`` and ``top_k`` default to ``options``; ``temperature=0`` is greedy (no numbers drawn).
        """
        prompts = check_prompts(prompts, allow_blank=False)
        check_count("n_samples", n_samples)
        check_sampling(temperature, top_p)
        t = self.num_image_tokens
        if noise is not None:
            noise = check_noise(noise, (len(prompts), n_samples, t), generator).reshape(-1, t)
        cfg = self.options.cfg_scale if cfg_scale is None else float(cfg_scale)
        k = self.options.top_k if top_k is None else int(top_k)
        seqs = [self.prompt_ids(p) for p in prompts]
        per_group = max(1, self.options.generation_rows // n_samples)
        out = []
        for s in range(0, len(seqs), per_group):
            rows = [q for q in seqs[s : s + per_group] for _ in range(n_samples)]
            group_noise = None if noise is None else noise[s * n_samples : s * n_samples + len(rows)]
            out.append(self._generate_rows(rows, cfg, temperature, k, top_p, generator, group_noise))
        return torch.cat(out).view(len(prompts), n_samples, t)

    def _generate_rows(
        self,
        seqs: list[list[int]],
        cfg_scale: float,
        temperature: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        from transformers import StaticCache

        ids, mask, pos = self._left_pad(seqs)
        b, width = ids.shape
        t = self.num_image_tokens
        # Unconditional rows: everything but BOS and begin-of-image becomes pad, under the same attention mask.
        keep = (ids == self.bos_id) | (ids == self.boi_id)
        uncond = ids.masked_fill(~keep, self.pad_id)
        both = torch.cat([ids, uncond])
        # One mask for the whole loop: the cache's future slots are hidden by causality until they are written.
        full_mask = torch.cat([mask, torch.ones(b, t, dtype=mask.dtype, device=mask.device)], dim=1).repeat(2, 1)
        pos = pos.repeat(2, 1)
        cache = StaticCache(config=self.model.config, max_cache_len=width + t)
        embeds = self.model.get_input_embeddings()(both)
        hidden = self._lm(cache, inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos)[:, -1]
        next_pos = pos[:, -1:] + 1
        tokens = torch.empty(b, t, dtype=torch.long, device=ids.device)
        head = self.model.model.generation_head
        for i in range(t):
            logits = head(hidden).float()
            u = None
            if temperature > 0:
                u = _uniforms(b, generator, logits.device) if noise is None else noise[:, i].to(logits.device)
            tok = sample_tokens(
                logits[:b], logits[b:], cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, noise=u
            )
            tokens[:, i] = tok
            if i + 1 == t:
                break
            step = self.model.prepare_embeddings_for_image_generation(torch.cat([tok, tok])[:, None])
            hidden = self._lm(cache, inputs_embeds=step, attention_mask=full_mask, position_ids=next_pos)[:, -1]
            next_pos = next_pos + 1
        return tokens

    @torch.no_grad()
    def decode_images(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Pixels of token images [..., T]: uint8 [..., H, W, 3] on the CPU (VQ decoder output mapped back with the
        image processor's mean / std, rounded); ``PIL.Image.fromarray(out[i].numpy())`` gives a PNG-able image."""
        tokens = self._check_image_tokens(image_tokens)
        flat = tokens.reshape(-1, self.num_image_tokens)
        mean = torch.tensor(self.image_processor.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_processor.image_std, dtype=torch.float32)
        chunks = []
        for s in range(0, flat.shape[0], self.options.decode_batch):
            pixels = self.model.decode_image_tokens(flat[s : s + self.options.decode_batch]).float().cpu()
            chunks.append(((pixels * std + mean) * 255).clamp(0, 255).round().to(torch.uint8))
        if not chunks:
            vq = self.model.config.vq_config
            side = int(self.num_image_tokens**0.5) * 2 ** (len(vq.channel_multiplier) - 1)
            return torch.zeros(*tokens.shape[:-1], side, side, 3, dtype=torch.uint8)
        out = torch.cat(chunks)
        return out.view(*tokens.shape[:-1], *out.shape[1:])

    # ------------------------------------------------------------------ SILMM step 5: DPO inputs

    def image_logprob_inputs(self, prompts: Sequence[str], image_tokens: torch.Tensor) -> ImageLogprobInputs:
        """Activations and head that score ``image_tokens`` given their prompts (differentiable w.r.t. the model).

        Args:
            prompts: B prompts (or P prompts when ``image_tokens`` is [P, n, T]: each serves its n images).
            image_tokens: [B, T] or [P, n, T] codebook indices.

        Returns:
            ``ImageLogprobInputs(hidden [B', T, P_h], weight [V, P_h], labels [B', T], bias [V])`` with B' = B or
            P·n: ``hidden`` is ``GELU(proj_out(h))`` of the decoder states h at the positions that predict each image
            token (the prompt, begin-of-image, then the image tokens through the generation embeddings), ``weight``
            / ``bias`` are the generation head's last Linear, so ``fused_linear_logprobs`` equals a log-softmax of
            ``generation_head(h)`` gathered at the labels.
        """
        prompts = check_prompts(prompts, allow_blank=False)
        prompts, tokens = images_per_prompt(prompts, self._check_image_tokens(image_tokens), self.num_image_tokens)
        ids, mask, pos = self._left_pad([self.prompt_ids(p) for p in prompts])
        width, t = ids.shape[1], self.num_image_tokens
        # The last image token is only a label: the inputs stop one position before it.
        image_embeds = self.model.prepare_embeddings_for_image_generation(tokens[:, :-1])
        embeds = torch.cat([self.model.get_input_embeddings()(ids), image_embeds.to(self.model.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(t - 1, device=pos.device)], dim=1)
        hidden = self._lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)[:, width - 1 :]
        head = self.model.model.generation_head
        return ImageLogprobInputs(
            head.activation_fn(head.proj_out(hidden)), head.vision_head.weight, tokens, head.vision_head.bias
        )

    # ------------------------------------------------------------------ SILMM step 4: answers

    def _judge_ids(self, question: str) -> tuple[list[int], list[int]]:
        """(prefix before the image, suffix after it) token ids of the judge prompt for ``question``."""
        text = self._user_turn(self.options.judge_question.format(question=question), with_image=True)
        ids = self._encode(text)
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise ValueError(f"judge prompt: expected one image placeholder in the encoded prompt, got {len(where)}")
        return ids[: where[0]], ids[where[0] + 1 :]

    @torch.no_grad()
    def answer(
        self, image_tokens: torch.Tensor, questions: Sequence[Sequence[str]], images_per_chunk: int = 256
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """p(yes) and p(no) of every question about every token image [I, T] (decoded, then ``answer_images``)."""
        tokens = self._check_image_tokens(image_tokens)
        if tokens.dim() != 2:
            raise ValueError(f"image_tokens: expected shape [I, {self.num_image_tokens}], got {tuple(tokens.shape)}")
        self._check_questions(questions, tokens.shape[0])
        check_count("images_per_chunk", images_per_chunk)
        p_yes: list[torch.Tensor] = []
        p_no: list[torch.Tensor] = []
        for s in range(0, tokens.shape[0], images_per_chunk):
            chunk = slice(s, s + images_per_chunk)
            yes, no = self.answer_images(self.decode_images(tokens[chunk]), questions[chunk], images_per_chunk)
            p_yes += yes
            p_no += no
        return p_yes, p_no

    @staticmethod
    def _check_questions(questions: object, n_images: int) -> None:
        if isinstance(questions, str) or not isinstance(questions, Sequence) or len(questions) != n_images:
            raise ValueError(f"questions: expected a list of {n_images} lists of questions (one per image)")
        for i, qs in enumerate(questions):
            if isinstance(qs, str) or not isinstance(qs, Sequence) or not all(isinstance(q, str) for q in qs):
                raise TypeError(f"questions[{i}]: expected a list of str")

    @torch.no_grad()
    def answer_images(
        self, images: torch.Tensor | Sequence[Any], questions: Sequence[Sequence[str]], images_per_chunk: int = 256
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """p(yes) and p(no) of ``questions[i]`` about ``images[i]``.

        Args:
            images: uint8 [I, H, W, 3], or I PIL images / HWC uint8 arrays.
            questions: I lists of question strings.
            images_per_chunk: at most this many images per forward (``options.judge_rows`` bounds the questions).

        Returns:
            (p_yes, p_no): two lists of I float32 tensors [M_i] on the CPU; softmax over the text vocabulary at the
            answer position, summed over the answer's single-token spellings.
        """
        n = len(images)
        self._check_questions(questions, n)
        check_count("images_per_chunk", images_per_chunk)
        encoded = {q: self._judge_ids(q) for qs in questions for q in qs}
        prefixes = {tuple(pre) for pre, _ in encoded.values()}
        if len(prefixes) > 1:
            raise ValueError("judge prompt: the text before the image must not depend on the question")
        empty = torch.zeros(0)
        p_yes, p_no = [empty] * n, [empty] * n
        groups, group, rows = [], [], 0
        for i in range(n):
            m = len(questions[i])
            if not m:
                continue
            if group and (rows + m > self.options.judge_rows or len(group) >= images_per_chunk):
                groups.append(group)
                group, rows = [], 0
            group.append(i)
            rows += m
        if group:
            groups.append(group)
        for group in groups:
            prefix = list(next(iter(prefixes)))
            suffixes = [encoded[q][1] for i in group for q in questions[i]]
            counts = [len(questions[i]) for i in group]
            yes, no = self._answer_group([images[i] for i in group], prefix, suffixes, counts)
            for i, y, o in zip(group, yes, no):
                p_yes[i], p_no[i] = y, o
        return p_yes, p_no

    def _pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        arrays = [np.asarray(im.numpy() if isinstance(im, torch.Tensor) else im) for im in images]
        pixels = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.model.dtype)

    def _answer_group(
        self, images: Sequence[Any], prefix: list[int], suffixes: list[list[int]], counts: list[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from transformers import DynamicCache

        dev = self.device
        feats = self.model.model.get_image_features(self._pixel_values(images)).pooler_output  # [I, N, H]
        ids = prefix + [self.boi_id] + [self.image_token_id] * feats.shape[1] + [self.eoi_id]
        ids_t = torch.tensor(ids, device=dev)
        embeds = self.model.get_input_embeddings()(ids_t)[None].repeat(len(images), 1, 1)
        at = (ids_t == self.image_token_id).nonzero().squeeze(1)
        embeds[:, at] = feats.to(embeds.dtype)
        cache = DynamicCache(config=self.model.config)
        self._lm(cache, inputs_embeds=embeds)
        owner = torch.repeat_interleave(torch.arange(len(images), device=dev), torch.tensor(counts, device=dev))
        cache.batch_select_indices(owner)
        # Suffixes are right-padded: causal attention keeps the pads (after the last real token) out of the answer.
        lengths = torch.tensor([len(s) for s in suffixes], device=dev)
        width = int(lengths.max())
        sfx = torch.full((len(suffixes), width), self.pad_id, dtype=torch.long)
        for r, s in enumerate(suffixes):
            sfx[r, : len(s)] = torch.tensor(s)
        pos = len(ids) + torch.arange(width, device=dev).expand(len(suffixes), -1)
        hidden = self._lm(cache, input_ids=sfx.to(dev), position_ids=pos)
        last = hidden[torch.arange(len(suffixes), device=dev), lengths - 1]
        probs = torch.softmax(self.model.lm_head(last).float(), dim=-1).cpu()
        yes = probs[:, self.yes_ids].sum(-1).split(counts)
        no = probs[:, self.no_ids].sum(-1).split(counts)
        return list(yes), list(no)

    # ------------------------------------------------------------------ text: steps 1 and 3

    def _ends_line(self, token: int) -> bool:
        if token not in self._newline:
            self._newline[token] = "\n" in self.tokenizer.decode([token])
        return self._newline[token]

    def generate_text(
        self,
        texts: Sequence[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        stop_at_newline: bool = False,
    ) -> list[str]:
        """The model's continuation of each text (batched, KV-cached, through ``lm_head``): up to EOS, to
        ``max_new_tokens``, or (``stop_at_newline``) to the first token that contains a line break."""
        return self._continue(texts, max_new_tokens, temperature, top_p, generator, stop_at_newline)[0]

    @torch.no_grad()
    def _continue(
        self,
        texts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        stop_at_newline: bool,
        noise: torch.Tensor | None = None,
    ) -> tuple[list[str], list[bool]]:
        """``generate_text``, plus whether each row finished (EOS or line break) within ``max_new_tokens``;
        ``noise`` [rows, max_new_tokens] replaces the generator's draws."""
        from transformers import DynamicCache

        ids, mask, pos = self._left_pad([self._encode(t) for t in texts])
        cache = DynamicCache(config=self.model.config)
        hidden = self._lm(cache, input_ids=ids, attention_mask=mask, position_ids=pos)[:, -1]
        next_pos = pos[:, -1:] + 1
        done = torch.zeros(len(texts), dtype=torch.bool, device=ids.device)
        out = []
        for step in range(max_new_tokens):
            logits = self.model.lm_head(hidden).float()
            u = None
            if temperature > 0:
                u = (
                    _uniforms(len(texts), generator, logits.device)
                    if noise is None
                    else noise[:, step].to(logits.device)
                )
            tok = sample_tokens(logits, None, temperature=temperature, top_k=0, top_p=top_p, noise=u)
            tok = tok.masked_fill(done, self.pad_id)
            out.append(tok)
            done = done | (tok == self.eos_id)
            if stop_at_newline:
                done = done | torch.tensor([self._ends_line(int(t)) for t in tok.tolist()], device=done.device)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            hidden = self._lm(cache, input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos)[:, -1]
            next_pos = next_pos + 1
        rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in texts]
        decoded = []
        for row in rows:
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            decoded.append(self.tokenizer.decode([t for t in row if t != self.pad_id], skip_special_tokens=True))
        return decoded, done.tolist()

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
        """``n`` prompts per category, category-major, written by the model from ``prompting.prompt_instruction``;
        an answer that does not end (line break or EOS) within ``max_new_tokens`` or that ``prompting.parse_prompt``
        rejects is replaced by ``prompting.template_prompt``. ``noise`` [len(categories), n, max_new_tokens]
        uniform in [0, 1) gives each prompt its own draws (its row also seeds its template fallback), else all draw
        from ``generator``.
        Returns a ``Sourced`` list whose ``sources`` say "model" or "template" for each."""
        if isinstance(categories, str) or not isinstance(categories, Sequence) or not categories:
            raise TypeError("categories: expected a non-empty list of category names")
        for c in categories:
            prompting.check_category(c)
        check_count("n", n)
        check_sampling(temperature, top_p)
        check_count("max_new_tokens", max_new_tokens)
        cats = [c for c in categories for _ in range(n)]
        if noise is not None:
            noise = check_noise(noise, (len(categories), n, max_new_tokens), generator).reshape(len(cats), -1)
        texts = [self._user_turn(prompting.prompt_instruction(c)) for c in cats]
        written, finished = self._continue(texts, max_new_tokens, temperature, top_p, generator, True, noise)
        if noise is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            rngs = [random.Random(seed)] * len(cats)  # one stream shared by the call's fallbacks
        else:
            rngs = [random.Random(repr(row)) for row in noise.tolist()]
        prompts, sources = [], []
        for c, w, ok, rng in zip(cats, written, finished, rngs):
            parsed = prompting.parse_prompt(w) if ok else None  # a prompt cut off by max_new_tokens is not used
            prompts.append(parsed if parsed is not None else prompting.template_prompt(c, rng))
            sources.append("model" if parsed is not None else "template")
        return self.remember("prompts", Sourced(prompts, sources))

    def decompose(self, prompts: Sequence[str], max_new_tokens: int = 96, *, fallback: bool = True) -> Sourced:
        """Yes/no questions per prompt, written greedily by the model from ``prompting.decompose_instruction``.

        Questions that ``prompting.parse_questions`` cannot read, or that miss an object of the prompt
        (``prompting.questions_cover``), are replaced by ``silmm_fast.decompose_prompt(prompt)`` (``fallback``) or
        by an empty list. Returns a ``Sourced`` list whose ``sources`` say "model", "rules" or "none" for each prompt.
        """
        from silmm_fast.loop.decompose import decompose_prompt

        prompts = check_prompts(prompts, allow_blank=False)
        check_count("max_new_tokens", max_new_tokens)
        texts = [self._user_turn(prompting.decompose_instruction(p)) for p in prompts]
        written = self.generate_text(texts, max_new_tokens)
        result, sources = [], []
        for p, w in zip(prompts, written):
            qs = prompting.parse_questions(w)
            if prompting.questions_cover(p, qs):
                result.append(qs)
                sources.append("model")
            elif fallback:
                result.append(decompose_prompt(p))
                sources.append("rules")
            else:
                result.append([])
                sources.append("none")
        return self.remember("questions", Sourced(result, sources))


def _read_chat_template(path: Path) -> str | None:
    """The chat template stored beside a checkpoint, if any (the tokenizer's own is used otherwise)."""
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text()
    for name in ("chat_template.json", "processor_config.json"):
        if (path / name).is_file():
            try:
                template = json.loads((path / name).read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(template, str):
                return template
    return None
