"""Images in, model input out: PIL / numpy / tensor → float RGB in [0, 1] → the 1024² stretch in [−1, 1].

The steps follow SEG4DIFF.md:

1. any input → RGB (grayscale repeated, alpha dropped);
2. optionally the evaluation pre-resize to a short side of 640 (detectron2's ``ResizeShortestEdge``:
   PIL bilinear for 8-bit images, ``F.interpolate`` bilinear for float ones, as detectron2 does);
3. optionally zero padding at the bottom/right to a multiple of 32 (the unsupervised protocol);
4. ``F.interpolate(..., (R, R), mode="bilinear", align_corners=False)`` (aspect ratio not kept), then
   ``x = 2x − 1``.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

try:  # pillow is a dependency, but keep the import local-failure friendly
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None  # type: ignore[assignment]

ImageLike = Union["Image.Image", np.ndarray, torch.Tensor]

__all__ = ["ImageLike", "as_float", "to_rgb", "resize_short_side", "short_side_size", "to_model_input"]


def _uint8_hwc(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) uint8 → (H, W, 3) uint8."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def to_rgb(image: ImageLike) -> np.ndarray | torch.Tensor:
    """Normalise one image to RGB: an (H, W, 3) uint8 array for 8-bit inputs, a float32 (3, H, W) tensor
    in [0, 1] for float inputs.

    Accepted: PIL images (any mode; grayscale, palette and RGBA are converted with ``convert("RGB")``,
    alpha dropped), numpy arrays (H, W[, 1|3|4]) uint8 or float in [0, 1], torch tensors (3|1|4, H, W)
    or (H, W), uint8 or float in [0, 1].

    Example:
        >>> import numpy as np
        >>> to_rgb(np.zeros((4, 5), np.uint8)).shape       # grayscale -> RGB
        (4, 5, 3)
        >>> import torch
        >>> to_rgb(torch.rand(4, 6, 7)).shape              # RGBA tensor -> RGB
        torch.Size([3, 6, 7])
    """
    if Image is not None and isinstance(image, Image.Image):
        return _uint8_hwc(np.asarray(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            return _uint8_hwc(image)
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"image arrays must be uint8 or float in [0, 1], got dtype {image.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(image)).float()
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1) if t.dim() == 3 else t
        return _float_chw(t)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dtype == torch.uint8:
            t = t[None] if t.dim() == 2 else t
            if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"image tensor must be (C, H, W) with C in 1, 3, 4 or (H, W); got {tuple(image.shape)}"
                )
            return _uint8_hwc(t.permute(1, 2, 0).numpy())
        if not t.dtype.is_floating_point:
            raise TypeError(f"image tensors must be uint8 or float in [0, 1], got {t.dtype}")
        return _float_chw(t[None] if t.dim() == 2 else t)
    raise TypeError(f"images must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}")


def _float_chw(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"float images must be (C, H, W) with C in 1, 3, 4, or (H, W); got shape {tuple(t.shape)}")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"image is empty: shape {tuple(t.shape)}")
    t = t.float()
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ValueError("float images must hold finite values in [0, 1]")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].contiguous()


def short_side_size(height: int, width: int, short_side: int, max_size: int = 2560) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: (new_h, new_w) with the short side ``short_side``
    and the long side at most ``max_size``.

    Example:
        >>> short_side_size(480, 640, 640)
        (640, 853)
    """
    scale = short_side / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_short_side(image: np.ndarray | torch.Tensor, short_side: int, max_size: int = 2560):
    """The evaluation pre-resize: a no-op when the short side already is ``short_side``.

    8-bit (H, W, 3) arrays are resized with PIL bilinear, float (3, H, W) tensors with
    ``F.interpolate(mode="bilinear", align_corners=False)`` (detectron2's ``ResizeTransform``).
    """
    h, w = (image.shape[0], image.shape[1]) if isinstance(image, np.ndarray) else tuple(image.shape[-2:])
    new_h, new_w = short_side_size(h, w, short_side, max_size)
    if (new_h, new_w) == (h, w):
        return image
    if isinstance(image, np.ndarray):
        return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    return F.interpolate(image[None], (new_h, new_w), mode="bilinear", align_corners=False)[0]


def as_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 or (3, H, W) float → float32 (3, H, W) in [0, 1]."""
    if isinstance(image, np.ndarray):
        arr = image if image.flags.writeable else image.copy()
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    return image


def to_model_input(images: list[torch.Tensor], resolution: int, pad_multiple: int | None = None,
                   signed: bool = True) -> torch.Tensor:
    """Float (3, H, W) images in [0, 1] → (B, 3, R, R) in [−1, 1] (``signed=False``: left in [0, 1], the
    authors' Flux path): optional zero padding (bottom/right) to a multiple of ``pad_multiple``, then a
    bilinear stretch to R×R (align_corners=False).

    Example:
        >>> import torch
        >>> to_model_input([torch.rand(3, 30, 40), torch.rand(3, 8, 8)], 16).shape
        torch.Size([2, 3, 16, 16])
    """
    out = []
    for img in images:
        if pad_multiple:
            h, w = img.shape[-2:]
            ph, pw = (-h) % pad_multiple, (-w) % pad_multiple
            if ph or pw:
                img = F.pad(img, (0, pw, 0, ph))
        if tuple(img.shape[-2:]) != (resolution, resolution):
            img = F.interpolate(img[None], (resolution, resolution), mode="bilinear", align_corners=False)[0]
        out.append(img)
    batch = torch.stack(out)
    return batch.mul_(2.0).sub_(1.0) if signed else batch
