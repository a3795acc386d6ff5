"""CPU micro-benchmarks of every public op through pytest-benchmark, at small fixed sizes (milliseconds per call):

    pytest bench/ --benchmark-only                    # add --benchmark-autosave / --benchmark-compare to track them

They watch the per-call cost of the CPU paths (validation, dispatch, the torch / C++ implementations) between
commits; the suite runner (``python -m silmm_fast.bench``) is the place for realistic shapes, peers and memory. The
plain test run (``python -m pytest``, testpaths = tests/) does not collect this folder.
"""

import pytest
import torch

import silmm_fast

B, T, H, V = 4, 64, 128, 2048  # 256 tokens over a 2,048-way head
P, K, L, D = 8, 4, 16, 256  # KC-DPO / diverse selection: 8 prompts, 4 candidates of 16 × 256 features


@pytest.fixture(autouse=True)
def _threads():
    """One thread: steadier numbers on a shared machine, and comparable across machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def logits_labels():
    g = _gen()
    return torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)


def test_gather_logprobs(benchmark, logits_labels):
    out = benchmark(silmm_fast.gather_logprobs, *logits_labels)
    assert out.shape == (B, T)


def test_sequence_logprobs(benchmark, logits_labels):
    out = benchmark(silmm_fast.sequence_logprobs, *logits_labels)
    assert out.shape == (B,)


def test_fused_linear_logprobs(benchmark):
    g = _gen()
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    out = benchmark(silmm_fast.fused_linear_logprobs, hidden, weight, labels)
    assert out.shape == (B,)


def test_dpo_loss(benchmark):
    logps = torch.randn(4, 1024, generator=_gen()) - 300.0
    out = benchmark(silmm_fast.dpo_loss, *logps, beta=0.1)
    assert out.loss.shape == ()


def test_pairwise_distance(benchmark):
    g = _gen()
    x, y = torch.randn(P, 2, L, D, generator=g), torch.randn(P, K, L, D, generator=g)
    out = benchmark(silmm_fast.pairwise_distance, x, y)
    assert out.shape == (P, 2, K)


def test_kc_dpo_loss(benchmark):
    g = _gen()
    policy, reference = torch.randn(P, L, D, generator=g), torch.randn(P, L, D, generator=g)
    chosen, rejected = torch.randn(P, 2, L, D, generator=g), torch.randn(P, 2, L, D, generator=g)
    out = benchmark(silmm_fast.kc_dpo_loss, policy, reference, chosen, rejected)
    assert out.loss.shape == ()


def test_diverse_select(benchmark):
    features = torch.randn(64, 32, D, generator=_gen())
    out = benchmark(silmm_fast.diverse_select, features, 8)
    assert out.shape == (64, 8)
