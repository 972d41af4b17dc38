"""The authors' training-data transforms (``protocol="paper"``), with a seeded RNG.

The authors' mappers run detectron2 augmentations on the process-global numpy RNG; here every random draw
comes from a ``numpy.random.Generator`` the caller passes (the trainer seeds one per position in the data
stream from ``(seed, position)``), in a fixed order, so a sample is reproducible. The steps are detectron2's,
with its resampling calls (docs/PAPER_PROTOCOL_MAGNET.md):

- :class:`CocoStuffChain` (``MaskFormerSemanticDatasetMapper`` with ``configs/train_coco.yaml``):
  ``ResizeShortestEdge(1024)`` (no long-side cap; the image with PIL bilinear, the label map, read as float,
  with ``F.interpolate(mode="nearest")``), ``FixedSizeCrop(1024, pad=False)`` (one uniform draw ``u`` for
  both axes, offset ``round(u · (size − 1024))``), ``RandomFlip`` (horizontal when a draw is < 0.5), then
  the mapper's pad to ``SIZE_DIVISIBILITY = 640``, which is negative here: the top-left 640 × 640 (a
  smaller side would be padded, the image with 128 and the labels with 255).
- :class:`SA1BChain` (``SamBaselineDatasetMapperJSON`` with ``configs/train_sa1b.yaml``):
  ``ResizeShortestEdge(1024, max_size=1333)`` (image PIL bilinear, each 8-bit mask PIL nearest), then
  ``RandomFlip``; masks sorted by area after the transform (largest first, ties in file order).
- :func:`authors_short_caption`: their two-sentence cut, ``split('.')[0] + '.' + split('.')[1] + '.'``.

What follows the mappers (the model's ``ImageList`` pad to 32, the bilinear stretch to 1024², SA-1B's area
filter on the padded size) is batch-level: :class:`seg4diff_fast.magnet.batch.PaperCollate`.

Example:
    >>> import numpy as np
    >>> img = np.zeros((480, 640, 3), np.uint8); lab = np.zeros((480, 640), np.uint8)
    >>> out, lab2 = CocoStuffChain()(img, lab, np.random.default_rng(0))
    >>> out.shape, lab2.shape
    ((640, 640, 3), (640, 640))
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "shortest_edge_size",
    "resize_image",
    "resize_label",
    "resize_mask",
    "crop_offset",
    "fit_top_left",
    "CocoStuffChain",
    "SA1BChain",
    "authors_short_caption",
]


def shortest_edge_size(h: int, w: int, short: int, max_size: int = sys.maxsize) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: (new_h, new_w), the short side ``short``, the long
    side at most ``max_size``, each rounded with ``int(x + 0.5)``.

    Example:
        >>> shortest_edge_size(480, 640, 1024), shortest_edge_size(1500, 2250, 1024, 1333)
        ((1024, 1365), (889, 1333))
    """
    size = float(short)
    scale = size / min(h, w)
    if h < w:
        new_h, new_w = size, scale * w
    else:
        new_h, new_w = scale * h, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 image resized to ``size`` = (h, w) with PIL bilinear (detectron2's uint8 path)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map resized to ``size`` with ``F.interpolate(mode="nearest")`` (detectron2's path for the
    float arrays the semantic mapper reads labels as); the dtype is kept."""
    h, w = size
    if label.shape[:2] == (h, w):
        return label
    t = torch.from_numpy(np.ascontiguousarray(label).astype(np.float64))[None, None]
    return F.interpolate(t, (h, w), mode="nearest")[0, 0].numpy().astype(label.dtype)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) uint8 mask resized to ``size`` with PIL nearest (detectron2's uint8 path, used for the
    decoded SA-1B masks)."""
    h, w = size
    if mask.shape[:2] == (h, w):
        return mask
    return np.asarray(Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).resize((w, h), Image.NEAREST))


def crop_offset(size: tuple[int, int], crop: tuple[int, int], u: float) -> tuple[int, int]:
    """detectron2 ``FixedSizeCrop``'s (y0, x0): ``round(max(size − crop, 0) · u)`` per axis, one ``u`` for both
    (numpy's round: halves to even)."""
    max_offset = np.maximum(np.subtract(size, crop), 0)
    off = np.round(np.multiply(max_offset, u)).astype(int)
    return int(off[0]), int(off[1])


def fit_top_left(array: np.ndarray, size: int, fill: int) -> np.ndarray:
    """``F.pad(x, [0, size − W, 0, size − H], value=fill)`` on an (H, W[, C]) array: the top-left
    ``size`` × ``size`` (negative padding crops), padded with ``fill`` where a side is shorter."""
    h, w = array.shape[:2]
    out = array[:size, :size]
    if h < size or w < size:
        pad = [(0, max(size - h, 0)), (0, max(size - w, 0))] + [(0, 0)] * (array.ndim - 2)
        out = np.pad(out, pad, constant_values=fill)
    return out


@dataclass(frozen=True)
class CocoStuffChain:
    """The authors' COCO-Stuff training chain on an (H, W, 3) uint8 image and its (H, W) label map.

    Draws from ``rng``, in this order: ``u = rng.random()`` (the crop), ``rng.random() < 0.5`` (the flip).
    """

    short: int = 1024
    crop: int = 1024
    keep: int = 640
    image_fill: int = 128
    label_fill: int = 255

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and label map {label.shape[:2]} differ in size")
        size = shortest_edge_size(image.shape[0], image.shape[1], self.short)
        image, label = resize_image(image, size), resize_label(label, size)
        y0, x0 = crop_offset(size, (self.crop, self.crop), float(rng.random()))
        image = image[y0:y0 + self.crop, x0:x0 + self.crop]
        label = label[y0:y0 + self.crop, x0:x0 + self.crop]
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image = fit_top_left(image, self.keep, self.image_fill)
        label = fit_top_left(label, self.keep, self.label_fill)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


@dataclass(frozen=True)
class SA1BChain:
    """The authors' SA-1B training chain on an (H, W, 3) uint8 image and its (H, W) uint8 masks.

    Draws from ``rng``: ``rng.random() < 0.5`` (the flip). Returns the image and the masks, both transformed;
    the masks' order is unchanged (sorting is the caller's: by area after the transform).
    """

    short: int = 1024
    max_size: int = 1333

    def __call__(self, image: np.ndarray, masks: Sequence[np.ndarray],
                 rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
        for k, m in enumerate(masks):
            if m.shape[:2] != image.shape[:2]:
                raise ValueError(f"mask {k} is {m.shape[:2]} but the image is {image.shape[:2]}")
        size = shortest_edge_size(image.shape[0], image.shape[1], self.short, self.max_size)
        image = resize_image(image, size)
        out = [resize_mask(m, size) for m in masks]
        if rng.random() < 0.5:
            image = image[:, ::-1]
            out = [m[:, ::-1] for m in out]
        return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in out]


def authors_short_caption(caption: str) -> str:
    """The authors' caption cut (``SHORT_CAPTION``): ``split('.')[0] + '.' + split('.')[1] + '.'``. A caption
    without any ``.`` makes their code raise ``IndexError``; here its missing second part is empty.

    Example:
        >>> authors_short_caption("A dog runs. It is brown. The sky is blue.")
        'A dog runs. It is brown.'
        >>> authors_short_caption("Pi is 3.14 or so. It is irrational. Yes.")  # a decimal point counts
        'Pi is 3.14 or so.'
        >>> authors_short_caption("A dog runs.")
        'A dog runs..'
    """
    parts = caption.split(".")
    return parts[0] + "." + (parts[1] if len(parts) > 1 else "") + "."
