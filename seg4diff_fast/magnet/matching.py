"""Hungarian matching of predicted masks to target masks (MAGNET, Mask2Former-style costs).

The cost of pairing prediction i with target j is ``focal_weight·focal[i, j] + dice_weight·dice[i, j]`` on
the token grid (targets downsampled with nearest interpolation), computed for all pairs at once with two
matmuls per term; :func:`match_masks` solves the assignment with ``scipy.optimize.linear_sum_assignment``.
The focal term has two forms: ``"standard"`` (the sigmoid in the modulating factor) and ``"authors"`` (the raw
logit there, as ``batch_sigmoid_focal_loss`` in the authors' ``matcher.py`` computes it: ``prob = inputs``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["match_costs", "match_masks", "FOCAL_FORMS"]

#: The focal forms of the matching cost.
FOCAL_FORMS = ("standard", "authors")


@torch.no_grad()
def match_costs(
    pred: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float = 0.02,
    dice_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_form: str = "standard",
) -> torch.Tensor:
    """(P, M) float32 matching costs between P mask logits and M binary target masks.

    Targets whose size differs from the predictions' (h, w) are first resized with
    ``F.interpolate(target[None].float(), size=(h, w), mode="nearest")``. Then, with x the logits,
    p = σ(x), t the targets flattened over the n = h·w pixels:

    - ``focal[i, j] = (pos_i·t_j + neg_i·(1 − t_j)) / n``, pos = α(1 − p)^γ·softplus(−x),
      neg = (1 − α)p^γ·softplus(x) (the mean standard sigmoid focal loss; α < 0 drops the α factors);
      with ``focal_form="authors"`` the modulating factors are (1 − x)^γ and x^γ (the raw logit for p);
    - ``dice[i, j] = 1 − (2 p_i·t_j + 1) / (Σp_i + Σt_j + 1)``.

    Computed in float32, without autograd.

    Args:
        pred: (P, h, w) logits (any floating dtype).
        target: (M, H, W) masks in {0, 1} (bool, integer or floating).
        focal_weight, dice_weight: weights of the two costs (MAGNET: 0.02 and 1.0).
        alpha, gamma: the focal loss' α and γ.
        focal_form: ``"standard"`` or ``"authors"`` (see above).

    Returns:
        (P, M) float32 tensor on ``pred``'s device.

    Example:
        >>> import torch
        >>> from seg4diff_fast.magnet import match_costs
        >>> pred = torch.full((2, 4, 4), -5.0)
        >>> pred[0, :2] = 5.0  # prediction 0: top half
        >>> target = torch.zeros(1, 8, 8, dtype=torch.bool)
        >>> target[0, :4] = True  # the top half, at twice the resolution
        >>> costs = match_costs(pred, target)
        >>> costs.shape, bool(costs[0, 0] < costs[1, 0])
        (torch.Size([2, 1]), True)
    """
    _check(pred, target)
    if focal_form not in FOCAL_FORMS:
        raise ValueError(f"match_costs: focal_form must be one of {FOCAL_FORMS}, got {focal_form!r}")
    h, w = pred.shape[-2:]
    t = target.to(device=pred.device, dtype=torch.float32)
    if t.shape[-2:] != (h, w):
        t = F.interpolate(t[None], size=(h, w), mode="nearest")[0] if t.shape[0] else t.new_zeros(0, h, w)
    n = h * w
    x = pred.float().reshape(pred.shape[0], n)  # (P, n)
    t = t.reshape(t.shape[0], n)  # (M, n)
    p = torch.sigmoid(x)
    if focal_form == "standard":
        pm = torch.sigmoid(-x)  # 1 − p
        pos = pm.pow(gamma) * F.softplus(-x)  # −log p = softplus(−x): the loss where t = 1
        neg = p.pow(gamma) * F.softplus(x)  # −log(1 − p) = softplus(x): the loss where t = 0
    else:  # the authors' matcher: the raw logit stands for p in the modulating factors
        pos = (1.0 - x).pow(gamma) * F.softplus(-x)
        neg = x.pow(gamma) * F.softplus(x)
    if alpha >= 0:
        pos = pos * alpha
        neg = neg * (1.0 - alpha)
    focal = (pos @ t.T + neg @ (1.0 - t).T) / n
    dice = 1.0 - (2.0 * (p @ t.T) + 1.0) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1.0)
    return focal_weight * focal + dice_weight * dice


def match_masks(
    pred: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float = 0.02,
    dice_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_form: str = "standard",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one matching of predictions to targets on :func:`match_costs`.

    ``min(P, M)`` pairs are matched (either side may be the larger one), with
    ``scipy.optimize.linear_sum_assignment``.

    Args:
        pred, target, focal_weight, dice_weight, alpha, gamma, focal_form: as for :func:`match_costs`.

    Returns:
        ``(pred_idx, tgt_idx)``: int64 CPU tensors of length min(P, M), sorted by target index; pair r
        matches ``pred[pred_idx[r]]`` with ``target[tgt_idx[r]]`` (CPU index tensors index CUDA tensors too).

    Example:
        >>> import torch
        >>> from seg4diff_fast.magnet import match_masks
        >>> target = torch.zeros(2, 4, 4, dtype=torch.bool)
        >>> target[0, :2] = True
        >>> target[1, 2:] = True
        >>> pred = torch.stack([target[1], torch.zeros(4, 4, dtype=torch.bool), target[0]]).float() * 10 - 5
        >>> pred_idx, tgt_idx = match_masks(pred, target)
        >>> pred_idx.tolist(), tgt_idx.tolist()
        ([2, 0], [0, 1])
    """
    cost = match_costs(pred, target, focal_weight, dice_weight, alpha, gamma, focal_form)
    if cost.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    cost_np = cost.cpu().double().numpy()
    if not np.isfinite(cost_np).all():
        raise ValueError("match_masks: the cost matrix has NaN or inf entries; check pred for NaN/inf logits")
    rows, cols = linear_sum_assignment(cost_np)
    order = np.argsort(cols, kind="stable")
    return torch.as_tensor(rows[order], dtype=torch.int64), torch.as_tensor(cols[order], dtype=torch.int64)


def _check(pred, target) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"match_costs: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"match_costs: {name} must be 3-D ({'P, h, w' if name == 'pred' else 'M, H, W'}), "
                f"got shape {tuple(t.shape)}; match one image at a time"
            )
    if not pred.dtype.is_floating_point:
        raise TypeError(f"match_costs: pred must hold floating logits, got {pred.dtype} (e.g. pred.float())")
    if target.dtype.is_complex:
        raise TypeError(f"match_costs: target must be real 0/1 masks, got {target.dtype}")
    if 0 in pred.shape[1:] or 0 in target.shape[1:]:
        raise ValueError(
            f"match_costs: empty spatial size (pred {tuple(pred.shape)}, target {tuple(target.shape)})"
        )


def __getattr__(name: str):  # the 0.1.0 name, kept importable
    if name == "hungarian_match":
        import warnings

        warnings.warn("hungarian_match is deprecated; use match_masks", DeprecationWarning, stacklevel=2)
        return match_masks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
