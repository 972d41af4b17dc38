"""Bilinear sampling taps shared by the Triton kernels that upsample token-grid maps on the fly.

PyTorch's ``F.interpolate(..., mode="bilinear", align_corners=False)`` math: source coordinate
(dst + 0.5)·in/out − 0.5 clamped at 0, the two neighbours clamped to the grid, float32 weights.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bilinear_taps(offs, OUT_W, IN_H, IN_W, scale_h, scale_w):
    """Flat indices of the 4 source cells of each output pixel and their bilinear weights (PyTorch's math)."""
    oy = offs // OUT_W
    ox = offs % OUT_W
    sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
    sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    y1 = tl.minimum(y0 + 1, IN_H - 1)
    x1 = tl.minimum(x0 + 1, IN_W - 1)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    hy = 1.0 - ly
    hx = 1.0 - lx
    return y0 * IN_W + x0, y0 * IN_W + x1, y1 * IN_W + x0, y1 * IN_W + x1, hy, hx, ly, lx


@triton.jit
def bilinear_sample(X, offs, ok, OUT_W, IN_H, IN_W, scale_h, scale_w):
    """The bilinearly upsampled value of one (IN_H, IN_W) float plane ``X`` at output pixels ``offs``
    (float32, 0 where ``ok`` is false), with the taps that made it (for a backward that scatters)."""
    i00, i01, i10, i11, hy, hx, ly, lx = bilinear_taps(offs, OUT_W, IN_H, IN_W, scale_h, scale_w)
    v00 = tl.load(X + i00, mask=ok, other=0.0).to(tl.float32)
    v01 = tl.load(X + i01, mask=ok, other=0.0).to(tl.float32)
    v10 = tl.load(X + i10, mask=ok, other=0.0).to(tl.float32)
    v11 = tl.load(X + i11, mask=ok, other=0.0).to(tl.float32)
    x = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)
    return x, i00, i01, i10, i11, hy, hx, ly, lx
