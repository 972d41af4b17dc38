"""Fused bilinear upsample + argmax over classes: the last step of the segmentation (maps → labels).

Seg4Diff's class maps live on the token grid (64×64 at 1024²); the labels are the argmax over classes of
the maps upsampled bilinearly to the image's size. Done naively (``F.interpolate(...).argmax(0)``) that
allocates K×H×W floats: 150 classes at 1024² is 600 MiB. :func:`upsample_argmax` returns the same labels
(plus the top score and the score sum) without ever holding more than a band of output rows:

- CPU: the C++ kernel ``seg4diff_fast._C.upsample_argmax`` (``csrc/upsample_argmax.cpp``) when it was
  built; it runs over output rows in parallel with the GIL released;
- CUDA: the Triton kernel ``seg4diff_fast.kernels.upsample_argmax`` (also runs in Triton's CPU
  interpreter, for tests);
- otherwise (no ``_C``, no triton): a torch fallback that does the same arithmetic on
  bands of output rows, each at most about ``CHUNK_BYTES`` of (rows, W, K) float32 (a few such buffers
  live at once: about 50 MiB peak for K=150 at 1024², against 600 MiB for the naive way).

Both reproduce ``F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0]`` (the
same float32 source indices and weights as PyTorch's CPU kernel) up to float rounding.
"""

from __future__ import annotations

import torch

from .backends import resolve_backend, triton_available

__all__ = ["upsample_argmax", "has_cpp_extension", "CHUNK_BYTES"]

CHUNK_BYTES = 16 << 20  # bound on one (rows, W, K) float32 band of the torch fallback

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler at install time, or a failed build): torch fallback
    _C = None


def has_cpp_extension() -> bool:
    """Whether the C++ extension ``seg4diff_fast._C`` was built and imports."""
    return _C is not None


def upsample_argmax(
    scores: torch.Tensor, size: tuple[int, int], backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinearly upsample (K, h, w) class scores to ``size`` and reduce over classes, fused.

    Equivalent to::

        up = F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        labels, top, total = up.argmax(0), up.amax(0), up.sum(0)

    but never allocates the (K, H, W) tensor ``up``.

    Args:
        scores: (K, h, w) floating tensor (K classes on an h×w grid), any strides, CPU or CUDA.
            Computation is in float32 (other float dtypes are converted).
        size: output (H, W), both positive; smaller than (h, w) works too (plain bilinear sampling,
            no antialiasing, like ``F.interpolate``).
        backend: None (C++ on CPU when built, Triton on CUDA, else torch), ``"cpp"`` (CPU only, fails
            if ``_C`` was not built), ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or
            ``"torch"`` (the row-banded fallback, any device).

    Returns:
        ``(labels, top, total)`` on ``scores``' device: ``labels`` int64 (H, W), the class index of the
        maximum (the first one on ties; NaN counts as the maximum, like ``torch.argmax``); ``top``
        float32 (H, W), that maximum; ``total`` float32 (H, W), the sum over the K classes.

    Example:
        >>> import torch
        >>> from seg4diff_fast.ops.upsample_argmax import upsample_argmax
        >>> scores = torch.zeros(3, 4, 4)
        >>> scores[1, :, :2] = 1.0  # class 1 on the left half
        >>> scores[2, :, 2:] = 1.0  # class 2 on the right half
        >>> labels, top, total = upsample_argmax(scores, (8, 8))
        >>> labels[0].tolist()
        [1, 1, 1, 1, 2, 2, 2, 2]
        >>> labels.shape, top.dtype, float(total.max())
        (torch.Size([8, 8]), torch.float32, 1.0)
    """
    out_h, out_w = _check(scores, size)
    if backend not in (None, "cpp", "triton", "torch"):
        raise ValueError(f"upsample_argmax: backend={backend!r} is not one of None, 'cpp', 'triton', 'torch'")
    x = scores if scores.dtype == torch.float32 else scores.float()
    on_cpu = x.device.type == "cpu"
    if backend == "cpp":
        if _C is None:
            raise RuntimeError(
                "upsample_argmax: backend='cpp' needs the C++ extension seg4diff_fast._C, which was not built; "
                "reinstall with a C++ compiler present (pip install --no-build-isolation .) or use backend='torch'"
            )
        if not on_cpu:
            raise ValueError(f"upsample_argmax: backend='cpp' runs on CPU tensors, got {x.device.type}")
    if backend == "cpp" or (backend is None and on_cpu and _C is not None):
        return _C.upsample_argmax(x.contiguous(), out_h, out_w)
    if backend == "triton" or (backend is None and x.device.type == "cuda" and triton_available()):
        resolve_backend("triton", x.device, op="upsample_argmax")  # raises with the reason if Triton cannot run here
        from ..kernels.upsample_argmax import triton_upsample_argmax

        return triton_upsample_argmax(x, (out_h, out_w))
    return _torch_upsample_argmax(x, out_h, out_w)


def _check(scores: torch.Tensor, size) -> tuple[int, int]:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"upsample_argmax: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 3:
        raise ValueError(
            f"upsample_argmax: scores must be 3-D (K, h, w), got shape {tuple(scores.shape)}; "
            "for a batch, call it once per image"
        )
    if not scores.dtype.is_floating_point:
        raise TypeError(f"upsample_argmax: scores must be a floating tensor, got {scores.dtype}")
    if scores.numel() == 0:
        raise ValueError(f"upsample_argmax: scores is empty, shape {tuple(scores.shape)}; need K, h, w >= 1")
    try:
        out_h, out_w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise TypeError(f"upsample_argmax: size must be a pair of ints (H, W), got {size!r}") from None
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"upsample_argmax: size must be positive, got ({out_h}, {out_w})")
    return out_h, out_w


def _source_index_and_lambda(in_size: int, out_size: int, device: torch.device):
    """PyTorch's bilinear (align_corners=False) source indices and weights, in the same float32 math."""
    dst = torch.arange(out_size, device=device)
    if in_size == out_size:
        ones = torch.ones(out_size, dtype=torch.float32, device=device)
        return dst, dst, ones, torch.zeros_like(ones)
    scale = torch.tensor(in_size, dtype=torch.float32, device=device) / out_size
    src = (scale * (dst.to(torch.float32) + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.floor().to(torch.int64).clamp_max(in_size - 1)
    l1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    return i0, i1, 1.0 - l1, l1


def _torch_upsample_argmax(x: torch.Tensor, out_h: int, out_w: int):
    k, in_h, in_w = x.shape
    dev = x.device
    ih0, ih1, h0, h1 = _source_index_and_lambda(in_h, out_h, dev)
    iw0, iw1, w0, w1 = _source_index_and_lambda(in_w, out_w, dev)
    labels = torch.empty(out_h, out_w, dtype=torch.int64, device=dev)
    top = torch.empty(out_h, out_w, dtype=torch.float32, device=dev)
    total = torch.empty(out_h, out_w, dtype=torch.float32, device=dev)
    step = max(1, min(out_h, CHUNK_BYTES // max(1, 4 * k * out_w)))
    # Classes last, so that the per-pixel reductions run over the innermost, contiguous dimension
    # (several times faster on the CPU than reducing over the outer one).
    xt = x.permute(1, 2, 0).contiguous()  # (h, w, K): the input's size
    w0, w1 = w0[:, None], w1[:, None]
    for a in range(0, out_h, step):
        b = min(out_h, a + step)
        # Horizontal pass over the source rows this band reads ([s0, s1], contiguous), then vertical.
        s0, s1 = int(ih0[a]), int(ih1[b - 1])
        src = xt[s0 : s1 + 1]
        hx = src.index_select(1, iw0) * w0
        hx += src.index_select(1, iw1) * w1  # (s1 - s0 + 1, W, K)
        # index_select over dim 0 of the 2-D view: the row-copy fast path (3-D is far slower on the CPU).
        flat = hx.view(hx.shape[0], -1)
        band = flat.index_select(0, ih0[a:b] - s0).mul_(h0[a:b, None])
        band += flat.index_select(0, ih1[a:b] - s0).mul_(h1[a:b, None])
        band = band.view(b - a, out_w, k)  # (rows, W, K)
        del hx, flat
        # torch.max over a dim returns the first maximal index and propagates NaN, like argmax.
        top[a:b], labels[a:b] = band.max(dim=-1)
        total[a:b] = band.sum(dim=-1)
    return labels, top, total
