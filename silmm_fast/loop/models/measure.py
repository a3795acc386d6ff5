"""How good a ShapesLMM is at each SILMM skill on held-out prompts, scored by the world's ground truth.

``measure_base(model)`` gives, per prompt category and overall:

- ``vqa``: accuracy of the model's yes/no answers (yes when p(yes) > p(no)) to the ground-truth questions of each
  held-out prompt, asked about a scene that meets the prompt, a near miss of it (``corrupt_scene``) and one image
  the model generated for the prompt;
- ``vqa_shuffled``: the same questions asked about another prompt's image (a fixed derangement of the images) and
  scored against the right image's answers, so it measures what the question text alone predicts; a model that
  reads the image scores well below ``vqa`` here;
- ``vqa_binding``: accuracy on the binding traps among those questions (``binding_trap``: "is there a red circle?"
  about an image with a red object and a circle but no red circle), which a model checking each word of a question
  on its own always answers wrong (NaN for a category without any);
- ``decompose``: fraction of held-out prompts whose greedy decomposition is exactly the ground-truth question set
  (compared as token sequences, order-free), decoded as the loop decodes it (``ShapesLMM.decompose``'s
  ``copy_words``: a question copies its words from the prompt); ``decompose_free``: the same with any word allowed;
- ``generate``: for images sampled from the model (discrete: nucleus sampling; continuous: DropDiv samples of the
  feature matrix, decoded by the FeatureCodec), the fraction of images meeting every constraint
  (``all_constraints``) and the mean fraction of constraints met (``constraint_fraction``), per category and for
  single- vs multi-object prompts.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch

from silmm_fast.loop.models.shapes_lmm import ShapesLMM
from silmm_fast.loop.world import (
    FeatureCodec,
    ImageTokenizer,
    Prompt,
    Question,
    Scene,
    corrupt_scene,
    prompt_split,
    questions_for,
    scene_for_prompt,
    tokenize_text,
)


def binding_trap(question: Question, scene: Scene) -> bool:
    """Whether ``question`` asks for an object that ``scene`` lacks while each attribute it names (shape, color,
    texture) is on some object of it: "is there a red circle?" beside a red star and a purple circle."""
    c = question.constraint
    if c.kind != "exists" or c.holds(scene):
        return False
    named = [(a, getattr(c.subject, a)) for a in ("shape", "color", "texture") if getattr(c.subject, a) is not None]
    return len(named) > 1 and all(any(getattr(o, a) == v for o in scene.objects) for a, v in named)


def _mean(xs: Sequence[float]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


def _by_category(prompts: Sequence[Prompt], values: Sequence[Sequence[float]]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for p, vs in zip(prompts, values):
        groups[p.category].extend(vs)
        groups["all"].extend(vs)
    return {k: _mean(v) for k, v in groups.items()}


@torch.no_grad()
def generate_scenes(
    model: ShapesLMM,
    texts: Sequence[str],
    samples: int = 4,
    top_p: float = 0.95,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    dropdiv_layers: int | None = None,
    dropdiv_p: float = 0.5,
) -> list[list[Scene]]:
    """``samples`` generated scenes per prompt text (leniently decoded: a blank or crowded image is still a scene).

    The continuous variant samples the way the SILMM loop does: DropDiv (``dropdiv_layers``, None for all layers,
    and ``dropdiv_p``: the loop's defaults) gives each sample its own dropout masks, seeded by ``seed``.
    """
    from silmm_fast.dropdiv import dropdiv

    gen = torch.Generator(device=model.device).manual_seed(seed)
    out: list[list[Scene]] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        if model.config.variant == "discrete":
            tokens = model.generate_images(chunk, samples, top_p=top_p, temperature=temperature, generator=gen)
            tok = ImageTokenizer()
            out.extend([tok.decode(t, strict=False) for t in row] for row in tokens.cpu())
        else:
            codec = FeatureCodec(model.config.feature_dim)
            row_seeds = [
                seed * 1_000_003 + (start + i) * samples + j for i in range(len(chunk)) for j in range(samples)
            ]
            with dropdiv(model, last_layers=dropdiv_layers, p=dropdiv_p, row_seeds=row_seeds):
                feats = model.generate_features(chunk, samples).float().cpu()
            out.extend([codec.decode(f, strict=False) for f in row] for row in feats)
    return out


@torch.no_grad()
def measure_base(
    model: ShapesLMM,
    prompts: Sequence[Prompt] | None = None,
    *,
    n_per_category: int = 40,
    split_seed: int = 0,
    samples: int = 4,
    top_p: float = 0.95,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, dict]:
    """VQA accuracy, decomposition accuracy and generation alignment of ``model`` (see the module docstring).

    Args:
        model: a ShapesLMM of either variant.
        prompts: the prompts to measure on (default: the held-out half of ``prompt_split(split_seed,
            n_per_category)``).
        samples, top_p, temperature: how many images to sample per prompt and how (discrete variant).
        seed: seed of the sampling and of the near-miss scenes.

    Returns:
        ``{"vqa": {cat: acc}, "vqa_shuffled": {cat: acc}, "vqa_binding": {cat: acc}, "decompose": {cat: frac},
        "decompose_free": {cat: frac}, "generate": {cat | "single" | "multi": {"all_constraints": ...,
        "constraint_fraction": ...}}}``, each with an ``"all"`` entry.
    """
    if not isinstance(model, ShapesLMM):
        raise TypeError(f"model: expected a ShapesLMM, got {type(model).__name__}")
    if prompts is None:
        prompts = prompt_split(split_seed, n_per_category)["heldout"]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, Prompt) for p in prompts):
        raise TypeError("prompts: expected a non-empty list of silmm_fast.loop.world.Prompt")
    rng = random.Random(seed)
    texts = [p.text for p in prompts]

    generated = generate_scenes(model, texts, samples, top_p, temperature, seed)
    all_ok = [[float(p.satisfied_by(s)) for s in scenes] for p, scenes in zip(prompts, generated)]
    frac = [[sum(p.check(s)) / len(p.constraints) for s in scenes] for p, scenes in zip(prompts, generated)]
    by_cat_all = _by_category(prompts, all_ok)
    by_cat_frac = _by_category(prompts, frac)
    generate = {k: {"all_constraints": by_cat_all[k], "constraint_fraction": by_cat_frac[k]} for k in by_cat_all}
    for name, keep in (("single", lambda p: p.n_objects == 1), ("multi", lambda p: p.n_objects > 1)):
        idx = [i for i, p in enumerate(prompts) if keep(p)]
        generate[name] = {
            "all_constraints": _mean([x for i in idx for x in all_ok[i]]),
            "constraint_fraction": _mean([x for i in idx for x in frac[i]]),
            "prompts": len(idx),
        }

    question_sets = [sorted(tuple(tokenize_text(q.text)) for q in questions_for(p)) for p in prompts]
    decompose = {}
    for name, copy_words in (("decompose", True), ("decompose_free", False)):
        decomposed = model.decompose(texts, copy_words=copy_words)
        ok = [[float(sorted(tuple(tokenize_text(q)) for q in qs) == t)] for qs, t in zip(decomposed, question_sets)]
        decompose[name] = _by_category(prompts, ok)

    scenes, questions, truths, traps, owners = [], [], [], [], []
    tok = ImageTokenizer()
    for i, (p, gen_scenes) in enumerate(zip(prompts, generated)):
        good = scene_for_prompt(p, rng)
        for scene in (good, corrupt_scene(p, good, rng), gen_scenes[0]):
            qs = questions_for(p)
            scenes.append(scene)
            questions.append([q.text for q in qs])
            truths.append([q.answer(scene) for q in qs])
            traps.append([binding_trap(q, scene) for q in qs])
            owners.append(i)
    image_tokens = torch.tensor([tok.encode(s) for s in scenes])
    # each question is asked about the image in the same slot of the next prompt: never one of its own prompt's
    # (with a single prompt there is no other image, and vqa_shuffled repeats vqa)
    k, per_prompt_images = len(scenes), len(scenes) // len(prompts)
    shift = torch.tensor([(j + per_prompt_images) % k for j in range(k)])
    vqa = {}
    for name, images in (("vqa", image_tokens), ("vqa_shuffled", image_tokens[shift])):
        p_yes, p_no = model.answer(images, questions)
        per_prompt: dict[int, list[float]] = defaultdict(list)
        per_trap: dict[int, list[float]] = defaultdict(list)
        for i, yes, no, truth, trap in zip(owners, p_yes, p_no, truths, traps):
            right = [float((y > n).item() == t) for y, n, t in zip(yes, no, truth)]
            per_prompt[i].extend(right)
            per_trap[i].extend(r for r, is_trap in zip(right, trap) if is_trap)
        vqa[name] = _by_category(prompts, [per_prompt[i] for i in range(len(prompts))])
        if name == "vqa":
            vqa["vqa_binding"] = _by_category(prompts, [per_trap[i] for i in range(len(prompts))])
    return {**vqa, **decompose, "generate": generate}


def format_report(result: dict[str, dict]) -> str:
    """A small text table of a ``measure_base`` result, one row per category."""
    gen = result["generate"]
    keys = [k for k in result["vqa"] if k != "all"] + ["all"]
    lines = [
        f"{'category':<10} {'vqa':>6} {'vqa_shuf':>8} {'vqa_bind':>8} {'decomp':>7} {'dec_free':>8} {'gen_all':>8} "
        f"{'gen_frac':>9}"
    ]
    for k in keys:
        lines.append(
            f"{k:<10} {result['vqa'][k]:>6.3f} {result['vqa_shuffled'][k]:>8.3f} {result['vqa_binding'][k]:>8.3f} "
            f"{result['decompose'][k]:>7.3f} "
            f"{result['decompose_free'][k]:>8.3f} "
            f"{gen[k]['all_constraints']:>8.3f} {gen[k]['constraint_fraction']:>9.3f}"
        )
    for k in ("single", "multi"):
        lines.append(
            f"{k + '-object':<44} {'':>7} {gen[k]['all_constraints']:>8.3f} {gen[k]['constraint_fraction']:>9.3f}"
        )
    return "\n".join(lines)
