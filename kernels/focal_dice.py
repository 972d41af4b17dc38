"""Fused bilinear upsample + sigmoid focal + dice mask loss (Triton), forward and backward.

Per mask k and target pixel (y, x), the logit is sampled from the (K, h, w) token-grid predictions exactly
as ``F.interpolate(pred[None], size=(H, W), mode="bilinear", align_corners=False)`` does (source coordinate
(dst + 0.5)·in/out − 0.5 clamped at 0, float32 weights), so the K×H×W upsampled logits never exist.
With p = σ(x), t ∈ {0, 1}, q = 1 − p_t and α_t = α·t + (1 − α)(1 − t) (1 when α < 0):

  focal_px = α_t · ce · q^γ,         ce = max(x, 0) − x·t + log1p(e^−|x|)
  standard: p_t = p·t + (1 − p)(1 − t)   d q^γ/dx = γ·q^γ·p_t·(1 − 2t)   (= γ q^(γ−1)·dq/dx for binary t,
                                                                          written so that q = 0 is harmless)
  authors:  p_t = x·t + (1 − x)(1 − t)   (raw logit; q may be negative: γ = 2 only) d q²/dx = 2q(1 − 2t)
  d focal_px/dx = α_t·((p − t)·q^γ + ce·d q^γ/dx)
  dice_k = 1 − N/D, N = 2Σp·t + 1, D = Σp + Σt + 1     d dice_k/dx = (N/D − 2t)/D · p(1 − p)

Forward: one launch, one program per (mask, block of target pixels); each program stores its four partial
sums (focal, Σp·t, Σp, Σt) into a (K, n_blocks, 4) float32 buffer that torch reduces over the blocks:
no atomics, so the forward (the loss values) is deterministic.
Backward: one launch over the same grid; each program recomputes x, p from pred, forms
dL/dx = g_focal·d focal_px/dx / (K·H·W) + g_dice·d dice_k/dx / K (the dice term needs the saved per-mask
sums) and scatters it to the 4 source cells with the bilinear weights by ``tl.atomic_add`` into a float32
(K, h, w) buffer: the gradient's last bits depend on the atomics' order on a GPU (not deterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .bilinear import bilinear_sample

# Output allocator (tests replace it with a NaN-filling one so unwritten elements show up).
empty_output = torch.empty

# POW: how the kernels form the focal modulation q^γ. tl.constexpr, the only kind of global a @triton.jit
# function may read; the launchers pass the plain int values (``.value``, see _pow_mode).
POW_ONE = tl.constexpr(0)  # γ = 0: q^γ = 1
POW_SQUARE = tl.constexpr(1)  # γ = 2: q·q (also the "authors" form)
POW_GENERIC = tl.constexpr(2)  # any other γ: 2^(γ·log2 q), 0 where q = 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _pointwise(x, t, alpha, gamma, AUTHORS: tl.constexpr, POW: tl.constexpr):
    """(focal_px, d focal_px/dx, p, 1 − p) per pixel, in float32."""
    e = tl.exp(-tl.abs(x))  # in (0, 1]
    u = 1.0 + e
    r = 1.0 / u
    pos = x >= 0
    p = tl.where(pos, r, e * r)  # σ(x)
    pm = tl.where(pos, e * r, r)  # 1 − σ(x), without cancellation
    # log1p(e) = log(u)·e/(u − 1): accurate even where 1 + e rounds to 1 (Goldberg's trick)
    one = u == 1.0
    l1p = tl.where(one, e, tl.log(u) * e / tl.where(one, 1.0, u - 1.0))
    ce = tl.maximum(x, 0.0) - x * t + l1p
    a_t = tl.where(alpha >= 0, alpha * t + (1.0 - alpha) * (1.0 - t), 1.0)
    if AUTHORS:
        q = 1.0 - (x * t + (1.0 - x) * (1.0 - t))
        mod = q * q
        dmod = 2.0 * q * (1.0 - 2.0 * t)
    else:
        p_t = p * t + pm * (1.0 - t)
        q = p * (1.0 - t) + pm * t  # 1 − p_t, from the accurate σ(±x)
        if POW == POW_ONE:
            mod = tl.full(x.shape, 1.0, tl.float32)
        elif POW == POW_SQUARE:
            mod = q * q
        else:  # POW_GENERIC
            qpos = q > 0  # q ≥ 0 mathematically; q = 0 gives 0 (γ > 0 here)
            mod = tl.where(qpos, tl.exp2(gamma * tl.log2(tl.where(qpos, q, 1.0))), 0.0)
        dmod = gamma * mod * p_t * (1.0 - 2.0 * t)
    loss = a_t * ce * mod
    dloss = a_t * ((p - t) * mod + ce * dmod)
    return loss, dloss, p, pm


@triton.jit
def _focal_dice_fwd_kernel(
    X, T, PARTIAL,
    IN_H, IN_W, OUT_H, OUT_W, N_BLOCKS, scale_h, scale_w, alpha, gamma,
    AUTHORS: tl.constexpr, POW: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (mask k, block of BLOCK target pixels): x = bilinear sample of pred[k] at each pixel,
    then this block's partial sums Σ focal_px, Σ p·t, Σ p, Σ t into PARTIAL[k, blk, 0:4]."""
    pid = tl.program_id(0)
    k = pid // N_BLOCKS
    blk = pid % N_BLOCKS
    n_pix = OUT_H * OUT_W
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_pix
    x, _, _, _, _, _, _, _, _ = bilinear_sample(X + k.to(tl.int64) * (IN_H * IN_W), offs, ok, OUT_W, IN_H, IN_W,
                                                scale_h, scale_w)
    t = tl.load(T + k.to(tl.int64) * n_pix + offs, mask=ok, other=0).to(tl.float32)
    loss, _, p, _ = _pointwise(x, t, alpha, gamma, AUTHORS, POW)
    out = PARTIAL + pid.to(tl.int64) * 4  # (K, N_BLOCKS, 4) row-major: pid = k·N_BLOCKS + blk
    tl.store(out, tl.sum(tl.where(ok, loss, 0.0), 0))
    tl.store(out + 1, tl.sum(tl.where(ok, p * t, 0.0), 0))
    tl.store(out + 2, tl.sum(tl.where(ok, p, 0.0), 0))
    tl.store(out + 3, tl.sum(t, 0))  # masked lanes loaded t = 0


@triton.jit
def _focal_dice_bwd_kernel(
    X, T, SUMS, GOUT, DX,
    IN_H, IN_W, OUT_H, OUT_W, N_BLOCKS, scale_h, scale_w, alpha, gamma, focal_norm, dice_norm,
    AUTHORS: tl.constexpr, POW: tl.constexpr, BLOCK: tl.constexpr,
):
    """Same grid as the forward: dL/dx = g_focal·d focal_px/dx / (K·H·W) + g_dice·d dice_k/dx / K per pixel,
    scattered to pred's 4 source cells with the bilinear weights (the adjoint of the upsampling)."""
    pid = tl.program_id(0)
    k = pid // N_BLOCKS
    blk = pid % N_BLOCKS
    n_pix = OUT_H * OUT_W
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_pix
    plane = k.to(tl.int64) * (IN_H * IN_W)
    x, i00, i01, i10, i11, hy, hx, ly, lx = bilinear_sample(X + plane, offs, ok, OUT_W, IN_H, IN_W, scale_h, scale_w)
    t = tl.load(T + k.to(tl.int64) * n_pix + offs, mask=ok, other=0).to(tl.float32)
    _, dloss, p, pm = _pointwise(x, t, alpha, gamma, AUTHORS, POW)
    # upstream gradients (on the device: no host sync) and this mask's dice sums
    g_focal = tl.load(GOUT) * focal_norm  # · 1/(K·H·W)
    g_dice = tl.load(GOUT + 1) * dice_norm  # · 1/K
    s_pt = tl.load(SUMS + k * 4 + 1)
    s_p = tl.load(SUMS + k * 4 + 2)
    s_t = tl.load(SUMS + k * 4 + 3)
    num = 2.0 * s_pt + 1.0
    den = s_p + s_t + 1.0
    ddice = (num / den - 2.0 * t) / den * (p * pm)
    g = tl.where(ok, g_focal * dloss + g_dice * ddice, 0.0)
    # adjoint of the bilinear sample: scatter to the 4 source cells (coinciding cells at the border add twice)
    db = DX + plane
    tl.atomic_add(db + i00, hy * hx * g, mask=ok)
    tl.atomic_add(db + i01, hy * lx * g, mask=ok)
    tl.atomic_add(db + i10, ly * hx * g, mask=ok)
    tl.atomic_add(db + i11, ly * lx * g, mask=ok)


def _pow_mode(gamma: float) -> int:
    """The POW constexpr for γ, as the int the launch passes."""
    return (POW_ONE if gamma == 0 else POW_SQUARE if gamma == 2 else POW_GENERIC).value


def _launch_geometry(out_h: int, out_w: int) -> tuple[int, int, int]:
    n_pix = out_h * out_w
    cap = 256 if _interpreting() else 1024  # small blocks keep several per mask in the tests
    block = min(cap, triton.next_power_of_2(n_pix))
    return block, triton.cdiv(n_pix, block), 4 if block <= 512 else 8


def _forward_sums(pred, target, alpha: float, gamma: float, authors: bool) -> torch.Tensor:
    """Per-mask float32 sums (K, 4): focal, Σp·t, Σp, Σt over the H·W target pixels."""
    k, in_h, in_w = pred.shape
    _, out_h, out_w = target.shape
    block, n_blocks, warps = _launch_geometry(out_h, out_w)
    partial = empty_output((k, n_blocks, 4), dtype=torch.float32, device=pred.device)
    _focal_dice_fwd_kernel[(k * n_blocks,)](
        pred, target, partial,
        in_h, in_w, out_h, out_w, n_blocks,
        float(in_h) / out_h, float(in_w) / out_w,  # the scale PyTorch uses when given a size
        float(alpha), float(gamma),
        AUTHORS=authors, POW=_pow_mode(gamma), BLOCK=block, num_warps=warps,
    )
    return partial.sum(1)  # fixed-order reduction over the blocks: deterministic


class FocalDiceFunction(torch.autograd.Function):
    """(focal, dice) from (K, h, w) logits and (K, H, W) binary targets; saves pred, target and the sums."""

    @staticmethod
    def forward(ctx, pred, target, alpha, gamma, authors):
        pred = pred.contiguous()
        target = target.contiguous()
        if target.dtype == torch.bool:
            target = target.view(torch.uint8)
        sums = _forward_sums(pred, target, alpha, gamma, authors)
        k, out_h, out_w = target.shape
        focal = sums[:, 0].sum() / (k * out_h * out_w)  # mean over masks of each mask's pixel mean
        dice = (1.0 - (2.0 * sums[:, 1] + 1.0) / (sums[:, 2] + sums[:, 3] + 1.0)).mean()
        ctx.save_for_backward(pred, target, sums)
        ctx.meta = (float(alpha), float(gamma), bool(authors))
        return focal, dice

    @staticmethod
    def backward(ctx, g_focal, g_dice):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        pred, target, sums = ctx.saved_tensors
        alpha, gamma, authors = ctx.meta
        k, in_h, in_w = pred.shape
        _, out_h, out_w = target.shape
        gout = torch.stack([g_focal.reshape(()), g_dice.reshape(())]).to(torch.float32)
        dx = torch.zeros((k, in_h, in_w), dtype=torch.float32, device=pred.device)  # atomic accumulator
        block, n_blocks, warps = _launch_geometry(out_h, out_w)
        _focal_dice_bwd_kernel[(k * n_blocks,)](
            pred, target, sums, gout, dx,
            in_h, in_w, out_h, out_w, n_blocks,
            float(in_h) / out_h, float(in_w) / out_w,
            alpha, gamma, 1.0 / (k * out_h * out_w), 1.0 / k,
            AUTHORS=authors, POW=_pow_mode(gamma), BLOCK=block, num_warps=warps,
        )
        return dx.to(pred.dtype), None, None, None, None


def triton_focal_dice(
    pred: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float, authors: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher used by ``seg4diff_fast.magnet.focal_dice_loss`` (backend "triton"); inputs already checked."""
    return FocalDiceFunction.apply(pred, target, alpha, gamma, authors)


__all__ = ["FocalDiceFunction", "triton_focal_dice"]
