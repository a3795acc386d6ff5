"""DPO with TRL, the loss through silmm_fast's fused head: a complete script to copy.

Everything is built in code, so it runs anywhere in well under a minute on a CPU: a word-level tokenizer, a tiny
random Llama, and a preference dataset that prefers sentences about red things. Swap in your own model, tokenizer
and dataset; nothing else changes. ``FusedDPOTrainer`` takes the same arguments and ``DPOConfig`` as
``trl.DPOTrainer`` and logs the same metrics, with the [tokens, vocab] logits never materialized.

    pip install 'silmm_fast[trl]'
    python examples/trl_dpo.py [--steps 30] [--out /tmp/trl_dpo]

For an image-generating model whose image head is not ``get_output_embeddings()``, pass ``head=``:
``FusedDPOTrainer(janus_model, ..., head="janus")`` fuses the last Linear of Janus's image head.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig

from silmm_fast.integrations.trl import FusedDPOTrainer

COLORS = ["red", "blue", "green", "yellow"]
THINGS = ["cube", "ball", "cat", "tree", "box"]
WORDS = ["a", "the", "draw", "is", "on", "next", "to", *COLORS, *THINGS]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One id per word, BOS prepended; pad / eos / unk specials."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_dataset(n: int, seed: int = 0) -> Dataset:
    """Prompts "draw a <thing>"; the chosen completion makes the thing red, the rejected one another color."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        thing, other = rng.choice(THINGS), rng.choice(THINGS)
        rows["prompt"].append(f"draw a {thing}")
        rows["chosen"].append(f" the {thing} is red next to a {rng.choice(COLORS)} {other}")
        rows["rejected"].append(f" the {thing} is {rng.choice(COLORS[1:])} next to a {rng.choice(COLORS)} {other}")
    return Dataset.from_dict(rows)


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--out", default=None, help="output directory (default: a temporary folder)")
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    config = DPOConfig(
        output_dir=args.out or tempfile.mkdtemp(prefix="trl_dpo_"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        beta=0.1,
        precompute_ref_log_probs=True,  # the reference is the initial model: its log-probs once, up front
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,  # the trainer then prints each metrics row
    )
    trainer = FusedDPOTrainer(model, args=config, train_dataset=build_dataset(256), processing_class=tokenizer)
    trainer.train()
    last = [row for row in trainer.state.log_history if "rewards/accuracies" in row][-1]
    print(
        f"after {args.steps} steps: rewards/accuracies {last['rewards/accuracies']:.2f}, "
        f"rewards/margins {last['rewards/margins']:.3f}, loss {last['loss']:.4f}"
    )
    return last


if __name__ == "__main__":
    main()
