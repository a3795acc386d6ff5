"""The loop's configuration: defaults, YAML, command-line overrides, and bad values rejected by name."""

import pytest

from silmm_fast.train import config


def test_defaults_are_valid_and_documented():
    cfg = config.load()
    assert cfg.mode == "discrete" and cfg.iterations == 3 and cfg.feedback == "self"
    for dotted, f, _ in config._dotted_fields():
        assert f.metadata["help"], f"{dotted} has no help text"


def test_learning_rate_defaults_per_mode_and_explicit_value_wins():
    assert config.load().optim.lr == pytest.approx(5e-5)
    assert config.load(overrides={"mode": "continuous"}).optim.lr == pytest.approx(5e-5)
    assert config.parse_args(["--mode", "continuous", "--optim.lr", "3e-4"]).optim.lr == pytest.approx(3e-4)


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
    from silmm_fast.models.bootstrap import cache_path, recipe

    assert config.parse_args([]).model.recipe == "reading"
    assert config.parse_args(["--mode", "continuous"]).model.recipe == "reading"
    assert config.parse_args(["--mode", "continuous", "--model.recipe", "plain"]).model.recipe == "plain"
    cfg = config.parse_args(["--model.recipe", "pairs", "--model.tiny", "true"])
    assert cfg.model.recipe == "pairs"
    keys = {cache_path(recipe(name, "discrete", tiny=True), "/c") for name in ("plain", "pairs", "reading")}
    assert len(keys) == 3
    with pytest.raises(ValueError, match=r"config model.recipe: expected one of \('plain', 'pairs', 'reading'\)"):
        config.parse_args(["--model.recipe", "pixels"])


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


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        config.load(tmp_path / "absent.yaml")


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        config.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for dotted, _, _ in config._dotted_fields():
        assert f"--{dotted}" in text
