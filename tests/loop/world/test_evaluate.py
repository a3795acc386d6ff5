"""The ground-truth evaluator on hand-made scenes with known answers, for every category, incl. near misses."""

import pytest
import torch

from silmm_fast.loop.world import (
    CONSTRAINT_NAMES,
    FeatureCodec,
    ImageTokenizer,
    Obj,
    Scene,
    audit_pairs,
    check,
    evaluate,
    evaluate_features,
    evaluate_tokens,
    parse_prompt,
)

O = Obj  # short name keeps each hand-made case on one line


CASES = [
    # (prompt text, objects, expected per-constraint results)
    # color: right scene; colors swapped between the objects; one color wrong
    (
        "a red circle and a blue square",
        [O("circle", "red", "plain", 0, 0), O("square", "blue", "dotted", 1, 1)],
        [1, 1],
    ),
    (
        "a red circle and a blue square",
        [O("circle", "blue", "plain", 0, 0), O("square", "red", "dotted", 1, 1)],
        [0, 0],
    ),
    (
        "a red circle and a blue square",
        [O("circle", "red", "plain", 0, 0), O("square", "green", "plain", 1, 1)],
        [1, 0],
    ),
    (
        "a red circle, a blue square and a green star",
        [O("circle", "red", "plain", 0, 0), O("square", "blue", "plain", 0, 1), O("star", "green", "plain", 0, 2)],
        [1, 1, 1],
    ),
    # shape: shared color, one shape wrong
    (
        "a green star and a green hexagon",
        [O("star", "green", "plain", 2, 2), O("circle", "green", "plain", 0, 0)],
        [1, 0],
    ),
    (
        "a striped star and a striped hexagon",
        [O("star", "green", "striped", 2, 2), O("hexagon", "red", "striped", 0, 0)],
        [1, 1],
    ),
    # texture: textures swapped between the objects
    (
        "a dotted triangle and a plain hexagon",
        [O("triangle", "red", "plain", 0, 0), O("hexagon", "red", "dotted", 0, 1)],
        [0, 0],
    ),
    (
        "a dotted triangle and a plain hexagon",
        [O("triangle", "red", "dotted", 0, 0), O("hexagon", "red", "plain", 0, 1)],
        [1, 1],
    ),
    # spatial: right objects in the wrong relation; same column is not "left of"; above / below
    (
        "a red circle to the left of a blue square",
        [O("circle", "red", "plain", 1, 0), O("square", "blue", "plain", 1, 2)],
        [1, 1, 1],
    ),
    (
        "a red circle to the left of a blue square",
        [O("circle", "red", "plain", 1, 2), O("square", "blue", "plain", 1, 0)],
        [1, 1, 0],
    ),
    (
        "a red circle to the left of a blue square",
        [O("circle", "red", "plain", 0, 1), O("square", "blue", "plain", 2, 1)],
        [1, 1, 0],
    ),
    (
        "a star above a dotted triangle",
        [O("star", "yellow", "plain", 0, 2), O("triangle", "red", "dotted", 1, 0)],
        [1, 1, 1],
    ),
    (
        "a star below a dotted triangle",
        [O("star", "yellow", "plain", 0, 2), O("triangle", "red", "dotted", 1, 0)],
        [1, 1, 0],
    ),
    (
        "a star above a dotted triangle",
        [O("star", "yellow", "plain", 0, 2), O("triangle", "red", "plain", 1, 0)],
        [1, 0, 0],
    ),
    # numeracy: exact, one too many, one too few, other kinds don't count
    ("three green stars", [O("star", "green", "plain", 0, c) for c in range(3)], [1]),
    (
        "three green stars",
        [O("star", "green", "plain", 0, c) for c in range(3)] + [O("star", "green", "plain", 1, 0)],
        [0],
    ),
    ("three green stars", [O("star", "green", "plain", 0, c) for c in range(2)], [0]),
    (
        "three green stars",
        [O("star", "green", "plain", 0, c) for c in range(3)] + [O("star", "red", "plain", 2, 2)],
        [1],
    ),
    ("one circle", [O("circle", "purple", "striped", 1, 1), O("square", "purple", "striped", 0, 0)], [1]),
    (
        "two circles and one star",
        [O("circle", "red", "plain", 0, 0), O("circle", "blue", "dotted", 2, 2), O("star", "red", "plain", 1, 1)],
        [1, 1],
    ),
    (
        "two circles and one star",
        [O("circle", "red", "plain", 0, 0), O("star", "blue", "dotted", 2, 2), O("star", "red", "plain", 1, 1)],
        [0, 0],
    ),
    # complex: full binding + relation; count + bound object; three objects + relation
    (
        "a striped red circle above a plain blue star",
        [O("circle", "red", "striped", 0, 0), O("star", "blue", "plain", 2, 0)],
        [1, 1, 1],
    ),
    (
        "a striped red circle above a plain blue star",
        [O("circle", "red", "plain", 0, 0), O("star", "blue", "striped", 2, 0)],
        [0, 0, 0],
    ),
    (
        "two red circles and a dotted blue square",
        [O("circle", "red", "plain", 0, 0), O("circle", "red", "striped", 0, 1), O("square", "blue", "dotted", 2, 2)],
        [1, 1],
    ),
    (
        "two red circles and a dotted blue square",
        [O("circle", "red", "plain", 0, 0), O("circle", "blue", "striped", 0, 1), O("square", "red", "dotted", 2, 2)],
        [0, 0],
    ),
    (
        "a red circle to the left of a blue star and a dotted square",
        [O("circle", "red", "plain", 0, 0), O("star", "blue", "plain", 0, 2), O("square", "green", "dotted", 2, 2)],
        [1, 1, 1, 1],
    ),
    (
        "a red circle to the left of a blue star and a dotted square",
        [O("circle", "red", "plain", 0, 2), O("star", "blue", "plain", 0, 0), O("square", "green", "plain", 2, 2)],
        [1, 1, 0, 0],
    ),
]


@pytest.mark.parametrize("text, objects, expected", CASES)
def test_check_known_answers(text, objects, expected):
    prompt = parse_prompt(text)
    assert check(prompt, Scene(objects)) == [bool(e) for e in expected]


def test_cases_cover_every_category():
    assert {parse_prompt(t).category for t, _, _ in CASES} == {
        "color",
        "shape",
        "texture",
        "spatial",
        "numeracy",
        "complex",
    }


def test_no_image_meets_nothing():
    p = parse_prompt("a red circle to the left of a blue square")
    assert check(p, None) == [False, False, False]
    assert check(p, Scene.blank()) == [False, False, False]


def test_evaluate_aggregates():
    prompts = [parse_prompt(t) for t, _, _ in CASES[:3]] + [parse_prompt("three green stars")] * 2
    scenes = [Scene(o) for _, o, _ in CASES[:3]] + [Scene(CASES[14][1]), None]
    r = evaluate(prompts, scenes)
    # results: [1,1], [0,0], [1,0], [1], [0]
    assert r["overall"] == {
        "all_constraints": pytest.approx(2 / 5),
        "constraint_fraction": pytest.approx((1 + 0 + 0.5 + 1 + 0) / 5),
        "n_prompts": 5,
        "n_constraints": 8,
        "n_constraints_met": 4,
        "extra_objects": 0.0,  # every image holds as many objects as its prompt asks for
    }
    assert list(r["by_category"]) == ["color", "numeracy"]
    assert r["by_category"]["color"]["all_constraints"] == pytest.approx(1 / 3)
    assert r["by_category"]["color"]["constraint_fraction"] == pytest.approx(0.5)
    assert r["by_category"]["numeracy"]["all_constraints"] == pytest.approx(0.5)
    assert r["multi_object"]["n_prompts"] == 5 and "single_object" not in r  # "three green stars" is 3 objects
    single = evaluate([parse_prompt("one circle")], [Scene(CASES[18][1])])
    assert single["single_object"]["all_constraints"] == 1.0 and "multi_object" not in single


def test_evaluate_counts_extra_objects_and_splits_constraints_by_kind_and_relation():
    red_circle, blue_star = Obj("circle", "red", "plain", 0, 0), Obj("star", "blue", "plain", 0, 1)
    cases = [
        # left of met, both exist, one object more than asked (a green square)
        (
            "a red circle to the left of a blue star",
            Scene((red_circle, blue_star, Obj("square", "green", "plain", 2, 2))),
        ),
        # three red circles for two: the count breaks, one object more
        ("two red circles", Scene(tuple(Obj("circle", "red", "plain", 1, c) for c in range(3)))),
        # the star above the circle: both exist, "below" not met, nothing extra
        ("a star below a circle", Scene((Obj("star", "red", "plain", 0, 0), Obj("circle", "red", "plain", 1, 0)))),
        ("one red circle", None),  # no image: nothing met, no object
    ]
    r = evaluate([parse_prompt(t) for t, _ in cases], [s for _, s in cases])
    assert r["overall"]["extra_objects"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert r["by_category"]["numeracy"]["extra_objects"] == r["by_category"]["spatial"]["extra_objects"] == 0.5
    assert r["by_constraint"] == {
        "exists": {"met": 4, "n": 4},
        "count": {"met": 0, "n": 2},
        "left": {"met": 1, "n": 1},
        "below": {"met": 0, "n": 1},
    }
    assert set(r["by_constraint"]) <= set(CONSTRAINT_NAMES)


def test_evaluate_tokens_decodes_leniently():
    tok = ImageTokenizer()
    prompts = [parse_prompt("a red circle and a blue square")] * 4
    good = tok.encode(Scene(CASES[0][1]))
    five = list(good)
    for i in (1, 2, 3):  # three extra stars after the two described objects: lenient decode keeps four objects
        five[i] = tok.token_of("star", "green", "plain")
    r = evaluate_tokens(prompts, [good, five, good[:8], [0] * 9], tok)
    # good: met; five objects -> first four row-major keep the circle (cell 0) but drop the square (cell 4)
    assert [check(p, s) for p, s in zip(prompts[:2], [tok.decode(good), tok.decode(five, strict=False)])] == [
        [True, True],
        [True, False],
    ]
    assert r["overall"]["n_constraints_met"] == 2 + 1
    assert r["overall"]["all_constraints"] == pytest.approx(1 / 4)
    assert evaluate_tokens(prompts[:2], torch.tensor([good, good]))["overall"]["all_constraints"] == 1.0


def test_evaluate_features():
    codec = FeatureCodec()
    prompts = [parse_prompt(t) for t, _, _ in CASES]
    feats = codec.encode_batch([Scene(o) for _, o, _ in CASES])
    feats[1] = float("nan")  # an image that does not decode scores 0
    r = evaluate_features(prompts, feats, codec)
    expected = [e for i, (_, _, e) in enumerate(CASES) if i != 1]
    assert r["overall"]["n_constraints_met"] == sum(map(sum, expected))
    with pytest.raises(ValueError, match="features"):
        evaluate_features(prompts, feats[:, :, :10], codec)


def test_evaluate_bad_input():
    p = parse_prompt("one circle")
    with pytest.raises(ValueError, match="scenes"):
        evaluate([p, p], [None])
    with pytest.raises(ValueError, match="prompts"):
        evaluate([], [])
    with pytest.raises(TypeError, match=r"scenes\[0\]"):
        evaluate([p], [[0] * 9])
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        evaluate(["one circle"], [None])
    with pytest.raises(TypeError, match="scene"):
        check(p, "scene")
    with pytest.raises(TypeError, match="tokenizer"):
        evaluate_tokens([p], [[0] * 9], tokenizer=FeatureCodec())


def test_audit_pairs_counts_better_worse_and_objects():
    color = parse_prompt("a red circle and a blue square")
    numeracy = parse_prompt("two stars")
    right = Scene([O("circle", "red", "plain", 0, 0), O("square", "blue", "dotted", 1, 1)])
    swapped = Scene([O("circle", "blue", "plain", 0, 0), O("square", "red", "dotted", 1, 1)])
    cluttered = Scene([*right.objects, O("star", "green", "plain", 2, 2)])
    two = Scene([O("star", "red", "plain", 0, 0), O("star", "red", "plain", 0, 1)])
    three = Scene([*two.objects, O("star", "red", "plain", 0, 2)])
    audit = audit_pairs(
        [color, color, color, numeracy, numeracy, None],
        [right, swapped, cluttered, three, None, right],  # better, worse, tie (both meet all), worse, worse
        [swapped, right, right, two, two, swapped],
    )
    assert audit["unparsed"] == 1
    assert audit["by_category"]["color"] == {
        "pairs": 3, "chosen_better": 1, "chosen_worse": 1, "objects_chosen": pytest.approx(7 / 3, abs=1e-4),
        "objects_rejected": 2.0,
    }  # fmt: skip
    assert audit["by_category"]["numeracy"] == {
        "pairs": 2, "chosen_better": 0, "chosen_worse": 2, "objects_chosen": 1.5, "objects_rejected": 2.0,
    }  # fmt: skip
    assert audit["overall"]["pairs"] == 5 and audit["overall"]["chosen_worse"] == 3
    assert set(audit["by_category"]) == {"color", "numeracy"}


def test_audit_pairs_bad_input():
    p = parse_prompt("a red circle and a blue square")
    scene = Scene([O("circle", "red", "plain", 0, 0)])
    with pytest.raises(ValueError, match="one entry per pair"):
        audit_pairs([p], [scene], [])
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        audit_pairs(["a red circle and a blue square"], [scene], [scene])
    assert audit_pairs([None], [scene], [scene]) == {"by_category": {}, "unparsed": 1}
