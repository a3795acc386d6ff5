"""The SILMM loop, as a recipe: for each iteration the model writes prompts, decomposes them into yes/no questions,
samples candidate images, judges its own candidates, builds preference pairs, and learns from them (DPO on image
tokens, or KC-DPO on feature matrices); then it is scored on held-out prompts.

``run`` reads as the method; each phase is one function of ``silmm_fast.loop.train.phases`` (values in, values out),
and each runs through ``RunDir.step`` (``silmm_fast.loop.train.rundir``), which skips a done step by loading its saved
result, saves a new one atomically before marking it done in ``state.json`` (a crash loses at most the running
step), and shares results across processes. Models come from the adapter factory
(``silmm_fast.loop.adapters.factory``): the built-in world's model (default), or a local Janus / Janus-Pro
checkpoint (``--model janus --model-path DIR``). The world's ground-truth evaluator reads only the world's images;
other models' held-out images are scored by their frozen base model answering ``decompose_prompt``'s questions (not
ground truth).

Determinism: every random stream of a prompt derives from (run seed, iteration, phase, prompt id) and nothing else,
so a redone step gives the same result as the lost one, and results do not depend on how prompts are batched or on
how many processes share the work.

Several processes (``torchrun``, see ``silmm_fast.loop.train.distributed``): every list of prompts (or pairs) is cut
into units whose boundaries do not depend on the number of processes; each rank runs a contiguous run of units and
the results are gathered on every rank. A batch's floating-point results can depend on its composition (the CPU's
matrix products do, at the last bit), so fixed units are what makes scores bitwise identical at any world size.
Training shards each optimizer step's pairs over the ranks (DDP or FSDP2); the global batch is unchanged, each rank
weights its loss by its share, so the averaged gradient is the single-process mean up to float rounding. Rank 0
alone reads and writes the run directory, so only rank 0's machine needs it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

from safetensors import SafetensorError

from silmm_fast.loop.adapters import (
    ContinuousAdapter,
    ModelAdapter,
    ModelSpec,
    blank_adapter,
    build_adapter,
    load_adapter,
)
from silmm_fast.loop.adapters.factory import architecture
from silmm_fast.loop.train import distributed, report, store
from silmm_fast.loop.train.config import TrainConfig
from silmm_fast.loop.train.phases import (
    build_pairs,
    candidate_grid,
    decompose,
    evaluate,
    evaluator,
    judge,
    load_jsonl,
    load_scores,
    optimize,
    reference_features,
    reference_logps,
    sample_candidates,
    save_jsonl,
    save_scores,
    write_prompts,
)
from silmm_fast.loop.train.rundir import RunDir, log
from silmm_fast.loop.world import prompt_split

HELDOUT_SEED = 1234  # the held-out prompt set is the same for every run, so runs are comparable


def run(cfg: TrainConfig, dist: distributed.Dist | None = None) -> dict:
    """Run (or resume) the loop described by ``cfg`` on this process (``dist``: its place among the run's
    processes; default: from the environment). Every rank returns the final summary (``summary.json``)."""
    dist = dist if dist is not None else distributed.setup(cfg.dist.device)
    heldout = prompt_split(HELDOUT_SEED, cfg.eval.heldout_per_category)["heldout"]
    rd = RunDir(cfg, dist).open(n_heldout=len(heldout))
    spec = model_spec(cfg)

    start = max([0] + [i for i in range(1, cfg.iterations + 1) if rd.is_done(i, "eval")])
    if start:
        rd.log(f"resuming {rd.path}: iterations 1..{start} are complete")
    policy = base_policy(rd, spec) if start == 0 else checkpoint_policy(rd, spec, start)

    summary = Summary(rd, spec)
    # iteration 0 scores the base model; the completed iterations are entered again (a crash may have come between
    # an evaluation and its summary entry)
    for it in range(start + 1):
        summary.add(it, evaluation(rd, it, policy, heldout, spec), saved_iteration(rd, it))
    for it in range(start + 1, cfg.iterations + 1):
        policy, record = iteration(rd, it, policy, spec)
        summary.add(it, evaluation(rd, it, policy, heldout, spec), record)
    return dist.broadcast(summary.summary)


class Trained(NamedTuple):
    """The train step's result: the policy after it (on this rank's device) and the per-step metrics."""

    policy: ModelAdapter
    metrics: list[dict]


def iteration(rd: RunDir, it: int, policy: ModelAdapter, spec: ModelSpec) -> tuple[ModelAdapter, dict]:
    """One SILMM iteration from ``policy``: the policy after it, and the iteration's results for its summary entry
    (rank 0)."""
    cfg, dist, d = rd.cfg, rd.dist, rd.iter_dir(it)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # this iteration's DPO reference: frozen

    prompt_rows = rd.step(
        it,
        "prompts",
        lambda: write_prompts(cfg, dist, it, policy),
        save_jsonl(d / "prompts.jsonl"),
        load_jsonl(d / "prompts.jsonl"),
    )
    prompts = [r["prompt"] for r in prompt_rows]
    ids = [r["id"] for r in prompt_rows]  # a prompt's id: its slot among the prompts the model was asked to write

    question_rows = rd.step(
        it,
        "questions",
        lambda: decompose(cfg, dist, it, policy, prompts),
        save_jsonl(d / "questions.jsonl"),
        load_jsonl(d / "questions.jsonl"),
    )
    questions = [r["questions"] for r in question_rows]

    cands = rd.step(
        it,
        "generate",
        lambda: sample_candidates(cfg, dist, it, policy, prompts, ids),
        lambda c: store.write_tensors(d / "candidates.pt", c),
        lambda: store.read_tensors(d / "candidates.pt"),
    )

    scores = rd.step(
        it,
        "judge",
        lambda: judge(cfg, dist, it, policy, prompts, cands["tokens"], questions, ids),
        lambda s: save_scores(d, s),
        lambda: load_scores(d),
    )

    def save_pairs(rows: list[dict]) -> None:
        store.write_jsonl(d / "pairs.jsonl", rows)
        grid = candidate_grid(cfg, it, policy, prompts, cands["tokens"], scores.tensor(), rows)
        store.write_png(d / "candidates.png", grid)

    pairs = rd.step(it, "pairs", lambda: build_pairs(cfg, scores.tensor()), save_pairs, load_jsonl(d / "pairs.jsonl"))

    def train() -> Trained:
        if not pairs:
            rd.log(f"iteration {it}: no pairs passed the margin; the policy is unchanged")
            return Trained(policy, [])
        if cfg.mode == "discrete":
            ref = reference_logps(cfg, dist, it, reference, prompts, cands["tokens"], pairs)
        else:
            ref = reference_features(cfg, dist, it, reference, prompts)
        metrics, weights = optimize(cfg, dist, it, policy, prompts, cands, pairs, ref)
        if weights is None:
            return Trained(policy, metrics)
        # FSDP2 left the policy sharded: the trained policy is an unsharded copy holding the gathered weights
        full = blank_adapter(spec, architecture(reference), dist.device)
        full.load_state_dict(weights)
        return Trained(full.to(dist.device).eval(), metrics)

    def save_trained(trained: Trained) -> None:
        store.write_jsonl(d / "metrics.jsonl", trained.metrics)
        trained.policy.save(d / "checkpoint")
        store.note(d / "checkpoint")

    def load_trained() -> Trained:  # on every rank: the checkpoint travels by broadcast from rank 0
        metrics = dist.from_main(lambda: store.read_jsonl(d / "metrics.jsonl"))
        return Trained(checkpoint_policy(rd, spec, it), metrics)

    trained = rd.step(it, "train", train, save_trained, load_trained, broadcast=False)
    record = {
        "prompts": prompt_rows,
        "tokens": cands["tokens"],
        "counts": scores.counts,
        "pairs": pairs,
        "metrics": trained.metrics,
    }
    return trained.policy, record


def evaluation(rd: RunDir, it: int, policy: ModelAdapter, heldout: list, spec: ModelSpec) -> dict | None:
    """Held-out alignment of ``policy`` after iteration ``it`` (``eval.json``); the result on rank 0."""
    path = rd.iter_dir(it) / "eval.json"
    return rd.step(
        it,
        "eval",
        lambda: evaluate(rd.cfg, rd.dist, it, policy, heldout, spec),
        lambda result: store.write_json(path, result),
        lambda: store.read_json(path),
    )


# --- models ----------------------------------------------------------------------------------------------------------
def model_spec(cfg: TrainConfig) -> ModelSpec:
    m = cfg.model
    return ModelSpec(
        name=m.name,
        variant=cfg.mode,
        path=m.path,
        recipe=m.recipe,
        tiny=m.tiny,
        cache_dir=m.cache_dir,
        cfg_scale=m.cfg_scale,
    )


def shared_model(rd: RunDir, spec: ModelSpec, load: Callable[[], ModelAdapter]) -> ModelAdapter:
    """``load()`` on rank 0; the other ranks build the same architecture and receive its weights by broadcast. On
    this rank's device, in eval mode. (A Janus-sized model travels as one pickled state dict: slow; a shared run
    directory would avoid it.)"""
    dist = rd.dist
    if dist.world_size == 1:
        return load().to(dist.device).eval()
    loaded: list[ModelAdapter] = []

    def share() -> tuple:  # rank 0; a failing load stops every rank instead of leaving them waiting
        loaded.append(load())
        return architecture(loaded[0]), {k: v.detach().cpu() for k, v in loaded[0].state_dict().items()}

    arch, weights = dist.from_main(share)
    if dist.is_main:
        model = loaded[0]
    else:
        model = blank_adapter(spec, arch, dist.device)
        model.load_state_dict(weights)
    return model.to(dist.device).eval()


def base_policy(rd: RunDir, spec: ModelSpec) -> ModelAdapter:
    """The base model, on every rank."""
    policy = shared_model(rd, spec, lambda: build_adapter(spec, rd.dist.device))
    if rd.cfg.mode == "continuous" and not isinstance(policy, ContinuousAdapter):
        raise ValueError(
            f"mode: 'continuous' needs a model with feature matrices (ContinuousAdapter), and model.name "
            f"{spec.name!r} has none; use mode discrete"
        )
    return policy


def checkpoint_policy(rd: RunDir, spec: ModelSpec, it: int) -> ModelAdapter:
    """The policy saved after iteration ``it``, on every rank."""
    path = rd.iter_dir(it) / "checkpoint"

    def load() -> ModelAdapter:
        try:
            return load_adapter(spec, path, rd.dist.device)
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise ValueError(f"{path}: cannot load the checkpoint ({err}); the run directory is damaged") from None

    return shared_model(rd, spec, load)


# --- summary ---------------------------------------------------------------------------------------------------------
def saved_iteration(rd: RunDir, it: int) -> dict | None:
    """The results of a completed iteration ``it`` > 0 that its summary entry reads, from its files (rank 0; None
    for iteration 0 and on the other ranks)."""
    if it == 0 or not rd.main:
        return None
    d = rd.iter_dir(it)
    return {
        "prompts": load_jsonl(d / "prompts.jsonl")(),
        "tokens": store.read_tensors(d / "candidates.pt")["tokens"],
        "counts": load_scores(d).counts,
        "pairs": load_jsonl(d / "pairs.jsonl")(),
        "metrics": load_jsonl(d / "metrics.jsonl")(),
    }


class Summary:
    """``summary.json`` and ``report.md`` of the run, rewritten after every iteration (rank 0)."""

    def __init__(self, rd: RunDir, spec: ModelSpec) -> None:
        self.rd, self.spec = rd, spec
        path = rd.path / "summary.json"
        self.iterations: list[dict] = rd.dist.from_main(
            lambda: store.read_json(path)["iterations"] if path.exists() else []
        )
        self.summary: dict | None = None

    def add(self, it: int, heldout: dict | None, record: dict | None) -> None:
        """Enter (or replace) iteration ``it``'s entry, write the summary and the report, and print its line (rank 0;
        a failure there stops every rank)."""
        self.rd.dist.from_main(lambda: self._write(it, heldout, record))

    def _write(self, it: int, heldout: dict | None, record: dict | None) -> None:
        rd = self.rd
        entry = report.iteration_entry(it, heldout, rd.timings(it), record, rd.cfg, self.spec.world_images)
        self.iterations = sorted(
            [e for e in self.iterations if e["iteration"] != it] + [entry], key=lambda e: e["iteration"]
        )
        meta = {"mode": rd.cfg.mode, "feedback": rd.cfg.feedback, "seed": rd.cfg.seed}
        meta.update(model=self.spec.name, evaluator=evaluator(self.spec))
        self.summary = report.build_summary(meta, self.iterations)
        store.write_json(rd.path / "summary.json", self.summary)
        report.write_report(self.summary, rd.path)
        log(report.line(self.iterations, it))
