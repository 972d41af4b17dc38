"""Segmentation metrics: a dataset-level confusion matrix (mIoU) and the unsupervised Hungarian protocol.

:class:`MeanIoU` accumulates a (K, K + 1) confusion matrix over the dataset: rows are ground-truth
classes, columns predicted classes, and one extra column for pixels that got no class (an unmatched
segment in the unsupervised protocol): those count as false negatives of their ground-truth class and
as nobody's false positive. IoU_c = TP / (TP + FP + FN) in percent; a class with TP + FP + FN = 0 (absent
from both prediction and ground truth everywhere) is NaN and left out of the mean.

:func:`match_segments_to_classes` is the DiffSeg protocol of SEG4DIFF.md: per image, segments are matched one-to-one
to ground-truth classes by ``scipy.optimize.linear_sum_assignment`` on their overlap histogram
(maximising the total overlap); a matched segment's pixels become its class, an unmatched segment's
pixels get no class (false negatives); TP/FP/FN then accumulate over the dataset in :class:`MeanIoU`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MeanIoU", "match_segments_to_classes", "overlap_histogram"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class MeanIoU:
    """Dataset-level mean intersection-over-union.

    Args:
        num_classes: K, ground-truth labels 0 … K−1.
        ignore_index: ground-truth label not scored (255).

    ``update(pred, gt)`` takes integer arrays (numpy or torch) of the same shape; ground-truth pixels
    equal to ``ignore_index`` are skipped, any other ground-truth value must be in 0 … K−1. Predicted
    values outside 0 … K−1 (e.g. −1) mean "no class": a false negative only.

    Example:
        >>> import numpy as np
        >>> m = MeanIoU(3)
        >>> m.update(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [255, 0]]))
        >>> r = m.compute()
        >>> r["IoU"]                       # class 2 never appears: NaN, left out of the mean
        [50.0, 50.0, nan]
        >>> r["mIoU"]
        50.0
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> None:
        pred, gt = _np(pred).astype(np.int64, copy=False), _np(gt).astype(np.int64, copy=False)
        if pred.shape != gt.shape:
            raise ValueError(f"MeanIoU.update: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        valid = np.ones(gt.shape, bool) if self.ignore_index is None else gt != self.ignore_index
        g, p = gt[valid], pred[valid]
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            raise ValueError(f"MeanIoU.update: ground-truth labels must be in 0..{self.num_classes - 1} or "
                             f"{self.ignore_index}, got {int(g.min())}..{int(g.max())}")
        k = self.num_classes
        p = np.where((p >= 0) & (p < k), p, k)
        self.confusion += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(TP, FP, FN) per class."""
        k = self.num_classes
        tp = np.diag(self.confusion[:, :k]).copy()
        fp = self.confusion[:, :k].sum(0) - tp
        fn = self.confusion.sum(1) - tp
        return tp, fp, fn

    def compute(self, exclude: tuple[int, ...] = ()) -> dict:
        """``{"mIoU": float, "IoU": list}`` in percent; NaN classes (and ``exclude``) are left out of the mean
        (``mIoU`` is NaN when nothing is left)."""
        tp, fp, fn = self.stats()
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan) * 100.0
        keep = np.ones(self.num_classes, bool)
        keep[list(exclude)] = False
        vals = iou[keep]
        vals = vals[~np.isnan(vals)]
        miou = float(vals.mean()) if vals.size else float("nan")
        return {"mIoU": miou, "IoU": [float(x) for x in iou]}


def overlap_histogram(segments: np.ndarray, gt: np.ndarray, num_segments: int, num_classes: int,
                      ignore_index: int | None = 255) -> np.ndarray:
    """(S, K) counts of valid pixels with segment s and ground-truth class c."""
    segments, gt = _np(segments).astype(np.int64), _np(gt).astype(np.int64)
    valid = np.ones(gt.shape, bool) if ignore_index is None else gt != ignore_index
    s, g = segments[valid], gt[valid]
    return np.bincount(s * num_classes + g, minlength=num_segments * num_classes).reshape(num_segments, num_classes)


def match_segments_to_classes(segments: Any, gt: Any, num_classes: int, ignore_index: int | None = 255,
                    num_segments: int | None = None) -> np.ndarray:
    """Map segment ids to ground-truth classes, one-to-one, maximising the total overlap (per image).

    Only the classes present in this image's (non-ignored) ground truth take part; with more segments
    than classes the extra segments stay unmatched, with fewer the extra classes get no segment.

    Args:
        segments: int (H, W) segment ids 0 … S−1.
        gt: int (H, W) ground truth, classes 0 … K−1 or ``ignore_index``.
        num_classes: K.
        num_segments: S (default: ``segments.max() + 1``).

    Returns:
        int64 (H, W): each pixel's matched class, −1 for pixels of unmatched segments; feed it with
        ``gt`` to :meth:`MeanIoU.update`.

    Example:
        >>> import numpy as np
        >>> seg = np.array([[0, 0, 1, 2]])
        >>> gt = np.array([[3, 3, 3, 1]])
        >>> match_segments_to_classes(seg, gt, num_classes=4).tolist()
        [[3, 3, -1, 1]]
    """
    from scipy.optimize import linear_sum_assignment

    segments = _np(segments).astype(np.int64)
    s = int(segments.max()) + 1 if num_segments is None else int(num_segments)
    hist = overlap_histogram(segments, gt, s, num_classes, ignore_index)
    present = np.flatnonzero(hist.sum(0))  # the classes of this image's (valid) ground truth
    lut = np.full(s, -1, dtype=np.int64)
    if present.size:
        rows, cols = linear_sum_assignment(hist[:, present], maximize=True)
        lut[rows] = present[cols]
    return lut[segments]


def __getattr__(name: str):  # the 0.1.0 name, kept importable
    if name == "hungarian_match":
        import warnings

        warnings.warn("hungarian_match is deprecated; use match_segments_to_classes", DeprecationWarning, stacklevel=2)
        return match_segments_to_classes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
