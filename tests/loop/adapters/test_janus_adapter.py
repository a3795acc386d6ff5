"""JanusAdapter on tiny random Janus models built in code: batched CFG generation against transformers' own
``generate``, DPO inputs against a naive forward, the judge against one-at-a-time and against the model's plain
multimodal forward, text steps with their fallbacks, checkpoints and the missing-files errors."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from silmm_fast.loop.adapters import JanusAdapter, JanusOptions, Sourced, prompting
from silmm_fast.loop.adapters.random_janus import random_janus, word_tokenizer
from silmm_fast.loop.decompose import decompose_prompt
from silmm_fast.ops.fused_linear_logprobs import fused_linear_logprobs

# A Janus-Pro-like chat template: user turn with the image placeholder before the text, then the assistant's cue.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<image_placeholder>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
PROMPTS = ["a red circle", "two blue squares to the left of a green star", "a dotted hexagon above a plain triangle"]
QUESTIONS = [
    ["is there a red circle?", "is the circle red?"],
    [],
    ["are there two blue squares?"],
    ["is there a star?", "is there a square?", "is the square to the left of the star?"],
]


@pytest.fixture(scope="module")
def janus() -> JanusAdapter:
    return random_janus("tiny")


@pytest.fixture(scope="module")
def janus64() -> JanusAdapter:
    return random_janus("tiny", dtype=torch.float64)


def hf_generate(adapter: JanusAdapter, prompt: str, cfg_scale: float) -> torch.Tensor:
    ids = torch.tensor([adapter.prompt_ids(prompt)])
    return adapter.model.generate(
        ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False, guidance_scale=cfg_scale
    )[0]


# --- generation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_batched_greedy_generation_equals_generate_per_prompt(chat):
    """Prompts of different lengths (left padding) × 2 samples × CFG rows in one loop give, token for token, what
    ``JanusForConditionalGeneration.generate(generation_mode="image")`` gives for each prompt alone."""
    adapter = random_janus("tiny", chat_template=CHAT_TEMPLATE if chat else None)
    assert len({len(adapter.prompt_ids(p)) for p in PROMPTS}) == 3
    out = adapter.generate_images(PROMPTS, 2, temperature=0, cfg_scale=3.0)
    assert out.shape == (3, 2, adapter.num_image_tokens) and out.dtype == torch.long
    for i, p in enumerate(PROMPTS):
        expected = hf_generate(adapter, p, 3.0)
        assert len(set(expected.tolist())) > 4  # the random model's tokens vary: a real comparison
        assert torch.equal(out[i, 0], expected) and torch.equal(out[i, 1], expected)


def test_generation_groups_and_options(janus):
    grouped = copy.deepcopy(janus)
    grouped.options = JanusOptions(cfg_scale=2.0, generation_rows=2)
    out = grouped.generate_images(PROMPTS, 3, temperature=0)
    assert torch.equal(out, janus.generate_images(PROMPTS, 3, temperature=0, cfg_scale=2.0))
    assert torch.equal(out[1, 0], hf_generate(janus, PROMPTS[1], 2.0))


def test_sampling_is_reproducible_and_diverse(janus):
    draw = (
        lambda seed, **kw: janus.generate_images(  # noqa: E731
            PROMPTS[:2], 4, top_p=0.95, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw
        )
    )
    a = draw(0)
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))
    assert len({tuple(row) for row in a.reshape(-1, a.shape[-1]).tolist()}) > 1  # samples of a prompt differ
    assert 0 <= int(a.min()) and int(a.max()) < janus.codebook_size
    top1 = draw(2, top_k=1)
    assert torch.equal(top1, janus.generate_images(PROMPTS[:2], 4, temperature=0).expand_as(top1))


def test_noise_gives_each_prompt_its_own_stream(janus):
    """With ``noise`` a prompt's samples depend only on its own numbers, not on the prompts batched with it."""
    noise = torch.rand(3, 2, janus.num_image_tokens, generator=torch.Generator().manual_seed(0))
    together = janus.generate_images(PROMPTS, 2, temperature=1.0, top_p=0.9, noise=noise)
    alone = janus.generate_images(PROMPTS[1:2], 2, temperature=1.0, top_p=0.9, noise=noise[1:2])
    assert torch.equal(together[1:2], alone)
    with pytest.raises(ValueError, match="noise, generator: pass one source"):
        janus.generate_images(PROMPTS, 2, generator=torch.Generator(), noise=noise)
    with pytest.raises(ValueError, match=r"noise: expected a float tensor of uniform numbers with shape \[3, 1, 16\]"):
        janus.generate_images(PROMPTS, 1, noise=noise)
    text_noise = torch.rand(2, 1, 4, generator=torch.Generator().manual_seed(1))
    both = janus.write_prompts(["color", "shape"], 1, max_new_tokens=4, noise=text_noise)
    assert janus.write_prompts(["shape"], 1, max_new_tokens=4, noise=text_noise[1:]) == both[1:]


def test_decode_images_to_png(janus, tmp_path):
    tokens = janus.generate_images(PROMPTS[:2], 2, temperature=0)
    images = janus.decode_images(tokens)
    assert images.shape == (2, 2, 32, 32, 3) and images.dtype == torch.uint8
    pixels = janus.model.decode_image_tokens(tokens[0, :1]).detach()[0]  # [-1, 1] with mean = std = 0.5
    torch.testing.assert_close(images[0, 0].float(), ((pixels * 0.5 + 0.5) * 255).clamp(0, 255).round(), atol=1, rtol=0)
    Image.fromarray(images[1, 0].numpy()).save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), images[1, 0].numpy())
    assert janus.decode_images(tokens[:0]).shape == (0, 2, 32, 32, 3)


# --- DPO inputs ------------------------------------------------------------------------------------------------------
def naive_logprobs(adapter: JanusAdapter, prompt: str, tokens: torch.Tensor) -> torch.Tensor:
    """One image alone: prompt embeddings + image tokens through the generation embeddings, the full generation head
    on every position, log_softmax, gather."""
    m = adapter.model
    ids = torch.tensor([adapter.prompt_ids(prompt)])
    embeds = torch.cat([m.get_input_embeddings()(ids), m.prepare_embeddings_for_image_generation(tokens[None, :-1])], 1)
    hidden = m.model.language_model(inputs_embeds=embeds).last_hidden_state[:, ids.shape[1] - 1 :]
    logits = m.model.generation_head(hidden)
    return torch.log_softmax(logits, -1).gather(-1, tokens[None, :, None]).sum()


def test_logprobs_match_naive_forward_float64(janus64):
    tokens = janus64.generate_images(PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    inp = janus64.image_logprob_inputs(PROMPTS, tokens)
    assert inp.hidden.shape == (6, janus64.num_image_tokens, 32) and inp.bias is not None and not inp.frozen
    got = fused_linear_logprobs(inp.hidden, inp.weight, inp.labels, bias=inp.bias)
    want = torch.stack([naive_logprobs(janus64, p, tokens[i, j]) for i, p in enumerate(PROMPTS) for j in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    flat = janus64.image_logprob_inputs([p for p in PROMPTS for _ in range(2)], tokens.reshape(6, -1))
    torch.testing.assert_close(flat.logprobs(), got, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_logprob_gradients_match_naive_float64(frozen_head):
    adapter = random_janus("tiny", dtype=torch.float64)
    adapter.model.model.generation_head.vision_head.requires_grad_(not frozen_head)
    tokens = torch.randint(0, adapter.codebook_size, (2, adapter.num_image_tokens), generator=torch.Generator())
    upstream = torch.tensor([0.7, -1.3], dtype=torch.float64)
    probe = adapter.model.model.language_model.layers[-1].mlp.down_proj.weight

    inp = adapter.image_logprob_inputs(PROMPTS[:2], tokens)
    assert inp.frozen == frozen_head
    (inp.logprobs() * upstream).sum().backward()
    fused = probe.grad.clone()
    probe.grad = None
    naive = torch.stack([naive_logprobs(adapter, p, tokens[i]) for i, p in enumerate(PROMPTS[:2])])
    (naive * upstream).sum().backward()
    torch.testing.assert_close(fused, probe.grad, rtol=1e-9, atol=1e-12)


def test_logprob_inputs_validate(janus):
    tokens = torch.zeros(2, janus.num_image_tokens, dtype=torch.long)
    with pytest.raises(ValueError, match=r"image_tokens: expected shape \[\.\.\., 16\]"):
        janus.image_logprob_inputs(PROMPTS[:2], tokens[:, :5])
    with pytest.raises(ValueError, match=r"image tokens must lie in \[0, 64\)"):
        janus.image_logprob_inputs(PROMPTS[:2], tokens + 64)
    with pytest.raises(ValueError, match="expected shape \\[3, 16\\]"):
        janus.image_logprob_inputs(PROMPTS, tokens)
    with pytest.raises(TypeError, match="image_tokens: expected an integer tensor"):
        janus.image_logprob_inputs(PROMPTS[:2], tokens.float())
    with pytest.raises(ValueError, match="image_tokens: expected 3 prompts in dim 0, got 2"):
        janus.image_logprob_inputs(PROMPTS, tokens[:, None].expand(2, 2, -1))
    with pytest.raises(TypeError, match="prompts: expected a list of str"):
        janus.image_logprob_inputs("a red circle", tokens[:1])


# --- judge -----------------------------------------------------------------------------------------------------------
def test_judge_returns_probabilities(janus):
    tokens = torch.randint(0, janus.codebook_size, (4, janus.num_image_tokens), generator=torch.Generator())
    p_yes, p_no = janus.answer(tokens, QUESTIONS)
    assert [len(p) for p in p_yes] == [len(q) for q in QUESTIONS] == [len(p) for p in p_no]
    for y, n in zip(p_yes, p_no):
        assert y.dtype == torch.float32 and torch.all((y >= 0) & (n >= 0) & (y + n <= 1 + 1e-6))
    assert float(torch.cat(p_yes).sum()) > 0


@pytest.mark.parametrize("judge_rows", [64, 2])
def test_judge_batched_equals_one_at_a_time_float64(janus64, judge_rows):
    adapter = copy.copy(janus64)
    adapter.options = JanusOptions(judge_rows=judge_rows)
    tokens = torch.randint(0, adapter.codebook_size, (4, adapter.num_image_tokens), generator=torch.Generator())
    p_yes, p_no = adapter.answer(tokens, QUESTIONS, images_per_chunk=3)
    for i in range(4):
        yes, no = adapter.answer(tokens[i : i + 1], [QUESTIONS[i]])
        torch.testing.assert_close(p_yes[i], yes[0], rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(p_no[i], no[0], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("chat", [False, True])
def test_judge_equals_plain_multimodal_forward_float64(chat):
    """The shared-prefix, cached judge equals the model's own forward on the whole prompt with ``pixel_values``."""
    adapter = random_janus("tiny", dtype=torch.float64, chat_template=CHAT_TEMPLATE if chat else None)
    tokens = torch.randint(0, adapter.codebook_size, (1, adapter.num_image_tokens), generator=torch.Generator())
    question = "is the square to the left of the star?"
    p_yes, p_no = adapter.answer(tokens, [[question]])
    prefix, suffix = adapter._judge_ids(question)
    ids = prefix + [adapter.boi_id] + [adapter.image_token_id] * adapter.num_image_tokens + [adapter.eoi_id] + suffix
    pixels = adapter._pixel_values(list(adapter.decode_images(tokens)))
    with torch.no_grad():
        logits = adapter.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(p_yes[0][0], probs[adapter.yes_ids].sum().float(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(p_no[0][0], probs[adapter.no_ids].sum().float(), rtol=1e-6, atol=1e-12)


def test_answer_images_accepts_pil_and_validates(janus):
    tokens = torch.randint(0, janus.codebook_size, (2, janus.num_image_tokens), generator=torch.Generator())
    images = janus.decode_images(tokens)
    pil = [Image.fromarray(im.numpy()) for im in images]
    a = janus.answer_images(pil, [["is there a circle?"], ["is there a star?"]])
    b = janus.answer(tokens, [["is there a circle?"], ["is there a star?"]])
    torch.testing.assert_close(torch.cat(a[0]), torch.cat(b[0]))
    with pytest.raises(ValueError, match="questions: expected a list of 2 lists"):
        janus.answer(tokens, [["is there a circle?"]])
    with pytest.raises(TypeError, match=r"questions\[1\]: expected a list of str"):
        janus.answer(tokens, [["is there a circle?"], "is there a star?"])


# --- text: prompts and questions -------------------------------------------------------------------------------------
def test_write_prompts_falls_back_to_templates(janus):
    prompts = janus.write_prompts(["color", "spatial"], 3, generator=torch.Generator().manual_seed(0), max_new_tokens=1)
    assert len(prompts) == 6 and prompts.sources == ["template"] * 6
    assert all(prompting.parse_prompt(p) == p for p in prompts)
    assert "left" in " ".join(prompts[3:]) or "right" in " ".join(prompts[3:]) or "above" in " ".join(prompts[3:])
    with pytest.raises(ValueError, match="unknown category 'weather'"):
        janus.write_prompts(["weather"], 1)


def test_write_prompts_keeps_model_output(janus, monkeypatch):
    answers = iter([(["a red apple and a green book\n", "{garbage"], [True, True])])
    monkeypatch.setattr(janus, "_continue", lambda *a, **k: next(answers))
    prompts = janus.write_prompts(["color"], 2, generator=torch.Generator().manual_seed(0))
    assert prompts[0] == "a red apple and a green book"
    assert isinstance(prompts, Sourced) and prompts.sources == ["model", "template"]
    with pytest.warns(FutureWarning, match="last_sources is deprecated"):  # the old spelling, until it goes
        assert janus.last_sources["prompts"] == ["model", "template"]


def test_write_prompts_runs_the_model(janus):
    """The real text path end to end (a random model writes garbage; whatever it wrote is parsed or replaced)."""
    prompts = janus.write_prompts(["numeracy"], 2, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(prompts) == 2 and all(isinstance(p, str) and p for p in prompts)
    assert len(prompts.sources) == 2 and set(prompts.sources) <= {"model", "template"}


def test_decompose_model_rules_and_none(janus, monkeypatch):
    good = "- Is there a red apple?\n- is the apple red ?\n\nDescription: something else\n- is there a cat?"
    monkeypatch.setattr(janus, "_continue", lambda texts, *a, **k: ([good, "nothing useful"], [True, True]))
    qs = janus.decompose(["a red apple", "two blue cars"])
    assert qs[0] == ["is there a red apple?", "is the apple red?"]
    assert qs[1] == decompose_prompt("two blue cars")
    assert isinstance(qs, Sourced) and qs.sources == ["model", "rules"]
    qs = janus.decompose(["a red apple", "two blue cars"], fallback=False)
    assert qs[1] == [] and qs.sources == ["model", "none"]


def test_decompose_runs_the_model(janus):
    qs = janus.decompose(PROMPTS[:2], max_new_tokens=8)
    assert len(qs) == 2 and all(qs)
    assert qs.sources == ["rules", "rules"]  # a random model's words are no questions


def test_prompting_parsers():
    assert prompting.parse_prompt('  - "A red apple and a green book."\nmore') == "A red apple and a green book"
    assert prompting.parse_prompt("Description: three cats on a sofa") == "three cats on a sofa"
    assert prompting.parse_prompt("a red apple and a") is None  # cut off
    assert prompting.parse_prompt("red {apple} here") is None
    assert prompting.parse_prompt("apple") is None
    assert prompting.parse_questions("1. Is there a dog?\n2) are there two cats ?\nis there a dog?\nno question") == [
        "is there a dog?",
        "are there two cats?",
    ]
    assert prompting.questions_cover("a red apple and two cars", ["is there a red apple?", "are there two cars?"])
    assert not prompting.questions_cover("a red apple and two cars", ["is there a red apple?"])
    assert not prompting.questions_cover("a red apple", [])
    assert "- is there a red apple?" in prompting.decompose_instruction("a cat")


# --- checkpoints and missing files -----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    adapter = random_janus("tiny", chat_template=CHAT_TEMPLATE, options=JanusOptions(cfg_scale=2.5, top_k=7))
    adapter.save(tmp_path)
    again = JanusAdapter.from_pretrained(tmp_path)
    assert again.options == adapter.options and again.chat_template == adapter.chat_template
    for (k, a), (_, b) in zip(adapter.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.prompt_ids(PROMPTS[1]) == adapter.prompt_ids(PROMPTS[1])
    greedy = lambda a: a.generate_images(PROMPTS, 1, temperature=0)  # noqa: E731
    assert torch.equal(greedy(again), greedy(adapter))
    assert (again.boi_id, again.pad_id, again.bos_id) == (adapter.boi_id, adapter.pad_id, adapter.bos_id)
    assert type(JanusAdapter.load(tmp_path)) is JanusAdapter


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        JanusAdapter.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*config.json"):
        JanusAdapter.from_pretrained(tmp_path)
    full = tmp_path / "full"
    random_janus("tiny").save(full)
    config = (full / "config.json").read_text()

    weights_only = tmp_path / "no_weights"
    weights_only.mkdir()
    (weights_only / "config.json").write_text(config)
    with pytest.raises(FileNotFoundError, match=f"{weights_only} has no model weights .*model.safetensors"):
        JanusAdapter.from_pretrained(weights_only)

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((full / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{no_tokenizer} has no tokenizer .*tokenizer.json"):
        JanusAdapter.from_pretrained(no_tokenizer)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama', expected 'janus'"):
        JanusAdapter.from_pretrained(other)
    (other / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        JanusAdapter.from_pretrained(other)

    (full / "preprocessor_config.json").unlink()
    with pytest.warns(UserWarning, match="no preprocessor_config.json"):
        JanusAdapter.from_pretrained(full)


def test_constructor_checks():
    adapter = random_janus("tiny")
    with pytest.raises(TypeError, match="model: expected a JanusForConditionalGeneration"):
        JanusAdapter(torch.nn.Linear(2, 2), adapter.tokenizer)
    with pytest.raises(TypeError, match="processor: expected a JanusProcessor or a tokenizer"):
        JanusAdapter(adapter.model, object())
    with pytest.raises(ValueError, match="options.yes_words: none of"):
        JanusAdapter(adapter.model, adapter.tokenizer, options=JanusOptions(yes_words=("Oui",)))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match="processor: the tokenizer has no image_token '<image_placeholder>'"):
        JanusAdapter(adapter.model, plain)
    with pytest.raises(ValueError, match="options.no_words"):
        JanusAdapter(adapter.model, word_tokenizer(words=["Yes"]))
    with pytest.raises(ValueError, match="judge_question"):
        JanusOptions(judge_question="no field")


def test_processor_input_and_module_behaviour():
    from transformers import JanusProcessor

    adapter = random_janus("tiny")
    processor = JanusProcessor(
        image_processor=adapter.image_processor, tokenizer=adapter.tokenizer, chat_template=CHAT_TEMPLATE
    )
    via_processor = JanusAdapter(adapter.model, processor)
    assert via_processor.chat_template == CHAT_TEMPLATE
    assert via_processor.prompt_ids("a red circle")[-1] == via_processor.boi_id
    reference = copy.deepcopy(adapter).eval().requires_grad_(False)
    greedy = lambda a: a.generate_images(PROMPTS[:1], 1, temperature=0)  # noqa: E731
    assert torch.equal(greedy(reference), greedy(adapter))
    assert len(adapter.dropdiv_mlps()) == 2 and len(adapter.decoder_layers()) == 2
    assert adapter.image_seq_len == adapter.num_image_tokens == 16
