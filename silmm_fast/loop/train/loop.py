"""The SILMM loop: for each iteration, the model writes prompts, samples candidates, decomposes the prompts into yes/no
questions, judges its own candidates, builds preference pairs, and learns from them (DPO on image tokens, or KC-DPO on
feature matrices); then the ground-truth evaluator scores it on held-out prompts.

The model is reached only through the adapter protocol (``silmm_fast.loop.adapters.ModelAdapter``): ``ShapesAdapter``
over the built-in world's model (default), or ``JanusAdapter`` over a local Janus / Janus-Pro checkpoint (``--model
janus --model-path DIR``). The world's ground-truth evaluator reads only the world's image tokens; for other models the
held-out prompts are scored by the frozen base model answering ``decompose_prompt``'s questions (not ground truth).

One explicit loop, one step per phase. Each step writes its outputs atomically and is then marked done in
``state.json``; a rerun of the same command skips done steps and reloads their outputs, so a crash loses at most the
step that was running.

Randomness: every random stream of a prompt derives from (run seed, iteration, phase, prompt id) and nothing else — per-
prompt noise for the token draws (``sample_next``), per-row DropDiv streams, per-prompt random-feedback scores, one
global permutation of the pairs per iteration. So a redone step gives the same result as the lost one, and the results
do not depend on how prompts are batched or on how many processes share the work.

Several processes (``torchrun``, see ``silmm_fast.loop.train.distributed``): every list of prompts (or pairs) is cut
into units of ``sample.chunk`` prompts (``optim.batch_size`` pairs for reference log-probs), whose boundaries do not
depend on the number of processes; each rank runs a contiguous run of units and the results are gathered on every rank.
A batch's floating-point results can depend on its composition (the CPU's matrix products do, at the last bit), so fixed
units are what makes scores bitwise identical at any world size. Training shards each optimizer step's pairs over the
ranks (DDP or FSDP2); the global batch is unchanged, each rank weights its loss by its share, so the averaged gradient
is the single-process mean up to float rounding. Rank 0 alone reads and writes the run directory and hands what the
others need to them through collectives, so only rank 0's machine needs the directory.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from silmm_fast.loop.adapters import JanusAdapter, ModelAdapter, ShapesAdapter, check_adapter
from silmm_fast.loop.models.bootstrap import bootstrap, recipe
from silmm_fast.loop.models.shapes_lmm import ShapesLMM, ShapesLMMConfig
from silmm_fast.loop.train import distributed, report, store
from silmm_fast.loop.train.config import TrainConfig, identity
from silmm_fast.loop.train.pairs import aggregate_scores, make_pairs
from silmm_fast.loop.world import (
    CATEGORIES,
    FeatureCodec,
    ImageTokenizer,
    audit_pairs,
    parse_prompt,
    prompt_split,
    render_grid,
)
from silmm_fast.loop.world.evaluate import evaluate_features, evaluate_tokens
from silmm_fast.losses.fused_linear_dpo import FusedLinearDPOLoss
from silmm_fast.losses.kc_dpo import KCDPOLoss

PHASES = ("prompts", "questions", "generate", "judge", "pairs", "train", "eval")
HELDOUT_SEED = 1234  # the held-out prompt set is the same for every run, so runs are comparable
PROMPT_TOKENS = 32  # most words the model may write for one prompt


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


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (FSDP2's gradient norm), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def log(msg: str) -> None:
    tqdm.write(msg)


def units(n: int, size: int) -> list[slice]:
    """Slices of ``size`` covering range(n): the fixed units of work, whatever the number of processes."""
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


class Run:
    """One run directory and the state the phases share, on one process of the run (``dist``)."""

    def __init__(self, cfg: TrainConfig, dist: distributed.Dist | None = None) -> None:
        self.cfg = cfg
        self.dist = dist if dist is not None else distributed.setup(cfg.dist.device)
        self.main = self.dist.is_main
        self.device = self.dist.device
        self.dir = cfg.run_dir()
        self.tokenizer = ImageTokenizer()
        self.codec = FeatureCodec()
        self.heldout = prompt_split(HELDOUT_SEED, cfg.eval.heldout_per_category)["heldout"]
        # Only rank 0 reads the run directory; the others get its state from it.
        self.state = store.RunState(self.dir, persist=self.main) if self.main else None
        done = self.dist.broadcast(self.state.done if self.main else None)
        if not self.main:
            self.state = store.RunState(self.dir, done=done, persist=False)
        summary_path = self.dir / "summary.json"
        self.iterations: list[dict] = (
            store.read_json(summary_path)["iterations"] if self.main and summary_path.exists() else []
        )

    # --- bookkeeping -----------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.main:
            log(msg)

    def shared(self, read: Callable[[], Any]) -> Any:
        """``read()`` on rank 0 (a file of the run directory), its result on every rank."""
        return self.dist.broadcast(read() if self.main else None)

    def check_setup(self) -> None:
        """Before any work: the same configuration on every rank, enough prompts for every rank, a usable
        strategy."""
        cfg, world = self.cfg, self.dist.world_size
        self.dist.check_same_config(cfg.to_dict())
        n_prompts = len(CATEGORIES) * cfg.sample.prompts_per_category
        for what, n in (
            (f"prompts per iteration ({len(CATEGORIES)} categories x sample.prompts_per_category)", n_prompts),
            (f"held-out prompts ({len(CATEGORIES)} categories x eval.heldout_per_category)", len(self.heldout)),
        ):
            if world > n:
                raise ValueError(
                    f"world size {world} is larger than the number of {what} = {n}: start fewer processes "
                    "or ask for more prompts"
                )
        distributed.check_strategy(cfg.dist.strategy, self.dist)
        n_units = -(-n_prompts // cfg.sample.chunk)
        if n_units < world:
            self.log(
                f"note: {n_prompts} prompts make only {n_units} units of sample.chunk={cfg.sample.chunk} for "
                f"{world} processes; some will idle (a smaller sample.chunk spreads the work)"
            )

    def prepare_dir(self) -> None:
        """Create the run directory (rank 0), or refuse by name an ``--out`` that cannot hold one: a file, or a
        directory this process cannot write."""
        error = None
        if self.main:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=self.dir, prefix=".write-check.", suffix=store.TMP_SUFFIX)
                os.close(fd)
                os.unlink(probe)
                orphans = store.remove_orphans(self.dir)
                if orphans:
                    self.log(f"removed {len(orphans)} temporary files that an interrupted run left in {self.dir}")
            except OSError as err:
                error = f"out: expected a writable directory, got {str(self.dir)!r} ({err.strerror or err})"
        error = self.dist.broadcast(error)
        if error:
            raise ValueError(error)

    def check_config(self) -> None:
        """A resumed run must use the configuration it started with (the run identity: ``dist`` may change), except
        where no completed step used what changed: anything before the first step is done (a start that failed, say
        on a wrong model path), and the optimizer settings before any train step is done (a run whose training
        diverged). Then the new configuration replaces the saved one."""
        path = self.dir / "config.json"
        current = self.cfg.run_identity()
        error = None
        if self.main:
            # a config written before the runtime fields were left out of the identity compares without them
            saved = identity(store.read_json(path)) if path.exists() else None
            restore = saved is None and bool(self.state.done)
            if restore:  # the run's settings must not be lost with config.json: its copy in config.yaml stands in
                import yaml

                copy = self.dir / "config.yaml"
                try:
                    data = yaml.safe_load(copy.read_text()) if copy.is_file() else None
                except (yaml.YAMLError, UnicodeDecodeError):
                    data = None
                if isinstance(data, dict):
                    saved = identity(data)
                else:
                    error = (
                        f"out: {self.dir} holds completed steps but no config.json and no readable config.yaml: its "
                        "settings are unknown; restore one of them, or use another --out"
                    )
            if error is None and saved is not None and saved != current:
                old, new = _flatten(saved), _flatten(current)
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                done = self.state.done
                unused = not done or (
                    all(k.startswith("optim.") for k in diff) and not any(s.endswith("/train") for s in done)
                )
                if unused:
                    self.log(f"note: no completed step of {self.dir} used {', '.join(diff)}; the new settings apply")
                    saved = None
                else:
                    changes = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
                    error = (
                        f"out: {self.dir} holds a run with another configuration ({changes}); "
                        "use another --out, or the same settings to resume it"
                    )
            if error is None and (saved is None or restore):
                store.write_json(path, current)
                import yaml

                store.write_text(self.dir / "config.yaml", yaml.safe_dump(current, sort_keys=False))
        error = self.dist.broadcast(error)
        if error:
            raise ValueError(error)

    def check_files(self) -> None:
        """Each done step's files must be the ones it wrote (checksums in ``state.json``): the first step with a
        missing or changed file is redone, with every step done after it (the run is deterministic, so they give the
        same results as before)."""
        if self.main:
            damaged = self.state.damaged()
            if damaged:
                step, name = damaged
                later = self.state.done[self.state.done.index(step) + 1 :]
                self.log(
                    f"{self.dir / name} is missing or changed since step {step} wrote it: redoing {step}"
                    + (f" and the {len(later)} steps done after it" if later else "")
                )
                self.state.undo_from(step)
        done = self.dist.broadcast(self.state.done if self.main else None)
        if not self.main:
            self.state.done = list(done)

    def iter_dir(self, it: int) -> Path:
        return self.dir / f"iter{it}"

    def timed(self, it: int, phase: str, seconds: float) -> None:
        if not self.main:
            return
        path = self.iter_dir(it) / "timings.json"
        timings = store.read_json(path) if path.exists() else {}
        timings[phase] = round(seconds, 3)
        store.write_json(path, timings)

    def timings(self, it: int) -> dict:
        path = self.iter_dir(it) / "timings.json"
        return store.read_json(path) if path.exists() else {}

    def map_units(self, n: int, size: int, fn: Callable[[slice], Any], desc: str) -> list[Any]:
        """``fn(unit)`` for every unit of ``units(n, size)``, the units shared out contiguously among the ranks;
        returns every unit's result, in unit order, on every rank. ``fn`` must return CPU data."""
        parts = units(n, size)
        mine = [parts[i] for i in self.dist.shard(len(parts))]
        local = []
        total = sum(u.stop - u.start for u in mine)
        with tqdm(total=total, desc=desc, leave=False, unit="it", dynamic_ncols=True, disable=not self.main) as bar:
            for u in mine:
                local.append(fn(u))
                bar.update(u.stop - u.start)
        return [r for rank_results in self.dist.all_gather(local) for r in rank_results]

    # --- models --------------------------------------------------------------------------------------------------
    @property
    def janus(self) -> bool:
        return self.cfg.model.name == "janus"

    def load_janus(self, path: str | Path) -> JanusAdapter:
        """A Janus checkpoint directory on this rank's device, with the run's guidance scale."""
        adapter = JanusAdapter.from_pretrained(path, device=self.device)
        adapter.options.cfg_scale = self.cfg.model.cfg_scale
        return adapter

    def skeleton(self, shapes_config: dict | None) -> ModelAdapter:
        """An adapter of the run's architecture, for weights loaded next (Janus: the base checkpoint, which every
        rank must be able to read at model.path)."""
        if self.janus:
            return self.load_janus(self.cfg.model.path)
        return ShapesAdapter(ShapesLMM(ShapesLMMConfig.from_dict(shapes_config)))

    def shared_model(self, load: Callable[[], ModelAdapter]) -> ModelAdapter:
        """``load()`` on rank 0; the other ranks build the same architecture and receive its weights. On this rank's
        device. (A Janus-sized model travels as one pickled state dict: slow; a shared run directory would avoid it.)"""
        model = load() if self.main else None
        if self.main:
            check_adapter(model)
        if self.dist.world_size > 1:
            payload = self.dist.broadcast(
                (
                    None if self.janus else model.model.config.to_dict(),
                    {k: v.detach().cpu() for k, v in model.state_dict().items()},
                )
                if self.main
                else None
            )
            if not self.main:
                model = self.skeleton(payload[0])
                model.load_state_dict(payload[1])
        return model.to(self.device).eval()

    def base_model(self) -> ModelAdapter:
        if self.janus:
            return self.shared_model(lambda: self.load_janus(self.cfg.model.path))
        variant = self.cfg.mode
        config = recipe(self.cfg.model.recipe, variant, tiny=self.cfg.model.tiny)
        return self.shared_model(
            lambda: ShapesAdapter(bootstrap(variant, cache_dir=self.cfg.model.cache_dir, config=config))
        )

    def model_after(self, it: int) -> ModelAdapter:
        """The policy after iteration ``it`` (0: the base model)."""
        if it == 0:
            return self.base_model()
        path = self.iter_dir(it) / "checkpoint"

        def load() -> ModelAdapter:
            try:
                return self.load_janus(path) if self.janus else ShapesAdapter.load(path)
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:
                raise ValueError(f"{path}: cannot load the checkpoint ({err}); the run directory is damaged") from None

        return self.shared_model(load)

    def dropdiv(self, model: ModelAdapter, row_seeds: list[int]):
        """DropDiv as configured (``sample.dropdiv_layers``, 0 for all; ``sample.dropdiv_p``), one seed per row."""
        from silmm_fast import dropdiv

        s = self.cfg.sample
        return dropdiv(model, last_layers=s.dropdiv_layers or None, p=s.dropdiv_p, row_seeds=row_seeds)

    # --- evaluation ------------------------------------------------------------------------------------------------
    def eval_samples(self) -> int:
        """Images per held-out prompt: ``eval.samples``, or 1 for the continuous model's deterministic decode."""
        cfg = self.cfg
        return 1 if cfg.mode == "continuous" and cfg.eval.decode == "deterministic" else cfg.eval.samples

    @torch.no_grad()
    def evaluate(self, model: ModelAdapter, it: int) -> dict | None:
        """Held-out alignment (ground-truth evaluator), the prompts sharded over the ranks; the result on rank 0."""
        cfg, texts, s = self.cfg, [p.text for p in self.heldout], self.eval_samples()
        desc = f"iter {it} eval"
        if cfg.mode == "discrete":
            seq = model.image_seq_len

            def sample(u: slice) -> torch.Tensor:
                # the same noise at every iteration (common random numbers make iterations comparable)
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
                # the model's images are its DropDiv samples, drawn like the candidates, with the same masks at every
                # iteration (common random numbers, as above)
                row_seeds = [stream_seed(cfg.seed, "eval", j, r) for j in range(u.start, u.stop) for r in range(s)]
                with self.dropdiv(model, row_seeds):
                    return model.generate_features(texts[u], s).float().cpu()

        images = torch.cat(self.map_units(len(texts), cfg.sample.chunk, sample, desc))
        if self.janus:
            return self.evaluate_by_base_judge(images, it)
        if not self.main:
            return None
        prompts = [p for p in self.heldout for _ in range(s)]  # [P * s] prompt of each sampled image
        images = images.flatten(0, 1)
        if cfg.mode == "discrete":
            return evaluate_tokens(prompts, images, self.tokenizer)
        return evaluate_features(prompts, images, self.codec)

    @torch.no_grad()
    def evaluate_by_base_judge(self, tokens: torch.Tensor, it: int) -> dict | None:
        """Held-out alignment of a model without a ground-truth evaluator: the frozen base model (loaded for the
        occasion, so every iteration has the same judge) answers ``decompose_prompt``'s questions about each image;
        a constraint is met when p(yes) > p(no). The result on rank 0, in the evaluator's schema."""
        from silmm_fast.loop.decompose import decompose_prompt

        judge = self.load_janus(self.cfg.model.path).eval()
        s = tokens.shape[1]
        questions = [decompose_prompt(p.text) for p in self.heldout]

        def judge_unit(u: slice) -> list[torch.Tensor]:
            per_image = [questions[i] for i in range(u.start, u.stop) for _ in range(s)]
            yes, no = judge.answer(tokens[u].reshape(-1, tokens.shape[-1]), per_image, len(per_image))
            return [(y > n).cpu() for y, n in zip(yes, no)]

        per_unit = max(1, self.cfg.sample.judge_chunk // s)
        parts = self.map_units(len(questions), per_unit, judge_unit, f"iter {it} eval judge")
        met = [m for part in parts for m in part]
        if not self.main:
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
        for i, p in enumerate(self.heldout):
            by_cat.setdefault(p.category, []).extend(range(i * s, (i + 1) * s))
        return {
            "overall": stats(list(range(len(met)))),
            "by_category": {c: stats(images) for c, images in by_cat.items()},
        }

    def evaluator(self) -> str:
        if self.janus:
            return "the frozen base model's yes/no answers to rule-based questions (self-judged, not ground truth)"
        return "the world's ground-truth evaluator"

    def record_eval(self, it: int, model: ModelAdapter) -> None:
        step = f"iter{it}/eval"
        if not self.state.is_done(step):
            t0 = time.perf_counter()
            result = self.evaluate(model, it)
            with store.recording() as written:
                if self.main:
                    store.write_json(self.iter_dir(it) / "eval.json", result)
            self.timed(it, "eval", time.perf_counter() - t0)
            self.state.record(step, written)
            self.state.mark(step)
            self.dist.barrier()

    def update_summary(self, it: int, heldout: dict, extra: dict) -> None:
        entry = {"iteration": it, "heldout": heldout, **extra, "wall_s": self.timings(it)}
        self.iterations = [e for e in self.iterations if e["iteration"] != it] + [entry]
        self.iterations.sort(key=lambda e: e["iteration"])
        meta = {"mode": self.cfg.mode, "feedback": self.cfg.feedback, "seed": self.cfg.seed}
        meta.update(model=self.cfg.model.name, evaluator=self.evaluator())
        summary = report.build_summary(meta, self.iterations)
        store.write_json(self.dir / "summary.json", summary)
        report.write_report(summary, self.dir)

    # --- one SILMM iteration -------------------------------------------------------------------------------------
    def step(self, it: int, phase: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` (every rank; rank 0 writes its files) unless already done; then rank 0 marks it done, after
        all its files are durable, and every rank waits for that."""
        key = f"iter{it}/{phase}"
        if self.state.is_done(key):
            return
        t0 = time.perf_counter()
        with store.recording() as written:
            fn()
        self.timed(it, phase, time.perf_counter() - t0)
        self.state.record(key, written)
        self.state.mark(key)
        self.dist.barrier()

    def iteration(self, it: int, policy: ModelAdapter) -> ModelAdapter:
        cfg, d = self.cfg, self.iter_dir(it)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)

        self.step(it, "prompts", lambda: self.write_prompts(it, policy))
        rows = self.shared(lambda: store.read_jsonl(d / "prompts.jsonl"))
        prompts = [r["prompt"] for r in rows]
        ids = [r["id"] for r in rows]  # a prompt's id: its slot among the prompts the model was asked to write

        self.step(it, "questions", lambda: self.write_questions(it, policy, prompts))
        questions = [r["questions"] for r in self.shared(lambda: store.read_jsonl(d / "questions.jsonl"))]

        self.step(it, "generate", lambda: self.generate(it, policy, prompts, ids))
        cands = self.shared(lambda: store.read_tensors(d / "candidates.pt"))

        self.step(it, "judge", lambda: self.judge(it, policy, prompts, cands["tokens"], questions, ids))
        scores = torch.tensor([r["scores"] for r in self.shared(lambda: store.read_jsonl(d / "scores.jsonl"))])

        def write_pairs() -> None:
            if not self.main:
                return
            pairs = make_pairs(scores, cfg.pairs.k, cfg.pairs.min_margin)
            store.write_jsonl(
                d / "pairs.jsonl",
                [{"prompt_id": p, "chosen": w, "rejected": lo, "gap": round(g, 5)} for p, w, lo, g in pairs],
            )
            self.write_candidate_grid(it, policy, prompts, cands["tokens"], scores, pairs)

        self.step(it, "pairs", write_pairs)
        pairs = self.shared(lambda: store.read_jsonl(d / "pairs.jsonl"))

        def train() -> None:
            losses, weights = self.train(it, policy, reference, prompts, cands, pairs)
            if self.main:
                store.write_jsonl(d / "metrics.jsonl", losses)
                if weights is None:
                    policy.save(d / "checkpoint")
                else:  # FSDP2 left the policy sharded: save the gathered weights through an unsharded copy
                    full = self.skeleton(None if self.janus else policy.model.config.to_dict())
                    full.load_state_dict(weights)
                    full.save(d / "checkpoint")
                store.note(d / "checkpoint")

        self.step(it, "train", train)
        return self.model_after(it)

    # --- phases with real work -------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_prompts(self, it: int, policy: ModelAdapter) -> None:
        cfg = self.cfg
        cats = [c for c in CATEGORIES for _ in range(cfg.sample.prompts_per_category)]

        def write(u: slice) -> list[tuple[str, str]]:
            noise = torch.stack(
                [uniforms((1, PROMPT_TOKENS), cfg.seed, it, "prompts", i) for i in range(u.start, u.stop)]
            )
            texts = policy.write_prompts(cats[u], 1, top_p=cfg.sample.top_p, max_new_tokens=PROMPT_TOKENS, noise=noise)
            sources = getattr(policy, "last_sources", {}).get("prompts") or ["model"] * len(texts)
            return list(zip(texts, sources))

        written = [t for part in self.map_units(len(cats), cfg.sample.chunk, write, f"iter {it} prompts") for t in part]
        if self.main:
            rows = [
                {"id": i, "category": c, "prompt": t, "source": src}
                for i, (c, (t, src)) in enumerate(zip(cats, written))
                if t.strip()
            ]
            store.write_jsonl(self.iter_dir(it) / "prompts.jsonl", rows)

    @torch.no_grad()
    def write_questions(self, it: int, policy: ModelAdapter, prompts: list[str]) -> None:
        from silmm_fast.loop.decompose import decompose_prompt

        def decompose(u: slice) -> list[tuple[list[str], str]]:
            written = policy.decompose(prompts[u])
            sources = getattr(policy, "last_sources", {}).get("questions") or ["model"] * len(written)
            return list(zip(written, sources))

        parts = self.map_units(len(prompts), self.cfg.sample.chunk, decompose, f"iter {it} questions")
        written = [qs for part in parts for qs in part]
        if not self.main:
            return
        rows = []
        for i, (p, (qs, source)) in enumerate(zip(prompts, written)):
            if not qs:  # the model wrote nothing usable: the rule-based decomposer stands in
                qs, source = decompose_prompt(p), "rules"
            rows.append({"id": i, "prompt": p, "questions": qs, "source": source})
        store.write_jsonl(self.iter_dir(it) / "questions.jsonl", rows)

    @torch.no_grad()
    def generate(self, it: int, policy: ModelAdapter, prompts: list[str], ids: list[int]) -> None:
        cfg = self.cfg
        desc = f"iter {it} generate"
        path = self.iter_dir(it) / "candidates.pt"
        if cfg.mode == "discrete":
            n, seq = cfg.sample.candidates, policy.image_seq_len

            def sample(u: slice) -> torch.Tensor:
                noise = torch.stack([uniforms((n, seq), cfg.seed, it, "generate", i) for i in ids[u]])
                return policy.generate_images(
                    prompts[u], n, top_p=cfg.sample.top_p, temperature=cfg.sample.temperature, noise=noise
                ).cpu()

            tokens = torch.cat(self.map_units(len(prompts), cfg.sample.chunk, sample, desc))
            if self.main:
                store.write_tensors(path, {"tokens": tokens})
            return
        from silmm_fast import diverse_select

        k, n = cfg.sample.oversample, cfg.sample.candidates
        own = cfg.sample.deterministic_candidate

        def sample_features(u: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # one DropDiv stream per (prompt, sample): a prompt's K feature matrices are its own
            row_seeds = [stream_seed(cfg.seed, it, "generate", i, j) for i in ids[u] for j in range(k)]
            with self.dropdiv(policy, row_seeds):
                feats = policy.generate_features(prompts[u], k)  # [u, K, L, D]
            picked = diverse_select(feats, n - own, method=cfg.sample.select_method)  # [u, n - own]
            chosen = torch.gather(feats, 1, picked[:, :, None, None].expand(-1, -1, *feats.shape[2:]))
            if own:
                # candidate 0: the policy's own (dropout-free) image; selected index -1 marks it. Ties in score go
                # to the lower index (make_pairs), so a sample that shows the same scene never displaces it
                chosen = torch.cat([policy.generate_features(prompts[u], 1), chosen], dim=1)
                picked = torch.cat([torch.full_like(picked[:, :1], -1), picked], dim=1)
            chosen = chosen.cpu()
            scenes = self.codec.decode_batch(chosen.reshape(-1, *feats.shape[2:]).float(), strict=False)
            tokens = self.tokenizer.encode_batch(scenes).view(len(chosen), n, -1)
            return tokens, chosen, picked.cpu()

        parts = self.map_units(len(prompts), cfg.sample.chunk, sample_features, desc)
        if self.main:
            tokens, chosen, picked = (torch.cat([p[i] for p in parts]) for i in range(3))
            store.write_tensors(path, {"tokens": tokens, "features": chosen, "selected": picked})

    @torch.no_grad()
    def judge(
        self,
        it: int,
        policy: ModelAdapter,
        prompts: list[str],
        tokens: torch.Tensor,
        questions: list[list[str]],
        ids: list[int],
    ) -> None:
        cfg = self.cfg
        p, n = tokens.shape[:2]
        if cfg.feedback == "random":  # control: the same pipeline, but scores that carry no information
            scores = torch.stack([torch.rand(n, generator=seeded(cfg.seed, it, "judge", i)) * 2 - 1 for i in ids])
            n_questions = 0
        elif cfg.feedback == "oracle":  # control: the ground truth judges (on the same scale as p(yes) - p(no))
            scores = torch.stack([self.oracle_scores(text, cands) for text, cands in zip(prompts, tokens)])
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
            scores = torch.cat(self.map_units(p, per_unit, judge_unit, f"iter {it} judge"))
            n_questions = n * sum(len(q) for q in questions)
        if not self.main:
            return
        rows = [{"prompt_id": i, "scores": [round(float(s), 6) for s in scores[i]]} for i in range(p)]
        store.write_jsonl(self.iter_dir(it) / "scores.jsonl", rows)
        store.write_json(self.iter_dir(it) / "judge.json", {"questions_judged": n_questions, "images": p * n})

    def oracle_scores(self, text: str, tokens: torch.Tensor) -> torch.Tensor:
        """Ground-truth scores of one prompt's candidates [N, seq]: the mean over the prompt's constraints of +1 (met)
        or -1 (not met); all 0 (no pair) when the model's prompt is outside the world's grammar."""
        try:
            prompt = parse_prompt(text)
        except ValueError:
            return torch.zeros(len(tokens))
        scenes = [self.tokenizer.decode(t, strict=False) for t in tokens.tolist()]
        return torch.tensor([2 * sum(prompt.check(sc)) / len(prompt.constraints) - 1 for sc in scenes])

    def write_candidate_grid(
        self,
        it: int,
        policy: ModelAdapter,
        prompts: list[str],
        tokens: torch.Tensor,
        scores: torch.Tensor,
        pairs: list[tuple[int, int, int, float]],
        max_prompts: int = 8,
    ) -> None:
        chosen = {(p, w) for p, w, _, _ in pairs}
        rejected = {(p, lo) for p, _, lo, _ in pairs}
        from PIL import Image

        images, captions = [], []
        rows = min(max_prompts, len(prompts))
        pixels = policy.decode_images(tokens[:rows])  # uint8 [rows, N, H, W, 3]
        for p in range(rows):
            for j in range(tokens.shape[1]):
                mark = "CHOSEN " if (p, j) in chosen else "REJECTED " if (p, j) in rejected else ""
                images.append(Image.fromarray(pixels[p, j].numpy()))
                head = f"{prompts[p][:40]}\n" if j == 0 else "\n"
                captions.append(f"{head}{mark}{scores[p, j]:+.2f}")
        grid = render_grid(
            images,
            captions,
            columns=tokens.shape[1],
            tile_size=96,
            title=f"iteration {it}: candidates per prompt (row), {self.cfg.feedback}-feedback score, chosen / rejected",
        )
        store.write_png(self.iter_dir(it) / "candidates.png", grid)

    def train(
        self, it: int, policy: ModelAdapter, reference: ModelAdapter, prompts: list[str], cands: dict, pairs: list[dict]
    ) -> tuple[list[dict], dict | None]:
        """DPO / KC-DPO on the iteration's pairs. Returns the per-step metrics and, under FSDP2, the gathered
        weights (None otherwise: ``policy`` itself holds them)."""
        cfg, o, world = self.cfg, self.cfg.optim, self.dist.world_size
        if not pairs:
            self.log(f"iteration {it}: no pairs passed the margin; the policy is unchanged")
            return [], None
        dev = self.device
        pid = torch.tensor([r["prompt_id"] for r in pairs])
        win = torch.tensor([r["chosen"] for r in pairs])
        lose = torch.tensor([r["rejected"] for r in pairs])
        if cfg.mode == "discrete":
            tokens = cands["tokens"]
            loss_fn = FusedLinearDPOLoss(beta=o.beta, loss_type=o.loss_type, nll_weight=o.nll_weight)

            @torch.no_grad()
            def reference_logps(u: slice) -> torch.Tensor:  # once per iteration, through the same fp32 path
                both = torch.cat([tokens[pid[u], win[u]], tokens[pid[u], lose[u]]])
                texts = [prompts[i] for i in pid[u].tolist()] * 2
                lp = reference.image_logprob_inputs(texts, both).logprobs()
                return lp.view(2, -1).cpu()

            ref = torch.cat(self.map_units(len(pairs), o.batch_size, reference_logps, f"iter {it} reference"), dim=1)
            ref_c, ref_r = ref[0], ref[1]
        else:
            feats = cands["features"]
            loss_fn = KCDPOLoss(gamma=o.gamma, kernel=o.kernel, pool=o.pool, sigma=o.sigma)
            ref_feats = torch.cat(
                self.map_units(
                    len(prompts),
                    cfg.sample.chunk,
                    lambda u: reference.feature_forward(prompts[u]).detach().cpu(),
                    f"iter {it} reference",
                )
            )
        # DDP must be told that some parameters get no gradient: continuous mode never reads the LM head, and no
        # preference step reads a word shift's maps (only questions do)
        model = distributed.TrainModel(policy, self.dist, cfg.dist.strategy, find_unused=True)
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        policy.train()
        gen = seeded(cfg.seed, it, "train")  # the same permutation on every rank
        history = []
        steps = o.epochs * ((len(pairs) + o.batch_size - 1) // o.batch_size)
        bar = tqdm(total=steps, desc=f"iter {it} train", leave=False, unit="step", disable=not self.main)
        for epoch in range(o.epochs):
            order = torch.randperm(len(pairs), generator=gen)
            for s in range(0, len(pairs), o.batch_size):
                batch = order[s : s + o.batch_size]
                lo, hi = distributed.shard_bounds(len(batch), world, self.dist.rank)
                # Each rank's loss is its share of the batch's summed loss, times the world size that the gradient
                # average divides by: the averaged gradient is the batch mean's. A rank with no pair this step
                # still runs one (weighted 0) so that every rank joins the gradient collectives.
                b, live = (batch[lo:hi], 1.0) if hi > lo else (batch[:1], 0.0)
                weight = live * world / len(batch)
                texts = [prompts[i] for i in pid[b].tolist()]
                if cfg.mode == "discrete":
                    both = torch.cat([tokens[pid[b], win[b]], tokens[pid[b], lose[b]]])
                    inp = model("image_logprob_inputs", texts * 2, both)
                    out = loss_fn(inp.hidden, inp.weight, inp.labels, ref_c[b].to(dev), ref_r[b].to(dev), bias=inp.bias)
                else:
                    h = model("feature_forward", texts)
                    out = loss_fn(
                        h, ref_feats[pid[b]].to(dev), feats[pid[b], win[b]].to(dev), feats[pid[b], lose[b]].to(dev)
                    )
                opt.zero_grad(set_to_none=True)
                (out.losses.sum() * weight).backward()
                if o.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in model.parameters() if p.grad is not None]
                    )
                margin = (out.chosen_rewards - out.rejected_rewards).float()
                sums = torch.stack([out.losses.detach().float().sum(), margin.sum(), (margin > 0).float().sum()])
                sums = self.dist.all_reduce_sum(sums * live).cpu() / len(batch)
                # the same values on every rank (reduced above; gradients are averaged), so all ranks stop together
                self.check_finite(it, len(history), epoch, "loss", float(sums[0]))
                self.check_finite(it, len(history), epoch, "gradient norm", float(_full(grad_norm)))
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
        # finite losses and gradients leave finite weights unless an update overflows: checked once, before anything
        # is saved from them (on every rank's shard, summed, so that all ranks stop together)
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        bad = torch.stack([(~torch.isfinite(p.detach())).sum() for p in shards]).sum().float().reshape(1)
        n_bad = int(self.dist.all_reduce_sum(bad).item())
        if n_bad:
            raise FloatingPointError(
                f"iteration {it}, after train step {len(history) - 1}: {n_bad} weights are not finite; "
                + self.diverged_advice()
            )
        policy.eval()
        weights = model.full_state_dict() if model.strategy == "fsdp2" else None
        return history, weights

    def check_finite(self, it: int, step: int, epoch: int, what: str, value: float) -> None:
        """Stop the run (FloatingPointError) when a training step's ``what`` is not finite."""
        if not math.isfinite(value):
            raise FloatingPointError(
                f"iteration {it}, train step {step} (epoch {epoch}): the {what} is {value}; " + self.diverged_advice()
            )

    def diverged_advice(self) -> str:
        o = self.cfg.optim
        scale = f"optim.beta = {o.beta:g}" if self.cfg.mode == "discrete" else f"optim.gamma = {o.gamma:g}"
        return (
            "training stopped before saving anything from it, and the train step is not marked done. Rerun with "
            f"other optimizer settings (optim.lr = {o.lr:g}, {scale}, optim.grad_clip = {o.grad_clip:g}): the run "
            "resumes from this step"
        )

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
        extra = {
            "throughput": {
                "candidates_per_s": round(gen_count / max(t.get("generate", 0), 1e-9), 2),
                "questions_per_s": round(judged["questions_judged"] / max(t.get("judge", 0), 1e-9), 2),
                "pairs_per_s": round(n_pairs * self.cfg.optim.epochs / max(t.get("train", 0), 1e-9), 2),
            },
            "pairs": n_pairs,
            "train_loss": round(sum(last_epoch) / len(last_epoch), 6) if last_epoch else None,
        }
        if not self.janus:
            extra["pair_audit"] = self.pair_audit(it)
        return extra

    def pair_audit(self, it: int) -> dict:
        """The iteration's pairs scored by the world's ground truth (``audit_pairs``): how often the judge's chosen
        image is really the better one. A diagnostic for people reading the run; training never sees it."""
        d = self.iter_dir(it)
        rows = store.read_jsonl(d / "prompts.jsonl")
        tokens = store.read_tensors(d / "candidates.pt")["tokens"]
        prompts, chosen, rejected = [], [], []
        for pair in store.read_jsonl(d / "pairs.jsonl"):
            row = rows[pair["prompt_id"]]
            try:
                prompts.append(parse_prompt(row["prompt"], row["category"]))
            except ValueError:
                prompts.append(None)
            for side, out in (("chosen", chosen), ("rejected", rejected)):
                out.append(self.tokenizer.decode(tokens[pair["prompt_id"], pair[side]].tolist(), strict=False))
        return audit_pairs(prompts, chosen, rejected)

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
            t, truth = e["throughput"], report.audited(e)
            parts += [
                f"vs base {'n/a' if gain is None else f'{gain * 100:+.1f}%'}",
                f"pairs {e['pairs']}" + (" (ground truth: {} better, {} worse)".format(*truth) if truth else ""),
                f"{t['candidates_per_s']:.0f} cand/s, {t['questions_per_s']:.0f} q/s, {t['pairs_per_s']:.0f} pairs/s",
            ]
        return " | ".join(parts) + f" | {sum(e['wall_s'].values()):.1f}s"

    def summarize(self, it: int) -> None:
        """(Re)write the summary entry of a completed iteration from its files, and print its line (rank 0)."""
        if not self.main:
            return
        heldout = store.read_json(self.iter_dir(it) / "eval.json")
        self.update_summary(it, heldout, self.iteration_extra(it) if it else {})
        log(self.line(it))

    def run(self) -> dict:
        """Run (or resume) the loop; every rank returns the final summary."""
        self.prepare_dir()
        self.check_setup()
        self.check_config()
        self.check_files()
        start = max([0] + [i for i in range(1, self.cfg.iterations + 1) if self.state.is_done(f"iter{i}/eval")])
        if start:
            self.log(f"resuming {self.dir}: iterations 1..{start} are complete")
        policy = self.model_after(start)
        if start == 0:
            self.record_eval(0, policy)
        for it in range(start + 1):  # a crash may have come between an evaluation and its summary entry
            self.summarize(it)
        for it in range(start + 1, self.cfg.iterations + 1):
            policy = self.iteration(it, policy)
            self.record_eval(it, policy)
            self.summarize(it)
        return self.shared(lambda: store.read_json(self.dir / "summary.json"))
