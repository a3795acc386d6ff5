"""The SILMM loop end to end on a tiny config: one iteration per mode, the run directory's contents, and resume
after injected crashes (at every step boundary and inside a step) giving the same final state as an uninterrupted
run. Uses the real tiny shapes-world model (bootstrapped once per session into a temporary cache)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from silmm_fast.loop.models.bootstrap import bootstrap, recipe
from silmm_fast.loop.models.image_embedding import ImageEmbedding
from silmm_fast.loop.models.image_head import FactoredImageHead
from silmm_fast.loop.models.shapes_lmm import ShapesLMM
from silmm_fast.loop.models.word_shift import WordShift
from silmm_fast.loop.train import config, loop, store
from silmm_fast.loop.world import ImageTokenizer, parse_prompt


def tiny_config(out, mode="discrete", cache=None, **overrides) -> config.TrainConfig:
    data = {
        "out": str(out),
        "mode": mode,
        "iterations": 1,
        "model": {"tiny": True, "cache_dir": str(cache)},
        "sample": {"prompts_per_category": 2, "candidates": 4, "oversample": 6},
        "pairs": {"min_margin": 0.0},
        "optim": {"epochs": 1, "batch_size": 4},
        "eval": {"heldout_per_category": 2, "samples": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return config.from_dict(data).validate()


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, model_cache):
    """One uninterrupted discrete run: the smoke test reads it, the crash tests compare against it."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    loop.run(tiny_config(run_dir, cache=model_cache))
    return run_dir


def comparable(run_dir):
    """Everything a run decided, without wall times and throughputs."""
    summary = store.read_json(run_dir / "summary.json")
    for it in summary["iterations"]:
        it.pop("wall_s", None)
        it.pop("throughput", None)
    out = {"summary": summary}
    for name in ("prompts.jsonl", "questions.jsonl", "scores.jsonl", "pairs.jsonl", "metrics.jsonl"):
        out[name] = (run_dir / "iter1" / name).read_text()
    out["weights"] = load_file(str(run_dir / "iter1" / "checkpoint" / "model.safetensors"))
    return out


def assert_same(a, b):
    for key in a:
        if key == "weights":
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_one_iteration_writes_the_run_directory(tmp_path, model_cache, straight_run, mode):
    if mode == "discrete":
        d = straight_run
    else:
        d = tmp_path / "run"
        loop.run(tiny_config(d, mode, model_cache))
    summary = store.read_json(d / "summary.json")
    assert summary["schema"] == 1 and summary["mode"] == mode
    # the default recipe: a structured image embedding under a word shift, and in discrete mode the factored
    # image-token head
    trained = ShapesLMM.load(d / "iter1" / "checkpoint")
    embed = trained.lm.model.embed_tokens
    assert isinstance(embed, WordShift) and isinstance(embed.inner, ImageEmbedding)
    assert isinstance(trained.lm.lm_head, FactoredImageHead) == (mode == "discrete")
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    heldout = summary["iterations"][1]["heldout"]
    assert heldout["overall"]["n_prompts"] == 12  # 2 held-out prompts x 6 categories x 1 sample
    assert set(heldout["by_category"]) == {"color", "shape", "texture", "spatial", "numeracy", "complex"}
    for key in ("candidates_per_s", "questions_per_s", "pairs_per_s"):
        assert summary["iterations"][1]["throughput"][key] >= 0
    audit = summary["iterations"][1]["pair_audit"]
    audited = sum(a["pairs"] for a in audit["by_category"].values()) + audit["unparsed"]
    assert audited == summary["iterations"][1]["pairs"] == len(store.read_jsonl(d / "iter1" / "pairs.jsonl"))
    for name in ("config.json", "config.yaml", "summary.json", "report.md", "alignment.png", "state.json"):
        assert (d / name).is_file(), name
    # every held-out constraint is counted once in the per-kind split, which report.md tabulates per iteration
    split = heldout["by_constraint"]
    assert sum(c["n"] for c in split.values()) == heldout["overall"]["n_constraints"]
    assert sum(c["met"] for c in split.values()) == heldout["overall"]["n_constraints_met"]
    assert heldout["overall"]["extra_objects"] >= 0
    assert "| iteration | exists | count |" in (d / "report.md").read_text()
    for name in (
        "prompts.jsonl",
        "questions.jsonl",
        "candidates.pt",
        "candidates.png",
        "scores.jsonl",
        "pairs.jsonl",
        "metrics.jsonl",
        "eval.json",
        "checkpoint/model.safetensors",
    ):
        assert (d / "iter1" / name).is_file(), name
    prompts = store.read_jsonl(d / "iter1" / "prompts.jsonl")
    scores = store.read_jsonl(d / "iter1" / "scores.jsonl")
    assert len(scores) == len(prompts) and all(len(r["scores"]) == 4 for r in scores)
    assert all(-1 <= s <= 1 for r in scores for s in r["scores"])
    for pair in store.read_jsonl(d / "iter1" / "pairs.jsonl"):
        row = scores[pair["prompt_id"]]["scores"]
        assert row[pair["chosen"]] > row[pair["rejected"]]
    assert store.read_json(d / "state.json")["done"][-1] == "iter1/eval"
    if mode == "continuous":
        cands = store.read_tensors(d / "iter1" / "candidates.pt")
        assert cands["features"].shape[:2] == (len(prompts), 4)
        assert cands["selected"].shape == (len(prompts), 4)
        # candidate 0 is the base model's own dropout-free image; the others are DropDiv samples (indices into K)
        assert (cands["selected"][:, 0] == -1).all() and (cands["selected"][:, 1:] >= 0).all()
        base = bootstrap("continuous", cache_dir=model_cache, config=recipe("anchored", "continuous", tiny=True))
        own = base.generate_features([r["prompt"] for r in prompts], 1)[:, 0]
        torch.testing.assert_close(cands["features"][:, 0], own.to(cands["features"].dtype))
        assert not torch.allclose(cands["features"][:, 1], cands["features"][:, 0])


class Crash(Exception):
    pass


def test_resume_after_a_crash_at_every_step_boundary(tmp_path, model_cache, straight_run, monkeypatch):
    expected = comparable(straight_run)

    crash_dir = tmp_path / "crashy"
    original_mark = store.RunState.mark

    def mark_then_crash(self, step):
        original_mark(self, step)
        raise Crash(step)

    monkeypatch.setattr(store.RunState, "mark", mark_then_crash)
    crashes = []
    for _ in range(20):
        try:
            loop.run(tiny_config(crash_dir, cache=model_cache))
            break
        except Crash as err:
            crashes.append(str(err))
    # every step of the run was interrupted right after it completed, and each rerun went on from there
    assert crashes == ["iter0/eval"] + [
        f"iter1/{p}" for p in ("prompts", "questions", "generate", "judge", "pairs", "train", "eval")
    ]
    monkeypatch.setattr(store.RunState, "mark", original_mark)
    assert_same(comparable(crash_dir), expected)


def test_resume_after_a_crash_inside_a_step(tmp_path, model_cache, straight_run, monkeypatch):
    expected = comparable(straight_run)

    crash_dir = tmp_path / "crashy"
    original = store._atomic_bytes

    def torn_write(path, data):
        if path.name == "candidates.png":  # inside the pairs step, after pairs.jsonl was written
            path.with_name(".candidates.png.partial.tmp").write_bytes(data[: len(data) // 2])
            raise Crash("mid-step")
        original(path, data)

    monkeypatch.setattr(store, "_atomic_bytes", torn_write)
    with pytest.raises(Crash):
        loop.run(tiny_config(crash_dir, cache=model_cache))
    assert "iter1/pairs" not in store.read_json(crash_dir / "state.json")["done"]
    monkeypatch.setattr(store, "_atomic_bytes", original)
    loop.run(tiny_config(crash_dir, cache=model_cache))
    assert_same(comparable(crash_dir), expected)


def test_oracle_feedback_scores_candidates_by_ground_truth(tmp_path, model_cache):
    # the tiny plain-recipe model: it writes prompts the grammar parses after its short bootstrap (the tiny
    # reading-recipe model, with fewer steps of prompt writing, often does not)
    cfg = tiny_config(tmp_path / "oracle", cache=model_cache, feedback="oracle", model={"recipe": "plain"})
    summary = loop.run(cfg)
    assert summary["feedback"] == "oracle"
    it1 = tmp_path / "oracle" / "iter1"
    prompts = [r["prompt"] for r in store.read_jsonl(it1 / "prompts.jsonl")]
    scores = [r["scores"] for r in store.read_jsonl(it1 / "scores.jsonl")]
    tokens = store.read_tensors(it1 / "candidates.pt")["tokens"]
    tok = ImageTokenizer()
    checked = 0
    for text, row, cands in zip(prompts, scores, tokens):
        try:
            prompt = parse_prompt(text)
        except ValueError:  # outside the grammar: no information, no pair
            assert row == [0.0] * len(row)
            continue
        for score, t in zip(row, cands.tolist()):
            met = prompt.check(tok.decode(t, strict=False))
            assert score == pytest.approx(2 * sum(met) / len(met) - 1, abs=1e-6)
            checked += 1
    assert checked > 0
    audit = summary["iterations"][1]["pair_audit"]["overall"]  # the ground truth never prefers a worse image
    assert audit["pairs"] > 0 and audit["chosen_worse"] == 0


def test_random_feedback_control_and_config_mismatch(tmp_path, model_cache):
    cfg = tiny_config(tmp_path / "rand", cache=model_cache, feedback="random")
    summary = loop.run(cfg)
    assert summary["feedback"] == "random"
    assert json.loads((tmp_path / "rand" / "iter1" / "judge.json").read_text())["questions_judged"] == 0
    other = tiny_config(tmp_path / "rand", cache=model_cache, feedback="self")
    with pytest.raises(ValueError, match="another configuration"):
        loop.run(other)


def test_plain_recipe_base_model_runs_the_loop(tmp_path):
    from silmm_fast.loop.adapters import load_adapter
    from silmm_fast.loop.models.bootstrap import cache_path, recipe

    cfg = tiny_config(tmp_path / "plain", cache=tmp_path / "models", model={"recipe": "plain"})
    summary = loop.run(cfg)
    plain = cache_path(recipe("plain", "discrete", tiny=True), tmp_path / "models")
    assert plain.is_dir() and not cache_path(recipe("reading", "discrete", tiny=True), tmp_path / "models").exists()
    model = load_adapter(loop.model_spec(cfg), tmp_path / "plain" / "iter1" / "checkpoint").model
    assert not isinstance(model.lm.model.embed_tokens, ImageEmbedding)
    assert not isinstance(model.lm.lm_head, FactoredImageHead)
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]


def test_diverging_training_stops_before_saving_and_corrected_settings_resume(tmp_path, model_cache):
    run_dir = tmp_path / "diverged"
    # lr 1e30: the first update sends the weights so far that the second step's loss is NaN
    with pytest.raises(
        FloatingPointError, match=r"iteration 1, train step 1 \(epoch 0\): the loss is nan; .*lr = 1e\+30"
    ):
        loop.run(tiny_config(run_dir, cache=model_cache, optim={"lr": 1e30}))
    done = store.read_json(run_dir / "state.json")["done"]
    assert done[-1] == "iter1/pairs" and "iter1/train" not in done
    assert not (run_dir / "iter1" / "metrics.jsonl").exists() and not (run_dir / "iter1" / "checkpoint").exists()
    # the optimizer settings were used by no completed step: the corrected command resumes at the train step
    summary = loop.run(tiny_config(run_dir, cache=model_cache))
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    assert store.read_json(run_dir / "config.json")["optim"]["lr"] == pytest.approx(5e-5)
    metrics = store.read_jsonl(run_dir / "iter1" / "metrics.jsonl")
    assert metrics and all(m["loss"] == m["loss"] for m in metrics)  # finite, not NaN
    # once a train step is done, the optimizer settings are part of the run: another lr is refused, by field
    with pytest.raises(ValueError, match=r"another configuration \(optim\.lr: 5e-05 there, 0\.001 now\)"):
        loop.run(tiny_config(run_dir, cache=model_cache, optim={"lr": 1e-3}))


def test_non_finite_gradient_stops_the_step(tmp_path, model_cache, monkeypatch):
    # a NaN gradient with a finite loss (injected after backward): named as the gradient norm, before the update
    original = torch.nn.utils.clip_grad_norm_

    def poisoned(params, max_norm):
        params = list(params)
        params[0].grad.view(-1)[0] = float("nan")
        return original(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    with pytest.raises(FloatingPointError, match=r"iteration 1, train step 0 \(epoch 0\): the gradient norm is nan"):
        loop.run(tiny_config(tmp_path / "run", cache=model_cache))
    assert "iter1/train" not in store.read_json(tmp_path / "run" / "state.json")["done"]


def test_failed_start_does_not_block_the_corrected_command(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        loop.run(
            tiny_config(run_dir, cache=model_cache, model={"name": "janus", "path": str(tmp_path / "nonexistent")})
        )
    summary = loop.run(tiny_config(run_dir, cache=model_cache))  # nothing was computed: the new settings apply
    assert summary["model"] == "shapes" and store.read_json(run_dir / "config.json")["model"]["name"] == "shapes"


def test_truncated_checkpoint_is_redone_or_named_on_resume(tmp_path, model_cache, straight_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    weights = run_dir / "iter1" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    loop.run(tiny_config(run_dir, cache=model_cache))  # its checksum no longer matches: the train step is redone
    assert_same(comparable(run_dir), comparable(straight_run))
    # a run directory without checksums (written before they were recorded): the damaged file is named
    state = store.read_json(run_dir / "state.json")
    store.write_json(run_dir / "state.json", {"done": state["done"]})
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^{run_dir / 'iter1' / 'checkpoint'}: cannot load the checkpoint"):
        loop.run(tiny_config(run_dir, cache=model_cache))


def test_resume_from_a_copy_under_another_spelling_and_thread_count(tmp_path, model_cache, straight_run, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(straight_run, copy)
    # a config.json written with the runtime fields (as before they left the identity) still matches
    saved = store.read_json(copy / "config.json")
    store.write_json(copy / "config.json", {"out": str(straight_run), "threads": 0, **saved})
    done = store.read_json(copy / "state.json")["done"]
    monkeypatch.chdir(tmp_path)
    summary = loop.run(tiny_config("copy/", cache=model_cache, threads=1))
    assert store.read_json(copy / "state.json")["done"] == done  # nothing recomputed
    assert summary == store.read_json(straight_run / "summary.json")


def test_resume_redoes_a_step_whose_file_was_cut_short(tmp_path, model_cache, straight_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(straight_run, copy)
    scores = copy / "iter1" / "scores.jsonl"
    scores.write_text(scores.read_text().splitlines(keepends=True)[0])  # cut at a line boundary: still valid JSON
    files = store.read_json(copy / "state.json")["files"]
    assert "iter1/scores.jsonl" in files["iter1/judge"] and "iter1/checkpoint" in files["iter1/train"]
    loop.run(tiny_config(copy, cache=model_cache))
    # the judge step and every step after it ran again, and gave the uninterrupted run's results
    assert_same(comparable(copy), comparable(straight_run))


def test_settings_survive_a_deleted_config_json(tmp_path, model_cache, straight_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(straight_run, copy)
    (copy / "config.json").unlink()
    with pytest.raises(ValueError, match=r"another configuration \(optim\.lr: 5e-05 there, 0\.001 now\)"):
        loop.run(tiny_config(copy, cache=model_cache, optim={"lr": 1e-3}))
    loop.run(tiny_config(copy, cache=model_cache))  # the same settings resume, and config.json is restored
    assert store.read_json(copy / "config.json") == tiny_config(copy, cache=model_cache).run_identity()
    (copy / "config.json").unlink()
    (copy / "config.yaml").unlink()
    with pytest.raises(ValueError, match="no config.json and no readable config.yaml"):
        loop.run(tiny_config(copy, cache=model_cache))
