"""DropDiv on a tiny LlamaForCausalLM built in code: samples differ only inside the block, only the last L layers'
MLPs are affected, the model is exactly restored, seeded runs reproduce; plus the lookup rule and bad input."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import silmm_fast
from silmm_fast.dropdiv import DropDiv, find_mlps

LAYERS = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=61,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def batch():
    # one prompt expanded to 4 samples, as DropDiv is used: K candidates per prompt from one forward pass
    return torch.tensor([[3, 14, 15, 9, 26, 5]]).expand(4, -1)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, type(m).__name__, m.training) for name, m in model.named_modules()],
        {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()},
    )


def test_samples_differ_only_when_enabled(model, batch):
    plain = _logits(model, batch)
    assert (plain == plain[:1]).all()  # eval mode: identical samples
    with silmm_fast.dropdiv(model, last_layers=2, p=0.2, seed=1):
        noisy = _logits(model, batch)
        again = _logits(model, batch)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(noisy[i], noisy[j])  # each sample of the expanded batch has its own mask
    assert not torch.equal(noisy, again)  # and each forward pass draws new masks
    assert torch.equal(_logits(model, batch), plain)  # deterministic again after exit


def test_only_last_layers_are_affected(model, batch):
    # capture every MLP's output (hooks registered inside the block run after DropDiv's, so they see its output)
    def capture(store, idx):
        return lambda module, inputs, output: store.__setitem__(idx, output.detach().clone())

    base, dropped = {}, {}
    handles = [layer.mlp.register_forward_hook(capture(base, i)) for i, layer in enumerate(model.model.layers)]
    _logits(model, batch)
    for h in handles:
        h.remove()
    p, last = 0.3, 2
    with silmm_fast.dropdiv(model, last_layers=last, p=p, seed=2) as dd:
        assert dd.mlps == [layer.mlp for layer in model.model.layers[LAYERS - last :]]
        handles = [layer.mlp.register_forward_hook(capture(dropped, i)) for i, layer in enumerate(model.model.layers)]
        _logits(model, batch)
        for h in handles:
            h.remove()
    for i in range(LAYERS - last):
        assert torch.equal(dropped[i], base[i]), f"layer {i} must be untouched"
        assert (dropped[i] == 0).float().mean() < 0.01
    for i in range(LAYERS - last, LAYERS):
        zero_frac = (dropped[i] == 0).float().mean().item()
        assert abs(zero_frac - p) < 0.06, f"layer {i}: {zero_frac:.3f} of outputs dropped, expected ~{p}"
        kept = dropped[i] != 0
        # kept entries are scaled by 1/(1-p); layer LAYERS-last sees the same input as without DropDiv
        if i == LAYERS - last:
            torch.testing.assert_close(dropped[i][kept], base[i][kept] / (1 - p))


def test_model_restored_exactly(model, batch):
    model.train()  # a non-default mode must come back too
    model.model.layers[0].training = False  # and a mixed one
    before = _snapshot(model)
    with silmm_fast.dropdiv(model, last_layers=3, p=0.5, seed=3):
        assert not model.training  # the rest runs deterministic
        assert all(len(layer.mlp._forward_hooks) == (1 if i >= 1 else 0) for i, layer in enumerate(model.model.layers))
        _logits(model, batch)
    after = _snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1]
    assert before[2] == after[2]
    model.eval()


def test_restored_after_an_exception(model, batch):
    before = _snapshot(model)
    with pytest.raises(KeyError), silmm_fast.dropdiv(model, last_layers=1, p=0.1, seed=0):
        raise KeyError("boom")
    after = _snapshot(model)
    assert before[1:] == after[1:]


def test_seeded_runs_reproduce_without_touching_global_rng(model, batch):
    rng = torch.get_rng_state()
    with silmm_fast.dropdiv(model, last_layers=2, p=0.2, seed=7):
        a1, a2 = _logits(model, batch), _logits(model, batch)
    with silmm_fast.dropdiv(model, last_layers=2, p=0.2, seed=7):
        b1, b2 = _logits(model, batch), _logits(model, batch)
    with silmm_fast.dropdiv(model, last_layers=2, p=0.2, seed=8):
        c1 = _logits(model, batch)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1)
    assert torch.equal(torch.get_rng_state(), rng)
    with silmm_fast.dropdiv(model, p=0.2) as dd:  # no seed: a fresh one, readable afterwards
        d1 = _logits(model, batch)
    with silmm_fast.dropdiv(model, p=0.2, seed=dd.seed):
        assert torch.equal(_logits(model, batch), d1)


def test_p_zero_is_identity_and_generation_varies(model, batch):
    plain = _logits(model, batch)
    with silmm_fast.dropdiv(model, last_layers=LAYERS, p=0.0, seed=0):
        assert torch.equal(_logits(model, batch), plain)
    # greedy decoding of an expanded batch: identical without DropDiv, diverse with it
    ids = batch[:, :3]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert (out == out[:1]).all()
    with silmm_fast.dropdiv(model, last_layers=LAYERS, p=0.5, seed=4):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len({tuple(row) for row in out.tolist()}) > 1


class _OwnModel(nn.Module):
    """A model of our own exposing its MLPs through the dropdiv_mlps() protocol."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def dropdiv_mlps(self):
        return list(self.blocks)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_own_model_protocol_and_bad_input(model):
    own = _OwnModel()
    x = torch.randn(5, 8)
    with torch.no_grad():
        plain = own(x)
        with silmm_fast.dropdiv(own, last_layers=1, p=0.5, seed=0) as dd:
            assert dd.mlps == [own.blocks[2]]
            assert not torch.equal(own(x), plain)
        assert torch.equal(own(x), plain)
    mlps, where = find_mlps(model)
    assert mlps == [layer.mlp for layer in model.model.layers] and "layers" in where
    with pytest.raises(TypeError, match="model"):
        silmm_fast.dropdiv("not a model")
    with pytest.raises(TypeError, match="model: cannot find decoder-layer MLPs"):
        silmm_fast.dropdiv(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="last_layers"):
        silmm_fast.dropdiv(model, last_layers=0)
    with pytest.raises(ValueError, match="last_layers"):
        silmm_fast.dropdiv(model, last_layers=LAYERS + 1)
    with pytest.raises(TypeError, match="last_layers"):
        silmm_fast.dropdiv(model, last_layers=1.5)
    for p in (-0.1, 1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="p: expected"):
            silmm_fast.dropdiv(model, p=p)
    with pytest.raises(TypeError, match="seed"):
        silmm_fast.dropdiv(model, seed=1.0)
    dd = DropDiv(model, 1, 0.1, seed=0)
    with dd, pytest.raises(RuntimeError, match="already active"), dd:
        pass
    assert all(not layer.mlp._forward_hooks for layer in model.model.layers)
