"""The phases of one SILMM iteration, one function each: values in, values out. ``silmm_fast.loop.train.loop`` runs
them in order; here is what each computes, and how its result is saved in the run directory (``save_*`` / ``load_*``,
which give back exactly the value computed: a phase's result is used the same whether it was just computed or
loaded by a resumed run).

Every phase that does model work is collective: the prompts (or pairs) are cut into fixed units
(``distributed.map_units``), each rank runs a contiguous run of them and every rank gets every result, so results do
not depend on the number of processes.

Randomness: every random stream of a prompt derives from (run seed, iteration, phase, prompt id) and nothing else
(``stream_seed``): per-prompt noise for the token draws, per-row DropDiv streams, per-prompt random-feedback scores,
one global permutation of the pairs per iteration.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from silmm_fast.loop.adapters import ModelAdapter, ModelSpec, Sourced, build_adapter
from silmm_fast.loop.train import distributed, store
from silmm_fast.loop.train.config import TrainConfig
from silmm_fast.loop.train.distributed import Dist, map_units
from silmm_fast.loop.train.pairs import aggregate_scores, make_pairs
from silmm_fast.loop.world import CATEGORIES, FeatureCodec, ImageTokenizer, parse_prompt, render_grid
from silmm_fast.loop.world.evaluate import evaluate_features, evaluate_tokens
from silmm_fast.losses.fused_linear_dpo import FusedLinearDPOLoss
from silmm_fast.losses.kc_dpo import KCDPOLoss

PROMPT_TOKENS = 32  # most words the model may write for one prompt
TOKENIZER = ImageTokenizer()
CODEC = FeatureCodec()


# --- random streams ----------------------------------------------------------------------------------------------
def stream_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed hashed from the run seed and ``parts`` (iteration, phase, prompt id, ...)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded with ``stream_seed(seed, *parts)``."""
    return torch.Generator().manual_seed(stream_seed(seed, *parts))


def uniforms(shape: tuple[int, ...], seed: int, *parts: object) -> torch.Tensor:
    """float32 uniforms in [0, 1) of one stream (a prompt's noise for its token draws)."""
    return torch.rand(shape, generator=seeded(seed, *parts))


def dropdiv(cfg: TrainConfig, model: ModelAdapter, row_seeds: list[int]) -> Any:
    """DropDiv as configured (``sample.dropdiv_layers``, 0 for all; ``sample.dropdiv_p``), one seed per row."""
    from silmm_fast import dropdiv as _dropdiv

    s = cfg.sample
    return _dropdiv(model, last_layers=s.dropdiv_layers or None, p=s.dropdiv_p, row_seeds=row_seeds)


# --- 1. prompts --------------------------------------------------------------------------------------------------
@torch.no_grad()
def write_prompts(cfg: TrainConfig, dist: Dist, it: int, policy: ModelAdapter) -> list[dict]:
    """The model writes ``sample.prompts_per_category`` prompts per category. Returns the rows of
    ``prompts.jsonl``: ``{"id", "category", "prompt", "source"}``, where a prompt's id is its slot among those the
    model was asked to write (blank prompts are dropped) and ``source`` says whether the model or a fallback wrote
    it."""
    cats = [c for c in CATEGORIES for _ in range(cfg.sample.prompts_per_category)]

    def write(u: slice) -> list[tuple[str, str]]:
        noise = torch.stack([uniforms((1, PROMPT_TOKENS), cfg.seed, it, "prompts", i) for i in range(u.start, u.stop)])
        texts = policy.write_prompts(cats[u], 1, top_p=cfg.sample.top_p, max_new_tokens=PROMPT_TOKENS, noise=noise)
        texts = Sourced.of(texts)
        return list(zip(texts, texts.sources))

    written = [t for part in map_units(dist, len(cats), cfg.sample.chunk, write, f"iter {it} prompts") for t in part]
    return [
        {"id": i, "category": c, "prompt": t, "source": src}
        for i, (c, (t, src)) in enumerate(zip(cats, written))
        if t.strip()
    ]


# --- 2. questions ------------------------------------------------------------------------------------------------
@torch.no_grad()
def decompose(cfg: TrainConfig, dist: Dist, it: int, policy: ModelAdapter, prompts: list[str]) -> list[dict]:
    """The model turns each prompt into yes/no questions; where it wrote nothing usable the rule-based decomposer
    stands in. Returns the rows of ``questions.jsonl``: ``{"id", "prompt", "questions", "source"}``."""
    from silmm_fast.loop.decompose import decompose_prompt

    def unit(u: slice) -> list[tuple[list[str], str]]:
        written = Sourced.of(policy.decompose(prompts[u]))
        return list(zip(written, written.sources))

    parts = map_units(dist, len(prompts), cfg.sample.chunk, unit, f"iter {it} questions")
    rows = []
    for i, (p, (qs, source)) in enumerate(zip(prompts, [qs for part in parts for qs in part])):
        if not qs:
            qs, source = decompose_prompt(p), "rules"
        rows.append({"id": i, "prompt": p, "questions": qs, "source": source})
    return rows


# --- 3. candidates -----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_candidates(
    cfg: TrainConfig, dist: Dist, it: int, policy: ModelAdapter, prompts: list[str], ids: list[int]
) -> dict[str, torch.Tensor]:
    """``sample.candidates`` images per prompt, each prompt with its own random stream (by its id).

    Discrete: ``{"tokens": [P, N, T]}`` sampled image tokens. Continuous: K = ``sample.oversample`` DropDiv samples
    per prompt, N of them kept by diverse selection (candidate 0 the policy's own dropout-free image with
    ``sample.deterministic_candidate``): ``{"tokens": [P, N, T]`` the world's tokens of their decoded scenes,
    ``"features": [P, N, L, D]``, ``"selected": [P, N]`` indices into the K samples, -1 for the own image}."""
    desc = f"iter {it} generate"
    if cfg.mode == "discrete":
        n, seq = cfg.sample.candidates, policy.image_seq_len

        def sample(u: slice) -> torch.Tensor:
            noise = torch.stack([uniforms((n, seq), cfg.seed, it, "generate", i) for i in ids[u]])
            return policy.generate_images(
                prompts[u], n, top_p=cfg.sample.top_p, temperature=cfg.sample.temperature, noise=noise
            ).cpu()

        return {"tokens": torch.cat(map_units(dist, len(prompts), cfg.sample.chunk, sample, desc))}

    from silmm_fast import diverse_select

    k, n = cfg.sample.oversample, cfg.sample.candidates
    own = cfg.sample.deterministic_candidate

    def sample_features(u: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # one DropDiv stream per (prompt, sample): a prompt's K feature matrices are its own
        row_seeds = [stream_seed(cfg.seed, it, "generate", i, j) for i in ids[u] for j in range(k)]
        with dropdiv(cfg, policy, row_seeds):
            feats = policy.generate_features(prompts[u], k)  # [u, K, L, D]
        picked = diverse_select(feats, n - own, method=cfg.sample.select_method)  # [u, n - own]
        chosen = torch.gather(feats, 1, picked[:, :, None, None].expand(-1, -1, *feats.shape[2:]))
        if own:
            # candidate 0: the policy's own (dropout-free) image; selected index -1 marks it. Ties in score go to
            # the lower index (make_pairs), so a sample that shows the same scene never displaces it
            chosen = torch.cat([policy.generate_features(prompts[u], 1), chosen], dim=1)
            picked = torch.cat([torch.full_like(picked[:, :1], -1), picked], dim=1)
        chosen = chosen.cpu()
        scenes = CODEC.decode_batch(chosen.reshape(-1, *feats.shape[2:]).float(), strict=False)
        tokens = TOKENIZER.encode_batch(scenes).view(len(chosen), n, -1)
        return tokens, chosen, picked.cpu()

    parts = map_units(dist, len(prompts), cfg.sample.chunk, sample_features, desc)
    tokens, chosen, picked = (torch.cat([p[i] for p in parts]) for i in range(3))
    return {"tokens": tokens, "features": chosen, "selected": picked}


# --- 4. judge ----------------------------------------------------------------------------------------------------
class Scores(NamedTuple):
    """The judge's verdict, as saved: ``rows`` of ``scores.jsonl`` (``{"prompt_id", "scores"}``, one score per
    candidate, rounded to 6 decimals) and ``counts``, ``judge.json`` (``{"questions_judged", "images"}``)."""

    rows: list[dict]
    counts: dict

    def tensor(self) -> torch.Tensor:
        """float32 [P, N], the scores the pairs are built from."""
        return torch.tensor([r["scores"] for r in self.rows])


def oracle_scores(text: str, tokens: torch.Tensor) -> torch.Tensor:
    """Ground-truth scores of one prompt's candidates [N, seq]: the mean over the prompt's constraints of +1 (met) or
    -1 (not met); all 0 (no pair) when the model's prompt is outside the world's grammar."""
    try:
        prompt = parse_prompt(text)
    except ValueError:
        return torch.zeros(len(tokens))
    scenes = [TOKENIZER.decode(t, strict=False) for t in tokens.tolist()]
    return torch.tensor([2 * sum(prompt.check(sc)) / len(prompt.constraints) - 1 for sc in scenes])


@torch.no_grad()
def judge(
    cfg: TrainConfig,
    dist: Dist,
    it: int,
    policy: ModelAdapter,
    prompts: list[str],
    tokens: torch.Tensor,
    questions: list[list[str]],
    ids: list[int],
) -> Scores:
    """Each candidate's score in [-1, 1]. ``feedback`` self: the mean over its prompt's questions of the policy's
    p(yes) - p(no); random (control): uniform noise; oracle (control): the world's ground truth."""
    p, n = tokens.shape[:2]
    if cfg.feedback == "random":
        scores = torch.stack([torch.rand(n, generator=seeded(cfg.seed, it, "judge", i)) * 2 - 1 for i in ids])
        n_questions = 0
    elif cfg.feedback == "oracle":
        scores = torch.stack([oracle_scores(text, cands) for text, cands in zip(prompts, tokens)])
        n_questions = 0
    else:

        def judge_unit(u: slice) -> torch.Tensor:
            per_image = [questions[i] for i in range(u.start, u.stop) for _ in range(n)]
            yes, no = policy.answer(tokens[u].reshape(-1, tokens.shape[-1]), per_image, len(per_image))
            owner = torch.repeat_interleave(
                torch.arange(len(per_image)), torch.tensor([len(q) for q in per_image], dtype=torch.long)
            )
            return aggregate_scores(torch.cat(yes).cpu(), torch.cat(no).cpu(), owner, len(per_image)).view(-1, n)

        per_unit = max(1, cfg.sample.judge_chunk // n)
        scores = torch.cat(map_units(dist, p, per_unit, judge_unit, f"iter {it} judge"))
        n_questions = n * sum(len(q) for q in questions)
    rows = [{"prompt_id": i, "scores": [round(float(s), 6) for s in scores[i]]} for i in range(p)]
    return Scores(rows, {"questions_judged": n_questions, "images": p * n})


# --- 5. pairs ----------------------------------------------------------------------------------------------------
def build_pairs(cfg: TrainConfig, scores: torch.Tensor) -> list[dict]:
    """Top-k x bottom-k pairs per prompt past ``pairs.min_margin``: the rows of ``pairs.jsonl``, ``{"prompt_id",
    "chosen", "rejected", "gap"}``."""
    pairs = make_pairs(scores, cfg.pairs.k, cfg.pairs.min_margin)
    return [{"prompt_id": p, "chosen": w, "rejected": lo, "gap": round(g, 5)} for p, w, lo, g in pairs]


def candidate_grid(
    cfg: TrainConfig,
    it: int,
    policy: ModelAdapter,
    prompts: list[str],
    tokens: torch.Tensor,
    scores: torch.Tensor,
    pairs: list[dict],
    max_prompts: int = 8,
) -> Any:
    """A picture of the first prompts' candidates (one row per prompt) with their scores, chosen and rejected
    marked: ``candidates.png``, for people reading the run."""
    from PIL import Image

    chosen = {(r["prompt_id"], r["chosen"]) for r in pairs}
    rejected = {(r["prompt_id"], r["rejected"]) for r in pairs}
    images, captions = [], []
    rows = min(max_prompts, len(prompts))
    pixels = policy.decode_images(tokens[:rows])  # uint8 [rows, N, H, W, 3]
    for p in range(rows):
        for j in range(tokens.shape[1]):
            mark = "CHOSEN " if (p, j) in chosen else "REJECTED " if (p, j) in rejected else ""
            images.append(Image.fromarray(pixels[p, j].numpy()))
            head = f"{prompts[p][:40]}\n" if j == 0 else "\n"
            captions.append(f"{head}{mark}{scores[p, j]:+.2f}")
    return render_grid(
        images,
        captions,
        columns=tokens.shape[1],
        tile_size=96,
        title=f"iteration {it}: candidates per prompt (row), {cfg.feedback}-feedback score, chosen / rejected",
    )


# --- 6. reference ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_logps(
    cfg: TrainConfig,
    dist: Dist,
    it: int,
    reference: ModelAdapter,
    prompts: list[str],
    tokens: torch.Tensor,
    pairs: list[dict],
) -> torch.Tensor:
    """Discrete: the frozen reference's log-likelihood of every pair's chosen and rejected image, through the same
    fp32 path as training: [2, n_pairs] (row 0 chosen, row 1 rejected), in units of ``optim.batch_size`` pairs."""
    pid, win, lose = pair_indices(pairs)

    def unit(u: slice) -> torch.Tensor:
        both = torch.cat([tokens[pid[u], win[u]], tokens[pid[u], lose[u]]])
        texts = [prompts[i] for i in pid[u].tolist()] * 2
        return reference.image_logprob_inputs(texts, both).logprobs().view(2, -1).cpu()

    return torch.cat(map_units(dist, len(pairs), cfg.optim.batch_size, unit, f"iter {it} reference"), dim=1)


@torch.no_grad()
def reference_features(
    cfg: TrainConfig, dist: Dist, it: int, reference: ModelAdapter, prompts: list[str]
) -> torch.Tensor:
    """Continuous: the frozen reference's feature matrices of every prompt, [P, L, D]."""

    def unit(u: slice) -> torch.Tensor:
        return reference.feature_forward(prompts[u]).detach().cpu()

    return torch.cat(map_units(dist, len(prompts), cfg.sample.chunk, unit, f"iter {it} reference"))


def pair_indices(pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, chosen candidates, rejected candidates) of ``pairs``, three LongTensors [n_pairs]."""
    return (
        torch.tensor([r["prompt_id"] for r in pairs]),
        torch.tensor([r["chosen"] for r in pairs]),
        torch.tensor([r["rejected"] for r in pairs]),
    )


# --- 7. optimize -------------------------------------------------------------------------------------------------
def kcdpo_targets(cfg: TrainConfig, cands: dict[str, torch.Tensor]) -> torch.Tensor:
    """Continuous: the feature matrices KC-DPO pulls toward (winners) and pushes from (losers), [P, N, L, D].
    ``optim.targets`` features: the candidates' own DropDiv features. decoded: the images the judge scored (the
    world's tokens of the decoded scenes) encoded back into features, so that winner and loser differ only in what
    the judge saw and not in the dropout noise that decoding removed."""
    feats = cands["features"]
    if cfg.optim.targets == "features":
        return feats
    tokens = cands["tokens"]
    scenes = TOKENIZER.decode_batch(tokens.flatten(0, 1), strict=False)
    return CODEC.encode_batch(scenes).view(feats.shape).to(feats.dtype)


def diverged_advice(cfg: TrainConfig) -> str:
    o = cfg.optim
    scale = f"optim.beta = {o.beta:g}" if cfg.mode == "discrete" else f"optim.gamma = {o.gamma:g}"
    return (
        "training stopped before saving anything from it, and the train step is not marked done. Rerun with "
        f"other optimizer settings (optim.lr = {o.lr:g}, {scale}, optim.grad_clip = {o.grad_clip:g}): the run "
        "resumes from this step"
    )


def _check_finite(cfg: TrainConfig, it: int, step: int, epoch: int, what: str, value: float) -> None:
    """Stop the run (FloatingPointError) when a training step's ``what`` is not finite."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"iteration {it}, train step {step} (epoch {epoch}): the {what} is {value}; " + diverged_advice(cfg)
        )


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (FSDP2's gradient norm), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimize(
    cfg: TrainConfig,
    dist: Dist,
    it: int,
    policy: ModelAdapter,
    prompts: list[str],
    cands: dict[str, torch.Tensor],
    pairs: list[dict],
    reference: torch.Tensor,
) -> tuple[list[dict], dict[str, torch.Tensor] | None]:
    """DPO (discrete; ``reference`` from ``reference_logps``) or KC-DPO (continuous; ``reference`` from
    ``reference_features``) on the iteration's pairs, ``optim.epochs`` passes in one seeded order, in steps of
    ``optim.batch_size`` pairs sharded over the ranks (DDP or FSDP2). Returns the per-step metrics and, under FSDP2,
    the gathered weights (None otherwise: ``policy`` itself holds them).

    Raises FloatingPointError, before anything is saved, when a loss, a gradient norm or a weight is not finite."""
    o, world, dev = cfg.optim, dist.world_size, dist.device
    pid, win, lose = pair_indices(pairs)
    if cfg.mode == "discrete":
        tokens = cands["tokens"]
        loss_fn = FusedLinearDPOLoss(beta=o.beta, loss_type=o.loss_type, nll_weight=o.nll_weight)
        ref_c, ref_r = reference[0], reference[1]
    else:
        feats = kcdpo_targets(cfg, cands)
        loss_fn = KCDPOLoss(gamma=o.gamma, kernel=o.kernel, pool=o.pool, sigma=o.sigma)
    # DDP must be told that some parameters get no gradient: continuous mode never reads the LM head, and no
    # preference step reads a word shift's maps (only questions do)
    model = distributed.TrainModel(policy, dist, cfg.dist.strategy, find_unused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    policy.train()
    gen = seeded(cfg.seed, it, "train")  # the same permutation on every rank
    history = []
    steps = o.epochs * ((len(pairs) + o.batch_size - 1) // o.batch_size)
    bar = tqdm(total=steps, desc=f"iter {it} train", leave=False, unit="step", disable=not dist.is_main)
    for epoch in range(o.epochs):
        order = torch.randperm(len(pairs), generator=gen)
        for s in range(0, len(pairs), o.batch_size):
            batch = order[s : s + o.batch_size]
            lo, hi = distributed.shard_bounds(len(batch), world, dist.rank)
            # Each rank's loss is its share of the batch's summed loss, times the world size that the gradient
            # average divides by: the averaged gradient is the batch mean's. A rank with no pair this step still
            # runs one (weighted 0) so that every rank joins the gradient collectives.
            b, live = (batch[lo:hi], 1.0) if hi > lo else (batch[:1], 0.0)
            weight = live * world / len(batch)
            texts = [prompts[i] for i in pid[b].tolist()]
            if cfg.mode == "discrete":
                both = torch.cat([tokens[pid[b], win[b]], tokens[pid[b], lose[b]]])
                inp = model.image_logprob_inputs(texts * 2, both)
                out = loss_fn(inp.hidden, inp.weight, inp.labels, ref_c[b].to(dev), ref_r[b].to(dev), bias=inp.bias)
            else:
                h = model.feature_forward(texts)
                out = loss_fn(
                    h, reference[pid[b]].to(dev), feats[pid[b], win[b]].to(dev), feats[pid[b], lose[b]].to(dev)
                )
            opt.zero_grad(set_to_none=True)
            (out.losses.sum() * weight).backward()
            if o.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            margin = (out.chosen_rewards - out.rejected_rewards).float()
            sums = torch.stack([out.losses.detach().float().sum(), margin.sum(), (margin > 0).float().sum()])
            sums = dist.all_reduce_sum(sums * live).cpu() / len(batch)
            # the same values on every rank (reduced above; gradients are averaged), so all ranks stop together
            _check_finite(cfg, it, len(history), epoch, "loss", float(sums[0]))
            _check_finite(cfg, it, len(history), epoch, "gradient norm", float(_full(grad_norm)))
            opt.step()
            history.append(
                {
                    "epoch": epoch,
                    "step": len(history),
                    "loss": round(float(sums[0]), 6),
                    "reward_margin": round(float(sums[1]), 6),
                    "reward_accuracy": round(float(sums[2]), 4),
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    bar.close()
    # finite losses and gradients leave finite weights unless an update overflows: checked once, before anything is
    # saved from them (on every rank's shard, summed, so that all ranks stop together)
    shards = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = torch.stack([(~torch.isfinite(p.detach())).sum() for p in shards]).sum().float().reshape(1)
    n_bad = int(dist.all_reduce_sum(bad).item())
    if n_bad:
        raise FloatingPointError(
            f"iteration {it}, after train step {len(history) - 1}: {n_bad} weights are not finite; "
            + diverged_advice(cfg)
        )
    policy.eval()
    return history, model.full_state_dict() if model.strategy == "fsdp2" else None


# --- 8. evaluate -------------------------------------------------------------------------------------------------
def eval_samples(cfg: TrainConfig) -> int:
    """Images per held-out prompt: ``eval.samples``, or 1 for the continuous model's deterministic decode."""
    return 1 if cfg.mode == "continuous" and cfg.eval.decode == "deterministic" else cfg.eval.samples


@torch.no_grad()
def sample_heldout(cfg: TrainConfig, dist: Dist, it: int, model: ModelAdapter, texts: list[str]) -> torch.Tensor:
    """The model's images of the held-out prompts, with the same random streams at every iteration (common random
    numbers make iterations comparable): tokens [P, s, T] (discrete) or features [P, s, L, D] (continuous), s =
    ``eval_samples(cfg)``."""
    s = eval_samples(cfg)
    if cfg.mode == "discrete":
        seq = model.image_seq_len

        def sample(u: slice) -> torch.Tensor:
            noise = torch.stack([uniforms((s, seq), cfg.seed, "eval", j) for j in range(u.start, u.stop)])
            tokens = model.generate_images(
                texts[u], s, top_p=cfg.sample.top_p, temperature=cfg.sample.temperature, noise=noise
            )
            return tokens.cpu()

    elif cfg.eval.decode == "deterministic":

        def sample(u: slice) -> torch.Tensor:
            # the model's image of a prompt: its features without dropout (DropDiv only samples candidates)
            return model.generate_features(texts[u], 1).float().cpu()

    else:

        def sample(u: slice) -> torch.Tensor:
            # the model's images are its DropDiv samples, drawn like the candidates
            row_seeds = [stream_seed(cfg.seed, "eval", j, r) for j in range(u.start, u.stop) for r in range(s)]
            with dropdiv(cfg, model, row_seeds):
                return model.generate_features(texts[u], s).float().cpu()

    return torch.cat(map_units(dist, len(texts), cfg.sample.chunk, sample, f"iter {it} eval"))


@torch.no_grad()
def evaluate(cfg: TrainConfig, dist: Dist, it: int, model: ModelAdapter, heldout: list, spec: ModelSpec) -> dict | None:
    """Held-out alignment of ``model`` on the ``heldout`` prompts (``silmm_fast.loop.world`` prompts), in the
    evaluator's schema; the result on rank 0, None on the others. A model of the built-in world is scored by the
    world's ground truth; any other by its frozen base model's answers (``evaluate_by_base_judge``)."""
    images = sample_heldout(cfg, dist, it, model, [p.text for p in heldout])
    if not spec.world_images:
        return evaluate_by_base_judge(cfg, dist, it, images, heldout, spec)
    if not dist.is_main:
        return None
    s = images.shape[1]
    prompts = [p for p in heldout for _ in range(s)]  # [P * s] prompt of each sampled image
    images = images.flatten(0, 1)
    if cfg.mode == "discrete":
        return evaluate_tokens(prompts, images, TOKENIZER)
    return evaluate_features(prompts, images, CODEC)


@torch.no_grad()
def evaluate_by_base_judge(
    cfg: TrainConfig, dist: Dist, it: int, tokens: torch.Tensor, heldout: list, spec: ModelSpec
) -> dict | None:
    """Held-out alignment of a model without a ground-truth evaluator: the frozen base model (built for the
    occasion, so every iteration has the same judge) answers ``decompose_prompt``'s questions about each image; a
    constraint is met when p(yes) > p(no). The result on rank 0, in the evaluator's schema."""
    from silmm_fast.loop.decompose import decompose_prompt

    judge_model = build_adapter(spec, dist.device).eval()
    s = tokens.shape[1]
    questions = [decompose_prompt(p.text) for p in heldout]

    def judge_unit(u: slice) -> list[torch.Tensor]:
        per_image = [questions[i] for i in range(u.start, u.stop) for _ in range(s)]
        yes, no = judge_model.answer(tokens[u].reshape(-1, tokens.shape[-1]), per_image, len(per_image))
        return [(y > n).cpu() for y, n in zip(yes, no)]

    per_unit = max(1, cfg.sample.judge_chunk // s)
    parts = map_units(dist, len(questions), per_unit, judge_unit, f"iter {it} eval judge")
    met = [m for part in parts for m in part]
    if not dist.is_main:
        return None

    def stats(images: list[int]) -> dict:
        full = [bool(met[i].all()) for i in images]
        frac = [float(met[i].float().mean()) if len(met[i]) else 1.0 for i in images]
        return {
            "all_constraints": sum(full) / max(len(full), 1),
            "constraint_fraction": sum(frac) / max(len(frac), 1),
            "n_prompts": len(images) // s,
        }

    by_cat: dict[str, list[int]] = {}
    for i, p in enumerate(heldout):
        by_cat.setdefault(p.category, []).extend(range(i * s, (i + 1) * s))
    return {"overall": stats(list(range(len(met)))), "by_category": {c: stats(images) for c, images in by_cat.items()}}


def evaluator(spec: ModelSpec) -> str:
    """What scores the held-out images, in words (``summary.json``'s ``evaluator``)."""
    if spec.world_images:
        return "the world's ground-truth evaluator"
    return "the frozen base model's yes/no answers to rule-based questions (self-judged, not ground truth)"


# --- the files ---------------------------------------------------------------------------------------------------
def save_jsonl(path: Path) -> Any:
    """A ``save`` that writes rows to ``path`` (``RunDir.step``)."""
    return lambda rows: store.write_jsonl(path, rows)


def load_jsonl(path: Path) -> Any:
    """A ``load`` that reads the rows at ``path`` (``RunDir.step``)."""
    return lambda: store.read_jsonl(path)


def save_scores(d: Path, scores: Scores) -> None:
    store.write_jsonl(d / "scores.jsonl", scores.rows)
    store.write_json(d / "judge.json", scores.counts)


def load_scores(d: Path) -> Scores:
    return Scores(store.read_jsonl(d / "scores.jsonl"), store.read_json(d / "judge.json"))
