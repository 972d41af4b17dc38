"""The capture request every `joint_attention` backend receives: :class:`CaptureSpec` and its vocabulary.

This is the bottom of ``ops/``: it imports nothing from the package, and the op (``joint_attention.py``),
its backends (``torch_attention.py``, ``reference.py``, ``seg4diff_fast.kernels``) and the shared map
math (``maps.py``) all import from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CaptureSpec", "HEAD_REDUCES", "MAX_SELECTED", "MODES"]

MODES = ("probs", "logits", "sel_probs")
HEAD_REDUCES = ("mean", "max", "none")
MAX_SELECTED = 512


@dataclass(frozen=True)
class CaptureSpec:
    """A validated capture request.

    ``cols`` is (B, n_sel) int64 on the tensors' device, -1 marking padding; ``rows`` is the half-open
    query-row range [r0, r1) whose maps are returned. ``contiguous``: every row of ``cols`` is one run
    ``cols[b, 0] + arange(n_sel)`` (no padding), which lets the Triton kernels use block loads instead of
    index gathers; False is always correct.
    """

    cols: torch.Tensor
    r0: int
    r1: int
    mode: str
    head_reduce: str
    contiguous: bool = False

    @property
    def n_rows(self) -> int:
        return self.r1 - self.r0

    @property
    def n_sel(self) -> int:
        return self.cols.shape[1]

    def maps_shape(self, batch: int, heads: int) -> tuple[int, ...]:
        if self.head_reduce == "none":
            return (batch, heads, self.n_rows, self.n_sel)
        return (batch, self.n_rows, self.n_sel)
