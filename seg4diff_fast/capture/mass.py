"""Attention mass per block and head: how much of each query row's softmax goes to the text keys.

For a call's joint sequence the fused op captures every row's probabilities on the text columns (in
chunks of :data:`~seg4diff_fast.ops.joint_attention.MAX_SELECTED` columns, per head, never an N×N
matrix); summed over the columns that is each row's text-key mass. Averaged over the image rows it is
the I2T share (I2I = 1 − I2T), over the text rows the T2T share (T2I = 1 − T2T). Image rows are the
generated image's (``info.rows``); text rows are the text positions (``info.col0`` … ``+ n_txt``), so the
conditioning-image tokens of edit pipelines (Flux Kontext, Flux.2 references, Qwen-Image-Edit) count as
neither. Qwen-Image's masked calls pass each batch row's gathered ``[valid text; image]`` sequence.
"""

from __future__ import annotations

import torch

from ..ops.joint_attention import MAX_SELECTED, joint_attention
from .state import CallInfo


def attention_with_text_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: CallInfo,
                             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output of (B, H, N, D) q, k, v and, per head, ``[I2T, T2T]`` text-key mass summed over
    the batch ((H, 2) float64 on the CPU; the kept CFG half only when the call keeps one)."""
    batch, heads, n = q.shape[:3]
    text_mass = torch.zeros(batch, heads, n, dtype=torch.float64, device=q.device)
    out = None
    c_start, c_end = info.col0, info.col0 + info.n_txt  # joint indices of the text keys
    for c0 in range(c_start, c_end, MAX_SELECTED):
        cols = torch.arange(c0, min(c0 + MAX_SELECTED, c_end), device=q.device)
        o, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=(0, n), mode="probs",
                                  head_reduce="none", backend=backend)
        out = o if out is None else out
        text_mass += maps.to(torch.float64).sum(-1)  # (B, H, N): each row's mass on these text keys
    if out is None:  # no text keys at all (a fully masked text row): nothing goes to text
        out, _ = joint_attention(q, k, v, backend=backend)
    if info.keep is not None:
        text_mass = text_mass[info.keep]
    r0, r1 = info.rows  # the generated image's rows
    i2t = text_mass[:, :, r0:r1].mean(-1)
    text_rows = text_mass[:, :, c_start:c_end]  # the text rows (any conditioning-image rows are neither)
    t2t = text_rows.mean(-1) if c_end > c_start else torch.zeros_like(i2t)
    return out, torch.stack([i2t, t2t], dim=-1).sum(0).cpu()
