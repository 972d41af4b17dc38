"""Fused bilinear upsample + argmax over classes (Triton): full-resolution labels from token-grid maps.

For every output pixel the K class scores are interpolated exactly as
``F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)`` does (source
coordinate (dst + 0.5)·in/out − 0.5 clamped at 0, float32 weights), and only the running argmax, max
and sum over classes are kept: the K×H×W upsampled tensor is never stored. Each program owns a tile of
output pixels and loops over the classes in blocks; the (K, h, w) input is small and stays in cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bilinear import bilinear_taps


@triton.jit
def _upsample_argmax_kernel(
    S, LABELS, TOP, TOTAL,
    K, IN_H, IN_W, OUT_H, OUT_W, scale_h, scale_w,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per BLOCK_P output pixels: for each class k (BLOCK_K at a time) the bilinear value
    v_k = hy·(hx·s00 + lx·s01) + ly·(hx·s10 + lx·s11); keeps argmax_k v_k, max_k v_k and Σ_k v_k."""
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = offs_p < OUT_H * OUT_W
    i00, i01, i10, i11, hy, hx, ly, lx = bilinear_taps(offs_p, OUT_W, IN_H, IN_W, scale_h, scale_w)

    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    best_k = tl.zeros([BLOCK_P], tl.int32)
    best_nan = tl.zeros([BLOCK_P], tl.int1)
    total = tl.zeros([BLOCK_P], tl.float32)
    plane = IN_H * IN_W
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        base = S + offs_k.to(tl.int64)[:, None] * plane
        msk = k_ok[:, None] & pix_ok[None, :]
        v00 = tl.load(base + i00[None, :], mask=msk, other=0.0)
        v01 = tl.load(base + i01[None, :], mask=msk, other=0.0)
        v10 = tl.load(base + i10[None, :], mask=msk, other=0.0)
        v11 = tl.load(base + i11[None, :], mask=msk, other=0.0)
        val = hy[None, :] * (hx[None, :] * v00 + lx[None, :] * v01) + ly[None, :] * (
            hx[None, :] * v10 + lx[None, :] * v11
        )
        total += tl.sum(tl.where(msk, val, 0.0), 0)
        # NaN counts as the maximum, as in torch.argmax: rank it as +inf and remember it
        is_nan = (val != val) & k_ok[:, None]
        key = tl.where(is_nan, float("inf"), tl.where(k_ok[:, None], val, float("-inf")))
        blk_max = tl.max(key, 0)
        blk_arg = tl.argmax(key, 0, tie_break_left=True).to(tl.int32) + k0
        blk_nan = tl.max(is_nan.to(tl.int32), 0) > 0
        # strict: on ties the earlier class block keeps the pixel; nothing displaces a NaN
        better = (~best_nan) & (blk_nan | (blk_max > best))
        best_k = tl.where(better, blk_arg, best_k)
        best = tl.where(better, blk_max, best)
        best_nan = best_nan | blk_nan
    tl.store(LABELS + offs_p, best_k.to(tl.int64), mask=pix_ok)
    tl.store(TOP + offs_p, tl.where(best_nan, float("nan"), best), mask=pix_ok)
    tl.store(TOTAL + offs_p, total, mask=pix_ok)


def triton_upsample_argmax(scores: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Launcher: scores (K, h, w) float32 → labels int64, top and total float32, each (H, W)."""
    scores = scores.contiguous().float()
    k, in_h, in_w = scores.shape
    out_h, out_w = int(size[0]), int(size[1])
    labels = torch.empty((out_h, out_w), dtype=torch.int64, device=scores.device)
    top = torch.empty((out_h, out_w), dtype=torch.float32, device=scores.device)
    total = torch.empty((out_h, out_w), dtype=torch.float32, device=scores.device)
    block_p = 128 if scores.device.type == "cpu" else 256
    block_k = min(16, triton.next_power_of_2(k))
    grid = (triton.cdiv(out_h * out_w, block_p),)
    _upsample_argmax_kernel[grid](
        scores, labels, top, total, k, in_h, in_w, out_h, out_w,
        float(in_h) / out_h, float(in_w) / out_w,  # the scale PyTorch uses when given a size
        BLOCK_P=block_p, BLOCK_K=block_k, num_warps=4,
    )
    return labels, top, total
