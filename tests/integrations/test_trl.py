"""FusedDPOTrainer against stock trl.DPOTrainer: same initial weights, same data, same DPOConfig; per-step metrics
and final weights must match. Also: no [tokens, vocab] logits tensor is produced or saved for backward, unsupported
options are refused at construction, and the Janus image head trains against a materialized-logits reference.

Everything is built in code (tiny Llama / Janus, word-level tokenizer, datasets.Dataset); nothing is downloaded."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the [trl] extra (trl, datasets, accelerate) is not installed")

from datasets import Dataset  # noqa: E402
from tiny_preference import dpo_config, preference_dataset, tiny_llama, word_tokenizer  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from silmm_fast.integrations.trl import FusedDPOTrainer, token_statistics  # noqa: E402

METRICS = (
    "loss",
    "grad_norm",
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return preference_dataset(8, seed=0)


def _train(cls, model, ref_model, args, dataset, tokenizer, **kwargs):
    trainer = cls(model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


def _assert_same_metrics(stock_rows, fused_rows):
    assert len(stock_rows) == len(fused_rows) > 0
    for stock, fused in zip(stock_rows, fused_rows):
        assert set(stock) == set(fused)
        for key in METRICS:
            assert key in stock, key
            assert fused[key] == pytest.approx(stock[key], rel=2e-5, abs=2e-6), (stock["step"], key)


def _assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


ALL_TYPES = {"loss_type": ["sigmoid", "hinge", "ipo", "robust"], "loss_weights": [1.0, 0.7, 0.3, 0.5]}
CASES = [
    # (DPOConfig overrides, explicit reference model). Every supported loss type, weighted so each one shows in the
    # loss and its gradient, with and without precomputed reference log-probs.
    pytest.param({"loss_type": ["sigmoid"]}, True, id="sigmoid"),
    pytest.param(  # one optimizer step of two accumulated micro-batches
        {**ALL_TYPES, "label_smoothing": 0.1, "gradient_accumulation_steps": 2, "max_steps": 1},
        True,
        id="all-grad-accum",
    ),
    pytest.param({**ALL_TYPES, "label_smoothing": 0.2, "precompute_ref_log_probs": True}, False, id="all-precompute"),
    pytest.param({"loss_type": ["ipo"], "precompute_ref_log_probs": True}, True, id="ipo-precompute-ref"),
    # "_tie": a model whose head shares its weight with the input embedding
    pytest.param({"loss_type": ["hinge"], "_tie": True}, True, id="hinge-tied-head"),
]


@pytest.mark.parametrize("overrides, explicit_ref", CASES)
def test_metrics_and_weights_match_stock_dpo_trainer(tmp_path, tokenizer, dataset, overrides, explicit_ref):
    overrides = dict(overrides)
    base = tiny_llama(len(tokenizer), tie=overrides.pop("_tie", False))
    # SGD: final weights comparable to float tolerance (Adam magnifies rounding in near-zero gradients)
    args = {"optim": "sgd", "learning_rate": 0.5, "max_steps": 2, **overrides}
    models = {}
    rows = {}
    for cls in (DPOTrainer, FusedDPOTrainer):
        models[cls] = copy.deepcopy(base)
        ref = copy.deepcopy(base) if explicit_ref else None
        rows[cls] = _train(cls, models[cls], ref, dpo_config(tmp_path / cls.__name__, **args), dataset, tokenizer)
    _assert_same_metrics(rows[DPOTrainer], rows[FusedDPOTrainer])
    _assert_same_weights(models[DPOTrainer], models[FusedDPOTrainer])
    assert not torch.equal(models[FusedDPOTrainer].lm_head.weight, base.lm_head.weight)  # it trained


def test_without_a_reference_model_loads_it_from_the_model_path_like_stock(tmp_path, tokenizer, dataset):
    # TRL's PEFT-less case without ref_model and without precompute: the reference is loaded from the policy's path
    path = tmp_path / "tiny"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    rows = {
        cls: _train(cls, str(path), None, dpo_config(tmp_path / cls.__name__, max_steps=2), dataset, tokenizer)
        for cls in (DPOTrainer, FusedDPOTrainer)
    }
    _assert_same_metrics(rows[DPOTrainer], rows[FusedDPOTrainer])


class _LargestTensors(TorchDispatchMode):
    """Records the shape of every tensor an op produces that has ``vocab`` in its shape."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.shapes.append(tuple(t.shape))
        return out


def test_no_tokens_by_vocab_logits_are_produced_or_saved(tmp_path):
    vocab = 65536
    budget = 128 * vocab * 4  # 128 rows of fp32 logits: one pair per chunk, fewer rows than a batch scores
    tokenizer = word_tokenizer(vocab_size=vocab)
    data = preference_dataset(4, seed=1, completion_words=(40, 48))
    model = tiny_llama(vocab, hidden=8, layers=1)
    trainer = FusedDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=dpo_config(tmp_path, max_steps=1, optim="sgd"),
        train_dataset=data,
        processing_class=tokenizer,
        chunk_bytes=budget,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    scored = int(batch["completion_mask"][:, 1:].sum())
    assert scored > 128  # more scored tokens than any slab's rows
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    watch = _LargestTensors(vocab)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), watch:
        trainer.train()
    assert watch.shapes, "the head never ran"
    rows = [math.prod(s) // vocab for s in watch.shapes]
    assert max(rows) <= 128 < scored, f"a [{max(rows)}, {vocab}] tensor was produced ({scored} scored tokens)"
    assert all(math.prod(s) < scored * vocab for s in saved), "a tokens x vocab tensor was saved for backward"


def _dpo(tmp_path, **overrides):
    return dpo_config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"loss_type": ["aot"]}, "loss_type ['aot']"),
        ({"loss_type": ["sigmoid", "apo_zero"], "loss_weights": [1.0, 1.0]}, "loss_type ['apo_zero']"),
        ({"ld_alpha": 0.5}, "ld_alpha=0.5"),
        ({"f_divergence_type": "forward_kl"}, "f_divergence_type='forward_kl'"),
        ({"use_weighting": True}, "use_weighting=True"),
        ({"loss_type": ["robust"], "label_smoothing": 0.5}, "label_smoothing=0.5"),
    ],
)
def test_unsupported_options_are_refused_by_name(tmp_path, tokenizer, dataset, overrides, named):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="FusedDPOTrainer does not support") as err:
        FusedDPOTrainer(model, args=_dpo(tmp_path, **overrides), train_dataset=dataset, processing_class=tokenizer)
    assert named in str(err.value)


def test_unsupported_models_and_heads_are_refused(tmp_path, tokenizer, dataset):
    model = tiny_llama(len(tokenizer))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        FusedDPOTrainer(model, args=_dpo(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="head: expected"):
        FusedDPOTrainer(tiny_llama(8), args=_dpo(tmp_path), train_dataset=dataset, processing_class=tokenizer, head="x")
    with pytest.raises(ValueError, match="head='janus' needs a JanusForConditionalGeneration"):
        FusedDPOTrainer(
            tiny_llama(len(tokenizer)),
            args=_dpo(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            head="janus",
        )
    vision = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"], "images": [[]]})
    with pytest.raises(ValueError, match="vision datasets"):
        FusedDPOTrainer(
            tiny_llama(len(tokenizer)), args=_dpo(tmp_path), train_dataset=vision, processing_class=tokenizer
        )


def test_token_statistics_match_materialized_logits():
    torch.manual_seed(0)
    n, H, V = 37, 8, 50
    hidden, weight, bias = torch.randn(n, H), torch.randn(V, H), torch.randn(V)
    z = hidden.double() @ weight.double().T + bias.double()
    labels = torch.randint(0, V, (n,))
    labels[:5] = z[:5].argmax(-1)  # some exact top-1 hits
    # 16-row slabs: several slabs, the last one partial
    entropy, mean, top1 = token_statistics(hidden, weight, bias, labels, slab_bytes=16 * 8 * V)
    expected_entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), z.mean(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, z.argmax(-1) == labels) and top1[:5].all()


# --- Janus image head -----------------------------------------------------------------------------------------------
def _tiny_janus():
    pytest.importorskip("transformers", reason="needs transformers")
    from transformers import JanusForConditionalGeneration

    from silmm_fast.loop.adapters.random_janus import PRESETS, janus_config
    from silmm_fast.loop.adapters.random_janus import word_tokenizer as janus_tokenizer

    tokenizer = janus_tokenizer()
    preset = PRESETS["tiny"]
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(janus_config(preset, tokenizer))
    # the tiny preset's large init (0.5) saturates the head's softmax; a DPO test wants moderate logits
    with torch.no_grad():
        for p in model.model.generation_head.parameters():
            p.mul_(0.05)
    return model, tokenizer, preset.codebook


def _image_dataset(tokenizer, codebook, n=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    boi = tokenizer.convert_tokens_to_ids("<begin_of_image>")
    prompt = tokenizer("a red circle")["input_ids"] + [boi]
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for _ in range(n):
        rows["prompt_ids"].append(prompt)
        rows["chosen_ids"].append(torch.randint(0, codebook, (length,), generator=g).tolist())
        rows["rejected_ids"].append(torch.randint(0, codebook, (length,), generator=g).tolist())
    return Dataset.from_dict(rows)


def _janus_reference_logps(model, batch):
    """Materialized-logits reference: the image head on every position, log_softmax, gather, sum."""
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    text = model.get_input_embeddings()(ids.masked_fill(mask, 0))
    image = model.prepare_embeddings_for_image_generation(ids.masked_fill(~mask, 0))
    embeds = torch.where(mask.unsqueeze(-1), image, text)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.model.generation_head(hidden)[:, :-1].double()
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], 0)
    per_token = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
    return per_token.sum(1), logits, mask[:, 1:]


def test_janus_image_head_matches_materialized_reference_and_trains(tmp_path):
    model, tokenizer, codebook = _tiny_janus()
    data = _image_dataset(tokenizer, codebook)
    initial = copy.deepcopy(model)
    trainer = FusedDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=dpo_config(tmp_path, max_steps=2, optim="sgd", learning_rate=0.5, gradient_checkpointing=False),
        train_dataset=data,
        processing_class=tokenizer,
        head="janus",
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()
    loss = trainer.compute_loss(model, batch)
    logps, logits, mask = _janus_reference_logps(initial, batch)
    chosen, rejected = logps.chunk(2)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert metrics["entropy"] == pytest.approx((entropy * mask).sum().item() / mask.sum().item(), rel=1e-5)
    # gradients reach the fused last Linear (with bias) and the layers before it
    loss.backward()
    head = model.model.generation_head
    for p in (
        head.vision_head.weight,
        head.vision_head.bias,
        head.proj_out.weight,
        model.model.generation_embeddings.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 2 and rows[1]["rewards/margins"] != 0.0
    assert not torch.equal(head.vision_head.weight, initial.model.generation_head.vision_head.weight)


def test_janus_reference_through_the_same_path_gives_zero_margin_with_precompute(tmp_path):
    model, tokenizer, codebook = _tiny_janus()
    trainer = FusedDPOTrainer(
        model,
        args=dpo_config(tmp_path, max_steps=1, precompute_ref_log_probs=True, gradient_checkpointing=False),
        train_dataset=_image_dataset(tokenizer, codebook),
        processing_class=tokenizer,
        head="janus",
    )
    trainer.train()
    first = next(r for r in trainer.state.log_history if "loss" in r)
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)


# --- DDP ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ddp_processes_train_like_one(tmp_path):
    """torchrun, 2 CPU processes (gloo) with 1 pair each against 1 process with 2 pairs: the gradient all-reduce must
    fire (the fused head's gradients flow outside the model's forward), so weights and metrics agree."""
    import trl_ddp_worker

    worker = Path(trl_ddp_worker.__file__)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        cmd + [str(worker), str(tmp_path / "world2"), "1"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    trl_ddp_worker.train(str(tmp_path / "world1"), 2)  # the one-process run, here
    results = {n: [torch.load(tmp_path / f"world{n}" / f"rank{r}.pt") for r in range(n)] for n in (1, 2)}
    single, (rank0, rank1) = results[1][0], results[2]
    for name, p in single["weights"].items():
        torch.testing.assert_close(rank0["weights"][name], rank1["weights"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(rank0["weights"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(single["weights"]["lm_head.weight"], tiny_llama(len(word_tokenizer())).lm_head.weight)
    for one, two in zip(single["rows"], rank0["rows"], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy", "num_tokens"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (one["step"], key)


def test_token_metrics_off_skips_only_the_full_vocabulary_metrics(tmp_path, tokenizer, dataset):
    base = tiny_llama(len(tokenizer))
    rows = {}
    for token_metrics in (True, False):
        trainer = FusedDPOTrainer(
            copy.deepcopy(base),
            ref_model=copy.deepcopy(base),
            args=dpo_config(tmp_path / str(token_metrics), max_steps=2, optim="sgd", learning_rate=0.5),
            train_dataset=dataset,
            processing_class=tokenizer,
            token_metrics=token_metrics,
        )
        trainer.train()
        rows[token_metrics] = [r for r in trainer.state.log_history if "loss" in r]
    skipped = {"entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected"}
    for full, lean in zip(rows[True], rows[False], strict=True):
        assert set(full) - set(lean) == skipped
        for key in set(lean) - {"train_runtime", "train_samples_per_second", "train_steps_per_second"}:
            assert lean[key] == pytest.approx(full[key], rel=1e-6), key
    with pytest.raises(TypeError, match="token_metrics"):
        FusedDPOTrainer(base, args=_dpo(tmp_path), train_dataset=dataset, processing_class=tokenizer, token_metrics=1)


def test_evaluate_matches_stock_dpo_trainer(tmp_path, tokenizer, dataset):
    base = tiny_llama(len(tokenizer))
    held_out = preference_dataset(4, seed=5)
    results = {}
    for cls in (DPOTrainer, FusedDPOTrainer):
        trainer = cls(
            copy.deepcopy(base),
            args=dpo_config(tmp_path / cls.__name__, max_steps=1, precompute_ref_log_probs=True),
            train_dataset=dataset,
            eval_dataset=held_out,
            processing_class=tokenizer,
        )
        trainer.train()
        results[cls] = trainer.evaluate()
    stock, fused = results[DPOTrainer], results[FusedDPOTrainer]
    assert {k for k in stock if "runtime" not in k and "per_second" not in k} <= set(fused)
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_entropy", "eval_logits/rejected"):
        assert fused[key] == pytest.approx(stock[key], rel=2e-5, abs=2e-6), key
