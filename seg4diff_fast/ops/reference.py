"""The materializing way: full (B, H, N, N) scores, then slices. For tests and benchmarks only.

This is what the paper's code does (and what a user of plain diffusers would write); it is the
baseline the fused op is measured against, never a production path.
"""

from __future__ import annotations

import torch

from .joint_attention import CaptureSpec


def reduce_heads(maps: torch.Tensor, head_reduce: str) -> torch.Tensor:
    """(B, H, R, n) → the requested head reduction."""
    if head_reduce == "mean":
        return maps.mean(1)
    if head_reduce == "max":
        return maps.amax(1)
    return maps


def head_maps(scores: torch.Tensor, lse: torch.Tensor, spec: CaptureSpec, inplace: bool = False) -> torch.Tensor:
    """Per-head maps from scores at the selected columns.

    scores: (B, [h,] R, n_sel) scaled scores s_ic at the captured rows and selected columns;
    lse: (B, [h,] R) logsumexp of those rows over all N keys. Returns maps of the scores' shape and
    dtype, padded columns set to 0; ``inplace`` overwrites ``scores`` where it can.
    """
    pad = (spec.cols < 0).view(spec.cols.shape[0], *([1] * (scores.dim() - 2)), spec.n_sel)
    if not inplace:  # out-of-place, so that autograd can differentiate through it
        if spec.mode == "probs":
            maps = torch.exp(scores - lse.unsqueeze(-1))
        elif spec.mode == "logits":
            maps = scores
        else:  # softmax over the selected (non-padded) columns only
            maps = torch.softmax(scores.masked_fill(pad, float("-inf")), dim=-1)
        return maps.masked_fill(pad, 0.0)
    if spec.mode == "probs":
        maps = scores.sub_(lse.unsqueeze(-1)).exp_()
    elif spec.mode == "logits":
        maps = scores
    else:
        maps = torch.softmax(scores.masked_fill_(pad, float("-inf")), dim=-1)
    return maps.masked_fill_(pad, 0.0)


def gather_cols(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, D), cols: (B, n) with -1 padding → (B, H, n, D); padded rows read position 0."""
    b, h, _, d = x.shape
    idx = cols.clamp(min=0)[:, None, :, None].expand(b, h, -1, d)
    return x.gather(2, idx)


def reference_joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: CaptureSpec | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, N, N): the N² tensor
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.float()).to(q.dtype)
    if spec is None:
        return out, None
    rows = scores[:, :, spec.r0 : spec.r1]
    idx = spec.cols.clamp(min=0)[:, None, None, :].expand(*rows.shape[:3], -1)
    maps = head_maps(rows.gather(-1, idx), lse[:, :, spec.r0 : spec.r1], spec)
    return out, reduce_heads(maps, spec.head_reduce)
