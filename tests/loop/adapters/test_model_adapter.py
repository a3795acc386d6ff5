"""The model adapter protocol: ShapesLMM's conformance, the ShapesAdapter wrapper, the structural signature check,
and ImageLogprobInputs."""

import copy

import pytest
import torch

from silmm_fast.loop.adapters import (
    ContinuousAdapter,
    ImageLogprobInputs,
    JanusAdapter,
    LayeredAdapter,
    ModelAdapter,
    ModelSpec,
    ShapesAdapter,
    Sourced,
    adapter_mismatches,
    blank_adapter,
    build_adapter,
    check_adapter,
    load_adapter,
)
from silmm_fast.loop.adapters.factory import architecture
from silmm_fast.loop.adapters.random_janus import random_janus
from silmm_fast.loop.models.shapes_lmm import ShapesLMM, ShapesLMMConfig
from silmm_fast.ops.fused_linear_logprobs import fused_linear_logprobs


def tiny_shapes(variant: str = "discrete") -> ShapesLMM:
    torch.manual_seed(0)
    config = ShapesLMMConfig.for_world(variant, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=2)
    return ShapesLMM(config).eval()


@pytest.fixture(scope="module")
def shapes() -> ShapesLMM:
    return tiny_shapes()


# --- conformance -----------------------------------------------------------------------------------------------------
def test_shapes_lmm_has_every_step_but_decoding(shapes):
    """ShapesLMM already implements every protocol method with the protocol's parameters; it lacks ``image_seq_len``
    (it is ``config.image_seq_len``) and ``decode_images`` (the world renders images outside the model), which
    ShapesAdapter adds."""
    assert adapter_mismatches(ShapesLMM) == ["image_seq_len: missing", "decode_images: missing"]
    assert adapter_mismatches(shapes) == ["image_seq_len: missing", "decode_images: missing"]
    assert not isinstance(shapes, ModelAdapter)
    assert adapter_mismatches(ShapesLMM, ContinuousAdapter) == []


def test_shapes_adapter_conforms(shapes):
    adapter = ShapesAdapter(shapes)
    assert isinstance(adapter, ModelAdapter)
    assert isinstance(adapter, ContinuousAdapter)
    assert adapter_mismatches(adapter) == [] and adapter_mismatches(ShapesAdapter) == []
    check_adapter(adapter)
    check_adapter(adapter, ContinuousAdapter)


def test_janus_adapter_conforms():
    assert adapter_mismatches(JanusAdapter) == []
    adapter = random_janus("tiny")
    assert isinstance(adapter, ModelAdapter)
    check_adapter(adapter)
    assert not isinstance(adapter, ContinuousAdapter)  # discrete only


class _Bad:
    def write_prompts(self, cats, n):  # renamed first parameter, missing defaults' parameters
        return []

    def generate_images(self, prompts, n_samples, top_p=0.9, temperature=1.0, generator=None):  # lost a default
        return torch.zeros(0)

    def decode_images(self, image_tokens, size):  # extra parameter without default
        return torch.zeros(0)

    def decompose(self, prompts, *, max_new_tokens=96):  # keyword-only where the protocol is positional
        return []

    answer = None  # not callable


def test_mismatches_name_every_problem():
    problems = adapter_mismatches(_Bad)
    text = "\n".join(problems)
    assert "write_prompts: no parameter 'categories'" in text
    assert "write_prompts: no parameter 'top_p'" in text
    assert "generate_images: parameter 'n_samples' needs a default" in text
    assert "decode_images: extra parameter 'size' has no default" in text
    assert "decompose: parameter 'max_new_tokens' should be positional number 2" in text
    assert "answer: not callable" in text
    for member in ("image_seq_len", "image_logprob_inputs", "save", "load", "parameters", "train", "eval"):
        assert f"{member}: missing" in text
    with pytest.raises(TypeError, match="_Bad does not implement ModelAdapter: .*decode_images"):
        check_adapter(_Bad())


def test_kwargs_catch_all_conforms():
    class Forwarding(ShapesAdapter):
        def answer(self, image_tokens, questions, images_per_chunk=256, **kwargs):
            return super().answer(image_tokens, questions, images_per_chunk)

    assert adapter_mismatches(Forwarding) == []


# --- ShapesAdapter behaviour -----------------------------------------------------------------------------------------
def test_shapes_adapter_logprob_inputs_match_shapes_lmm(shapes):
    adapter = ShapesAdapter(shapes)
    prompts = ["a red circle", "two blue squares"]
    tokens = shapes.generate_images(prompts, 2, generator=torch.Generator().manual_seed(0))
    h, w, lab = shapes.image_logprob_inputs(prompts, tokens)
    inp = adapter.image_logprob_inputs(prompts, tokens)
    assert isinstance(inp, ImageLogprobInputs) and inp.bias is None
    torch.testing.assert_close(inp.logprobs(), fused_linear_logprobs(h, w, lab), rtol=1e-5, atol=1e-6)
    assert inp.logprobs().shape == (4,)


def test_shapes_adapter_decode_and_sources(shapes):
    adapter = ShapesAdapter(shapes, image_size=48)
    tokens = shapes.generate_images(["a red circle"], 3, generator=torch.Generator().manual_seed(1))
    images = adapter.decode_images(tokens)
    assert images.shape == (1, 3, 48, 48, 3) and images.dtype == torch.uint8
    assert adapter.image_seq_len == tokens.shape[-1]
    prompts = adapter.write_prompts(["color"], 2, generator=torch.Generator().manual_seed(0), max_new_tokens=4)
    questions = adapter.decompose(["a red circle"], max_new_tokens=4)
    # where each text came from is part of the result: ShapesLMM writes every one itself
    assert isinstance(prompts, Sourced) and prompts.sources == ["model", "model"]
    assert prompts == shapes.write_prompts(["color"], 2, generator=torch.Generator().manual_seed(0), max_new_tokens=4)
    assert isinstance(questions, Sourced) and questions.sources == ["model"]
    with pytest.warns(FutureWarning, match="last_sources is deprecated"):
        assert adapter.last_sources == {"prompts": ["model", "model"], "questions": ["model"]}
    with pytest.raises(ValueError, match="image_tokens: expected shape"):
        adapter.decode_images(tokens[..., :3])


def test_shapes_adapter_save_load_and_copy(shapes, tmp_path):
    adapter = ShapesAdapter(shapes)
    adapter.save(tmp_path / "ckpt")
    again = ShapesAdapter.load(tmp_path / "ckpt")
    for (k, a), (_, b) in zip(adapter.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    reference = copy.deepcopy(adapter).requires_grad_(False)
    assert all(not p.requires_grad for p in reference.parameters())
    assert any(p.requires_grad for p in adapter.parameters())


def test_shapes_adapter_continuous():
    adapter = ShapesAdapter(tiny_shapes("continuous"))
    feats = adapter.generate_features(["a red circle"], 2)
    assert feats.shape[:2] == (1, 2)
    assert adapter.feature_forward(["a red circle"]).shape == feats.shape[:1] + feats.shape[2:]
    assert len(adapter.dropdiv_mlps()) == 1 and adapter.decoder_layers() is adapter.model.model.layers


# --- ImageLogprobInputs ----------------------------------------------------------------------------------------------
def test_image_logprob_inputs_frozen_and_bias():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    inp = ImageLogprobInputs(hidden, head.weight.double(), labels, head.bias.double())
    assert not inp.frozen
    frozen = ImageLogprobInputs(hidden, head.weight.detach().double(), labels, head.bias.detach().double())
    assert frozen.frozen
    naive = torch.log_softmax(hidden @ head.weight.double().T + head.bias.double(), -1)
    naive = naive.gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(inp.logprobs(), naive.sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inp.logprobs("mean"), naive.mean(-1), rtol=1e-12, atol=1e-12)
    assert ImageLogprobInputs(hidden, head.weight, labels).bias is None


# --- Sourced -----------------------------------------------------------------------------------------------------
def test_sourced_is_a_list_with_one_source_per_item():
    import pickle

    texts = Sourced(["a", "b"], ["model", "template"])
    assert texts == ["a", "b"] and texts[1:] == ["b"] and texts.sources == ["model", "template"]
    again = pickle.loads(pickle.dumps(texts))  # the loop sends results between processes
    assert isinstance(again, Sourced) and again == texts and again.sources == texts.sources
    assert Sourced(["a"]).sources == ["model"]
    assert Sourced.of(texts) is texts and Sourced.of(["x", "y"]).sources == ["model", "model"]
    with pytest.raises(ValueError, match="sources: expected one per item"):
        Sourced(["a", "b"], ["model"])


# --- factory -----------------------------------------------------------------------------------------------------
def test_factory_builds_loads_and_rebuilds_shapes_adapters(shapes, tmp_path):
    spec = ModelSpec("shapes", "discrete")
    assert spec.world_images and not ModelSpec("janus", path=str(tmp_path)).world_images
    adapter = ShapesAdapter(shapes)
    adapter.save(tmp_path / "ckpt")
    loaded = load_adapter(spec, tmp_path / "ckpt")
    assert isinstance(loaded, ShapesAdapter) and isinstance(loaded, LayeredAdapter)
    blank = blank_adapter(spec, architecture(adapter))
    blank.load_state_dict(adapter.state_dict())
    for (k, a), (_, b) in zip(loaded.state_dict().items(), blank.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="name: expected one of"):
        ModelSpec("llava")
    with pytest.raises(ValueError, match="path: a janus model needs"):
        ModelSpec("janus")


def test_factory_builds_the_cached_shapes_base_model(tmp_path):
    from silmm_fast.loop.models.bootstrap import bootstrap, recipe

    spec = ModelSpec("shapes", "discrete", recipe="plain", tiny=True, cache_dir=tmp_path)
    built = build_adapter(spec)
    cached = bootstrap("discrete", cache_dir=tmp_path, config=recipe("plain", "discrete", tiny=True))
    assert isinstance(built, ShapesAdapter)
    for (k, a), (_, b) in zip(built.state_dict().items(), ShapesAdapter(cached).state_dict().items()):
        assert torch.equal(a, b), k


def test_factory_loads_janus_checkpoints_with_the_guidance_scale(tmp_path):
    janus = random_janus(seed=0)
    janus.save(tmp_path / "janus")
    spec = ModelSpec("janus", path=str(tmp_path / "janus"), cfg_scale=2.5)
    for adapter in (build_adapter(spec), load_adapter(spec, tmp_path / "janus"), blank_adapter(spec, None)):
        assert isinstance(adapter, JanusAdapter) and adapter.options.cfg_scale == 2.5
    assert architecture(adapter) is None
