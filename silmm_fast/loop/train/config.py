"""The loop's configuration: dataclasses with a default and a help text for every field, an optional YAML file, and
command-line overrides (``--section.field value`` or the short top-level flags). The resolved configuration is
written to the run directory, and a resumed run must match it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from silmm_fast.loop.models.bootstrap import RECIPES


def _f(default: Any, help: str, **bounds: float) -> Any:
    """A field with its help text and the range of its values (``gt`` / ``ge`` / ``lt`` / ``le``: >, >=, <, <=),
    which ``TrainConfig.validate`` checks for every numeric field, together with finiteness."""
    return field(default=default, metadata={"help": help, **bounds})


_BOUNDS = {"gt": (">", float.__gt__), "ge": (">=", float.__ge__), "lt": ("<", float.__lt__), "le": ("<=", float.__le__)}


def _base(hint: Any) -> Any:
    """The type of a field, without ``| None``."""
    args = typing.get_args(hint)
    return next((a for a in args if a is not type(None)), hint) if args else hint


def _expected(base: type, bounds: dict) -> str:
    """What a numeric field accepts, in words: "an integer >= 1", "a number in (0, 1] (finite)"."""
    kind = "an integer" if base is int else "a number"
    limits = sorted(((_BOUNDS[k][0], float(v)) for k, v in bounds.items()), key=lambda b: b[0][0] != ">")
    if len(limits) == 2:
        (op_lo, lo), (op_hi, hi) = limits
        text = f"{kind} in {'(' if op_lo == '>' else '['}{lo:g}, {hi:g}{')' if op_hi == '<' else ']'}"
    else:
        text = " ".join([kind] + [f"{op} {v:g}" for op, v in limits])
    return text + (" (finite)" if base is float else "")


def _check_number(name: str, value: Any, base: type, bounds: dict) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite ``base`` (int or float) within ``bounds``."""
    typed = isinstance(value, int if base is int else (int, float)) and not isinstance(value, bool)
    within = typed and math.isfinite(value) and all(_BOUNDS[k][1](float(value), float(v)) for k, v in bounds.items())
    if not within:
        raise ValueError(f"config {name}: expected {_expected(base, bounds)}, got {value!r}")


@dataclass
class ModelConfig:
    name: str = _f(
        "shapes",
        "model adapter: 'shapes' (the built-in world's tiny LMM) or 'janus' (a local Janus / Janus-Pro checkpoint "
        "given by model.path; discrete mode)",
    )
    path: str | None = _f(
        None, "janus: local checkpoint directory (config.json, weights, tokenizer files); nothing is downloaded"
    )
    cfg_scale: float = _f(5.0, "janus: classifier-free guidance scale of image generation", ge=0)
    cache_dir: str | None = _f(None, "where bootstrapped base models are cached (default ~/.cache/silmm_fast)")
    tiny: bool = _f(False, "use a tiny model and a short bootstrap (tests, smoke runs)")
    recipe: str | None = _f(
        None,
        "shapes: how the base model is bootstrapped; none: the mode's default, reading in discrete mode and anchored "
        "in continuous mode. reading: balanced VQA pairs, count targets, structured image tokens, a word shift "
        "inside questions, a reading stage, (discrete) a factored image-token head and (continuous) features "
        "regressed under light dropout. plain: unpaired VQA and atomic image tokens. pairs: plain with balanced VQA "
        "pairs. anchored: reading with the continuous model's query slots at fixed positions, so that it draws "
        "three-object prompts (its discrete model is reading's). See silmm_fast.loop.models.bootstrap.RECIPES",
    )


@dataclass
class SampleConfig:
    prompts_per_category: int = _f(
        96,
        "prompts the model writes per category per iteration; only the prompts whose candidates' scores differ by "
        "pairs.min_margin or more yield a pair",
        ge=1,
    )
    candidates: int | None = _f(
        None,
        "N: candidate images kept per prompt; none: the mode's default, 8 in discrete mode and 16 in continuous",
        ge=2,
    )
    oversample: int = _f(24, "K: continuous mode samples per prompt before diverse selection (K >= N)", ge=2)
    top_p: float = _f(0.95, "nucleus sampling threshold for image tokens (discrete) and prompts", gt=0, le=1)
    temperature: float = _f(1.0, "sampling temperature for image tokens", gt=0)
    dropdiv_layers: int = _f(
        0,
        "continuous mode: DropDiv acts on the MLPs of this many last decoder layers, 0 for all of them (fewer layers "
        "or a lower rate give fewer distinct candidates per prompt)",
        ge=0,
    )
    dropdiv_p: float = _f(
        0.5,
        "continuous mode: DropDiv dropout rate (also used to sample the held-out images with eval.decode dropdiv); "
        "a higher rate gives more varied candidates whose features lie further from the policy's own image",
        ge=0,
        lt=1,
    )
    select_method: str = _f("dpp", "continuous mode: diverse selection method, 'dpp' or 'fps'")
    deterministic_candidate: bool = _f(
        True,
        "continuous mode: candidate 0 of each prompt is the policy's dropout-free image (what eval.decode "
        "deterministic shows), the other N - 1 DropDiv samples chosen by diverse selection; when the judge scores it "
        "as high as the best sample it is the winner, so KC-DPO keeps an image that is already right where it is "
        "instead of pulling it toward another sample's layout",
    )
    chunk: int = _f(
        32,
        "prompts per batched call (prompt writing, generation, questions, held-out eval); also the unit of work "
        "shared out among processes, so results do not depend on their number",
        ge=1,
    )
    judge_chunk: int = _f(
        256, "images per batched judge call, rounded down to whole prompts (at least one prompt)", ge=1
    )


@dataclass
class PairConfig:
    k: int | None = _f(
        None,
        "pairs per prompt: top-k winners x bottom-k losers (k <= N/2); none: 1 in discrete mode, 4 in continuous "
        "mode, at most N/2",
        ge=1,
    )
    min_margin: float = _f(0.1, "drop pairs whose score difference is below this", ge=0)


@dataclass
class OptimConfig:
    beta: float = _f(0.1, "discrete DPO beta", gt=0)
    loss_type: str = _f("sigmoid", "discrete DPO loss: sigmoid, ipo, hinge or robust")
    nll_weight: float | None = _f(
        None,
        "discrete: weight of the chosen image's negative log-likelihood per token added to DPO (0: plain DPO; it "
        "keeps DPO from lowering the chosen images along with the rejected ones); none: 1 in discrete mode, 0 in "
        "continuous mode, where it does not apply",
        ge=0,
    )
    gamma: float = _f(
        10.0,
        "KC-DPO gamma: the margin's scale, so how far the features move before the sigmoid saturates (with the "
        "sqeuclidean kernel the margin is linear in the features and never stops pulling along winner minus loser; "
        "docs/continuous.md)",
        gt=0,
    )
    kernel: str = _f(
        "rbf",
        "KC-DPO distance: cosine, euclidean, sqeuclidean or rbf. rbf (2 - 2 exp(-|a - b|^2 / (2 sigma^2)) per token) "
        "attracts the features to a winner within about sigma and lets a far-away loser go, so the loss has an "
        "optimum near the winner; sqeuclidean pushes along winner minus loser without bound; the built-in model's "
        "empty cells are near-zero rows, whose cosine distance is direction noise",
    )
    targets: str = _f(
        "decoded",
        "continuous mode: what KC-DPO pulls the policy's features toward (winners) and pushes them from (losers). "
        "decoded: each candidate's decoded image, the one the judge scored, encoded back into features by the "
        "world's codec; features: the candidate's own DropDiv features, which also carry the dropout noise that "
        "decoding removes (docs/continuous.md)",
    )
    pool: str = _f("none", "KC-DPO pooling over tokens: mean, max or none (mean and max lose the cell positions)")
    sigma: float = _f(
        0.5, "KC-DPO rbf kernel width, near the built-in model's feature-row distances; other kernels ignore it", gt=0
    )
    lr: float | None = _f(
        None,
        "AdamW learning rate; none: the mode's default, 5e-5 in discrete mode and 3e-5 in continuous mode",
        gt=0,
    )
    epochs: int = _f(2, "passes over the iteration's pairs", ge=1)
    batch_size: int = _f(16, "pairs per optimizer step", ge=1)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = _f(1.0, "gradient norm clip (0 disables)", ge=0)


@dataclass
class EvalConfig:
    heldout_per_category: int = _f(
        40, "held-out prompts per category (ground-truth evaluation, never trained on)", ge=1
    )
    samples: int = _f(4, "images sampled per held-out prompt (continuous mode: with eval.decode dropdiv only)", ge=1)
    decode: str = _f(
        "deterministic",
        "continuous mode: how a held-out image is drawn. deterministic: the policy's dropout-free features, one image "
        "per prompt (the image a continuous LMM shows; DropDiv only samples the candidates it learns from); dropdiv: "
        "eval.samples DropDiv samples per prompt at sample.dropdiv_p, drawn like the candidates, with the same masks "
        "at every iteration. docs/continuous.md compares the two",
    )


@dataclass
class DistConfig:
    strategy: str = _f(
        "ddp",
        "training on several processes (torchrun): 'ddp' (replicated model, averaged gradients) or 'fsdp2' "
        "(parameters, gradients and optimizer state sharded with torch's fully_shard)",
    )
    device: str = _f("auto", "'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu' or 'cuda'")


# How a run is executed, not what it computes: left out of the run directory's config, so a run may resume under
# another number of processes or another strategy.
EXECUTION_SECTIONS = ("dist",)
# Where a run lives and how fast it runs, not what it computes: left out of the run's identity too, so a run resumes
# from a copied or moved directory, under another spelling of its path, or with another number of threads.
RUNTIME_FIELDS = ("out", "threads", "model.cache_dir")


FEEDBACKS = ("self", "random", "oracle")
EVAL_DECODES = ("deterministic", "dropdiv")
KCDPO_TARGETS = ("decoded", "features")
# Fields whose default depends on the mode: None in their dataclass ("none" on the command line), resolved by
# TrainConfig.validate to this table's value for the run's mode.
MODE_DEFAULTS = {
    ("optim", "lr"): {"discrete": 5e-5, "continuous": 3e-5},
    ("pairs", "k"): {"discrete": 1, "continuous": 4},
    ("sample", "candidates"): {"discrete": 8, "continuous": 16},
    ("model", "recipe"): {"discrete": "reading", "continuous": "anchored"},
    ("optim", "nll_weight"): {"discrete": 1.0, "continuous": 0.0},
}


@dataclass
class TrainConfig:
    out: str | None = _f(None, "run directory (default runs/<mode>-<feedback>-seed<seed>)")
    mode: str = _f("discrete", "discrete (image tokens + DPO) or continuous (features + DropDiv + KC-DPO)")
    iterations: int = _f(3, "SILMM iterations; each trained policy becomes the next reference", ge=1)
    seed: int = _f(0, "run seed: every random stream derives from it, the iteration and the phase")
    feedback: str = _f(
        "self",
        "'self' (the model judges its own images), 'random' (control: random scores) or 'oracle' (control, built-in "
        "world only: the ground-truth evaluator scores the candidates, the feedback a perfect judge would give)",
    )
    threads: int = _f(0, "torch CPU threads (0: leave torch's default)", ge=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> TrainConfig:
        def bad(name: str, expected: str, value: Any) -> None:
            raise ValueError(f"config {name}: expected {expected}, got {value!r}")

        if self.mode not in ("discrete", "continuous"):
            bad("mode", "'discrete' or 'continuous'", self.mode)
        defaulted = set()
        for (section, name), per_mode in MODE_DEFAULTS.items():
            if getattr(getattr(self, section), name) is None:
                setattr(getattr(self, section), name, per_mode[self.mode])
                defaulted.add(f"{section}.{name}")
        # every numeric field: its type, finite, within the bounds declared beside its default
        for dotted, f, hint in _dotted_fields():
            if _base(hint) in (int, float):
                section, _, leaf = dotted.rpartition(".")
                value = getattr(getattr(self, section) if section else self, leaf)
                bounds = {k: v for k, v in f.metadata.items() if k in _BOUNDS}
                _check_number(dotted, value, _base(hint), bounds)
        if self.feedback not in FEEDBACKS:
            bad("feedback", "'self', 'random' or 'oracle'", self.feedback)
        if self.model.name not in ("shapes", "janus"):
            bad("model.name", "'shapes' (the built-in world's model) or 'janus'", self.model.name)
        if self.model.recipe not in RECIPES:
            bad("model.recipe", f"one of {tuple(RECIPES)}", self.model.recipe)
        if self.model.name == "janus":
            if not self.model.path:
                bad("model.name", "'janus' together with model.path (--model-path DIR, a local checkpoint)", "janus")
            if self.mode != "discrete":
                bad("mode", "'discrete' with model.name 'janus' (Janus generates image tokens)", self.mode)
            if self.feedback == "oracle":
                bad("feedback", "'self' or 'random' with model.name 'janus' (no ground truth for its images)", "oracle")
        s, p, o, e = self.sample, self.pairs, self.optim, self.eval
        if s.oversample < s.candidates:
            bad("sample.oversample", f"an integer >= sample.candidates ({s.candidates})", s.oversample)
        if s.select_method not in ("dpp", "fps"):
            bad("sample.select_method", "'dpp' or 'fps'", s.select_method)
        if "pairs.k" in defaulted:
            p.k = min(p.k, s.candidates // 2)  # the mode's default, at most what the candidates allow
        if 2 * p.k > s.candidates:
            bad("pairs.k", f"an integer in [1, sample.candidates/2 = {s.candidates // 2}]", p.k)
        if o.loss_type not in ("sigmoid", "ipo", "hinge", "robust"):
            bad("optim.loss_type", "sigmoid, ipo, hinge or robust", o.loss_type)
        if o.kernel not in ("cosine", "euclidean", "sqeuclidean", "rbf"):
            bad("optim.kernel", "cosine, euclidean, sqeuclidean or rbf", o.kernel)
        if o.pool not in ("mean", "max", "none"):
            bad("optim.pool", "mean, max or none", o.pool)
        if o.targets not in KCDPO_TARGETS:
            bad("optim.targets", "'decoded' or 'features'", o.targets)
        if self.mode == "continuous" and o.nll_weight:
            bad("optim.nll_weight", "0 in continuous mode (KC-DPO has no chosen-image likelihood)", o.nll_weight)
        if e.decode not in EVAL_DECODES:
            bad("eval.decode", "'deterministic' or 'dropdiv'", e.decode)
        if self.dist.strategy not in ("ddp", "fsdp2"):
            bad("dist.strategy", "'ddp' or 'fsdp2'", self.dist.strategy)
        if self.dist.device not in ("auto", "cpu", "cuda"):
            bad("dist.device", "'auto', 'cpu' or 'cuda'", self.dist.device)
        return self

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.mode}-{self.feedback}-seed{self.seed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_identity(self) -> dict:
        """What the run computes: ``to_dict()`` without the execution sections (``dist``) and the runtime fields
        (``out``, ``threads``, ``model.cache_dir``), with ``model.path`` resolved. Saved in the run directory; a
        resumed run must match it, whatever its number of processes, location or path spelling."""
        return identity(self.to_dict())


def identity(data: dict) -> dict:
    """``data`` (a ``to_dict()``, or a run directory's saved config) as ``TrainConfig.run_identity`` describes."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items() if k not in EXECUTION_SECTIONS}
    for dotted in RUNTIME_FIELDS:
        section, _, name = dotted.rpartition(".")
        (out.get(section, {}) if section else out).pop(name, None)
    model = out.get("model", {})
    if model.get("path"):
        model["path"] = str(Path(model["path"]).expanduser().resolve())
    return out


# --- dict / YAML / command line ----------------------------------------------------------------------------------
def _sections(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def from_dict(data: dict, cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build a config from nested dicts; unknown keys are rejected by name."""
    if not isinstance(data, dict):
        raise ValueError(f"config {prefix or 'file'}: expected a mapping, got {type(data).__name__}")
    fields = _sections(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"config: unknown key {name!r}; known: {sorted(prefix + k for k in fields)}")
        f, hint = fields[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint, prefix=f"{name}.")
        else:
            kwargs[key] = _coerce(name, value, hint)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    optional = type(None) in typing.get_args(hint)
    base = _base(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"config {name}: expected {base.__name__}, got None")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base in (int, float) and isinstance(value, bool):  # YAML's yes / no are not numbers
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {name}: expected {base.__name__}, got {value!r}") from None


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (nested dict); validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"config: {path} is not a valid YAML file: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config: {path} must hold a mapping at top level")
    data = _merge(data, overrides or {})
    return from_dict(data).validate()


def _dotted_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    out = []
    for name, (f, hint) in _sections(cls).items():
        if dataclasses.is_dataclass(hint):
            out.extend(_dotted_fields(hint, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", f, hint))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m silmm_fast.train",
        description="SILMM self-improvement loop: the model writes prompts, samples candidates, asks itself yes/no "
        "questions about them, and learns from its own answers (DPO / KC-DPO). Runs on the built-in shapes world by "
        "default. A run directory that already holds a run is resumed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file with any of the fields below (nested by section)")
    # short spellings of the model choice: --model janus --model-path DIR
    for flag, dest, metavar in (("--model", "model.name", "NAME"), ("--model-path", "model.path", "DIR")):
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=metavar, help=f"= --{dest}")
    for dotted, f, hint in _dotted_fields():
        bounds = {k: v for k, v in f.metadata.items() if k in _BOUNDS}
        accepts = f"; {_expected(_base(hint), bounds)}" if bounds else ""
        parser.add_argument(
            f"--{dotted}",
            dest=dotted,
            default=argparse.SUPPRESS,
            metavar="V",
            help=f"{f.metadata['help']} (default: {f.default!r}{accepts})",
        )
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    overrides: dict = {}
    for dotted, value in args.items():
        node = overrides
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load(path, overrides)
