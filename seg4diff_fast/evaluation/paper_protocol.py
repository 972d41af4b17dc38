"""The authors' scoring, as their code computes it (``protocol="paper"``), kept apart from the corrected one.

Everything here reproduces a behaviour of cvlab-kaist/Seg4Diff (commit bb500ca) that the corrected protocol
does differently; ``docs/PAPER_PROTOCOL_EVAL.md`` has the table (quirk | paper | corrected | why).

- :func:`paper_prompt_classes`: the GT-only prompt from the label map as the test mapper resized it (nearest,
  short side 640), every id below 171 that occurs (``bincount()[:171].nonzero()``): "background" is prompted
  only where the image's labels hold it.
- :func:`paper_unsupervised_labels`: their unsupervised prediction: the token-grid segments (of the image
  padded to 32) upsampled to the ORIGINAL size, then cropped to the resized size's top-left corner and
  resized to it (``sem_seg_postprocess`` twice, ``train_net.py`` 283-285); for an image larger than its
  resize this keeps only the top-left region, compared with the whole (resized) ground truth.
- :class:`PaperHungarian`: their per-image matching (``hungarian_matching``, ``_fast_hist``): every class of
  the list takes part, absent ones included, so a leftover segment can be assigned to an absent class and
  count as its false positives.
- :func:`paper_iou`: detectron2's ``SemSegEvaluator`` mIoU: a class's IoU counts only if it has ground-truth
  pixels in the dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..segment.segmenter import PROTOCOLS

__all__ = ["AUTHORS_MAX_CLASS_ID", "PROTOCOL_VARIANTS", "PaperHungarian", "paper_iou", "paper_prompt_classes",
           "paper_unsupervised_labels", "protocol_variant", "resize_labels"]

#: ``get_gt_indices`` keeps label ids below this (``bincount()[:171]``).
AUTHORS_MAX_CLASS_ID = 171

#: ``Seg4DiffSegmenter(protocol=...)``'s choices: the authors' code as it runs, or without its quirks.
PROTOCOL_VARIANTS = PROTOCOLS


def protocol_variant(segmenter: Any) -> str:
    """``segmenter.protocol`` ("paper" or "corrected"; "paper" when the segmenter has none).

    Example:
        >>> protocol_variant(object()), protocol_variant(type("S", (), {"protocol": "corrected"})())
        ('paper', 'corrected')
    """
    variant = getattr(segmenter, "protocol", "paper")
    if variant not in PROTOCOL_VARIANTS:
        raise ValueError(f"segmenter.protocol must be one of {PROTOCOL_VARIANTS}, got {variant!r}")
    return variant


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map to ``size`` = (H, W) (PIL ``NEAREST``, what
    detectron2's ``ResizeTransform`` does to segmentation maps).

    Example:
        >>> resize_labels(np.array([[1, 2], [3, 4]]), (4, 4)).tolist()[0]
        [1, 1, 2, 2]
    """
    from PIL import Image

    h, w = size
    if labels.shape == (h, w):
        return labels.astype(np.int64, copy=False)
    small = labels.min() >= 0 and labels.max() <= 255
    img = Image.fromarray(labels.astype(np.uint8 if small else np.int32))
    return np.asarray(img.resize((w, h), Image.NEAREST)).astype(np.int64)


def paper_prompt_classes(gt: np.ndarray, short_side: int | None, ignore_index: int | None = 255) -> list[int]:
    """The classes the authors prompt for an image (their ``get_gt_indices``): the ids below 171 present in
    the ground truth after the test mapper's resize to ``short_side`` (nearest; None: no resize), ascending,
    ``ignore_index`` left out. "background" is among them only if the labels hold it.

    Example:
        >>> gt = np.zeros((4, 6), np.int64); gt[0, 0] = 3; gt[3] = 255
        >>> paper_prompt_classes(gt, None), paper_prompt_classes(gt, 2)   # the resize loses class 3
        ([0, 3], [0])
    """
    from ..reader.images import short_side_size

    g = gt if short_side is None else resize_labels(gt, short_side_size(gt.shape[0], gt.shape[1], short_side))
    present = np.flatnonzero(np.bincount(g[(g >= 0) & (g < AUTHORS_MAX_CLASS_ID)].ravel(),
                                         minlength=AUTHORS_MAX_CLASS_ID))
    return [int(c) for c in present if c != ignore_index]


def paper_unsupervised_labels(segments: torch.Tensor, working_size: tuple[int, int],
                              original_size: tuple[int, int], chunk: int = 8) -> np.ndarray:
    """The authors' unsupervised prediction at the working (resized) size.

    ``segments`` (S, h, w) are the merged maps on the token grid of the padded, stretched image. As their
    code runs: crop the grid to ``working_size`` (a no-op for a 64² grid and a 640 resize), upsample
    bilinearly (align_corners=False) to ``original_size``, crop the top-left ``working_size``, resize that
    bilinearly to ``working_size``, argmax over segments (first maximum wins). Chunked over segments so that
    S × H × W is never held.

    Returns:
        int64 (h', w') segment ids.

    Example:
        >>> seg = torch.zeros(2, 4, 4); seg[1, :, 2:] = 1             # segment 1 = the right half
        >>> paper_unsupervised_labels(seg, (2, 8), (2, 8))[0].tolist()  # same size: plain upsampling
        [0, 0, 0, 1, 1, 1, 1, 1]
        >>> paper_unsupervised_labels(seg, (2, 8), (4, 16))[0].tolist()  # larger original: its left half only
        [0, 0, 0, 0, 0, 0, 1, 1]
    """
    hw, ww = (int(x) for x in working_size)
    ho, wo = (int(x) for x in original_size)
    seg = segments.detach().float().cpu()[:, :hw, :ww]
    best = torch.full((hw, ww), -float("inf"))
    arg = torch.zeros((hw, ww), dtype=torch.int64)
    for s in range(0, seg.shape[0], max(1, chunk)):
        part = F.interpolate(seg[None, s:s + chunk], size=(ho, wo), mode="bilinear", align_corners=False)
        part = part[:, :, :hw, :ww]
        part = F.interpolate(part, size=(hw, ww), mode="bilinear", align_corners=False)[0]
        top, idx = part.max(0)
        better = top > best
        best = torch.where(better, top, best)
        arg = torch.where(better, idx + s, arg)
    return arg.numpy()


class PaperHungarian:
    """The authors' unsupervised score: per image, ``linear_sum_assignment`` (maximise) of every class of the
    list (rows, absent ones included) to predicted segment ids (columns; at least as many as classes) on
    their overlap histogram; ground-truth ids outside 0 … num_classes−1 are not counted. TP, FP, FN
    accumulate over the dataset; IoU = TP / (TP + FP + FN), NaN where that is 0/0; mIoU = their nanmean.

    Example:
        >>> h = PaperHungarian(3)                  # class 1 only; segment 1 is left over
        >>> h.update(np.array([[0, 0, 1, 2]]), np.array([[1, 1, 1, 255]]))
        >>> h.tp.tolist(), h.fp.tolist(), h.fn.tolist()   # absent class 0 got segment 1: one false positive
        ([0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
        >>> [round(x, 2) for x in h.compute()["IoU"][:2]]
        [0.0, 66.67]
    """

    def __init__(self, num_classes: int):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.tp = np.zeros(self.num_classes)
        self.fp = np.zeros(self.num_classes)
        self.fn = np.zeros(self.num_classes)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """One image: ``pred`` segment ids (≥ 0), ``gt`` labels, same shape."""
        from scipy.optimize import linear_sum_assignment

        pred = np.asarray(pred, dtype=np.int64).ravel()
        gt = np.asarray(gt, dtype=np.int64).ravel()
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        n = self.num_classes
        cols = max(n, int(pred.max()) + 1 if pred.size else n)
        keep = (gt >= 0) & (gt < n)
        hist = np.bincount(cols * gt[keep] + pred[keep], minlength=n * cols).reshape(n, cols)
        rows, assigned = linear_sum_assignment(hist, maximize=True)
        tp = hist[rows, assigned]
        self.tp[rows] += tp
        self.fn[rows] += hist[rows].sum(1) - tp
        self.fp[rows] += hist[:, assigned].sum(0) - tp

    def compute(self) -> dict:
        """``{"mIoU": float, "IoU": list}`` in percent (NaN classes left out of the mean)."""
        denom = self.tp + self.fp + self.fn
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(denom > 0, self.tp / np.maximum(denom, 1), np.nan) * 100.0
        vals = iou[~np.isnan(iou)]
        return {"mIoU": float(vals.mean()) if vals.size else float("nan"), "IoU": [float(x) for x in iou]}


def paper_iou(stats: tuple[np.ndarray, np.ndarray, np.ndarray], exclude: tuple[int, ...] = ()) -> dict:
    """detectron2 ``SemSegEvaluator``'s mIoU from (TP, FP, FN) per class: IoU only for classes with
    ground-truth pixels (TP + FN > 0), mean over those (``exclude`` left out too), in percent.

    Example:
        >>> tp, fp, fn = np.array([2, 0, 0]), np.array([1, 3, 0]), np.array([1, 0, 0])
        >>> r = paper_iou((tp, fp, fn)); r["mIoU"], r["IoU"][1] != r["IoU"][1]   # class 1: predicted, no GT
        (50.0, True)
    """
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in stats)
    gt_pixels = tp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(gt_pixels > 0, tp / np.maximum(tp + fp + fn, 1), np.nan) * 100.0
    keep = np.ones(iou.shape[0], bool)
    keep[list(exclude)] = False
    vals = iou[keep]
    vals = vals[~np.isnan(vals)]
    return {"mIoU": float(vals.mean()) if vals.size else float("nan"), "IoU": [float(x) for x in iou]}
