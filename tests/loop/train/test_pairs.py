"""Score aggregation and pair construction on hand-made inputs."""

import pytest
import torch

from silmm_fast.loop.train.pairs import aggregate_scores, make_pairs


def test_scores_are_mean_of_yes_minus_no_per_image():
    p_yes = torch.tensor([0.9, 0.7, 0.2, 0.5])
    p_no = torch.tensor([0.1, 0.1, 0.8, 0.5])
    owner = torch.tensor([0, 0, 1, 1])
    scores = aggregate_scores(p_yes, p_no, owner, n_images=3)
    # image 0: ((0.9-0.1) + (0.7-0.1)) / 2 = 0.7; image 1: ((0.2-0.8) + 0) / 2 = -0.3; image 2: no question -> 0
    torch.testing.assert_close(scores, torch.tensor([0.7, -0.3, 0.0]))


def test_top_k_by_bottom_k_pairs_with_margin():
    scores = torch.tensor([[0.1, 0.9, -0.5, 0.4], [0.2, 0.2, 0.2, 0.2]])
    pairs = make_pairs(scores, k=1)
    assert [(p, w, lo) for p, w, lo, _ in pairs] == [(0, 1, 2)]  # prompt 1 has no gap: no pair
    assert pairs[0][3] == pytest.approx(1.4)
    pairs2 = make_pairs(scores, k=2)
    assert [(p, w, lo) for p, w, lo, _ in pairs2] == [(0, 1, 2), (0, 1, 0), (0, 3, 2), (0, 3, 0)]
    assert [(p, w, lo) for p, w, lo, _ in make_pairs(scores, k=2, min_margin=0.5)] == [(0, 1, 2), (0, 1, 0), (0, 3, 2)]


def test_ties_break_by_lower_index():
    scores = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert [(w, lo) for _, w, lo, _ in make_pairs(scores, k=1)] == [(0, 2)]


def test_bad_k():
    with pytest.raises(ValueError, match="k"):
        make_pairs(torch.zeros(2, 4), k=3)
    with pytest.raises(ValueError, match="scores"):
        make_pairs(torch.zeros(4), k=1)
