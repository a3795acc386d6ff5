"""Bootstrap of the shapes-world base model: train a ShapesLMM from synthetic data on CPU, cache it, load it back.

``bootstrap("discrete")`` (or ``"continuous"``) returns the base model. The first call trains it (a tqdm bar shows
the progress; a few minutes on a 2-core CPU with the default config) and stores ``config.json``,
``model.safetensors`` and ``bootstrap.json`` (the training config and statistics) in
``<cache>/shapes_lmm-<variant>-<hash>/``, where the hash covers the training config and the world's vocabulary; any
later call with the same config loads that directory in about a second. ``<cache>`` is ``cache_dir`` when given,
else ``$SILMM_FAST_CACHE/models``, else ``~/.cache/silmm_fast/models``.

One explicit loop in two stages. The reading stage (``reading_steps``) trains only VQA, with many items per step,
and word copying; then every step draws a fresh batch of each task (prompt writing, decomposition, VQA, generation —
feature regression in the continuous variant — and word copying, the stand-in for text pretraining). Each step sums
the tasks' mean losses and takes one AdamW step; each stage has its own linear warm-up and cosine decay. See
``silmm_fast.loop.models.data`` for the data and its deliberate generation noise, and ``BootstrapConfig`` for why the
recipe is what it is.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from silmm_fast.dropdiv import dropdiv
from silmm_fast.loop.models.data import IGNORE, SyntheticData, collate
from silmm_fast.loop.models.shapes_lmm import IMAGE_HEADS, VARIANTS, ShapesLMM, ShapesLMMConfig

STATS_FILE = "bootstrap.json"
# Bumped whenever the data or the loop change in a way that makes old cached models stale.
FORMAT_VERSION = 3
# The code that decides what a bootstrap trains: the model, its data, the world the data comes from, the questions
# and DropDiv. Its digest is part of the cache key, so a model cached by other code is never loaded as this code's.
_TRAINING_CODE = ("loop/models", "loop/world", "loop/decompose", "dropdiv.py")
# Files in there that no bootstrap runs: the base model's measurements and the world's ground-truth evaluator and
# renderer. A change to how models are scored or drawn leaves every cached model valid.
_NOT_TRAINING_CODE = ("loop/models/measure.py", "loop/world/evaluate.py", "loop/world/render.py")


def source_digest(paths: list[Path]) -> str:
    """16 hex digits of a hash of the Python files ``paths`` as code: their syntax trees without docstrings, so
    comments, docstrings and formatting do not change it and any change to what the code does does."""
    h = hashlib.sha256()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        h.update(path.name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


def training_code_files() -> list[Path]:
    """The Python files a bootstrap's result depends on: ``_TRAINING_CODE`` without ``_NOT_TRAINING_CODE``."""
    root = Path(__file__).resolve().parents[2]  # silmm_fast/
    skip = {root / part for part in _NOT_TRAINING_CODE}
    files = []
    for part in _TRAINING_CODE:
        where = root / part
        files += sorted(where.rglob("*.py")) if where.is_dir() else [where]
    return [f for f in files if f not in skip]


@functools.cache
def training_code_digest() -> str:
    """``source_digest`` of ``training_code_files``."""
    return source_digest(training_code_files())


# BootstrapConfig fields that only the continuous variant's training reads (its feature regression and query slots).
CONTINUOUS_ONLY = ("feature_weight", "feature_dropout", "feature_slot_start")


@dataclass(frozen=True)
class BootstrapConfig:
    """Model size and training recipe of a bootstrap. Every field enters the cache key."""

    variant: str = "discrete"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    steps: int = 900
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    write_batch: int = 16
    decompose_batch: int = 32
    vqa_batch: int = 32
    # kept below 64 so the continuous variant's feature regression leaves room to the text tasks (docs/results.md,
    # "The bootstrap's settings")
    generate_batch: int = 48
    copy_batch: int = 16
    # Weight of the continuous variant's feature regression against the text tasks: too high and it crowds them
    # out (docs/results.md, "The bootstrap's settings").
    feature_weight: float = 0.3
    # Dropout rate in every decoder MLP while the continuous variant regresses its features (0: none). The loop
    # samples with DropDiv (dropout at the same place), and a model that never saw dropout in training draws mostly
    # broken images there; a high rate makes the samples vary less, so fewer pairs pass the loop's margin
    # (docs/results.md, "The bootstrap's settings").
    feature_dropout: float = 0.0
    gen_noise: float = 0.3
    distractor_prob: float = 0.2
    # Probability that a discrete generation target is the prompt's canonical layout (its objects in its first cells,
    # in the order it names them) rather than random cells: random layouts alone leave the base model meeting too few
    # multi-object prompts for the loop to start from (docs/results.md, "The bootstrap's settings").
    canonical_prob: float = 0.7
    # How the base model learns to read its images, so that its judge answers from the image rather than from the
    # question's priors (RECIPES["reading"] switches all of it on; docs/results.md has the measurements):
    # - VQA in balanced pairs (SyntheticData.vqa_pairs): a question alone no longer predicts its answer.
    # - count targets at the question's words (vqa_counts; data.count_targets) and a structured image embedding
    #   (attribute words + cell vector; models.image_embedding).
    # - a reading stage first (reading_steps): VQA and word copying only, before every other task; copying must come
    #   along, or decomposition never recovers.
    vqa_pairs: bool = False
    vqa_counts: bool = False
    image_embedding: str = "atomic"
    # The discrete variant's head over image tokens (models.image_head; the continuous variant draws no image tokens
    # and keeps the atomic head). Every held-out prompt names an attribute pair no training prompt does, so with
    # one row per token the tokens it needs are never a generation target; the factored head scores them from their
    # attributes' vectors.
    image_head: str = "atomic"
    # How many preceding tokens each token of a question takes in through the input embedding (models.word_shift).
    # Without it the model checks each word of a question on its own and answers "is there a red circle?" with yes
    # beside a red star and a purple circle.
    word_shift: int = 0
    # Where the continuous variant's query slots sit (ShapesLMMConfig.feature_slot_start): 0 right after the prompt,
    # where a slot sees the prompt's last words at fixed offsets and learns to copy the last object named into the
    # second cell; else at this fixed position, where it finds the n-th object of "a, b and c" and of "a and b" at
    # the same offset (RECIPES["anchored"]; docs/continuous.md, section 8).
    feature_slot_start: int = 0
    # The reading stage: `reading_steps` steps of VQA (`reading_vqa_batch` items per step) and word copying only,
    # with their own warm-up and cosine; then `steps` steps of every task.
    reading_steps: int = 0
    reading_vqa_batch: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        for name in ("reading_steps", "word_shift", "feature_slot_start"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        for name in (
            "steps",
            "write_batch",
            "decompose_batch",
            "vqa_batch",
            "generate_batch",
            "copy_batch",
            "reading_vqa_batch",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("vqa_pairs", "vqa_counts"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.image_head not in IMAGE_HEADS:
            raise ValueError(f"image_head: expected one of {IMAGE_HEADS}, got {self.image_head!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {self.warmup!r}")
        for name in ("lr", "feature_weight"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.feature_dropout, (int, float)) or not 0 <= self.feature_dropout < 1:
            raise ValueError(f"feature_dropout: expected a number in [0, 1), got {self.feature_dropout!r}")

    @classmethod
    def tiny(cls, variant: str = "discrete", **overrides: object) -> BootstrapConfig:
        """A seconds-long bootstrap of a very small model, for tests and smoke runs (it learns, not well)."""
        base = dict(
            variant=variant,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=2,
            steps=60,
            lr=5e-3,
            warmup=5,
            write_batch=8,
            decompose_batch=8,
            vqa_batch=32,
            generate_batch=16,
            copy_batch=8,
        )
        base.update(overrides)
        return cls(**base)

    def model_config(self) -> ShapesLMMConfig:
        """The ShapesLMMConfig (over the built-in world) this bootstrap trains."""
        return ShapesLMMConfig.for_world(
            self.variant,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            image_embedding=self.image_embedding,
            image_head=self.image_head if self.variant == "discrete" else "atomic",
            word_shift=self.word_shift,
            feature_slot_start=self.feature_slot_start if self.variant == "continuous" else 0,
        )

    def cache_key(self) -> str:
        """16 hex digits of a hash of this config, the model config, the data format and the training code. The
        fields only the continuous variant reads (``CONTINUOUS_ONLY``) are left out of a discrete config's key, so
        that recipes differing only there (``reading``, ``anchored``) share one discrete model."""
        fields_ = asdict(self)
        if self.variant != "continuous":
            for name in CONTINUOUS_ONLY:
                del fields_[name]
        payload = {
            "bootstrap": fields_,
            "model": self.model_config().to_dict(),
            "format": FORMAT_VERSION,
            "code": training_code_digest(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_READING: dict[str, object] = {
    "vqa_pairs": True,
    "vqa_counts": True,
    "image_embedding": "structured",
    "image_head": "factored",
    "reading_steps": 400,
    "reading_vqa_batch": 128,
    "steps": 650,
    "canonical_prob": 0.9,
    "feature_weight": 0.6,
    "feature_dropout": 0.02,
    "word_shift": 2,
}
RECIPES: dict[str, dict[str, object]] = {
    "plain": {},
    "pairs": {"vqa_pairs": True},
    "reading": _READING,
    "anchored": {**_READING, "feature_slot_start": 48},
}
"""Named training recipes (overrides of the defaults): ``plain`` (``BootstrapConfig``'s defaults: unpaired VQA, atomic
image tokens), ``pairs`` (balanced VQA pairs) and ``reading`` (the loop's default in both modes: pairs, count targets,
the structured image embedding, a word shift of 2 and a reading stage first, a base model that reads its images and
binds a question's attributes to its nouns; in the discrete variant also the factored image-token head, a model that can
draw attribute pairs it never drew; see the comments in ``BootstrapConfig``). ``reading`` doubles the continuous
variant's ``feature_weight``, since it trains fewer steps of every task, and regresses the features under dropout at
rate 0.02 (``feature_dropout``), where DropDiv samples them. ``anchored`` is ``reading`` with the continuous
variant's query slots at fixed positions (``feature_slot_start`` 48, past the longest prompt the loop writes): a
stronger continuous base model, which draws three-object prompts right, with less left for the loop to learn
(docs/continuous.md, section 8); in the discrete variant it is ``reading``, the same cached model. docs/results.md
has what each choice measured."""

_SCHEDULE = ("steps", "reading_steps", "reading_vqa_batch")


def recipe(name: str, variant: str = "discrete", tiny: bool = False) -> BootstrapConfig:
    """The ``BootstrapConfig`` of recipe ``name`` (one of ``RECIPES``); with ``tiny``, on ``BootstrapConfig.tiny``'s
    model and schedule (a recipe with a reading stage keeps one of 20 steps)."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {tuple(RECIPES)}, got {name!r}")
    overrides = dict(RECIPES[name])
    if not tiny:
        return BootstrapConfig(variant=variant, **overrides)
    reads_first = bool(overrides.get("reading_steps"))
    overrides = {k: v for k, v in overrides.items() if k not in _SCHEDULE}
    if reads_first:
        overrides.update(reading_steps=20, reading_vqa_batch=32)
    return BootstrapConfig.tiny(variant, **overrides)


def default_cache_dir() -> Path:
    """``$SILMM_FAST_CACHE/models``, else ``~/.cache/silmm_fast/models``."""
    root = os.environ.get("SILMM_FAST_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "silmm_fast") / "models"


def cache_path(config: BootstrapConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory where the model of ``config`` is (or will be) cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"shapes_lmm-{config.variant}-{config.cache_key()}"


def optimizer(model: ShapesLMM, config: BootstrapConfig) -> torch.optim.AdamW:
    """The bootstrap's AdamW over ``model``: weight decay on matrices other than embeddings, none elsewhere."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )


def lr_at(step: int, config: BootstrapConfig) -> float:
    """The bootstrap's learning rate at ``step``: linear warmup over ``config.warmup`` steps, then a cosine from
    ``config.lr`` down to a tenth of it at ``config.steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _token_loss(model: ShapesLMM, examples: list, pad_id: int) -> torch.Tensor:
    ids, labels = collate(examples, pad_id)
    hidden = model.lm.model(input_ids=ids.to(model.device)).last_hidden_state
    labels = labels.to(model.device)
    keep = labels != IGNORE
    logits = model.lm.lm_head(hidden[keep])
    return F.cross_entropy(logits.float(), labels[keep])


def _losses(
    model: ShapesLMM, data: SyntheticData, codec: object, config: BootstrapConfig, step: int
) -> dict[str, torch.Tensor]:
    """Step ``step``'s mean loss per task: VQA and word copying in the reading stage, every task after it."""
    first_stage = step < config.reading_steps
    pad = model.vocab.pad
    if first_stage:
        sizes = {"vqa": config.reading_vqa_batch, "copy": config.copy_batch}
    else:
        sizes = {
            "write": config.write_batch,
            "decompose": config.decompose_batch,
            "vqa": config.vqa_batch,
            "copy": config.copy_batch,
        }
    losses = {task: _token_loss(model, data.batch(task, n), pad) for task, n in sizes.items()}
    if first_stage:
        return losses
    if codec is None:
        losses["generate"] = _token_loss(model, data.batch("generate", config.generate_batch), pad)
    else:
        pairs = [data.generate_pair() for _ in range(config.generate_batch)]
        target = codec.encode_batch([s for _, s in pairs]).to(model.device)
        # feature_dropout: dropout as DropDiv applies it, each step with its own masks, seeded for a reproducible run
        drop = config.feature_dropout
        seed = config.seed * 1_000_003 + step
        with dropdiv(model, None, drop, seed=seed, eval_mode=False) if drop else contextlib.nullcontext():
            pred = model.feature_forward([t for t, _ in pairs])
        # Squared error summed over a row's D features, averaged over rows: O(1) at the start like the CEs.
        losses["generate"] = config.feature_weight * (pred - target).pow(2).sum(-1).mean()
    return losses


def train(
    config: BootstrapConfig, progress: bool = True, threads: int | None = None
) -> tuple[ShapesLMM, dict[str, object]]:
    """Train a base model from scratch with ``config``; returns (model in eval mode, statistics).

    Statistics: ``seconds``, ``steps_per_second``, ``threads``, and per task the mean loss over the first and
    the last 10 % of the steps (``loss_start`` / ``loss_end``).
    """
    if not isinstance(config, BootstrapConfig):
        raise TypeError(f"config: expected a BootstrapConfig, got {type(config).__name__}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(config.seed)
        model = ShapesLMM(config.model_config())
        model.train()
        data = SyntheticData(
            model.vocab,
            config.gen_noise,
            config.distractor_prob,
            seed=config.seed,
            canonical_prob=config.canonical_prob,
            vqa_pairs=config.vqa_pairs,
            vqa_counts=config.vqa_counts,
        )
        codec = None
        if config.variant == "continuous":
            from silmm_fast.loop.world import FeatureCodec

            codec = FeatureCodec(model.config.feature_dim)
        opt = optimizer(model, config)
        history: dict[str, list[float]] = {}
        start = time.perf_counter()
        reading = replace(config, steps=config.reading_steps) if config.reading_steps else None
        total_steps = config.reading_steps + config.steps
        bar = tqdm(range(total_steps), desc=f"bootstrap {config.variant}", disable=not progress, leave=False)
        for step in bar:
            first_stage = step < config.reading_steps
            lr = lr_at(step, reading) if first_stage else lr_at(step - config.reading_steps, config)
            for group in opt.param_groups:
                group["lr"] = lr
            losses = _losses(model, data, codec, config, step)
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            for k, v in losses.items():
                history.setdefault(k, []).append(float(v.detach()))
            if step % 10 == 0:
                bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in history.items()})
        seconds = time.perf_counter() - start
        bar.close()

        def tail(v: list[float]) -> int:
            return max(1, len(v) // 10)

        stats: dict[str, object] = {
            "seconds": round(seconds, 2),
            "steps_per_second": round(total_steps / seconds, 3),
            "threads": torch.get_num_threads(),
            "loss_start": {k: round(sum(v[: tail(v)]) / tail(v), 4) for k, v in history.items()},
            "loss_end": {k: round(sum(v[-tail(v) :]) / tail(v), 4) for k, v in history.items()},
        }
        return model.eval(), stats
    finally:
        torch.set_num_threads(previous_threads)


def bootstrap(
    variant: str = "discrete",
    cache_dir: str | os.PathLike | None = None,
    config: BootstrapConfig | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    threads: int | None = None,
) -> ShapesLMM:
    """The base ShapesLMM of ``variant`` ("discrete" or "continuous"): loaded from the cache, else trained and cached.

    Args:
        variant: which model; ignored when ``config`` is given (its ``variant`` wins) unless they disagree, which
            raises ValueError.
        cache_dir: cache root (default ``$SILMM_FAST_CACHE/models`` or ``~/.cache/silmm_fast/models``).
        config: the training recipe (default ``BootstrapConfig(variant=variant)``).
        progress: show a tqdm progress bar while training.
        force: retrain even when a cached model exists (and replace it).
        threads: torch CPU threads while training (default: leave torch's setting).

    Returns:
        The model in eval mode; ``bootstrap_stats(path)`` reads its training statistics.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if config is None:
        config = BootstrapConfig(variant=variant)
    elif not isinstance(config, BootstrapConfig):
        raise TypeError(f"config: expected a BootstrapConfig, got {type(config).__name__}")
    elif config.variant != variant:
        raise ValueError(f"variant: {variant!r} disagrees with config.variant={config.variant!r}")
    path = cache_path(config, cache_dir)
    if not force and (path / STATS_FILE).is_file():
        return ShapesLMM.load(path)
    model, stats = train(config, progress=progress, threads=threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a sibling temp dir and renamed: a crash mid-write never leaves a half-written cache entry.
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save(tmp)
    (tmp / STATS_FILE).write_text(json.dumps({"config": asdict(config), "stats": stats}, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return model


def bootstrap_stats(path: str | os.PathLike) -> dict:
    """The ``{"config": ..., "stats": ...}`` record a bootstrap wrote next to its cached model."""
    return json.loads((Path(path) / STATS_FILE).read_text())


def config_from_dict(d: dict) -> BootstrapConfig:
    """BootstrapConfig from a dict (as stored in ``bootstrap.json``); unknown keys raise ValueError."""
    unknown = set(d) - {f.name for f in fields(BootstrapConfig)}
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}")
    return replace(BootstrapConfig(variant=d.get("variant", "discrete")), **d)
