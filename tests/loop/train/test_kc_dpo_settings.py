"""The continuous loop's KC-DPO settings on a case whose answer is known: a policy whose features start at the
reference (halfway between), a winner that is the target and a loser that is not. With the loop's defaults (rbf
kernel, its sigma and gamma) AdamW brings the features close to the winner, decoding to its scene, and they settle
there; with the sqeuclidean kernel the margin is linear in the features, so they move along winner minus loser and,
past their closest point to the winner, keep drifting away from it."""

import torch

from silmm_fast.loop.train.config import OptimConfig
from silmm_fast.loop.world import FeatureCodec, Obj, Scene
from silmm_fast.losses.kc_dpo import KCDPOLoss


def known_case():
    codec = FeatureCodec()
    winner = codec.encode(Scene((Obj("circle", "red", "plain", 0, 0), Obj("square", "blue", "plain", 1, 1))))
    loser = codec.encode(Scene((Obj("circle", "green", "plain", 0, 0), Obj("square", "blue", "plain", 2, 2))))
    # the reference's image: halfway, blurred (a decode that is neither)
    reference = 0.5 * (winner + loser) + 0.05 * torch.randn(winner.shape, generator=torch.Generator().manual_seed(0))
    return codec, winner, loser, reference


def fit(kernel: str, steps: int) -> tuple[list[float], torch.Tensor]:
    """AdamW on the features themselves with the loop's lr and settings (kernel overridden); the distance to the
    winner after every step, and the final features."""
    o = OptimConfig()
    _, winner, loser, reference = known_case()
    h = reference.clone().unsqueeze(0).requires_grad_(True)
    loss_fn = KCDPOLoss(gamma=o.gamma, kernel=kernel, pool=o.pool, sigma=o.sigma)
    opt = torch.optim.AdamW([h], lr=1e-2, weight_decay=0.0)
    dist = []
    for _ in range(steps):
        out = loss_fn(h, reference.unsqueeze(0), winner.unsqueeze(0), loser.unsqueeze(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        dist.append(float((h.detach()[0] - winner).norm()))
    return dist, h.detach()[0]


def test_defaults_move_the_policy_to_the_winner_and_keep_it_there():
    o = OptimConfig()
    assert (o.kernel, o.pool) == ("rbf", "none")
    codec, winner, loser, reference = known_case()
    start = float((reference - winner).norm())
    dist, h = fit(o.kernel, 400)
    assert dist[-1] < 0.6 * start  # measured: 1.92 -> 0.86
    assert abs(dist[-1] - dist[-100]) < 0.05 * start  # settled, not drifting
    assert dist[-1] <= min(dist) + 1e-3  # never passed the winner
    assert codec.decode(h) == codec.decode(winner)


def test_sqeuclidean_runs_past_the_winner():
    dist, _ = fit("sqeuclidean", 400)
    closest = min(range(len(dist)), key=dist.__getitem__)
    # closest to the winner early on, then farther at every later checkpoint
    assert closest < 100
    assert dist[closest] < dist[199] < dist[299] < dist[-1]
