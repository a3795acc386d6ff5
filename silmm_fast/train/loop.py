"""The SILMM loop: for each iteration, the model writes prompts, samples candidates, decomposes the prompts into
yes/no questions, judges its own candidates, builds preference pairs, and learns from them (DPO on image tokens, or
KC-DPO on feature matrices); then the ground-truth evaluator scores it on held-out prompts.

One explicit loop, one step per phase. Each step writes its outputs atomically and is then marked done in
``state.json``; a rerun of the same command skips done steps and reloads their outputs, so a crash loses at most the
step that was running. Every random stream derives from (run seed, iteration, phase), so a redone step gives the same
result as the lost one.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from silmm_fast.losses.fused_linear_dpo import FusedLinearDPOLoss
from silmm_fast.losses.kc_dpo import KCDPOLoss
from silmm_fast.models.bootstrap import BootstrapConfig, bootstrap
from silmm_fast.models.shapes_lmm import ShapesLMM
from silmm_fast.ops.fused_linear_logprobs import fused_linear_logprobs
from silmm_fast.train import report, store
from silmm_fast.train.config import TrainConfig
from silmm_fast.train.pairs import aggregate_scores, make_pairs
from silmm_fast.world import CATEGORIES, FeatureCodec, ImageTokenizer, prompt_split, render_grid, render_tokens
from silmm_fast.world.evaluate import evaluate_features, evaluate_tokens

PHASES = ("prompts", "questions", "generate", "judge", "pairs", "train", "eval")
HELDOUT_SEED = 1234  # the held-out prompt set is the same for every run, so runs are comparable


def seeded(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator whose seed is a hash of the run seed and ``parts`` (iteration, phase, ...)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def log(msg: str) -> None:
    tqdm.write(msg)


def chunked(n: int, size: int, desc: str):
    """Slices covering range(n), ``size`` at a time, with a progress bar named ``desc``."""
    with tqdm(total=n, desc=desc, leave=False, unit="it", dynamic_ncols=True) as bar:
        for s in range(0, n, size):
            yield slice(s, min(n, s + size))
            bar.update(min(n, s + size) - s)


class Run:
    """One run directory and the state the phases share."""

    CHUNK = 32  # prompts per batched generation call (bounds memory; one progress-bar tick each)
    JUDGE_CHUNK = 256  # images per batched judge call

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir()
        self.state = store.RunState(self.dir)
        self.tokenizer = ImageTokenizer()
        self.codec = FeatureCodec()
        self.heldout = prompt_split(HELDOUT_SEED, cfg.eval.heldout_per_category)["heldout"]
        summary_path = self.dir / "summary.json"
        self.iterations: list[dict] = store.read_json(summary_path)["iterations"] if summary_path.exists() else []

    # --- bookkeeping -----------------------------------------------------------------------------------------
    def check_config(self) -> None:
        """A resumed run must use the configuration it started with."""
        path = self.dir / "config.json"
        current = self.cfg.to_dict()
        if path.exists():
            saved = store.read_json(path)
            if saved != current:
                diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
                raise ValueError(
                    f"out: {self.dir} holds a run with another configuration (differs in {diff}); "
                    "use another --out, or the same settings to resume it"
                )
        else:
            store.write_json(path, current)
            import yaml

            store.write_text(self.dir / "config.yaml", yaml.safe_dump(current, sort_keys=False))

    def iter_dir(self, it: int) -> Path:
        return self.dir / f"iter{it}"

    def timed(self, it: int, phase: str, seconds: float) -> None:
        path = self.iter_dir(it) / "timings.json"
        timings = store.read_json(path) if path.exists() else {}
        timings[phase] = round(seconds, 3)
        store.write_json(path, timings)

    def timings(self, it: int) -> dict:
        path = self.iter_dir(it) / "timings.json"
        return store.read_json(path) if path.exists() else {}

    # --- models --------------------------------------------------------------------------------------------------
    def base_model(self) -> ShapesLMM:
        variant = self.cfg.mode
        config = BootstrapConfig.tiny(variant) if self.cfg.model.tiny else BootstrapConfig(variant=variant)
        return bootstrap(variant, cache_dir=self.cfg.model.cache_dir, config=config)

    def model_after(self, it: int) -> ShapesLMM:
        """The policy after iteration ``it`` (0: the base model)."""
        return self.base_model() if it == 0 else ShapesLMM.load(self.iter_dir(it) / "checkpoint")

    # --- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: ShapesLMM, it: int) -> dict:
        texts = [p.text for p in self.heldout]
        desc = f"iter {it} eval"
        if self.cfg.mode == "discrete":
            s, gen = self.cfg.eval.samples, seeded(self.cfg.seed, "eval")
            tokens = torch.cat(
                [
                    model.generate_images(
                        texts[b], s, top_p=self.cfg.sample.top_p, temperature=self.cfg.sample.temperature, generator=gen
                    )
                    for b in chunked(len(texts), self.CHUNK, desc)
                ]
            )
            prompts = [p for p in self.heldout for _ in range(s)]
            return evaluate_tokens(prompts, tokens.reshape(-1, tokens.shape[-1]), self.tokenizer)
        feats = torch.cat([model.feature_forward(texts[b]) for b in chunked(len(texts), self.CHUNK, desc)])
        return evaluate_features(self.heldout, feats.float(), self.codec)

    def record_eval(self, it: int, model: ShapesLMM) -> dict:
        step = f"iter{it}/eval"
        path = self.iter_dir(it) / "eval.json"
        if not self.state.is_done(step):
            t0 = time.perf_counter()
            result = self.evaluate(model, it)
            store.write_json(path, result)
            self.timed(it, "eval", time.perf_counter() - t0)
            self.state.mark(step)
        return store.read_json(path)

    def update_summary(self, it: int, heldout: dict, extra: dict) -> None:
        entry = {"iteration": it, "heldout": heldout, **extra, "wall_s": self.timings(it)}
        self.iterations = [e for e in self.iterations if e["iteration"] != it] + [entry]
        self.iterations.sort(key=lambda e: e["iteration"])
        summary = report.build_summary(
            {"mode": self.cfg.mode, "feedback": self.cfg.feedback, "seed": self.cfg.seed}, self.iterations
        )
        store.write_json(self.dir / "summary.json", summary)
        report.write_report(summary, self.dir)

    # --- one SILMM iteration -------------------------------------------------------------------------------------
    def step(self, it: int, phase: str, fn) -> None:
        key = f"iter{it}/{phase}"
        if self.state.is_done(key):
            return
        t0 = time.perf_counter()
        fn()
        self.timed(it, phase, time.perf_counter() - t0)
        self.state.mark(key)

    def iteration(self, it: int, policy: ShapesLMM) -> ShapesLMM:
        cfg, d = self.cfg, self.iter_dir(it)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        seed = cfg.seed

        def write_prompts() -> None:
            with torch.no_grad():
                texts = policy.write_prompts(
                    CATEGORIES,
                    cfg.sample.prompts_per_category,
                    top_p=cfg.sample.top_p,
                    generator=seeded(seed, it, "prompts"),
                )
            cats = [c for c in CATEGORIES for _ in range(cfg.sample.prompts_per_category)]
            rows = [{"id": i, "category": c, "prompt": t} for i, (c, t) in enumerate(zip(cats, texts)) if t.strip()]
            store.write_jsonl(d / "prompts.jsonl", rows)

        self.step(it, "prompts", write_prompts)
        prompts = [r["prompt"] for r in store.read_jsonl(d / "prompts.jsonl")]

        def write_questions() -> None:
            from silmm_fast.decompose import decompose_prompt

            with torch.no_grad():
                written = policy.decompose(prompts)
            rows = []
            for i, (p, qs) in enumerate(zip(prompts, written)):
                source = "model"
                if not qs:  # the model wrote nothing usable: the rule-based decomposer stands in
                    qs, source = decompose_prompt(p), "rules"
                rows.append({"id": i, "prompt": p, "questions": qs, "source": source})
            store.write_jsonl(d / "questions.jsonl", rows)

        self.step(it, "questions", write_questions)
        questions = [r["questions"] for r in store.read_jsonl(d / "questions.jsonl")]

        self.step(it, "generate", lambda: self.generate(it, policy, prompts))
        cands = store.read_tensors(d / "candidates.pt")

        self.step(it, "judge", lambda: self.judge(it, policy, cands["tokens"], questions))
        scores = torch.tensor([r["scores"] for r in store.read_jsonl(d / "scores.jsonl")])

        def write_pairs() -> None:
            pairs = make_pairs(scores, cfg.pairs.k, cfg.pairs.min_margin)
            store.write_jsonl(
                d / "pairs.jsonl",
                [{"prompt_id": p, "chosen": w, "rejected": lo, "gap": round(g, 5)} for p, w, lo, g in pairs],
            )
            self.write_candidate_grid(it, prompts, cands["tokens"], scores, pairs)

        self.step(it, "pairs", write_pairs)
        pairs = store.read_jsonl(d / "pairs.jsonl")

        def train() -> None:
            losses = self.train(it, policy, reference, prompts, cands, pairs)
            store.write_jsonl(d / "metrics.jsonl", losses)
            policy.save(d / "checkpoint")

        self.step(it, "train", train)
        return ShapesLMM.load(d / "checkpoint")

    # --- phases with real work -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, it: int, policy: ShapesLMM, prompts: list[str]) -> None:
        cfg = self.cfg
        gen = seeded(cfg.seed, it, "generate")
        desc = f"iter {it} generate"
        if cfg.mode == "discrete":
            tokens = torch.cat(
                [
                    policy.generate_images(
                        prompts[b],
                        cfg.sample.candidates,
                        top_p=cfg.sample.top_p,
                        temperature=cfg.sample.temperature,
                        generator=gen,
                    )
                    for b in chunked(len(prompts), self.CHUNK, desc)
                ]
            )
            store.write_tensors(self.iter_dir(it) / "candidates.pt", {"tokens": tokens})
            return
        from silmm_fast import diverse_select, dropdiv

        k, n = cfg.sample.oversample, cfg.sample.candidates
        with dropdiv(
            policy,
            last_layers=cfg.sample.dropdiv_layers,
            p=cfg.sample.dropdiv_p,
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
        ):
            feats = torch.cat(
                [policy.generate_features(prompts[b], k) for b in chunked(len(prompts), self.CHUNK, desc)]
            )  # [P, K, L, D]
        picked = diverse_select(feats, n, method=cfg.sample.select_method)  # [P, n]
        chosen = torch.gather(feats, 1, picked[:, :, None, None].expand(-1, -1, *feats.shape[2:]))
        scenes = self.codec.decode_batch(chosen.reshape(-1, *feats.shape[2:]), strict=False)
        tokens = self.tokenizer.encode_batch(scenes).view(len(prompts), n, -1)
        store.write_tensors(
            self.iter_dir(it) / "candidates.pt", {"tokens": tokens, "features": chosen, "selected": picked}
        )

    @torch.no_grad()
    def judge(self, it: int, policy: ShapesLMM, tokens: torch.Tensor, questions: list[list[str]]) -> None:
        cfg = self.cfg
        p, n = tokens.shape[:2]
        if cfg.feedback == "random":  # control: the same pipeline, but scores that carry no information
            scores = torch.rand(p, n, generator=seeded(cfg.seed, it, "judge")) * 2 - 1
            n_questions = 0
        else:
            per_image = [questions[i // n] for i in range(p * n)]
            flat = tokens.reshape(p * n, -1)
            p_yes, p_no = [], []
            for b in chunked(p * n, self.JUDGE_CHUNK, f"iter {it} judge"):
                yes, no = policy.answer(flat[b], per_image[b])
                p_yes += yes
                p_no += no
            owner = torch.repeat_interleave(torch.arange(p * n), torch.tensor([len(q) for q in per_image]))
            scores = aggregate_scores(torch.cat(p_yes).cpu(), torch.cat(p_no).cpu(), owner, p * n).view(p, n)
            n_questions = int(owner.numel())
        rows = [{"prompt_id": i, "scores": [round(float(s), 6) for s in scores[i]]} for i in range(p)]
        store.write_jsonl(self.iter_dir(it) / "scores.jsonl", rows)
        store.write_json(self.iter_dir(it) / "judge.json", {"questions_judged": n_questions, "images": p * n})

    def write_candidate_grid(
        self,
        it: int,
        prompts: list[str],
        tokens: torch.Tensor,
        scores: torch.Tensor,
        pairs: list[tuple[int, int, int, float]],
        max_prompts: int = 8,
    ) -> None:
        chosen = {(p, w) for p, w, _, _ in pairs}
        rejected = {(p, lo) for p, _, lo, _ in pairs}
        images, captions = [], []
        rows = min(max_prompts, len(prompts))
        for p in range(rows):
            for j in range(tokens.shape[1]):
                mark = "CHOSEN " if (p, j) in chosen else "REJECTED " if (p, j) in rejected else ""
                images.append(render_tokens(tokens[p, j].tolist(), size=96))
                head = f"{prompts[p][:40]}\n" if j == 0 else "\n"
                captions.append(f"{head}{mark}{scores[p, j]:+.2f}")
        grid = render_grid(
            images,
            captions,
            columns=tokens.shape[1],
            title=f"iteration {it}: candidates per prompt (row), self-judged score, chosen / rejected",
        )
        store.write_png(self.iter_dir(it) / "candidates.png", grid)

    def train(
        self, it: int, policy: ShapesLMM, reference: ShapesLMM, prompts: list[str], cands: dict, pairs: list[dict]
    ) -> list[dict]:
        cfg, o = self.cfg, self.cfg.optim
        if not pairs:
            log(f"iteration {it}: no pairs passed the margin; the policy is unchanged")
            return []
        gen = seeded(cfg.seed, it, "train")
        pid = torch.tensor([r["prompt_id"] for r in pairs])
        win = torch.tensor([r["chosen"] for r in pairs])
        lose = torch.tensor([r["rejected"] for r in pairs])
        opt = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=o.lr, weight_decay=o.weight_decay
        )
        policy.train()
        if cfg.mode == "discrete":
            tokens = cands["tokens"]
            loss_fn = FusedLinearDPOLoss(beta=o.beta, loss_type=o.loss_type)
            ref_c, ref_r = [], []
            with torch.no_grad():  # reference log-probs: once per iteration, through the same fp32 path
                for s in range(0, len(pairs), o.batch_size):
                    b = slice(s, s + o.batch_size)
                    both = torch.cat([tokens[pid[b], win[b]], tokens[pid[b], lose[b]]])
                    texts = [prompts[i] for i in pid[b].tolist()] * 2
                    h, w, lab = reference.image_logprob_inputs(texts, both)
                    lp = fused_linear_logprobs(h, w, lab)
                    ref_c.append(lp[: len(lp) // 2])
                    ref_r.append(lp[len(lp) // 2 :])
            ref_c, ref_r = torch.cat(ref_c), torch.cat(ref_r)
        else:
            feats = cands["features"]
            loss_fn = KCDPOLoss(gamma=o.gamma, kernel=o.kernel, pool=o.pool)
            with torch.no_grad():
                ref_feats = reference.feature_forward(prompts)
        history = []
        steps = o.epochs * ((len(pairs) + o.batch_size - 1) // o.batch_size)
        bar = tqdm(total=steps, desc=f"iter {it} train", leave=False, unit="step")
        for epoch in range(o.epochs):
            order = torch.randperm(len(pairs), generator=gen)
            for s in range(0, len(pairs), o.batch_size):
                b = order[s : s + o.batch_size]
                texts = [prompts[i] for i in pid[b].tolist()]
                if cfg.mode == "discrete":
                    both = torch.cat([tokens[pid[b], win[b]], tokens[pid[b], lose[b]]])
                    h, w, lab = policy.image_logprob_inputs(texts * 2, both)
                    out = loss_fn(h, w, lab, ref_c[b], ref_r[b])
                else:
                    h = policy.feature_forward(texts)
                    out = loss_fn(h, ref_feats[pid[b]], feats[pid[b], win[b]], feats[pid[b], lose[b]])
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if o.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), o.grad_clip)
                opt.step()
                history.append(
                    {
                        "epoch": epoch,
                        "step": len(history),
                        "loss": round(out.loss.detach().item(), 6),
                        "reward_margin": round(float((out.chosen_rewards - out.rejected_rewards).mean()), 6),
                        "reward_accuracy": round(float((out.chosen_rewards > out.rejected_rewards).float().mean()), 4),
                    }
                )
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        bar.close()
        policy.eval()
        return history

    # --- the whole run ---------------------------------------------------------------------------------------------
    def iteration_extra(self, it: int) -> dict:
        d, t = self.iter_dir(it), self.timings(it)
        judged = store.read_json(d / "judge.json")
        metrics = store.read_jsonl(d / "metrics.jsonl")
        n_pairs = len(store.read_jsonl(d / "pairs.jsonl"))
        cands = judged["images"]
        gen_count = (
            cands if self.cfg.mode == "discrete" else cands // self.cfg.sample.candidates * self.cfg.sample.oversample
        )
        last_epoch = [m["loss"] for m in metrics if m["epoch"] == metrics[-1]["epoch"]] if metrics else []
        return {
            "throughput": {
                "candidates_per_s": round(gen_count / max(t.get("generate", 0), 1e-9), 2),
                "questions_per_s": round(judged["questions_judged"] / max(t.get("judge", 0), 1e-9), 2),
                "pairs_per_s": round(n_pairs * self.cfg.optim.epochs / max(t.get("train", 0), 1e-9), 2),
            },
            "pairs": n_pairs,
            "train_loss": round(sum(last_epoch) / len(last_epoch), 6) if last_epoch else None,
        }

    def line(self, it: int) -> str:
        e = next(x for x in self.iterations if x["iteration"] == it)
        h = e["heldout"]["overall"]
        base = self.iterations[0]["heldout"]["overall"]["all_constraints"]
        gain = report.relative_gain(base, h["all_constraints"])
        parts = [
            f"iteration {it}: held-out all-constraints {h['all_constraints']:.3f}",
            f"constraint fraction {h['constraint_fraction']:.3f}",
        ]
        if it > 0:
            t = e["throughput"]
            parts += [
                f"vs base {'n/a' if gain is None else f'{gain * 100:+.1f}%'}",
                f"pairs {e['pairs']}",
                f"{t['candidates_per_s']:.0f} cand/s, {t['questions_per_s']:.0f} q/s, {t['pairs_per_s']:.0f} pairs/s",
            ]
        return " | ".join(parts) + f" | {sum(e['wall_s'].values()):.1f}s"

    def summarize(self, it: int) -> None:
        """(Re)write the summary entry of a completed iteration from its files, and print its line."""
        heldout = store.read_json(self.iter_dir(it) / "eval.json")
        self.update_summary(it, heldout, self.iteration_extra(it) if it else {})
        log(self.line(it))

    def run(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.check_config()
        start = max([0] + [i for i in range(1, self.cfg.iterations + 1) if self.state.is_done(f"iter{i}/eval")])
        if start:
            log(f"resuming {self.dir}: iterations 1..{start} are complete")
        policy = self.model_after(start)
        if start == 0:
            self.record_eval(0, policy)
        for it in range(start + 1):  # a crash may have come between an evaluation and its summary entry
            self.summarize(it)
        for it in range(start + 1, self.cfg.iterations + 1):
            policy = self.iteration(it, policy)
            self.record_eval(it, policy)
            self.summarize(it)
        return store.read_json(self.dir / "summary.json")
