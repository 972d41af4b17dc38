"""The focal/dice op (MAGNET's mask loss): sigmoid focal + dice on token-grid logits upsampled bilinearly
to the masks' size.

:func:`focal_dice_loss` computes, for K predicted masks (K, h, w) (logits) and their K binary targets
(K, H, W), the Mask2Former-convention losses on ``F.interpolate(pred[None], (H, W), "bilinear",
align_corners=False)[0]``, without holding the K×H×W upsampled logits:

- ``"triton"``: one fused kernel forward and one backward (``seg4diff_fast.kernels.focal_dice``), CUDA
  or the Triton CPU interpreter (``TRITON_INTERPRET=1``);
- ``"torch"``: a lean autograd function over chunks of masks (each chunk's upsampled logits at most
  about ``CHUNK_BYTES``), recomputing the chunk in backward; any device;
- ``"reference"``: the plain autograd formula on the full upsampled tensor (tests, benchmarks).

This module owns the op's contract: argument checks, the backend choice (:data:`BACKEND_REGISTRY`, see
``backends.py``) and the two torch implementations. ``seg4diff_fast.magnet.losses`` re-exports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backends import BackendRegistry

__all__ = [
    "BACKENDS",
    "BACKEND_REGISTRY",
    "CHUNK_BYTES",
    "FOCAL_FORMS",
    "focal_dice_loss",
    "reference_focal_dice",
    "torch_focal_dice",
]

CHUNK_BYTES = 16 << 20  # bound on one chunk's (n_masks, H, W) float32 upsampled logits (torch backend)
FOCAL_FORMS = ("standard", "authors")
_PRED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TARGET_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Output allocator (tests replace it with a NaN-filling one so unwritten elements show up).
empty_output = torch.empty


def focal_dice_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_form: str = "standard",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid focal and dice losses of token-grid mask logits against full-resolution binary masks.

    With ``x = F.interpolate(pred[None], size=(H, W), mode="bilinear", align_corners=False)[0]``,
    p = σ(x) and t the target, per pixel ``focal = α_t · BCEWithLogits(x, t) · (1 − p_t)^γ`` where
    α_t = α·t + (1 − α)(1 − t) and p_t = p·t + (1 − p)(1 − t) (``focal_form="standard"``) or
    x·t + (1 − x)(1 − t) (``"authors"``: the raw logit, as in the authors' code; γ = 2 only). Per mask,
    ``dice = 1 − (2Σp·t + 1)/(Σp + Σt + 1)``. ``focal`` is the mean over masks of each mask's pixel mean,
    ``dice`` the mean over masks (the Mask2Former convention).

    Args:
        pred: (K, h, w) logits, float32, float16 or bfloat16, K ≥ 1; may require grad.
        target: (K, H, W) masks with values in {0, 1}: bool, uint8 or floating. The values are checked
            on CPU only (no host sync on CUDA). H, W may differ from h, w (usually larger).
        alpha: positive-class weight in [0, 1]; a negative value disables the α weighting (as in
            ``torchvision.ops.sigmoid_focal_loss``).
        gamma: focusing exponent, ≥ 0 (any float for ``"standard"``; exactly 2 for ``"authors"``).
        focal_form: ``"standard"`` or ``"authors"``.
        backend: None (``SEG4DIFF_BACKEND``, else Triton on CUDA, torch elsewhere), ``"triton"``,
            ``"torch"`` or ``"reference"``.

    Returns:
        ``(focal, dice)``: two 0-dim float32 tensors, differentiable w.r.t. ``pred`` (the gradient has
        ``pred``'s dtype). Computation is in float32.

    Example:
        >>> import torch
        >>> from seg4diff_fast.ops.focal_dice import focal_dice_loss
        >>> pred = torch.zeros(2, 4, 4, requires_grad=True)
        >>> target = torch.zeros(2, 16, 16, dtype=torch.bool)
        >>> target[:, :8] = True
        >>> focal, dice = focal_dice_loss(pred, target)
        >>> round(focal.item(), 4)  # p = 0.5 everywhere: mean α_t (0.5) · ln 2 · (1 − 0.5)²
        0.0866
        >>> round(dice.item(), 4)  # 1 − (2·64 + 1)/(128 + 128 + 1)
        0.4981
        >>> (focal + dice).backward()
        >>> pred.grad.shape
        torch.Size([2, 4, 4])
    """
    _check(pred, target, alpha, gamma, focal_form)
    resolved = BACKEND_REGISTRY.resolve(backend, pred.device)
    alpha, gamma, authors = float(alpha), float(gamma), focal_form == "authors"
    return BACKEND_REGISTRY[resolved](pred, target, alpha, gamma, authors)


def _check(pred, target, alpha, gamma, focal_form) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"focal_dice_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if pred.dim() != 3:
        raise ValueError(
            f"focal_dice_loss: pred must be 3-D (K, h, w) mask logits, got shape {tuple(pred.shape)}; "
            "for a batch, concatenate the images' masks along K (or call it once per image)"
        )
    if target.dim() != 3:
        raise ValueError(
            f"focal_dice_loss: target must be 3-D (K, H, W) masks, got shape {tuple(target.shape)}; "
            "concatenate the targets along K in the same order as pred"
        )
    if pred.dtype not in _PRED_DTYPES:
        raise TypeError(
            f"focal_dice_loss: pred has dtype {pred.dtype}; use float32, float16 or bfloat16 (e.g. pred.float())"
        )
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(
            f"focal_dice_loss: target has dtype {target.dtype}; use bool, uint8 or a floating dtype "
            "holding 0/1 (e.g. target.bool())"
        )
    if pred.shape[0] == 0:
        raise ValueError(
            "focal_dice_loss: no masks (K = 0): the loss of an empty set is undefined; skip the loss "
            "(or add a zero) for images without masks"
        )
    if target.shape[0] != pred.shape[0]:
        raise ValueError(
            f"focal_dice_loss: pred has {pred.shape[0]} masks but target has {target.shape[0]} "
            f"(pred {tuple(pred.shape)}, target {tuple(target.shape)}); pass the matched target of each "
            "prediction, in the same order (e.g. target[tgt_idx] with pred[pred_idx])"
        )
    if pred.numel() == 0 or target.numel() == 0:
        raise ValueError(
            f"focal_dice_loss: empty spatial size (pred {tuple(pred.shape)}, target {tuple(target.shape)}); "
            "h, w, H, W must all be >= 1"
        )
    if pred.device != target.device:
        raise ValueError(
            f"focal_dice_loss: pred is on {pred.device} but target on {target.device}; "
            f"move the target with target.to({str(pred.device)!r})"
        )
    if focal_form not in FOCAL_FORMS:
        raise ValueError(f"focal_dice_loss: focal_form={focal_form!r} is not one of {FOCAL_FORMS}")
    alpha, gamma = float(alpha), float(gamma)
    if not (math.isfinite(alpha) and alpha <= 1.0):
        raise ValueError(f"focal_dice_loss: alpha={alpha} must be in [0, 1], or negative to disable α weighting")
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"focal_dice_loss: gamma={gamma} must be a finite number >= 0")
    if focal_form == "authors" and gamma != 2.0:
        raise ValueError(
            f"focal_dice_loss: focal_form='authors' puts the raw logit in (1 - p_t)^gamma, whose base can be "
            f"negative, so only gamma=2 is supported (got {gamma}); use focal_form='standard' for other gammas"
        )
    if target.device.type == "cpu" and target.dtype != torch.bool:
        # cheap on CPU; on CUDA this would be a host sync on every call, so it is skipped there
        ok = bool(target.max() <= 1) if target.dtype == torch.uint8 else bool(((target == 0) | (target == 1)).all())
        if not ok:
            raise ValueError(
                "focal_dice_loss: target must hold only 0 and 1 (binary masks); threshold soft masks first, "
                "e.g. target > 0.5"
            )


def _pointwise(x: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float, authors: bool, grad: bool):
    """(focal_px, d focal_px/dx or None, p): the kernel's float32 per-pixel math, on tensors."""
    p = torch.sigmoid(x)
    pm = torch.sigmoid(-x)  # 1 − p without cancellation
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    a_t = alpha * t + (1.0 - alpha) * (1.0 - t) if alpha >= 0 else None
    if authors:
        q = 1.0 - (x * t + (1.0 - x) * (1.0 - t))
        mod = q * q
        dmod = 2.0 * q * (1.0 - 2.0 * t) if grad else None
    else:
        p_t = p * t + pm * (1.0 - t)
        q = p * (1.0 - t) + pm * t  # 1 − p_t
        mod = torch.ones_like(q) if gamma == 0 else q * q if gamma == 2 else q.clamp_min(0.0).pow(gamma)
        dmod = gamma * mod * p_t * (1.0 - 2.0 * t) if grad else None  # d q^γ/dx for t ∈ {0, 1}
    loss = ce * mod
    if a_t is not None:
        loss = loss * a_t
    if not grad:
        return loss, None, p
    dloss = (p - t) * mod + ce * dmod
    if a_t is not None:
        dloss = dloss * a_t
    return loss, dloss, p


def _chunk(k: int, out_h: int, out_w: int) -> int:
    return max(1, min(k, CHUNK_BYTES // (4 * out_h * out_w)))


def _upsample(pred_chunk: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(pred_chunk.float()[None], size=size, mode="bilinear", align_corners=False)[0]


class _TorchFocalDice(torch.autograd.Function):
    """Chunked over masks; saves only pred and target, and recomputes each chunk in backward."""

    @staticmethod
    def forward(ctx, pred, target, alpha, gamma, authors):
        k = pred.shape[0]
        size = tuple(target.shape[1:])
        sums = empty_output((k, 4), dtype=torch.float32, device=pred.device)
        step = _chunk(k, *size)
        for a in range(0, k, step):
            b = min(k, a + step)
            x = _upsample(pred[a:b], size)
            t = target[a:b].to(torch.float32)
            loss, _, p = _pointwise(x, t, alpha, gamma, authors, grad=False)
            sums[a:b, 0] = loss.sum((1, 2))
            sums[a:b, 1] = (p * t).sum((1, 2))
            sums[a:b, 2] = p.sum((1, 2))
            sums[a:b, 3] = t.sum((1, 2))
            del x, t, loss, p
        focal = sums[:, 0].sum() / (k * size[0] * size[1])
        dice = (1.0 - (2.0 * sums[:, 1] + 1.0) / (sums[:, 2] + sums[:, 3] + 1.0)).mean()
        ctx.save_for_backward(pred, target, sums)
        ctx.meta = (alpha, gamma, authors)
        return focal, dice

    @staticmethod
    def backward(ctx, g_focal, g_dice):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        pred, target, sums = ctx.saved_tensors
        alpha, gamma, authors = ctx.meta
        k = pred.shape[0]
        size = tuple(target.shape[1:])
        gf = g_focal.to(torch.float32) / (k * size[0] * size[1])
        gd = g_dice.to(torch.float32) / k
        grad = empty_output(pred.shape, dtype=pred.dtype, device=pred.device)
        step = _chunk(k, *size)
        for a in range(0, k, step):
            b = min(k, a + step)
            with torch.enable_grad():
                src = pred[a:b].detach().to(torch.float32).clone().requires_grad_(True)
                x = _upsample(src, size)
            with torch.no_grad():
                t = target[a:b].to(torch.float32)
                _, dloss, p = _pointwise(x.detach(), t, alpha, gamma, authors, grad=True)
                num = (2.0 * sums[a:b, 1] + 1.0)[:, None, None]
                den = (sums[a:b, 2] + sums[a:b, 3] + 1.0)[:, None, None]
                ddice = (num / den - 2.0 * t).div_(den).mul_(p * (1.0 - p))
                g = dloss.mul_(gf).add_(ddice.mul_(gd))
                del dloss, ddice, p, t
            # the adjoint of the bilinear upsampling, by autograd through F.interpolate on this chunk only
            (dsrc,) = torch.autograd.grad(x, src, g)
            grad[a:b] = dsrc.to(pred.dtype)
            del x, g, src, dsrc
        return grad, None, None, None, None


def reference_focal_dice(pred, target, alpha: float, gamma: float, authors: bool):
    """Backend "reference": the plain formula on the whole upsampled tensor (autograd does the backward)."""
    x = F.interpolate(pred.float()[None], size=tuple(target.shape[1:]), mode="bilinear", align_corners=False)[0]
    t = target.to(torch.float32)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = x * t + (1 - x) * (1 - t) if authors else p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    focal = loss.mean((1, 2)).mean()
    dice = (1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)).mean()
    return focal, dice


# ----------------------------------------------------------------------------------------------
# Backends, by name: each takes the checked (pred, target, alpha, gamma, authors) → (focal, dice)
# ----------------------------------------------------------------------------------------------


def _triton_backend(pred, target, alpha: float, gamma: float, authors: bool):
    """Backend "triton": the fused kernels, imported on first use (triton is optional)."""
    from ..kernels.focal_dice import triton_focal_dice

    return triton_focal_dice(pred, target, alpha, gamma, authors)


def torch_focal_dice(pred, target, alpha: float, gamma: float, authors: bool):
    """Backend "torch": chunks of masks, each chunk's upsampled logits at most about ``CHUNK_BYTES``."""
    return _TorchFocalDice.apply(pred, target, alpha, gamma, authors)


BACKEND_REGISTRY = BackendRegistry("focal_dice_loss")
BACKEND_REGISTRY.register("triton")(_triton_backend)
BACKEND_REGISTRY.register("torch")(torch_focal_dice)
BACKEND_REGISTRY.register("reference")(reference_focal_dice)
BACKENDS = BACKEND_REGISTRY.names()  # ("triton", "torch", "reference")
