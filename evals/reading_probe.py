"""How fast does a fresh ShapesLMM learn to answer yes/no questions about an image? A VQA-only training probe.

The base model's judge (issue 5: held-out VQA >= 90 %) reads its images poorly, and this probe isolates why: it
trains a freshly initialized model of the bootstrap's size on balanced VQA pairs alone (``SyntheticData`` with
``vqa_pairs``: every question asked of a scene answering yes and of one answering no, so the question text predicts
nothing) and prints held-out-stream accuracy per question kind every ``--eval-every`` steps. Four switches change how
the model sees the task:

- ``--order``: ``image-first`` is the bootstrap's format, "<bos> <img> t1 … t9 </img> <q> question <a>" → yes/no;
  ``question-first`` is "<bos> <q> question <img> t1 … t9 </img> <a>", so every image token can see the question.
- ``--image-embedding``: ``atomic`` is the bootstrap's (one learned vector per image token); ``word-tied`` adds to it
  the embeddings of the three words naming the token's shape, color and texture, so an image token and the words
  describing it share directions from the start.
- ``--cell-targets``: also train, at each image-token position, yes/no for "this cell holds an object the question
  is about" (any description in the question's constraint). Needs ``question-first``.
- ``--cell-embedding``: add to each image token a learned vector of its grid cell. A Llama decoder carries no
  absolute position in its residual stream (RoPE only tilts attention scores), so without it an image token does
  not know which cell it is in.
- ``--count-targets``: also train ``silmm_fast.loop.models.data.count_targets`` at the question's words (how many
  objects fit the description read so far), as the bootstrap's ``reading`` recipe does.

    python evals/reading_probe.py --steps 600 --questions exists
    python evals/reading_probe.py --steps 600 --questions exists --order question-first \\
        --image-embedding word-tied --cell-targets

The accuracies it measured, and what the bootstrap took from them, are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from silmm_fast.loop.models.bootstrap import BootstrapConfig, lr_at, optimizer
from silmm_fast.loop.models.data import IGNORE, SyntheticData, count_targets
from silmm_fast.loop.models.image_embedding import ImageEmbedding
from silmm_fast.loop.models.shapes_lmm import ShapesLMM
from silmm_fast.loop.world import ImageTokenizer, Question, Scene, tokenize_text
from silmm_fast.loop.world.prompts import KINDS
from silmm_fast.loop.world.scene import GRID


class Probe:
    """Builds the probe's sequences and trains / evaluates one model on them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        torch.manual_seed(args.seed)
        # the bootstrap's model size and optimizer recipe (warmup, cosine, weight decay, clipping), VQA pairs only
        self.config = BootstrapConfig(vqa_pairs=True, seed=args.seed, steps=args.steps, lr=args.lr)
        self.model = ShapesLMM(self.config.model_config()).train()
        self.v = self.model.vocab
        if args.image_embedding == "word-tied" or args.cell_embedding:
            lm = self.model.lm.model
            words, std = args.image_embedding == "word-tied", self.model.lm.config.initializer_range
            lm.embed_tokens = ImageEmbedding(lm.embed_tokens, self.v, words, args.cell_embedding, init_std=std)
        self.tokenizer = ImageTokenizer()
        self.train_data = SyntheticData(self.v, seed=args.seed, vqa_pairs=True)
        held = SyntheticData(self.v, seed=args.seed + 1000, vqa_pairs=True)
        self.eval_items = [self.item(held) for _ in range(args.eval_items)]

    def item(self, data: SyntheticData) -> tuple[Scene, Question, bool]:
        while True:
            scene, question, yes = data.vqa_question()
            if self.args.questions == "all" or question.constraint.kind == self.args.questions:
                return scene, question, yes

    def sequence(self, scene: Scene, question: Question, yes: bool) -> tuple[list[int], list[int]]:
        """(ids, targets): the answer after <a>; with ``--cell-targets`` a yes/no at every image token too."""
        v = self.v
        words = v.encode_words(tokenize_text(question.text))
        image = v.image_ids(self.tokenizer.encode(scene))
        if self.args.order == "image-first":
            ids = [v.bos, v.img, *image, v.img_close, v.q, *words, v.a]
            first_cell = 2
        else:
            ids = [v.bos, v.q, *words, v.img, *image, v.img_close, v.a]
            first_cell = 3 + len(words)
        targets = [IGNORE] * len(ids)
        targets[-1] = v.yes if yes else v.no
        if self.args.count_targets:
            first_word = ids.index(v.q) + 1 if self.args.order == "image-first" else 2
            for i, token in count_targets(v, scene, question):
                targets[first_word + i] = token
        if self.args.cell_targets:
            descs = question.constraint.descs()
            about = {o.cell for o in scene.objects if any(d.matches(o) for d in descs)}
            for cell in range(GRID * GRID):
                targets[first_cell + cell] = v.yes if cell in about else v.no
        return ids, targets

    def batch(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.sequence(*it) for it in items]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.v.pad)
        targets = torch.full((len(rows), width), IGNORE)
        for i, (a, t) in enumerate(rows):
            ids[i, : len(a)] = torch.tensor(a)
            targets[i, : len(t)] = torch.tensor(t)
        return ids, targets

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.lm(input_ids=ids).logits

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Answer accuracy overall and per question kind; cell accuracy with ``--cell-targets``."""
        self.model.eval()
        ids, targets = self.batch(self.eval_items)
        logits = self.logits(ids)
        said = torch.where(logits[..., self.v.yes] > logits[..., self.v.no], self.v.yes, self.v.no)
        answer_at = (targets != IGNORE).cumsum(1).argmax(1)  # the last target of each row: its answer
        rows = torch.arange(len(ids))
        right = (said[rows, answer_at] == targets[rows, answer_at]).tolist()
        out = {"accuracy": round(sum(right) / len(right), 3)}
        for kind in KINDS:
            mine = [r for r, (_, q, _) in zip(right, self.eval_items) if q.constraint.kind == kind]
            if mine:
                out[kind] = round(sum(mine) / len(mine), 3)
        if self.args.cell_targets:
            cells = targets != IGNORE
            cells[rows, answer_at] = False
            out["cell_accuracy"] = round(((said == targets) & cells).sum().item() / cells.sum().item(), 3)
        self.model.train()
        return out

    def train(self, report) -> None:
        args, config = self.args, self.config
        opt = optimizer(self.model, config)
        start, losses = time.time(), []
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, config)
            ids, targets = self.batch([self.item(self.train_data) for _ in range(args.batch)])
            logits = self.logits(ids)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                recent = losses[-args.eval_every :]
                report({"step": step + 1, "seconds": round(time.time() - start, 1),
                        "loss": round(sum(recent) / len(recent), 4), **self.evaluate()})  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32, help="VQA items per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--questions", choices=("all", *KINDS), default="all", help="question kinds trained and asked")
    parser.add_argument("--order", choices=("image-first", "question-first"), default="image-first")
    parser.add_argument("--image-embedding", choices=("atomic", "word-tied"), default="atomic")
    parser.add_argument("--cell-targets", action="store_true", help="yes/no at every image token (question-first)")
    parser.add_argument("--count-targets", action="store_true", help="data.count_targets too")
    parser.add_argument("--cell-embedding", action="store_true", help="learned per-cell vectors on image tokens")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-items", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also append every report as a JSON line to this file")
    args = parser.parse_args(argv)
    if args.cell_targets and args.order != "question-first":
        parser.error("--cell-targets: needs --order question-first (an image token must see the question)")
    for name in ("steps", "batch", "eval_every", "eval_items"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
    reports: list[dict] = []

    def report(row: dict) -> None:
        reports.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with Path(args.out).open("a") as f:
                f.write(json.dumps({**settings, **row}) + "\n")

    Probe(args).train(report)
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
