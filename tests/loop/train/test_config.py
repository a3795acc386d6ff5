"""The loop's configuration: defaults, YAML, command-line overrides, and bad values rejected by name."""

import re

import pytest

from silmm_fast.loop.train import config


def test_defaults_are_valid_and_documented():
    cfg = config.load()
    assert cfg.mode == "discrete" and cfg.iterations == 3 and cfg.feedback == "self"
    for dotted, f, _ in config._dotted_fields():
        assert f.metadata["help"], f"{dotted} has no help text"


def test_learning_rate_defaults_per_mode_and_explicit_value_wins():
    assert config.load().optim.lr == pytest.approx(5e-5)
    assert config.load(overrides={"mode": "continuous"}).optim.lr == pytest.approx(3e-5)
    assert config.parse_args(["--mode", "continuous", "--optim.lr", "3e-4"]).optim.lr == pytest.approx(3e-4)


def test_pairs_per_prompt_default_per_mode_and_explicit_value_wins():
    assert config.load().pairs.k == 1
    assert config.load(overrides={"mode": "continuous"}).pairs.k == 4
    assert config.parse_args(["--mode", "continuous", "--pairs.k", "1"]).pairs.k == 1
    assert config.parse_args(["--pairs.k", "none"]).pairs.k == 1
    # the mode's default k shrinks to what fewer candidates allow; an explicit k does not
    assert config.parse_args(["--mode", "continuous", "--sample.candidates", "6"]).pairs.k == 3
    assert config.parse_args(["--mode", "continuous", "--sample.candidates", "3"]).pairs.k == 1
    with pytest.raises(ValueError, match=r"pairs.k: expected an integer in \[1, sample.candidates/2 = 1\]"):
        config.parse_args(["--mode", "continuous", "--sample.candidates", "3", "--pairs.k", "2"])


def test_candidates_and_base_recipe_default_per_mode():
    assert config.load().sample.candidates == 8
    assert config.load(overrides={"mode": "continuous"}).sample.candidates == 16
    assert config.parse_args(["--mode", "continuous", "--sample.candidates", "4"]).sample.candidates == 4
    assert config.parse_args([]).model.recipe == "reading"
    assert config.parse_args(["--mode", "continuous"]).model.recipe == "anchored"
    assert config.parse_args(["--mode", "continuous", "--model.recipe", "reading"]).model.recipe == "reading"


def test_nll_weight_defaults_per_mode_and_applies_to_discrete_only():
    assert config.load().optim.nll_weight == 1.0
    assert config.load(overrides={"mode": "continuous"}).optim.nll_weight == 0.0
    assert config.parse_args(["--optim.nll_weight", "0"]).optim.nll_weight == 0.0
    assert config.parse_args(["--optim.nll_weight", "none"]).optim.nll_weight == 1.0
    with pytest.raises(ValueError, match="optim.nll_weight: expected 0 in continuous mode"):
        config.parse_args(["--mode", "continuous", "--optim.nll_weight", "0.5"])


def test_prompts_per_category_default_and_explicit_value_wins():
    assert config.load().sample.prompts_per_category == 96
    assert config.load(overrides={"mode": "continuous"}).sample.prompts_per_category == 96
    assert config.parse_args(["--sample.prompts_per_category", "5"]).sample.prompts_per_category == 5
    with pytest.raises(ValueError, match="sample.prompts_per_category: expected int"):
        config.parse_args(["--sample.prompts_per_category", "none"])  # no longer mode-dependent: none is refused


def test_base_model_recipe_keys_its_own_cache():
    from silmm_fast.loop.models.bootstrap import cache_path, recipe

    assert config.parse_args(["--mode", "continuous", "--model.recipe", "plain"]).model.recipe == "plain"
    cfg = config.parse_args(["--model.recipe", "pairs", "--model.tiny", "true"])
    assert cfg.model.recipe == "pairs"
    keys = {cache_path(recipe(name, "discrete", tiny=True), "/c") for name in ("plain", "pairs", "reading")}
    assert len(keys) == 3
    anchored = recipe("anchored", "continuous", tiny=True)
    assert anchored.feature_slot_start == 48 and anchored.model_config().feature_slot_start == 48
    assert cache_path(anchored, "/c") != cache_path(recipe("reading", "continuous", tiny=True), "/c")
    with pytest.raises(
        ValueError, match=r"config model.recipe: expected one of \('plain', 'pairs', 'reading', 'anchored'\)"
    ):
        config.parse_args(["--model.recipe", "pixels"])


def test_anchored_slots_sit_past_the_longest_prompt_the_loop_writes():
    from silmm_fast.loop.models.bootstrap import RECIPES
    from silmm_fast.loop.train.phases import PROMPT_TOKENS

    # "<bos> <gen> words <img>": a prompt the loop writes takes at most PROMPT_TOKENS + 3 positions, and the
    # anchored model refuses a prompt that reaches its first slot
    assert RECIPES["anchored"]["feature_slot_start"] >= PROMPT_TOKENS + 3


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mode: continuous\nsample:\n  candidates: 6\n  oversample: 12\noptim:\n  lr: 0.001\n")
    cfg = config.parse_args(["--config", str(path), "--sample.candidates", "4", "--seed", "7"])
    assert cfg.mode == "continuous"
    assert cfg.sample.candidates == 4  # the command line wins over the file
    assert cfg.sample.oversample == 12
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.seed == 7
    assert str(cfg.run_dir()) == "runs/continuous-self-seed7"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"sample": {"nope": 1}}, "unknown key 'sample.nope'"),
        ({"sample": {"candidates": -3}}, "sample.candidates"),
        ({"pairs": {"k": 5}}, "pairs.k"),  # 2k > N = 8
        ({"mode": "both"}, "mode"),
        ({"feedback": "telepathy"}, "feedback"),
        (
            {"model": {"name": "janus", "path": "/ckpt"}, "feedback": "oracle"},
            "feedback: expected 'self' or 'random' with model.name 'janus'",
        ),
        ({"optim": {"loss_type": "kto"}}, "optim.loss_type"),
        ({"optim": {"lr": -1e-4}}, "optim.lr: expected a number > 0"),
        ({"optim": {"kernel": "manhattan"}}, "optim.kernel"),
        ({"optim": {"nll_weight": -1.0}}, "optim.nll_weight: expected a number >= 0"),
        ({"model": {"recipe": "pixels"}}, "model.recipe: expected one of"),
        ({"sample": {"top_p": 1.5}}, "sample.top_p"),
        ({"iterations": "many"}, "iterations: expected int"),
        ({"sample": {"oversample": 4}}, "sample.oversample"),
        ({"model": {"name": "janus"}}, "model.name"),
    ],
)
def test_bad_values_are_rejected_by_name(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config.load(overrides=overrides)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim.beta", "inf"], "optim.beta: expected a number > 0 (finite), got inf"),
        (["--optim.beta", "0"], "optim.beta: expected a number > 0 (finite), got 0.0"),
        (["--optim.lr", "nan"], "optim.lr: expected a number > 0 (finite), got nan"),
        (["--optim.lr=-inf"], "optim.lr: expected a number > 0 (finite), got -inf"),
        (["--optim.lr", "0"], "optim.lr: expected a number > 0 (finite), got 0.0"),
        (["--pairs.min_margin", "nan"], "pairs.min_margin: expected a number >= 0 (finite), got nan"),
        (["--pairs.min_margin", "-0.5"], "pairs.min_margin: expected a number >= 0 (finite), got -0.5"),
        (["--optim.grad_clip", "-1"], "optim.grad_clip: expected a number >= 0 (finite), got -1.0"),
        (["--optim.grad_clip", "inf"], "optim.grad_clip: expected a number >= 0 (finite), got inf"),
        (["--optim.weight_decay", "-5"], "optim.weight_decay: expected a number >= 0 (finite), got -5.0"),
        (["--optim.weight_decay", "nan"], "optim.weight_decay: expected a number >= 0 (finite), got nan"),
        (["--sample.temperature", "inf"], "sample.temperature: expected a number > 0 (finite), got inf"),
        (["--sample.temperature", "0"], "sample.temperature: expected a number > 0 (finite), got 0.0"),
        (["--sample.top_p", "nan"], "sample.top_p: expected a number in (0, 1] (finite), got nan"),
        (["--sample.top_p", "0"], "sample.top_p: expected a number in (0, 1] (finite), got 0.0"),
        (["--sample.dropdiv_p", "1"], "sample.dropdiv_p: expected a number in [0, 1) (finite), got 1.0"),
        (["--sample.dropdiv_layers", "-1"], "sample.dropdiv_layers: expected an integer >= 0, got -1"),
        (["--sample.chunk", "0"], "sample.chunk: expected an integer >= 1, got 0"),
        (["--sample.judge_chunk", "-4"], "sample.judge_chunk: expected an integer >= 1, got -4"),
        (["--sample.prompts_per_category", "0"], "sample.prompts_per_category: expected an integer >= 1, got 0"),
        (["--sample.candidates", "1"], "sample.candidates: expected an integer >= 2, got 1"),
        (["--pairs.k", "0"], "pairs.k: expected an integer >= 1, got 0"),
        (["--optim.gamma", "inf"], "optim.gamma: expected a number > 0 (finite), got inf"),
        (["--optim.sigma", "nan"], "optim.sigma: expected a number > 0 (finite), got nan"),
        (["--optim.nll_weight", "inf"], "optim.nll_weight: expected a number >= 0 (finite), got inf"),
        (["--optim.epochs", "0"], "optim.epochs: expected an integer >= 1, got 0"),
        (["--optim.epochs", "2.5"], "optim.epochs: expected int, got '2.5'"),
        (["--optim.batch_size", "0"], "optim.batch_size: expected an integer >= 1, got 0"),
        (["--eval.heldout_per_category", "0"], "eval.heldout_per_category: expected an integer >= 1, got 0"),
        (["--eval.samples", "0"], "eval.samples: expected an integer >= 1, got 0"),
        (["--model.cfg_scale", "-1"], "model.cfg_scale: expected a number >= 0 (finite), got -1.0"),
        (["--model.cfg_scale", "nan"], "model.cfg_scale: expected a number >= 0 (finite), got nan"),
        (["--iterations", "0"], "iterations: expected an integer >= 1, got 0"),
        (["--threads", "-2"], "threads: expected an integer >= 0, got -2"),
        (["--seed", "nan"], "seed: expected int, got 'nan'"),
    ],
)
def test_bad_numbers_on_the_command_line_are_refused_with_status_2(argv, message, tmp_path, capsys):
    from silmm_fast.loop.train.__main__ import main

    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: config {message}\n"
    assert not out.exists()  # refused before anything is written


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optim: {beta: .inf}", "inf", "optim.beta: expected a number > 0 (finite)"),
        ("pairs: {min_margin: .nan}", "nan", "pairs.min_margin: expected a number >= 0 (finite)"),
        ("optim: {epochs: yes}", "True", "optim.epochs: expected int"),
        ("sample: {temperature: no}", "False", "sample.temperature: expected float"),
    ],
)
def test_bad_numbers_in_a_yaml_file_are_refused_by_name(tmp_path, field, value, message):
    path = tmp_path / "run.yaml"
    path.write_text(field + "\n")
    with pytest.raises(ValueError, match=re.escape(f"config {message}, got {value}")):
        config.parse_args(["--config", str(path)])


def test_every_numeric_field_declares_its_range():
    for dotted, f, hint in config._dotted_fields():
        if config._base(hint) in (int, float) and dotted != "seed":  # any integer is a seed
            assert {"gt", "ge", "lt", "le"} & set(f.metadata), f"{dotted} has no range"


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        config.load(tmp_path / "absent.yaml")


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        config.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for dotted, _, _ in config._dotted_fields():
        assert f"--{dotted}" in text
    flat = " ".join(text.split())
    assert "discrete DPO beta (default: 0.1; a number > 0 (finite))" in flat  # the range the validation checks
    assert "(default: 3; an integer >= 1)" in flat
