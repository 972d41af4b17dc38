"""MeanIoU against a hand-computed confusion matrix, the Hungarian protocol against brute force, and the
dataset loaders on folders written in the standard prepared layouts."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast import MeanIoU
from seg4diff_fast.evaluation import DATASETS, SegDataset, load_classnames, match_segments_to_classes


def _rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)


def _loop_iou(preds, gts, k, ignore):
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, gt in zip(preds, gts):
        for p, g in zip(pred.ravel(), gt.ravel()):
            if g == ignore:
                continue
            if p == g:
                tp[g] += 1
            else:
                fn[g] += 1
                if 0 <= p < k:
                    fp[p] += 1
    return tp, fp, fn


def test_mean_iou_matches_loops():
    rng = _rng()
    k = int(rng.integers(3, 8))
    metric = MeanIoU(k, ignore_index=255)
    preds, gts = [], []
    for _ in range(4):
        shape = tuple(rng.integers(3, 12, 2))
        gt = rng.integers(0, k - 1, shape)  # class k-1 never in the ground truth
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(-1, k - 1, shape)  # -1: no class; class k-1 never predicted
        metric.update(pred, gt)
        preds.append(pred)
        gts.append(gt)
    tp, fp, fn = _loop_iou(preds, gts, k, 255)
    got = metric.compute()
    denom = tp + fp + fn
    for c in range(k):
        if denom[c] == 0:
            assert np.isnan(got["IoU"][c])
        else:
            assert got["IoU"][c] == pytest.approx(100 * tp[c] / denom[c])
    assert np.isnan(got["IoU"][k - 1])
    valid = denom > 0
    assert got["mIoU"] == pytest.approx(100 * np.mean(tp[valid] / denom[valid]))
    excluded = metric.compute(exclude=(0,))
    keep = valid.copy()
    keep[0] = False
    assert excluded["mIoU"] == pytest.approx(100 * np.mean(tp[keep] / denom[keep]))
    with pytest.raises(ValueError):
        metric.update(np.zeros((2, 2)), np.full((2, 2), k))


def _brute_force(seg, gt, k, ignore):
    s = int(seg.max()) + 1
    valid = gt != ignore
    hist = np.zeros((s, k), np.int64)
    for a, b in zip(seg[valid], gt[valid]):
        hist[a, b] += 1
    present = [c for c in range(k) if hist[:, c].sum()]
    best, best_maps = -1, []
    n = min(s, len(present))
    for segs in itertools.permutations(range(s), n):
        for classes in itertools.permutations(present, n):
            total = sum(hist[a, b] for a, b in zip(segs, classes))
            mapping = dict(zip(segs, classes))
            if total > best:
                best, best_maps = total, [mapping]
            elif total == best and mapping not in best_maps:
                best_maps.append(mapping)
    return best, best_maps, hist


def test_hungarian_matches_brute_force():
    rng = _rng()
    checked_unique = 0
    for _ in range(40):
        k = int(rng.integers(2, 5))
        s = int(rng.integers(1, 5))
        shape = (int(rng.integers(2, 6)), int(rng.integers(2, 6)))
        seg = rng.integers(0, s, shape)
        seg.flat[: s] = np.arange(s)  # every segment id present
        gt = rng.integers(0, k, shape)
        gt[rng.random(shape) < 0.15] = 255
        best, maps, hist = _brute_force(seg, gt, k, 255)
        matched = match_segments_to_classes(seg, gt, k, 255)
        lut = {int(a): int(b) for a, b in zip(seg.ravel(), matched.ravel())}
        got = sum(hist[a, b] for a, b in lut.items() if b >= 0)
        assert got == best
        assert len({b for b in lut.values() if b >= 0}) == sum(b >= 0 for b in lut.values())  # one-to-one
        if len(maps) == 1:
            checked_unique += 1
            lut_ref = np.array([maps[0].get(a, -1) for a in range(s)])
            expected = lut_ref[seg]
            np.testing.assert_array_equal(matched, expected)
            # the DiffSeg TP/FP/FN of the unique optimum, accumulated by MeanIoU
            m = MeanIoU(k)
            m.update(matched, gt)
            tp, fp, fn = m.stats()
            ltp, lfp, lfn = _loop_iou([expected], [gt], k, 255)
            np.testing.assert_array_equal(tp, ltp)
            np.testing.assert_array_equal(fp, lfp)
            np.testing.assert_array_equal(fn, lfn)
    assert checked_unique > 5


def test_classnames_shipped():
    lengths = {"voc20": 20, "voc21": 21, "context59": 59, "ade150": 150, "cityscapes": 19, "coco-object": 81,
               "coco-stuff27": 27}
    for name, n in lengths.items():
        assert len(load_classnames(name)) == n
    assert load_classnames("voc21")[DATASETS["voc21"].background] == "background"
    assert load_classnames("coco-object")[DATASETS["coco-object"].background] == "background"


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_standard_layouts(tmp_path):
    rng = _rng()
    root = str(tmp_path)
    # context59: the image folder holds more images than there are labels
    spec = DATASETS["context59"]
    for i in range(4):
        _write(os.path.join(root, spec.images, f"2008_{i:06d}.jpg"), rng.integers(0, 255, (10, 12, 3), np.uint8))
    for i in (1, 3):
        _write(os.path.join(root, spec.labels, f"2008_{i:06d}.png"), rng.integers(0, 59, (10, 12), np.uint8))
    ds = SegDataset.standard("context59", root)
    assert [os.path.basename(p[0]) for p in ds.pairs] == ["2008_000001.jpg", "2008_000003.jpg"]
    items = list(ds)
    assert items[0][2].shape == (10, 12) and items[0][1].size == (12, 10)
    # cityscapes: per-city folders and train-id label names
    spec = DATASETS["cityscapes"]
    for city in ("frankfurt", "lindau"):
        stem = f"{city}_000000_000019"
        _write(os.path.join(root, spec.images, city, stem + "_leftImg8bit.png"),
               rng.integers(0, 255, (8, 16, 3), np.uint8))
        _write(os.path.join(root, spec.labels, city, stem + "_gtFine_labelTrainIds.png"),
               rng.integers(0, 19, (8, 16), np.uint8))
    ds = SegDataset.standard("cityscapes", root)
    assert len(ds) == 2 and all(p[0].endswith("_leftImg8bit.png") for p in ds.pairs)
    # out-of-range label ids are reported
    _write(os.path.join(root, "bad", "lab", "x.png"), np.full((4, 4), 30, np.uint8))
    _write(os.path.join(root, "bad", "img", "x.png"), np.zeros((4, 4, 3), np.uint8))
    with open(os.path.join(root, "names.json"), "w") as f:
        json.dump(["a", "b"], f)
    bad = SegDataset(os.path.join(root, "bad", "img"), os.path.join(root, "bad", "lab"),
                     load_classnames(os.path.join(root, "names.json")))
    with pytest.raises(ValueError, match="outside"):
        list(bad)
    with pytest.raises(FileNotFoundError):
        SegDataset.standard("ade150", root)
