"""DPO in your own training loop with FusedLinearDPOLoss: a complete script to copy.

A tiny random Llama over a joint vocabulary of words and image tokens learns, from preference pairs alone, to draw
images in the prompt's color. The training step is written out: the policy's last hidden states at the image
positions and its head's weight go into ``FusedLinearDPOLoss``, so the [tokens, vocab] logits are never
materialized; the reference model's log-probs come from ``reference_logps`` on the same fp32 path, so the margin
starts at exactly 0. Everything is built in code and runs in seconds on a CPU.

    pip install silmm_fast transformers
    python examples/dpo_training_step.py [--steps 40]

With a real model: take ``hidden_states[-1]`` at the positions that predict image tokens, the weight (and bias) of
the head's last Linear, and the image-token ids as labels (-100 elsewhere); the rest is the same.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from silmm_fast import FusedLinearDPOLoss

WORDS = ["<pad>", "<bos>", "draw", "red", "blue", "green", "yellow"]
COLORS = WORDS[3:]
TOKENS_PER_COLOR = 4  # image tokens that show each color
IMAGE_LEN = 8  # image tokens per image
PROMPT_LEN = 3  # <bos> draw <color>
VOCAB = len(WORDS) + len(COLORS) * TOKENS_PER_COLOR


def image_tokens(color: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random images [n, IMAGE_LEN], every token one of ``color``'s image tokens."""
    first = len(WORDS) + color * TOKENS_PER_COLOR
    return first + torch.randint(0, TOKENS_PER_COLOR, (n, IMAGE_LEN), generator=generator)


def batch(pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [2·pairs, PROMPT_LEN + IMAGE_LEN] (chosen rows, then rejected rows) and their labels: the image
    tokens where an image token is predicted, -100 elsewhere. Chosen images are in the prompt's color, rejected ones
    in another color."""
    color = torch.randint(0, len(COLORS), (pairs,), generator=generator)
    other = (color + torch.randint(1, len(COLORS), (pairs,), generator=generator)) % len(COLORS)
    prompt = torch.stack([torch.full_like(color, 1), torch.full_like(color, 2), 3 + color], dim=1)
    chosen = torch.cat([image_tokens(int(c), 1, generator) for c in color])
    rejected = torch.cat([image_tokens(int(c), 1, generator) for c in other])
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    # position i predicts token i + 1: the hidden states at PROMPT_LEN - 1 ... -2 predict the image
    labels = ids[:, PROMPT_LEN:]
    return ids, labels


def image_hidden(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The activations entering the LM head at the positions that predict image tokens: [B, IMAGE_LEN, H]."""
    hidden = model.model(input_ids=ids).last_hidden_state  # after the final norm, as the head sees it
    return hidden[:, PROMPT_LEN - 1 : -1]


@torch.no_grad()
def color_share(model: LlamaForCausalLM) -> float:
    """Mean probability, over the prompts "draw <color>", that the first image token shows the prompt's color."""
    prompts = torch.tensor([[1, 2, 3 + c] for c in range(len(COLORS))])
    probs = model(input_ids=prompts).logits[:, -1].softmax(-1)  # small vocabulary: plain logits are fine here
    share = [probs[c, len(WORDS) + c * TOKENS_PER_COLOR :][:TOKENS_PER_COLOR].sum() for c in range(len(COLORS))]
    return torch.stack(share).mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # the model before training
    loss_fn = FusedLinearDPOLoss(beta=0.1, loss_type="sigmoid")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)

    metrics = {}
    for step in range(1, args.steps + 1):
        ids, labels = batch(args.pairs, generator)
        with torch.no_grad():
            ref_chosen, ref_rejected = loss_fn.reference_logps(
                image_hidden(reference, ids), reference.lm_head.weight, labels
            )
        out = loss_fn(image_hidden(policy, ids), policy.lm_head.weight, labels, ref_chosen, ref_rejected)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "loss": out.loss.item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
            "rewards/margins": margins.mean().item(),
        }
        if step == 1 or step % max(1, args.steps // 5) == 0:
            print(f"step {step:3d}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    metrics["color_share/reference"], metrics["color_share/policy"] = color_share(reference), color_share(policy)
    print(
        "probability that the first image token shows the prompt's color: "
        f"{metrics['color_share/reference']:.3f} before training, {metrics['color_share/policy']:.3f} after"
    )
    return metrics


if __name__ == "__main__":
    main()
