"""The materializing way: full (B, H, N, N) scores, then slices. For tests and benchmarks only.

This is what the paper's code does (and what a user of plain diffusers would write); it is the
baseline the fused op is measured against, never a production path. The map helpers it uses live in
``maps.py`` (shared with the torch backend) and are re-exported here.
"""

from __future__ import annotations

import torch

from .capture_spec import CaptureSpec
from .maps import gather_cols, head_maps, reduce_heads

__all__ = ["gather_cols", "head_maps", "reduce_heads", "reference_joint_attention"]


def reference_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: CaptureSpec | None,
    scale: float,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backend "reference". ``deterministic`` is accepted for the backends' common signature (always so)."""
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
