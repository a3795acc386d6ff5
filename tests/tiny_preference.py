"""Tiny preference-training fixtures built in code (nothing downloaded): a word-level tokenizer, a random Llama,
a text preference ``datasets.Dataset`` and a ``DPOConfig`` for fast CPU runs. Shared by the TRL integration tests."""

from __future__ import annotations

import random

import torch

WORDS = (
    "the a red blue green big small cat dog bird cube ball sat ran flew on under near mat box tree and is was "
    "very quite happy sad"
).split()
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def word_tokenizer(vocab_size: int | None = None):
    """A ``PreTrainedTokenizerFast`` with one id per word of ``WORDS`` (BOS prepended), padded with filler tokens up
    to ``vocab_size``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<filler_{i}>"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 16, layers: int = 2, tie: bool = False):
    """A random ``LlamaForCausalLM`` small enough to train for a few steps in well under a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def preference_dataset(n: int = 8, seed: int = 0, completion_words: tuple[int, int] = (2, 6)):
    """``n`` text preference rows (prompt, chosen, rejected) of random words; completions start with a space."""
    from datasets import Dataset

    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(sentence(2, 4))
        rows["chosen"].append(" " + sentence(*completion_words))
        rows["rejected"].append(" " + sentence(*completion_words))
    return Dataset.from_dict(rows)


def dpo_config(output_dir, **overrides):
    """A ``DPOConfig`` for short, deterministic CPU runs: a metrics row per step, no saving, no reporting."""
    from trl import DPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        beta=0.1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=False,  # DPOConfig defaults to bf16 autocast; fp32 keeps stock and fused comparable to float tolerance
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)
