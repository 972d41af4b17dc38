"""The evaluation loop: a segmenter over a dataset, the paper's protocols, one result dict.

Two variants of every rule, chosen by ``segmenter.protocol`` (``"paper"``, the default, or ``"corrected"``);
``docs/PAPER_PROTOCOL_EVAL.md`` lists every difference, :mod:`.paper_protocol` holds the paper's side.

Open-vocabulary (SEG4DIFF.md §7–8): per image the prompt holds the ground-truth classes in ascending
label order (``gt_only=True``, the paper's "GT-only prompt") or the whole class list; the labels of the
prompted classes map back to dataset ids, so unprompted classes are never chosen (the authors give them
zero scores: the same argmax). Paper: the classes come from the labels as the test mapper resized them
(short side 640, nearest) and "background" (COCO-Object, VOC-21) is prompted only when the image's labels
hold it; corrected: the full-resolution labels, "background" always prompted. Either way its ground-truth
pixels are not scored and it is left out of the mean ("background excluded"). The image is pre-resized to
a short side of 640 by the segmenter (``short_side``), labels come back at the original size and are
scored against the full-resolution ground truth with a dataset-level confusion matrix (paper: a class
counts in the mean only if it has ground-truth pixels, detectron2's rule).

Unsupervised: ``segmenter.unsupervised`` per image (padding to 32; the ground truth is resized to the
pre-resized size with nearest neighbour), Hungarian matching per image, dataset-level TP/FP/FN, background
included. Paper: the segments are upsampled to the original size, then cropped to the top-left of the
pre-resized size (the authors' evaluator; only that region of a larger image is compared with the whole
resized ground truth) and every class of the list takes part in the matching; corrected: the segments
are upsampled to the pre-resized (padded) size and cropped back to the image, only the image's classes are
matched, pixels of unmatched segments are false negatives.

``layers="all"`` sweeps every block in one pass per image (capture at all of them; no early exit past
the last) and reports mIoU per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..reader.images import short_side_size
from .datasets import SegDataset
from .metrics import MeanIoU, match_segments_to_classes
from .paper_protocol import (
    PaperHungarian,
    paper_iou,
    paper_prompt_classes,
    paper_unsupervised_labels,
    protocol_variant,
    resize_labels,
)

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


def _prompt_ids(gt: np.ndarray, k: int, ignore: int | None, bg: int | None, gt_only: bool, variant: str,
                short_side: int | None) -> tuple[list[int], bool]:
    """(the dataset ids to prompt, whether the image has scored pixels at all)."""
    present = [int(c) for c in np.unique(gt) if c != ignore]
    if not present:
        return [], False
    if not gt_only:
        ids = list(range(k))
    elif variant == "paper":
        return [c for c in paper_prompt_classes(gt, short_side, ignore) if c < k], True
    else:
        ids = present
    if bg is not None and bg not in ids:
        ids = sorted(ids + [bg])
    return ids, True


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

    The paper / corrected rules follow ``segmenter.protocol`` (module docs).

    Args:
        protocol: the task: ``"open-vocab"`` or ``"unsupervised"``.
        gt_only: open-vocab: prompt only the image's ground-truth classes (the paper's protocol).
        layers: None (the segmenter's layer(s), averaged), a list of layers (averaged) or ``"all"`` (a sweep:
            one result per layer).
        limit: evaluate at most this many images.
        batch_size: images per segmenter call.
        threshold, power: unsupervised merging parameters (None: the defaults).
        progress: show a tqdm progress bar (stderr).

    Returns:
        ``{"dataset", "mIoU", "per_class": {name: IoU or None}, "layer", "protocol", "segmenter_protocol",
        "images", "skipped", "excluded", "per_layer"?}`` in percent; with a sweep, the best layer's numbers and
        ``per_layer`` ``{layer: mIoU}``.

    Example:
        >>> # complete offline runs: tests/test_eval_cli.py (a tiny SD3), tests/test_eval_layouts.py (fakes)
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    variant = protocol_variant(segmenter)
    sweep = isinstance(layers, str)
    if sweep and layers != "all":
        raise ValueError(f"layers must be a list of ints or 'all', got {layers!r}")
    layer_list = tuple(range(segmenter.num_layers)) if sweep else (segmenter.layers if layers is None
                                                                  else segmenter.reader.check_layers(layers))
    keys = layer_list if sweep else (layer_list,)
    k = len(dataset.classes)
    ignore = dataset.ignore_index
    bg = dataset.background if protocol == "open-vocab" else None
    paper_unsup = variant == "paper" and protocol == "unsupervised"
    scored_k = min(k, dataset.paper_num_classes or k) if paper_unsup else k
    metrics: dict[Any, Any] = {key: PaperHungarian(scored_k) if paper_unsup else MeanIoU(k, ignore) for key in keys}
    short_side = getattr(segmenter, "short_side", None)
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

        bar = tqdm(total=total, desc=f"{dataset.name} ({protocol}, {variant})", unit="img")
    images = skipped = 0
    for group in _groups(items, max(1, batch_size)):
        if protocol == "open-vocab":
            todo, prompts = [], []
            for _name, image, gt in group:
                ids, scored = _prompt_ids(gt, k, ignore, bg, gt_only, variant, short_side)
                if not scored:
                    skipped += 1
                    continue
                g = gt if bg is None else np.where(gt == bg, ignore, gt)
                if not ids:  # paper: the resize lost every class; their empty prompt scores class 0 everywhere
                    for m in metrics.values():
                        m.update(np.zeros_like(g), g)
                    images += 1
                    continue
                todo.append((image, g, np.asarray(ids, dtype=np.int64)))
                prompts.append([dataset.classes[i] for i in ids])
            if todo:
                out = segmenter([t[0] for t in todo], prompts, per_layer=sweep, layers=layer_list)
                for (_, scored_gt, ids), res in zip(todo, out):
                    per = res if sweep else {layer_list: res}
                    for key, r in per.items():
                        metrics[key].update(ids[r.label_map], scored_gt)
                    images += 1
        else:
            out = segmenter.unsupervised([g[1] for g in group], per_layer=sweep, layers=layer_list, **extra)
            for (_, _, gt), res in zip(group, out):
                per = res if sweep else {layer_list: res}
                if paper_unsup:  # scored at the mapper's resized size, whatever size label_map has
                    working = gt.shape if short_side is None else short_side_size(*gt.shape, short_side)
                    g = resize_labels(gt, working)  # once per image, not once per swept layer
                for key, r in per.items():
                    if paper_unsup:
                        metrics[key].update(paper_unsupervised_labels(r.segments, working, gt.shape), g)
                    else:
                        g = resize_labels(gt, r.label_map.shape)
                        metrics[key].update(match_segments_to_classes(r.label_map, g, k, ignore, r.num_segments), g)
                images += 1
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()

    exclude = (bg,) if bg is not None else ()
    if paper_unsup:
        results = {key: m.compute() for key, m in metrics.items()}
        for r in results.values():
            r["IoU"] = r["IoU"] + [float("nan")] * (k - scored_k)
        exclude = tuple(range(scored_k, k))
    elif variant == "paper":
        results = {key: paper_iou(m.stats(), exclude) for key, m in metrics.items()}
    else:
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
        "segmenter_protocol": variant,
        "images": images,
        "skipped": skipped,
        "excluded": [dataset.classes[i] for i in exclude],
    }
    if protocol == "open-vocab":
        out["prompt"] = "gt-only" if gt_only else "all-classes"
    if sweep:
        out["per_layer"] = {str(key): _nan_to_none(r["mIoU"]) for key, r in results.items()}
    return out
