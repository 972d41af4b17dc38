"""Map math shared by the torch backend (``torch_attention.py``) and the reference (``reference.py``).

Per head, with s the scaled scores and lse_i = log Σ_j exp s_ij over all N keys:
  probs      M_ic = exp(s_ic − lse_i)
  logits     M_ic = s_ic
  sel_probs  M_ic = softmax_c(s_ic) over the selected (non-padded) columns only
Padded columns (-1 in ``spec.cols``) give 0.
"""

from __future__ import annotations

import torch

from .capture_spec import CaptureSpec

__all__ = ["gather_cols", "head_maps", "reduce_heads"]


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
