"""ShapesLMM: joint vocabulary, batched KV-cached decoding against naive full forwards, prefix-shared VQA against
per-question forwards, the DPO inputs against a plain forward, the continuous variant, persistence, bad input."""

import pytest
import torch

from silmm_fast.loop.models.shapes_lmm import ShapesLMM, ShapesLMMConfig, sample_next
from silmm_fast.loop.models.vocab import SPECIALS, JointVocab
from silmm_fast.loop.world import CATEGORIES, QUESTION_WORDS, WORDS, tokenize_text

torch.set_num_threads(1)

PROMPTS = [
    "a red circle",
    "a striped blue star to the left of a plain green square",
    "two hexagons and one dotted triangle",
]
SIZES = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)


def _model(variant: str, image_embedding: str, seed: int, image_head: str = "atomic", word_shift: int = 0) -> ShapesLMM:
    torch.manual_seed(seed)
    config = ShapesLMMConfig.for_world(
        variant, image_embedding=image_embedding, image_head=image_head, word_shift=word_shift, **SIZES
    )
    model = ShapesLMM(config).eval()
    embed = model.lm.model.embed_tokens
    with torch.no_grad():
        if word_shift:  # maps large enough that a wrong preceding word changes every output
            for m in embed.maps:
                m.weight.normal_(std=0.5)
            embed = embed.inner
        if image_embedding == "structured":  # cell vectors large enough that a wrong cell changes every output
            embed.cells.weight.normal_(std=1.0)
        if image_head == "factored":  # attribute vectors large enough to decide what is drawn
            model.lm.lm_head.attributes.normal_(std=1.0)
    return model


@pytest.fixture(
    scope="module",
    params=[
        ("atomic", "atomic", 0),
        ("structured", "atomic", 0),
        ("structured", "factored", 0),
        ("atomic", "atomic", 2),
        ("structured", "factored", 2),
    ],
)
def discrete(request):
    embedding, head, shift = request.param
    return _model("discrete", embedding, 0, head, shift)


@pytest.fixture(scope="module", params=[("atomic", 0), ("structured", 0), ("structured", 2)])
def continuous(request):
    embedding, shift = request.param
    return _model("continuous", embedding, 1, word_shift=shift)


def _logits(model, ids):
    """Logits [T, V] of one unpadded sequence, no cache."""
    return model.lm(input_ids=torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- vocabulary


def test_vocab_layout_and_round_trip():
    v = JointVocab(WORDS, CATEGORIES, 91)
    assert v.text_tokens[: len(SPECIALS)] == SPECIALS and v.pad == 0
    assert v.image_offset == len(SPECIALS) + len(CATEGORIES) + len(set(WORDS) - set(SPECIALS))
    assert v.size == v.image_offset + 91 == len(v)
    assert v.decode_ids(v.encode_words(["<bos>", "red", "circle"])) == ["<bos>", "red", "circle"]
    assert v.image_ids([0, 90]) == [v.image_offset, v.image_offset + 90]
    assert v.decode_ids([v.image_offset + 5]) == ["<t:5>"]
    assert v.is_image_id(v.image_offset) and not v.is_image_id(v.image_offset - 1)
    assert v.token_id(v.category_token("spatial")) == len(SPECIALS) + CATEGORIES.index("spatial")
    assert v.yes != v.no and {v.yes, v.no} <= set(range(len(SPECIALS)))


def test_vocab_bad_input():
    v = JointVocab(WORDS, CATEGORIES, 91)
    with pytest.raises(ValueError, match="token"):
        v.encode_words(["red", "elephant"])
    with pytest.raises(TypeError, match="words"):
        v.encode_words("red circle")
    with pytest.raises(ValueError, match="image_tokens"):
        v.image_ids([91])
    with pytest.raises(ValueError, match="ids"):
        v.decode_ids([v.size])
    with pytest.raises(ValueError, match="num_image_tokens"):
        JointVocab(WORDS, CATEGORIES, 0)
    with pytest.raises(TypeError, match="words"):
        JointVocab("abc", CATEGORIES, 3)


# ---------------------------------------------------------------- sampling


def test_sample_next_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, float("-inf")], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0, 1.0).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    # top_p below the top token's mass keeps only the top token.
    assert all(sample_next(logits, 1.0, 0.1, gen).tolist() == [1, 0] for _ in range(20))
    draws = torch.stack([sample_next(logits, 1.0, 1.0, gen) for _ in range(400)])
    assert (draws[:, 0] != 3).all()  # -inf is never drawn
    assert set(draws[:, 0].tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- generation


def test_generate_images_shape_dtype_range(discrete):
    gen = torch.Generator().manual_seed(0)
    out = discrete.generate_images(PROMPTS, 5, top_p=0.9, temperature=1.0, generator=gen)
    assert out.shape == (3, 5, 9) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < discrete.config.num_image_tokens
    again = discrete.generate_images(PROMPTS, 5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_generate_images_kv_cache_equals_naive_greedy(discrete):
    v = discrete.vocab
    cached = discrete.generate_images(PROMPTS, 2, temperature=0.0)
    assert torch.equal(cached[:, 0], cached[:, 1])
    with torch.no_grad():
        for p, row in zip(PROMPTS, cached[:, 0]):
            seq = [v.bos, v.gen, *v.encode_words(tokenize_text(p)), v.img]
            for _ in range(9):
                logits = _logits(discrete, seq)[-1]
                logits[: v.image_offset] = float("-inf")
                seq.append(int(logits.argmax()))
            assert [t - v.image_offset for t in seq[-9:]] == row.tolist()


def test_write_prompts_order_and_words(discrete):
    gen = torch.Generator().manual_seed(3)
    texts = discrete.write_prompts(["color", "numeracy"], 3, generator=gen, max_new_tokens=6)
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    for t in texts:
        assert all(w in WORDS for w in tokenize_text(t))
    # Greedy writing is the same for every sample of one category: category-major order.
    greedy = discrete.write_prompts(["color", "numeracy"], 2, temperature=0.0, max_new_tokens=6)
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]


@pytest.mark.parametrize("copy_words", [True, False])
def test_decompose_matches_naive_greedy(discrete, copy_words):
    v = discrete.vocab
    out = discrete.decompose(PROMPTS[:2], max_new_tokens=8, copy_words=copy_words)
    assert len(out) == 2
    with torch.no_grad():
        for p, questions in zip(PROMPTS[:2], out):
            seq = [v.bos, v.dec, *v.encode_words(tokenize_text(p)), v.sep]
            words_allowed = v.encode_words([*QUESTION_WORDS, *tokenize_text(p)]) if copy_words else list(v.word_ids)
            new = []
            for _ in range(8):
                logits = _logits(discrete, seq)[-1].clone()
                allowed = torch.zeros_like(logits, dtype=torch.bool)
                allowed[words_allowed + [v.sep, v.eos]] = True
                tok = int(logits.masked_fill(~allowed, float("-inf")).argmax())
                seq.append(tok)
                new.append(tok)
                if tok == v.eos:
                    break
            words = " ".join(v.text_tokens[t] if t not in (v.sep, v.eos) else "|" for t in new)
            expected = [q.strip() for q in words.split("|") if q.strip()]
            assert [tokenize_text(q) for q in questions] == [tokenize_text(q) for q in expected]


def test_decode_takes_one_allowed_row_per_prefix_and_repeats_it(discrete):
    # [B, V] masks (one per prefix, repeated with its prefix) draw what each row's own [V] mask draws
    v = discrete.vocab
    prefixes = [[v.bos, v.dec, *v.encode_words(tokenize_text(p)), v.sep] for p in PROMPTS[:2]]
    masks = torch.zeros(2, v.size, dtype=torch.bool)
    masks[0, v.encode_words(["is", "there", "a", "red", "circle"])] = True
    masks[1, v.encode_words(["the", "two", "stars", "?"])] = True
    noise = torch.rand(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(repeat=2, temperature=1.0, top_p=1.0)
    together = discrete._decode(prefixes, 5, masks, noise=noise, **kw)
    for b in range(2):
        alone = discrete._decode(prefixes[b : b + 1], 5, masks[b], noise=noise[2 * b : 2 * b + 2], **kw)
        assert torch.equal(together[2 * b : 2 * b + 2], alone)
        assert masks[b][together[2 * b : 2 * b + 2]].all()


def test_decompose_copy_words_keeps_to_the_prompt_and_the_question_words(discrete):
    prompts = ["a red circle to the left of a blue square", "two green stars"]
    out = discrete.decompose(prompts, max_new_tokens=24)
    assert any(out), "nothing decoded: the check below would hold vacuously"
    for p, questions in zip(prompts, out):
        allowed = {*QUESTION_WORDS, *tokenize_text(p)}
        assert all(set(tokenize_text(q)) <= allowed for q in questions), (p, questions)
    with pytest.raises(TypeError, match="copy_words"):
        discrete.decompose(prompts, copy_words="yes")


# ---------------------------------------------------------------- VQA


def test_answer_prefix_reuse_equals_per_question_forward(discrete):
    v = discrete.vocab
    images = torch.tensor([[0, 5, 0, 0, 17, 0, 0, 0, 90], [3, 0, 0, 0, 0, 0, 44, 0, 0]])
    questions = [
        ["is there a red circle?", "are there exactly two stars?", "is the red circle above the blue star?"],
        ["is there a dotted hexagon?"],
    ]
    p_yes, p_no = discrete.answer(images, questions, images_per_chunk=1)
    p_yes2, p_no2 = discrete.answer(images, questions)
    assert [t.shape[0] for t in p_yes] == [3, 1]
    with torch.no_grad():
        for i, qs in enumerate(questions):
            for j, q in enumerate(qs):
                seq = [v.bos, v.img, *v.image_ids(images[i].tolist()), v.img_close, v.q]
                seq += [*v.encode_words(tokenize_text(q)), v.a]
                probs = torch.softmax(_logits(discrete, seq)[-1].float(), -1)
                torch.testing.assert_close(p_yes[i][j], probs[v.yes], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(p_no[i][j], probs[v.no], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(p_yes2[i][j], probs[v.yes], rtol=1e-4, atol=1e-6)


def test_answer_empty_question_list(discrete):
    p_yes, p_no = discrete.answer(torch.zeros(2, 9, dtype=torch.long), [[], ["is there a star?"]])
    assert p_yes[0].numel() == 0 and p_no[1].shape == (1,)


# ---------------------------------------------------------------- DPO inputs


def test_image_logprob_inputs_match_plain_forward(discrete):
    v = discrete.vocab
    tokens = torch.tensor([[[1, 0, 0, 0, 2, 0, 0, 0, 0], [0] * 8 + [90]], [[7] * 9, [0, 3, 0, 3, 0, 3, 0, 3, 0]]])
    prompts = PROMPTS[:2]
    hidden, weight, labels = discrete.image_logprob_inputs(prompts, tokens)
    assert hidden.shape == (4, 9, 32) and torch.equal(weight, discrete.lm.lm_head.weight) and hidden.requires_grad
    assert torch.equal(labels, tokens.reshape(4, 9) + v.image_offset)
    got = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[..., None])[..., 0]
    with torch.no_grad():
        for b in range(4):
            p, img = prompts[b // 2], tokens.reshape(4, 9)[b].tolist()
            seq = [v.bos, v.gen, *v.encode_words(tokenize_text(p)), v.img, *v.image_ids(img)]
            logp = torch.log_softmax(_logits(discrete, seq).float(), -1)
            want = logp[-10:-1].gather(-1, torch.tensor(v.image_ids(img))[:, None])[:, 0]
            torch.testing.assert_close(got[b].detach(), want, rtol=1e-4, atol=1e-5)
    got.sum().backward()
    assert discrete.lm.model.layers[0].mlp.up_proj.weight.grad is not None
    if discrete.config.image_head == "factored":  # the head's gradient reaches the attribute vectors
        assert discrete.lm.lm_head.attributes.grad is not None and discrete.lm.lm_head.attributes.grad.abs().sum() > 0
    discrete.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- continuous variant


def test_feature_forward_padding_invariant_and_differentiable(continuous):
    feats = continuous.feature_forward(PROMPTS)
    assert feats.shape == (3, 9, 48) and feats.requires_grad
    alone = continuous.feature_forward(PROMPTS[:1])
    torch.testing.assert_close(feats[0], alone[0], rtol=1e-4, atol=1e-5)
    samples = continuous.generate_features(PROMPTS, 3)
    assert samples.shape == (3, 3, 9, 48) and not samples.requires_grad
    torch.testing.assert_close(samples[:, 1], feats.detach(), rtol=1e-4, atol=1e-5)
    feats.sum().backward()
    assert continuous.query_slots.grad is not None and continuous.feature_head.weight.grad is not None
    continuous.zero_grad(set_to_none=True)


def test_feature_slots_at_a_fixed_start_take_positions_start_to_start_plus_slots():
    torch.manual_seed(3)
    config = ShapesLMMConfig.for_world("continuous", feature_slot_start=40, **SIZES)
    model = ShapesLMM(config).eval()
    after_prompt = ShapesLMM(ShapesLMMConfig.for_world("continuous", **SIZES)).eval()
    after_prompt.load_state_dict(model.state_dict())
    feats = model.feature_forward(PROMPTS)
    for i, prompt in enumerate(PROMPTS):  # unpadded, positions written out: words 0..T-1, slots 40..48
        v = model.vocab
        ids = torch.tensor([[v.bos, v.gen, *model.prompt_ids(prompt), v.img]])
        embeds = torch.cat([model.lm.model.embed_tokens(ids), model.query_slots[None]], dim=1)
        pos = torch.cat([torch.arange(ids.shape[1]), 40 + torch.arange(9)])[None]
        hidden = model.lm.model(inputs_embeds=embeds, position_ids=pos).last_hidden_state
        torch.testing.assert_close(feats[i], model.feature_head(hidden[0, -9:]), rtol=1e-4, atol=1e-5)
    # the same weights with the slots right after the prompt give other features: the positions are what differs
    assert not torch.allclose(feats, after_prompt.feature_forward(PROMPTS), atol=1e-3)
    short = ShapesLMM(ShapesLMMConfig.for_world("continuous", feature_slot_start=5, **SIZES))
    with pytest.raises(ValueError, match="prompts: prompt 1 takes 15 positions, more than feature_slot_start=5"):
        short.feature_forward(PROMPTS[:2])
    with pytest.raises(ValueError, match="feature_slot_start: 155 \\+ feature_slots 9 exceeds max_positions 160"):
        ShapesLMMConfig.for_world("continuous", feature_slot_start=155, **SIZES)
    with pytest.raises(ValueError, match="feature_slot_start: expected an int >= 0"):
        ShapesLMMConfig.for_world("continuous", feature_slot_start=-1, **SIZES)


def test_decoder_layers_reachable_for_dropdiv(continuous):
    assert continuous.model is continuous.lm.model
    assert len(continuous.model.layers) == 2 and hasattr(continuous.model.layers[-1], "mlp")


def test_continuous_dropout_in_mlp_makes_samples_differ(continuous):
    layer = continuous.model.layers[-1]
    handle = layer.mlp.register_forward_hook(lambda m, i, o: torch.nn.functional.dropout(o, 0.5, training=True))
    try:
        samples = continuous.generate_features(PROMPTS[:1], 2)
    finally:
        handle.remove()
    assert not torch.allclose(samples[0, 0], samples[0, 1])


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path, discrete, continuous):
    for name, model in (("d", discrete), ("c", continuous)):
        model.save(tmp_path / name)
        loaded = ShapesLMM.load(tmp_path / name)
        assert loaded.config == model.config and type(loaded.lm.lm_head) is type(model.lm.lm_head)
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ShapesLMM.load(tmp_path / "missing")


# ---------------------------------------------------------------- bad input


def test_bad_input(discrete, continuous):
    with pytest.raises(TypeError, match="prompts"):
        discrete.generate_images("a red circle", 2)
    with pytest.raises(ValueError, match="token"):
        discrete.generate_images(["a red elephant"], 2)
    with pytest.raises(ValueError, match="n_samples"):
        discrete.generate_images(PROMPTS, 0)
    with pytest.raises(ValueError, match="top_p"):
        discrete.generate_images(PROMPTS, 1, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        discrete.generate_images(PROMPTS, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="categories"):
        discrete.write_prompts(["colour"], 1)
    with pytest.raises(ValueError, match="image_tokens"):
        discrete.answer(torch.full((1, 9), 91), [["is there a star?"]])
    with pytest.raises(TypeError, match="image_tokens"):
        discrete.answer(torch.zeros(1, 9), [["is there a star?"]])
    with pytest.raises(ValueError, match="image_tokens"):
        discrete.answer(torch.zeros(1, 8, dtype=torch.long), [["is there a star?"]])
    with pytest.raises(ValueError, match="questions"):
        discrete.answer(torch.zeros(2, 9, dtype=torch.long), [["is there a star?"]])
    with pytest.raises(ValueError, match=r"image_tokens: expected shape \[3, 9\] or \[P, n, 9\], got \(2, 9\)"):
        discrete.image_logprob_inputs(PROMPTS, torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="image_tokens: expected 3 prompts in dim 0, got 2"):
        discrete.image_logprob_inputs(PROMPTS, torch.zeros(2, 4, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image_tokens: image tokens must lie in \[0, 91\)"):
        discrete.image_logprob_inputs(PROMPTS, torch.full((3, 9), 91))
    with pytest.raises(ValueError, match="continuous"):
        discrete.feature_forward(PROMPTS)
    with pytest.raises(ValueError, match="discrete"):
        continuous.generate_images(PROMPTS, 1)
    with pytest.raises(ValueError, match="variant"):
        ShapesLMMConfig.for_world("diffusion")
    with pytest.raises(ValueError, match="num_heads"):
        ShapesLMMConfig.for_world("discrete", hidden_size=30, num_heads=4)
    with pytest.raises(TypeError, match="config"):
        ShapesLMM({"variant": "discrete"})
