"""Unsupervised segmentation from the empty prompt's 77 CLIP maps: KL-threshold greedy merging.

SEG4DIFF.md (the authors' code as it runs): the maps of all 77 CLIP positions (BOS, EOS, pads) are
min-max normalized per pixel across the 77 tokens — ``(x − min) / ((max − min) + 1e-6)`` in their code
(``range_epsilon=1e-6``, the paper protocol); ``range_epsilon=None`` divides by the range itself (zero-range
pixels become 0), which keeps small-range maps from being flattened — raised to the power p (1.0), then each map is
softmaxed over its pixels; one greedy pass over the maps in order: an unmatched map i forms a group of
every map j (already grouped or not) whose symmetric KL divergence ``(KL(p‖q) + KL(q‖p)) / 2`` to i is
below the threshold (0.1 as the code runs; its configs say 0.035); the members are marked matched; each
group's pixel-softmaxed maps are averaged into one segment map. The caller upsamples and takes the argmax.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_THRESHOLD", "DEFAULT_POWER", "PAPER_RANGE_EPSILON", "normalize_token_maps", "merge_maps",
           "symmetric_kl"]

DEFAULT_THRESHOLD = 0.1
DEFAULT_POWER = 1.0
#: The authors' ``att / (att.max() + 1e-6)`` after subtracting the per-pixel minimum.
PAPER_RANGE_EPSILON = 1e-6


def normalize_token_maps(maps: torch.Tensor, power: float = DEFAULT_POWER,
                         range_epsilon: float | None = None) -> torch.Tensor:
    """(T, h, w) token maps → per-pixel min-max over the T tokens, then ``** power`` (float64).

    ``range_epsilon`` None: divide by the range (a pixel where all T maps are equal becomes 0 everywhere);
    a number: divide by ``range + range_epsilon`` (the authors' 1e-6: on attention maps, whose per-pixel
    range is often ~1e-4, that shrinks the normalized values and so changes the KL grouping).

    Example:
        >>> import torch
        >>> m = normalize_token_maps(torch.rand(77, 4, 4))
        >>> float(m.amin(0).max()), float(m.amax(0).min())
        (0.0, 1.0)
    """
    x = maps.double()
    lo, hi = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
    if range_epsilon is None:
        x = (x - lo) / (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    else:
        x = (x - lo) / ((hi - lo) + range_epsilon)
    return x.pow(power) if power != 1.0 else x


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pairwise ``(KL(p_i‖q_j) + KL(q_j‖p_i)) / 2`` of distributions in the rows of p (M, P) and q (N, P)
    → (M, N). Entries must be positive (pixel softmaxes are)."""
    lp, lq = p.log(), q.log()
    # KL(p_i || q_j) = sum p_i log p_i - sum p_i log q_j
    kl_pq = (p * lp).sum(1)[:, None] - p @ lq.T
    kl_qp = (q * lq).sum(1)[None, :] - lp @ q.T
    return (kl_pq + kl_qp) / 2


def merge_maps(
    maps: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, power: float = DEFAULT_POWER,
    range_epsilon: float | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """The greedy KL merging of token maps into segment maps.

    Args:
        maps: (T, h, w) attention maps of the T token positions (probabilities).
        threshold: symmetric-KL threshold below which a map joins a group.
        power: exponent after the per-pixel min-max normalization.
        range_epsilon: see :func:`normalize_token_maps` (None: exact range; the paper: 1e-6).

    Returns:
        ``(segments, groups)``: segments float32 (S, h, w), each the mean of its group's pixel-softmaxed
        maps; groups, the token indices of each segment, in order of their seed token.

    Example:
        >>> import torch
        >>> base = torch.rand(3, 8, 8)
        >>> maps = base.repeat_interleave(4, 0) + 1e-6 * torch.rand(12, 8, 8)  # 3 distinct shapes, 4 copies
        >>> segments, groups = merge_maps(maps, threshold=0.1)
        >>> segments.shape[0] <= 3
        True
    """
    if maps.dim() != 3 or maps.shape[0] == 0:
        raise ValueError(f"merge_maps: maps must be (T, h, w) with T >= 1, got {tuple(maps.shape)}")
    maps = maps.detach().cpu()
    t, h, w = maps.shape
    x = normalize_token_maps(maps, power, range_epsilon).reshape(t, h * w)
    probs = torch.softmax(x, dim=1)
    dist = symmetric_kl(probs, probs)
    matched = torch.zeros(t, dtype=torch.bool)
    groups: list[list[int]] = []
    for i in range(t):
        if matched[i]:
            continue
        members = (dist[i] < threshold).nonzero().flatten()
        if not bool((members == i).any()):  # i always belongs to its own group (KL(p, p) = 0)
            members = torch.cat([torch.tensor([i]), members])
        matched[members] = True
        groups.append(members.tolist())
    segments = torch.stack([probs[g].mean(0) for g in groups]).reshape(-1, h, w)
    return segments.float(), groups
