"""match_costs against a float64 per-pair loop; match_masks against brute force and a planted matching."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_seed
from scipy.optimize import linear_sum_assignment

from seg4diff_fast.magnet import match_costs, match_masks


def pair_cost_ref(x, t, focal_weight=0.02, dice_weight=1.0, alpha=0.25, gamma=2.0):
    """One pair, float64, from the definition: mean sigmoid focal loss (standard form) and +1 dice."""
    x, t = x.double().flatten(), t.double().flatten()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return focal_weight * loss.mean() + dice_weight * dice


def make(p, m, h, w, H, W, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(p, h, w, generator=g) * 3
    target = F.interpolate(torch.randn(1, m, 3, 3, generator=g), size=(H, W), mode="bilinear")[0] > 0.2
    return pred.to(device), target.to(device)


@pytest.mark.parametrize(
    "p, m, h, w, H, W",
    [(5, 3, 6, 7, 6, 7), (3, 6, 8, 8, 32, 32), (4, 4, 5, 9, 13, 20), (1, 1, 4, 4, 4, 4), (7, 2, 6, 6, 17, 11)],
)
@pytest.mark.parametrize("kwargs", [{}, {"focal_weight": 1.0, "dice_weight": 0.5, "alpha": -1, "gamma": 1.5}])
def test_costs_match_per_pair_loop(p, m, h, w, H, W, kwargs, device):
    seed = fresh_seed()
    pred, target = make(p, m, h, w, H, W, seed, device)
    cost = match_costs(pred, target, **kwargs)
    assert cost.shape == (p, m) and cost.dtype == torch.float32 and cost.device == pred.device
    assert not cost.requires_grad
    small = F.interpolate(target[None].float(), size=(h, w), mode="nearest")[0]
    ref = torch.tensor(
        [[float(pair_cost_ref(pred[i], small[j], **kwargs)) for j in range(m)] for i in range(p)], dtype=torch.float64
    )
    torch.testing.assert_close(cost.cpu().double(), ref, rtol=1e-5, atol=1e-6, msg=lambda s: f"seed={seed}: {s}")


def test_costs_dtypes_and_no_grad():
    seed = fresh_seed()
    pred, target = make(3, 2, 5, 5, 10, 10, seed)
    want = match_costs(pred, target)
    pred_g = pred.clone().requires_grad_(True)
    assert not match_costs(pred_g, target).requires_grad
    torch.testing.assert_close(match_costs(pred, target.to(torch.uint8)), want)
    torch.testing.assert_close(match_costs(pred, target.float()), want)
    torch.testing.assert_close(match_costs(pred.half(), target), match_costs(pred.half().float(), target))


def brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost of matching min(P, M) pairs, by enumerating every injective assignment."""
    c = cost.double()
    if c.shape[0] < c.shape[1]:
        c = c.T
    n_big, n_small = c.shape
    return min(
        sum(float(c[perm[j], j]) for j in range(n_small)) for perm in itertools.permutations(range(n_big), n_small)
    )


@pytest.mark.parametrize("p, m", [(4, 3), (3, 4), (4, 4), (5, 2), (1, 3)])
def test_assignment_is_optimal(p, m):
    seed = fresh_seed()
    pred, target = make(p, m, 6, 6, 12, 12, seed)
    pred_idx, tgt_idx = match_masks(pred, target)
    n = min(p, m)
    assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
    assert len(pred_idx) == len(tgt_idx) == n
    assert torch.equal(tgt_idx, tgt_idx.sort().values)  # sorted by target
    assert len(set(pred_idx.tolist())) == n and len(set(tgt_idx.tolist())) == n  # one-to-one
    cost = match_costs(pred, target)
    total = float(cost.double()[pred_idx, tgt_idx].sum())
    assert total == pytest.approx(brute_force(cost), rel=1e-9, abs=1e-9), f"seed={seed}"
    rows, cols = linear_sum_assignment(cost.double().numpy())
    assert total == pytest.approx(float(cost.double().numpy()[rows, cols].sum()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("p, m", [(6, 4), (4, 4), (9, 3)])
def test_planted_matching_is_recovered(p, m, device):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    h, w = 8, 8
    pred = torch.randn(p, h, w, generator=g) * 4
    sigma = torch.randperm(p, generator=g)[:m]  # target j is prediction sigma[j], thresholded, at 2× size
    small = pred[sigma] > 0
    target = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    pred_idx, tgt_idx = match_masks(pred.to(device), target.to(device))
    assert tgt_idx.tolist() == list(range(m))
    assert pred_idx.tolist() == sigma.tolist(), f"seed={seed}"


def test_empty_sides_and_errors():
    pred, target = make(3, 2, 4, 4, 4, 4, 0)
    assert match_costs(pred, target[:0]).shape == (3, 0)
    for a, b in (match_masks(pred, target[:0]), match_masks(pred[:0], target)):
        assert a.numel() == 0 and b.numel() == 0 and a.dtype == torch.int64
    with pytest.raises(ValueError, match="3-D"):
        match_costs(pred[0], target)
    with pytest.raises(ValueError, match="3-D"):
        match_costs(pred, target[0])
    with pytest.raises(TypeError, match="floating"):
        match_costs(pred.long(), target)
    bad = pred.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        match_masks(bad, target)


def pair_cost_authors_ref(x, t, focal_weight=0.02, dice_weight=1.0, alpha=0.25, gamma=2.0):
    """One pair, float64, as the authors' matcher.py computes it: ``prob = inputs`` (the raw logit) in the
    modulating factors of the focal term, the BCE with logits, α / (1 − α), divided by the pixel count."""
    x, t = x.double().flatten(), t.double().flatten()
    pos = (1 - x) ** gamma * F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = x ** gamma * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    focal = ((pos * alpha * t).sum() + (neg * (1 - alpha) * (1 - t)).sum()) / x.numel()
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return focal_weight * focal + dice_weight * dice


@pytest.mark.parametrize("p, m, h, w, H, W", [(5, 3, 6, 7, 6, 7), (4, 4, 5, 9, 13, 20), (7, 2, 6, 6, 17, 11)])
def test_authors_focal_form_matches_their_matcher(p, m, h, w, H, W, device):
    seed = fresh_seed()
    pred, target = make(p, m, h, w, H, W, seed, device)
    cost = match_costs(pred, target, focal_form="authors")
    small = F.interpolate(target[None].float(), size=(h, w), mode="nearest")[0]
    ref = torch.tensor([[float(pair_cost_authors_ref(pred[i], small[j])) for j in range(m)] for i in range(p)],
                       dtype=torch.float64)
    torch.testing.assert_close(cost.cpu().double(), ref, rtol=1e-5, atol=1e-6, msg=lambda s: f"seed={seed}: {s}")
    assert not torch.allclose(cost, match_costs(pred, target))  # the forms differ
    pi, ti = match_masks(pred, target, focal_form="authors")
    rows, cols = linear_sum_assignment(ref.numpy())
    assert sorted(zip(ti.tolist(), pi.tolist())) == sorted(zip(cols.tolist(), rows.tolist()))
    with pytest.raises(ValueError, match="focal_form"):
        match_costs(pred, target, focal_form="raw")
