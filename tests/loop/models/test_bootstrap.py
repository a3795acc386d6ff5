"""Bootstrap of the shapes-world base model: synthetic data, a tiny training run that learns, the cache, bad input."""

import importlib
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import silmm_fast
from silmm_fast.loop.models.bootstrap import (
    BootstrapConfig,
    bootstrap,
    bootstrap_stats,
    cache_path,
    default_cache_dir,
    recipe,
    train,
)
from silmm_fast.loop.models.data import IGNORE, Example, SyntheticData, collate, count_targets, filter_counts
from silmm_fast.loop.models.image_embedding import ImageEmbedding
from silmm_fast.loop.models.image_head import FactoredImageHead
from silmm_fast.loop.models.measure import binding_trap, format_report, generate_scenes, measure_base
from silmm_fast.loop.models.shapes_lmm import ShapesLMM
from silmm_fast.loop.models.vocab import JointVocab
from silmm_fast.loop.models.word_shift import WordShift
from silmm_fast.loop.world import (
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    NUMBER_WORDS,
    SHAPES,
    TEXTURES,
    WORDS,
    Constraint,
    Desc,
    ImageTokenizer,
    Obj,
    Question,
    Scene,
    canonical_scene,
    sample_prompt,
)

# the module, not the `bootstrap` function that silmm_fast.loop.models re-exports under the same name
bootstrap_mod = importlib.import_module("silmm_fast.loop.models.bootstrap")

torch.set_num_threads(1)

# Small enough to train in a few seconds on one core; VQA gets most of the batch so it clears chance quickly.
# Unpaired VQA (the default): in 70 steps a tiny model learns what the question text predicts (above chance), a
# learning check that takes seconds. Reading the image, which paired VQA data teaches, takes the default-size
# bootstrap (measure_base's vqa_shuffled figure shows it; a tiny model on paired data stays at chance for 200 steps).
TINY = dict(steps=70, vqa_batch=48, generate_batch=8, write_batch=4, decompose_batch=4, lr=1e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    config = BootstrapConfig.tiny("discrete", **TINY)
    model = bootstrap("discrete", cache_dir=root, config=config, progress=False)
    return root, config, model


def _vqa_accuracy(model: ShapesLMM, n: int = 200, seed: int = 123, shuffle_images: bool = False) -> float:
    """Yes/no accuracy on ``n`` training-distribution VQA items; with ``shuffle_images`` each question is asked about
    another item's image (a fixed permutation), which leaves only what the question text alone predicts."""
    data = SyntheticData(model.vocab, seed=seed)
    items = [data.vqa_item() for _ in range(n)]
    tokens = ImageTokenizer().encode_batch([s for s, _, _ in items])
    if shuffle_images:
        tokens = tokens[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    p_yes, p_no = model.answer(tokens, [[q] for _, q, _ in items])
    return sum(float((y > n_).item() == a) for y, n_, (_, _, a) in zip(p_yes, p_no, items)) / n


# ---------------------------------------------------------------- data


def test_collate_shifts_targets():
    ex = [Example((1, 5, 6, 7), 2), Example((1, 9, 8), 1)]
    ids, labels = collate(ex, pad_id=0)
    assert ids.tolist() == [[1, 5, 6], [1, 9, 8]]
    assert labels.tolist() == [[IGNORE, 6, 7], [9, 8, IGNORE]]


def test_collate_places_extra_targets_at_their_positions():
    ids, labels = collate([Example((1, 5, 6, 7, 8), 4, ((1, 30), (2, 31)))], pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 7]]
    assert labels.tolist() == [[IGNORE, 30, 31, 8]]  # position 1 predicts 30 instead of the next id 6


def _question(constraint: Constraint) -> Question:
    return Question(constraint.question(), constraint)


def test_filter_counts_on_hand_made_scenes():
    scene = Scene(
        [
            Obj("circle", "red", "striped", 0, 0),
            Obj("circle", "blue", "striped", 0, 2),
            Obj("square", "red", "plain", 2, 1),
        ]
    )
    # "is there a striped red circle?": striped 2, striped red 1, striped red circle 1
    q = _question(Constraint.exists(Desc("circle", "red", "striped")))
    assert q.text == "is there a striped red circle?"
    assert filter_counts(scene, q) == [(3, 2), (4, 1), (5, 1)]
    # a binding near miss: red squares exist, red circles exist, but no plain red circle
    assert filter_counts(scene, _question(Constraint.exists(Desc("circle", "red", "plain"))))[-1] == (5, 0)
    # counts: two circles; exactly two → the last count equals the number asked
    q = _question(Constraint.count_of(Desc("circle"), 2))
    assert q.text == "are there exactly two circles?" and filter_counts(scene, q) == [(4, 2)]
    # relations: objects right of a red circle (col 0) are the blue circle and the red square; of those one is blue
    q = _question(Constraint.related(Desc("circle", "red"), "left", Desc("circle", "blue")))
    assert filter_counts(scene, q) == [(2, 2), (3, 1), (6, 2), (9, 1), (10, 1)]
    # the square is below both circles: nothing lies below it, so "the square above" views no object
    q = _question(Constraint.related(Desc("square"), "above", Desc("circle")))
    assert filter_counts(scene, q)[1:] == [(3, 0), (5, 0)]


def test_count_targets_decide_every_answer_of_the_vqa_stream():
    v = JointVocab(WORDS, CATEGORIES, 91)
    data = SyntheticData(v, seed=5, vqa_pairs=True)
    numbers = {v.no: 0, **{v.token_id(w): n for n, w in enumerate(NUMBER_WORDS, start=1)}}
    for _ in range(400):
        scene, question, yes = data.vqa_question()
        counts = count_targets(v, scene, question)
        assert counts, question.text
        last = numbers[counts[-1][1]]
        decided = last == question.constraint.count if question.constraint.kind == "count" else last > 0
        assert decided == yes, (question.text, scene)


def test_vqa_counts_put_targets_on_the_question_words():
    v = JointVocab(WORDS, CATEGORIES, 91)
    plain, counted = SyntheticData(v, seed=2), SyntheticData(v, seed=2, vqa_counts=True)
    for _ in range(20):
        a, b = plain.vqa(), counted.vqa()
        assert a.ids == b.ids and a.target_start == b.target_start and a.extra_targets == ()
        words = b.ids.index(v.q) + 1
        assert b.extra_targets and all(words <= p < b.target_start - 1 for p, _ in b.extra_targets)
        assert {t for _, t in b.extra_targets} <= {v.no, *(v.token_id(w) for w in NUMBER_WORDS)}


def test_synthetic_data_formats_and_split():
    v = JointVocab(WORDS, CATEGORIES, ImageTokenizer().num_tokens)
    data = SyntheticData(v, gen_noise=0.0, seed=0)
    for ex in data.batch("generate", 20):
        assert ex.ids[ex.target_start - 1] == v.img and len(ex.ids) - ex.target_start == 9
        assert all(v.is_image_id(t) for t in ex.ids[ex.target_start :])
    for ex in data.batch("vqa", 20):
        assert ex.ids[-1] in (v.yes, v.no) and ex.ids[ex.target_start - 1] == v.a
    for ex in data.batch("decompose", 20):
        assert ex.ids[-1] == v.eos and ex.ids[ex.target_start - 1] == v.sep
    for ex in data.batch("write", 20):
        assert ex.ids[-1] == v.eos and v.decode_ids([ex.ids[2]])[0].startswith("<cat:")
    for ex in data.batch("copy", 20):
        words = ex.ids[2 : ex.target_start - 1]
        assert ex.ids[1] == v.copy and ex.ids[ex.target_start - 1] == v.sep and 4 <= len(words) <= 16
        assert ex.ids[ex.target_start :] == (*words, v.eos)
    answers = [data.vqa_item()[2] for _ in range(400)]
    assert 0.4 < sum(answers) / len(answers) < 0.6
    # Prompts for writing, decomposition and generation come from the train split only.
    prompts = [data.prompt() for _ in range(300)]
    assert all(p.split() == "train" and not (p.pairs() & HELDOUT_PAIRS) for p in prompts)
    assert {p.category for p in prompts} == set(CATEGORIES)


def test_copy_task_never_shows_a_heldout_pair():
    v = JointVocab(WORDS, CATEGORIES, ImageTokenizer().num_tokens)
    shape_of = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
    seen = 0
    for ex in SyntheticData(v, seed=1).batch("copy", 2000):
        words = v.decode_ids(ex.ids[2 : ex.target_start - 1])
        for i, w in enumerate(words):
            if w in shape_of:
                assert not any((shape_of[w], a) in HELDOUT_PAIRS for a in words[max(0, i - 2) : i]), words
                seen += any(a in COLORS + TEXTURES for a in words[max(0, i - 2) : i])
    assert seen > 100  # attribute-shape neighbours do occur, only the held-out ones are excluded


def test_generation_noise_fraction():
    v = JointVocab(WORDS, CATEGORIES, ImageTokenizer().num_tokens)
    rng = random.Random(0)
    prompts = [sample_prompt(c, rng, "train") for c in CATEGORIES for _ in range(40)]
    clean = SyntheticData(v, gen_noise=0.0, seed=1)
    noisy = SyntheticData(v, gen_noise=0.5, seed=1)
    assert all(p.satisfied_by(clean.target_scene(p)) for p in prompts)
    met = sum(p.satisfied_by(noisy.target_scene(p)) for p in prompts) / len(prompts)
    assert 0.4 < met < 0.6


def test_canonical_layout_fraction():
    v = JointVocab(WORDS, CATEGORIES, ImageTokenizer().num_tokens)
    rng = random.Random(2)
    prompts = [sample_prompt(c, rng, "train") for c in CATEGORIES for _ in range(40)]
    never = SyntheticData(v, gen_noise=0.0, distractor_prob=0.0, seed=3)
    always = SyntheticData(v, gen_noise=0.0, canonical_prob=1.0, seed=3)
    half = SyntheticData(v, gen_noise=0.0, distractor_prob=0.0, canonical_prob=0.5, seed=3)
    assert all(always.target_scene(p) == canonical_scene(p) for p in prompts)
    # Random layouts rarely coincide with the canonical one (a 1-object prompt still can, 1 cell in 9).
    assert sum(never.target_scene(p) == canonical_scene(p) for p in prompts) / len(prompts) < 0.25
    frac = sum(half.target_scene(p) == canonical_scene(p) for p in prompts) / len(prompts)
    assert 0.4 < frac < 0.75
    for p in prompts:  # every target still meets its prompt (no noise here)
        assert p.satisfied_by(half.target_scene(p))


def test_vqa_pairs_ask_each_question_of_a_yes_and_a_no_scene():
    v = JointVocab(WORDS, CATEGORIES, 91)
    data = SyntheticData(v, seed=5, vqa_pairs=True)
    items = [data.vqa_item() for _ in range(400)]
    edits = 0
    for (scene, question, yes), (other, again, flipped) in zip(items[::2], items[1::2]):
        assert question == again and flipped == (not yes) and scene != other
        words = question.rstrip("?").split()
        if words[:2] == ["is", "there"] and words[2] in ("a", "an") and len(words) <= 6:
            # an existence question ("is there a [texture] [color] shape?") re-checked by hand
            *attributes, shape = words[3:]
            for sc, truth in ((scene, yes), (other, not yes)):
                found = any(o.shape == shape and set(attributes) <= {o.color, o.texture} for o in sc.objects)
                assert found == truth, question
        cells = {o.cell: (o.shape, o.color, o.texture) for o in scene.objects}
        cells_other = {o.cell: (o.shape, o.color, o.texture) for o in other.objects}
        changed = {c for c in cells.keys() | cells_other.keys() if cells.get(c) != cells_other.get(c)}
        edits += len(changed) <= 2  # one edit changes one cell (two for a move)
    # the question alone predicts nothing: every question is answered yes once and no once
    assert sum(a for _, _, a in items) == len(items) // 2
    assert edits > 0.4 * len(items) // 2  # many minimal pairs (58 % at this seed), the rest random scenes
    unpaired = SyntheticData(v, seed=5)
    first = [unpaired.vqa_item() for _ in range(4)]
    assert first[0][1] != first[1][1] or first[1][1] != first[2][1]


def test_vqa_question_is_vqa_item_with_the_question_object():
    v = JointVocab(WORDS, CATEGORIES, 91)
    for pairs in (False, True):
        texts, objects = SyntheticData(v, seed=9, vqa_pairs=pairs), SyntheticData(v, seed=9, vqa_pairs=pairs)
        for _ in range(40):
            scene, text, yes = texts.vqa_item()
            same_scene, question, same_yes = objects.vqa_question()
            assert (scene, text, yes) == (same_scene, question.text, same_yes)
            assert question.answer(scene) == yes


def test_synthetic_data_bad_input():
    v = JointVocab(WORDS, CATEGORIES, 91)
    with pytest.raises(ValueError, match="gen_noise"):
        SyntheticData(v, gen_noise=1.0)
    with pytest.raises(ValueError, match="canonical_prob"):
        SyntheticData(v, canonical_prob=-0.1)
    with pytest.raises(ValueError, match=r"canonical_prob: expected a number in \[0, 1\]"):
        SyntheticData(v, canonical_prob=1.5)
    with pytest.raises(TypeError, match="vocab"):
        SyntheticData(None)
    with pytest.raises(TypeError, match="vqa_pairs: expected a bool"):
        SyntheticData(v, vqa_pairs=1)
    with pytest.raises(TypeError, match="vqa_counts: expected a bool"):
        SyntheticData(v, vqa_counts="yes")
    with pytest.raises(ValueError, match="task"):
        SyntheticData(v).batch("draw", 2)


# ---------------------------------------------------------------- training and cache


def test_tiny_bootstrap_learns(trained):
    root, config, model = trained
    stats = bootstrap_stats(cache_path(config, root))["stats"]
    for task in ("write", "decompose", "vqa", "generate"):
        assert stats["loss_end"][task] < stats["loss_start"][task], task
    # Decomposition is a copy task: even the tiny run is well below the uniform loss ln(V) ~ 5.
    assert stats["loss_end"]["decompose"] < 2.0


def test_tiny_bootstrap_vqa_above_chance(trained):
    # Above chance (0.5), which the question text alone allows for unpaired questions (see TINY).
    _, _, model = trained
    assert _vqa_accuracy(model) > 0.55


def test_measure_base_reports_every_skill_and_the_shuffled_image_control(trained):
    _, _, model = trained
    prompts = [sample_prompt(c, random.Random(i), "heldout") for i, c in enumerate(CATEGORIES)]
    result = measure_base(model, prompts, samples=2)
    assert set(result) == {"vqa", "vqa_shuffled", "vqa_binding", "decompose", "decompose_free", "generate"}
    for skill in ("vqa", "vqa_shuffled", "decompose", "decompose_free"):
        assert set(result[skill]) == {*CATEGORIES, "all"}
        assert all(0.0 <= x <= 1.0 for x in result[skill].values())
    assert set(result["vqa_binding"]) == {*CATEGORIES, "all"}  # NaN where a category asked no binding trap
    assert all(0.0 <= x <= 1.0 or math.isnan(x) for x in result["vqa_binding"].values())
    assert result["generate"]["single"]["prompts"] + result["generate"]["multi"]["prompts"] == len(prompts)
    table = format_report(result)
    header = ["category", "vqa", "vqa_shuf", "vqa_bind", "decomp", "dec_free", "gen_all", "gen_frac"]
    assert table.splitlines()[0].split() == header
    assert len(table.splitlines()) == len(CATEGORIES) + 4


def test_binding_trap_needs_every_named_attribute_present_on_different_objects():
    red_star, purple_circle = Obj("star", "red", "plain", 0, 0), Obj("circle", "purple", "plain", 0, 1)
    red_circle = Question("is there a red circle?", Constraint.exists(Desc("circle", "red")))
    assert binding_trap(red_circle, Scene([red_star, purple_circle]))
    assert not binding_trap(red_circle, Scene([red_star]))  # no circle at all: a plain no
    assert not binding_trap(red_circle, Scene([red_star, Obj("circle", "red", "dotted", 1, 1)]))  # the answer is yes
    circle = Question("is there a circle?", Constraint.exists(Desc("circle")))
    assert not binding_trap(circle, Scene([red_star]))  # one attribute named: nothing to bind
    striped_red_circle = Question("is there a striped red circle?", Constraint.exists(Desc("circle", "red", "striped")))
    assert not binding_trap(striped_red_circle, Scene([red_star, purple_circle]))  # nothing striped
    assert binding_trap(
        striped_red_circle,
        Scene([red_star, Obj("circle", "red", "dotted", 1, 0), Obj("square", "blue", "striped", 2, 2)]),
    )
    left = Question(
        "is the red star to the left of the purple circle?",
        Constraint.related(Desc("star", "red"), "left", Desc("circle", "purple")),
    )
    assert not binding_trap(left, Scene([purple_circle]))  # only "is there" questions


def test_cache_hit_loads_same_weights(trained, monkeypatch):
    root, config, model = trained

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was retrained")

    monkeypatch.setattr(bootstrap_mod, "train", no_training)
    again = bootstrap("discrete", cache_dir=root, config=config, progress=False)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not again.training


def test_cache_key_depends_on_config(tmp_path, monkeypatch):
    a = BootstrapConfig.tiny("discrete")
    assert cache_path(a, tmp_path) == cache_path(BootstrapConfig.tiny("discrete"), tmp_path)
    assert cache_path(a, tmp_path) != cache_path(BootstrapConfig.tiny("discrete", gen_noise=0.1), tmp_path)
    assert cache_path(a, tmp_path) != cache_path(BootstrapConfig.tiny("discrete", vqa_pairs=True), tmp_path)
    with pytest.raises(TypeError, match="vqa_pairs"):
        BootstrapConfig.tiny("discrete", vqa_pairs="yes")
    for change in (
        dict(vqa_counts=not a.vqa_counts),
        dict(image_embedding="atomic" if a.image_embedding == "structured" else "structured"),
        dict(word_shift=a.word_shift + 1),
    ):
        assert cache_path(a, tmp_path) != cache_path(BootstrapConfig.tiny("discrete", **change), tmp_path)
    with pytest.raises(ValueError, match="image_embedding: expected one of"):
        BootstrapConfig.tiny("discrete", image_embedding="pixels").model_config()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="word_shift"):
            BootstrapConfig.tiny("discrete", word_shift=bad)
    assert cache_path(a, tmp_path) != cache_path(BootstrapConfig.tiny("continuous"), tmp_path)
    c = BootstrapConfig.tiny("continuous")
    assert cache_path(c, tmp_path) != cache_path(BootstrapConfig.tiny("continuous", feature_weight=2.0), tmp_path)
    assert cache_path(a, tmp_path).parent == tmp_path
    monkeypatch.setenv("SILMM_FAST_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("SILMM_FAST_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "silmm_fast", "models")


def test_tiny_continuous_bootstrap(tmp_path):
    config = BootstrapConfig.tiny("continuous", steps=12)
    model = bootstrap("continuous", cache_dir=tmp_path, config=config, progress=False)
    stats = bootstrap_stats(cache_path(config, tmp_path))["stats"]
    assert stats["loss_end"]["generate"] < stats["loss_start"]["generate"]
    assert model.generate_features(["a red circle"], 2).shape == (1, 2, 9, 48)
    # its images are DropDiv samples (the loop's defaults: every layer, p = 0.5), the same for the same seed
    texts = ["a red circle and a blue star", "two green squares"]
    first, again = (generate_scenes(model, texts, samples=6, seed=3) for _ in range(2))
    assert first == again and len(first) == 2 and all(len(row) == 6 for row in first)
    assert sorted(p.name for p in cache_path(config, tmp_path).iterdir()) == [
        "bootstrap.json",
        "config.json",
        "model.safetensors",
    ]


def test_tiny_reading_recipe_trains_a_reading_stage_first(tmp_path):
    config = recipe("reading", "discrete", tiny=True)
    assert (config.vqa_pairs, config.vqa_counts, config.image_embedding) == (True, True, "structured")
    assert config.reading_steps == 20 and config.steps == BootstrapConfig.tiny("discrete").steps
    model = bootstrap("discrete", cache_dir=tmp_path, config=config, progress=False)
    embed = model.lm.model.embed_tokens
    assert isinstance(embed, WordShift) and embed.shift == 2 and isinstance(embed.inner, ImageEmbedding)
    assert all(m.weight.abs().sum() > 0 for m in embed.maps)  # the shift's maps (zero at the start) learned
    assert isinstance(model.lm.lm_head, FactoredImageHead)
    stats = bootstrap_stats(cache_path(config, tmp_path))["stats"]
    # VQA and copying run through both stages, the other tasks only through the second
    assert stats["steps_per_second"] * stats["seconds"] == pytest.approx(config.reading_steps + config.steps, rel=0.01)
    for task in ("vqa", "copy", "write", "decompose", "generate"):
        assert stats["loss_end"][task] < stats["loss_start"][task], task
    assert recipe("plain") == BootstrapConfig() and recipe("pairs") == BootstrapConfig(vqa_pairs=True)
    with pytest.raises(ValueError, match="recipe: expected one of"):
        recipe("pixels")


def test_continuous_variant_keeps_the_atomic_head_and_trains_as_without_the_field():
    # the continuous variant draws no image tokens: the recipe's factored head does not apply to it, and the model
    # it trains is the one a config without it trains (same initialization, same data)
    config = recipe("reading", "continuous", tiny=True)
    assert config.image_head == "factored" and config.model_config().image_head == "atomic"
    small = dict(steps=3, reading_steps=2)
    a, _ = train(replace(config, **small), progress=False)
    b, _ = train(replace(config, image_head="atomic", **small), progress=False)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())
    with pytest.raises(ValueError, match="image_head"):
        BootstrapConfig(image_head="tied")


def test_feature_dropout_trains_the_feature_head_under_dropout_reproducibly():
    # features regressed under DropDiv's dropout: seeded per step (the same config trains the same weights), and
    # acting (without it the weights differ)
    config = replace(recipe("reading", "continuous", tiny=True), steps=3, reading_steps=2, feature_dropout=0.5)
    a, _ = train(config, progress=False)
    again, _ = train(config, progress=False)
    without, _ = train(replace(config, feature_dropout=0.0), progress=False)
    assert all(torch.equal(x, again.state_dict()[k]) for k, x in a.state_dict().items())
    assert not torch.equal(a.feature_head.weight, without.feature_head.weight)
    assert not any(module.training for module in a.modules())
    for bad in (-0.1, 1.0, "0.5"):
        with pytest.raises(ValueError, match="feature_dropout"):
            BootstrapConfig(feature_dropout=bad)


def test_bootstrap_bad_input(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        bootstrap("diffusion", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="variant"):
        bootstrap("continuous", cache_dir=tmp_path, config=BootstrapConfig.tiny("discrete"))
    with pytest.raises(TypeError, match="config"):
        bootstrap("discrete", cache_dir=tmp_path, config={"steps": 3})
    with pytest.raises(ValueError, match="steps"):
        BootstrapConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        BootstrapConfig(lr=-1.0)
    with pytest.raises(ValueError, match="feature_slot_start"):
        BootstrapConfig(feature_slot_start=-1)


def test_continuous_only_fields_reach_the_continuous_model_only(tmp_path):
    assert BootstrapConfig(variant="continuous", feature_slot_start=48).model_config().feature_slot_start == 48
    assert BootstrapConfig(variant="discrete", feature_slot_start=48).model_config().feature_slot_start == 0
    # a discrete model does not depend on them, so its cache key does not either (one bootstrap for both recipes);
    # a continuous model's does
    for variant, same in (("discrete", True), ("continuous", False)):
        keys = {cache_path(recipe(name, variant), tmp_path) for name in ("reading", "anchored")}
        assert (len(keys) == 1) == same
        a = BootstrapConfig.tiny(variant)
        for change in (dict(feature_weight=2.0), dict(feature_dropout=0.1), dict(feature_slot_start=40)):
            b = BootstrapConfig.tiny(variant, **change)
            assert (cache_path(a, tmp_path) == cache_path(b, tmp_path)) == same


def test_cache_key_follows_the_training_code_not_its_comments(tmp_path):
    from silmm_fast.loop.models.bootstrap import source_digest, training_code_digest

    f = tmp_path / "m.py"
    f.write_text('"""Doc."""\n\n\ndef g(x):\n    """Doc."""\n    return x + 1  # one\n')
    before = source_digest([f])
    f.write_text('"""Other doc."""\n# a comment\ndef g(x):\n    return x + 1\n')
    assert source_digest([f]) == before  # comments, docstrings and layout do not count
    f.write_text('"""Doc."""\n\n\ndef g(x):\n    """Doc."""\n    return x + 2\n')
    assert source_digest([f]) != before  # what the code does does
    assert len(training_code_digest()) == 16


def test_the_cache_key_leaves_out_only_files_no_bootstrap_runs():
    # every Python function a tiny bootstrap of each variant calls is recorded: each file it calls in the training
    # code's folders must be in the digest, and no left-out file (measurements, evaluator, renderer) may run
    from silmm_fast.loop.models.bootstrap import _NOT_TRAINING_CODE, _TRAINING_CODE, training_code_files

    package = Path(silmm_fast.__file__).resolve().parent
    left_out = {package / part for part in _NOT_TRAINING_CODE}
    covered = set(training_code_files())
    assert all(f.is_file() for f in left_out) and not left_out & covered
    called: set[Path] = set()

    def record(frame, event, arg):
        if event == "call":
            called.add(Path(frame.f_code.co_filename).resolve())

    for variant in ("discrete", "continuous"):
        config = replace(recipe("anchored", variant, tiny=True), steps=2, reading_steps=1)
        sys.setprofile(record)
        try:
            train(config, progress=False)
        finally:
            sys.setprofile(None)
    training = {f for f in called if any(f == package / p or package / p in f.parents for p in _TRAINING_CODE)}
    assert package / "loop" / "models" / "data.py" in training and package / "loop" / "world" / "prompts.py" in training
    assert training <= covered, sorted(str(f) for f in training - covered)
