"""The evaluation loop: a segmenter over a dataset, the paper's protocols, one result dict.

Open-vocabulary (SEG4DIFF.md §7–8): per image the prompt holds the ground-truth classes in ascending
label order (``gt_only=True``, the paper's "GT-only prompt") or the whole class list; the labels of the
prompted classes map back to dataset ids, so unprompted classes are never chosen (the authors give them
zero scores: the same argmax). When the dataset has a background class (COCO-Object, VOC-21), it is
prompted too, its ground-truth pixels are not scored and it is left out of the mean ("background
excluded", the paper's setting). The image is pre-resized to a short side of 640 by the segmenter
(``short_side``), labels come back at the original size and are scored against the full-resolution
ground truth with a dataset-level confusion matrix.

Unsupervised: ``segmenter.unsupervised`` per image (padding to 32, scoring at the pre-resized size: the
ground truth is resized there with nearest neighbour), Hungarian matching per image, dataset-level
TP/FP/FN, background included.

``layers="all"`` sweeps every block in one pass per image (capture at all of them; no early exit past
the last) and reports mIoU per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .datasets import SegDataset
from .metrics import MeanIoU, match_segments_to_classes

__all__ = ["evaluate", "PROTOCOLS"]

PROTOCOLS = ("open-vocab", "unsupervised")


def _nan_to_none(x: float) -> float | None:
    return None if x != x else round(float(x), 4)


def _groups(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def evaluate(
    segmenter: Any,
    dataset: SegDataset,
    *,
    protocol: str = "open-vocab",
    gt_only: bool = True,
    layers: Sequence[int] | str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    threshold: float | None = None,
    power: float | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate ``segmenter`` (a :class:`~seg4diff_fast.Seg4DiffSegmenter`) on ``dataset``.

    Args:
        protocol: ``"open-vocab"`` or ``"unsupervised"``.
        gt_only: open-vocab: prompt only the image's ground-truth classes (the paper's protocol).
        layers: None (the segmenter's layer(s), averaged), a list of layers (averaged) or ``"all"`` (a sweep:
            one result per layer).
        limit: evaluate at most this many images.
        batch_size: images per segmenter call.
        threshold, power: unsupervised merging parameters (None: the defaults).
        progress: show a tqdm progress bar (stderr).

    Returns:
        ``{"dataset", "mIoU", "per_class": {name: IoU or None}, "layer", "protocol", "images", "skipped",
        "excluded", "per_layer"?}`` in percent; with a sweep, the best layer's numbers and ``per_layer``
        ``{layer: mIoU}``.

    Example:
        >>> # see tests/test_eval_runner.py for a complete offline run on a generated dataset
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    sweep = isinstance(layers, str)
    if sweep and layers != "all":
        raise ValueError(f"layers must be a list of ints or 'all', got {layers!r}")
    layer_list = tuple(range(segmenter.num_layers)) if sweep else (segmenter.layers if layers is None
                                                                  else segmenter.reader.check_layers(layers))
    keys = layer_list if sweep else (layer_list,)
    k = len(dataset.classes)
    ignore = dataset.ignore_index
    bg = dataset.background if protocol == "open-vocab" else None
    metrics = {key: MeanIoU(k, ignore) for key in keys}
    extra = {}
    if threshold is not None:
        extra["threshold"] = threshold
    if power is not None:
        extra["power"] = power

    total = len(dataset) if limit is None else min(limit, len(dataset))
    items = (item for i, item in zip(range(total), dataset))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{dataset.name} ({protocol})", unit="img")
    images = skipped = 0
    for group in _groups(items, max(1, batch_size)):
        if protocol == "open-vocab":
            todo, prompts = [], []
            for _name, image, gt in group:
                present = [int(c) for c in np.unique(gt) if c != ignore]
                ids = present if gt_only else list(range(k))
                if bg is not None and bg not in ids:
                    ids = sorted(ids + [bg])
                if not present:
                    skipped += 1
                    continue
                todo.append((image, gt, np.asarray(ids, dtype=np.int64)))
                prompts.append([dataset.classes[i] for i in ids])
            if todo:
                out = segmenter([t[0] for t in todo], prompts, per_layer=sweep, layers=layer_list)
                for (_, gt, ids), res in zip(todo, out):
                    scored = gt if bg is None else np.where(gt == bg, ignore, gt)
                    per = res if sweep else {layer_list: res}
                    for key, r in per.items():
                        metrics[key].update(ids[r.label_map], scored)
                    images += 1
        else:
            from PIL import Image

            out = segmenter.unsupervised([g[1] for g in group], per_layer=sweep, layers=layer_list, **extra)
            for (_, _, gt), res in zip(group, out):
                per = res if sweep else {layer_list: res}
                for key, r in per.items():
                    h, w = r.label_map.shape
                    g = gt if gt.shape == (h, w) else np.asarray(
                        Image.fromarray(gt.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.int64)
                    metrics[key].update(match_segments_to_classes(r.label_map, g, k, ignore, r.num_segments), g)
                images += 1
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()

    exclude = (bg,) if bg is not None else ()
    results = {key: m.compute(exclude) for key, m in metrics.items()}
    if sweep:
        scores = {key: r["mIoU"] for key, r in results.items()}
        finite = {key: v for key, v in scores.items() if v == v}
        best = max(finite, key=finite.get) if finite else keys[0]
    else:
        best = keys[0]
    chosen = results[best]
    out = {
        "dataset": dataset.name,
        "mIoU": _nan_to_none(chosen["mIoU"]),
        "per_class": {n: _nan_to_none(v) for i, (n, v) in enumerate(zip(dataset.classes, chosen["IoU"]))
                      if i not in exclude},
        "layer": best if sweep else (list(best) if len(best) > 1 else best[0]),
        "protocol": protocol,
        "images": images,
        "skipped": skipped,
        "excluded": [dataset.classes[i] for i in exclude],
    }
    if protocol == "open-vocab":
        out["prompt"] = "gt-only" if gt_only else "all-classes"
    if sweep:
        out["per_layer"] = {str(key): _nan_to_none(r["mIoU"]) for key, r in results.items()}
    return out
