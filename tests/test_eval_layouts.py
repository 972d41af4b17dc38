"""Benchmark trees written exactly as the Seg4Diff authors' registration reads them (cvlab-kaist/Seg4Diff
``register_*.py`` and detectron2's Cityscapes loader), with the extra files real trees hold: pairs found,
labels decoded, class names in order, a ground-truth predictor scoring 100 on exactly the classes present;
the earlier layout still read; a missing tree names the folders tried; and the paper / corrected rules of
the runner (COCO-Object prompting, the prompt from the resized labels, detectron2's mIoU, the unsupervised
top-left crop and the authors' Hungarian matching) against independent re-statements of the authors' code.

``write_authors_tree`` and the reference functions are shared with ``test_eval_presets.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seg4diff_fast import cli
from seg4diff_fast.evaluation import MeanIoU, SegDataset, evaluate, match_segments_to_classes
from seg4diff_fast.evaluation.datasets import DatasetNotFoundError
from seg4diff_fast.evaluation.paper_protocol import paper_unsupervised_labels

# ---------------------------------------------------------------------------------------------------------
# the authors' layouts, restated from their registration code (not from this package's registry)
VOC12, VOC10 = "VOCdevkit/VOC2012", "VOCdevkit/VOC2010"
AUTHORS = {  # dataset: (image folder, label folder, label suffix, image suffix, image extension)
    "voc20": (f"{VOC12}/JPEGImages", f"{VOC12}/annotations_detectron2/val", ".png", "", ".jpg"),
    "voc21": (f"{VOC12}/JPEGImages", f"{VOC12}/annotations_detectron2_bg/val", ".png", "", ".jpg"),
    "context59": (f"{VOC10}/JPEGImages", f"{VOC10}/annotations_detectron2/pc59_val", ".png", "", ".jpg"),
    "context59-bg": (f"{VOC10}/JPEGImages", f"{VOC10}/annotations_detectron2_bg/pc59_val", ".png", "", ".jpg"),
    "ade150": ("ADEChallengeData2016/images/validation", "ADEChallengeData2016/annotations_detectron2/validation",
               ".png", "", ".jpg"),
    "cityscapes": ("cityscapes/leftImg8bit/val", "cityscapes/gtFine/val", "_gtFine_labelTrainIds.png",
                   "_leftImg8bit", ".png"),
    "coco-object": ("coco/val2017", "coco/annotations_object/val2017", ".png", "", ".jpg"),
    "coco-stuff27": ("coco/val2017", "coco/annotations_27_detectron2/val2017", ".png", "", ".jpg"),
}
# number of classes, background id, and a few names at known ids (the authors' metadata / class JSONs)
FACTS = {
    "voc20": (20, None, {0: "aeroplane", 4: "bottle", 19: "tvmonitor"}),
    "voc21": (21, 20, {0: "aeroplane", 19: "tvmonitor", 20: "background"}),
    "context59": (59, None, {0: "aeroplane", 13: "car", 58: "wood"}),
    "context59-bg": (60, 0, {0: "background", 1: "aeroplane", 59: "wood"}),
    "ade150": (150, None, {0: "wall", 7: "bed ", 149: "flag"}),
    "cityscapes": (19, None, {0: "road", 13: "car", 18: "bicycle"}),
    "coco-object": (81, 0, {0: "background", 1: "person", 80: "toothbrush"}),
    "coco-stuff27": (27, None, {0: "electronic-things", 12: "ceiling-stuff", 26: "food-stuff"}),
}
OPEN_VOCAB = ("voc20", "coco-object", "context59", "ade150", "cityscapes")


def image_key(image) -> str:
    a = np.ascontiguousarray(np.asarray(image))
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


def _save(path: str, array: np.ndarray, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _blocks(rng, h, w, classes, ignore=True) -> np.ndarray:
    lab = np.full((h, w), classes[0], np.uint8)
    lab[: h // 2, : w // 2] = classes[1 % len(classes)]
    lab[h // 2:, w // 2:] = classes[2 % len(classes)]
    if ignore:
        lab[0, :] = 255
    return lab


def _image(root, rel, rng, h, w, **kw) -> np.ndarray:
    path = os.path.join(root, rel)
    _save(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), **kw)
    return np.asarray(Image.open(path).convert("RGB"))  # what a loader reads back (JPEG is lossy)


def write_authors_tree(root: str, rng, n: int = 2, size=(14, 24)) -> dict:
    """All eight datasets under ``root`` in the authors' layout. Returns ``{dataset: [(stem, image, labels)]}``
    (the decoded image and the uint8 labels written), in label-path order."""
    truth: dict[str, list] = {name: [] for name in AUTHORS}

    def hw():
        return int(rng.integers(size[0], size[1])), int(rng.integers(size[0], size[1]))

    # Pascal VOC 2012: raw 0 = background, 1..20 objects, 255 border; prepare_voc.py's two conversions
    for i in range(n):
        stem = f"2007_{i:06d}"
        h, w = hw()
        img = _image(root, f"{VOC12}/JPEGImages/{stem}.jpg", rng, h, w, quality=95)
        objects = [int(c) for c in rng.choice(np.arange(1, 21), 2, replace=False)]
        raw = _blocks(rng, h, w, [0] + objects if i % 2 == 0 else objects)
        no_bg = np.where(raw == 0, 255, np.where(raw == 255, 255, raw - 1)).astype(np.uint8)
        bg = np.where(raw == 0, 20, np.where(raw == 255, 255, raw - 1)).astype(np.uint8)
        _save(os.path.join(root, f"{VOC12}/annotations_detectron2/val/{stem}.png"), no_bg)
        _save(os.path.join(root, f"{VOC12}/annotations_detectron2_bg/val/{stem}.png"), bg)
        _save(os.path.join(root, f"{VOC12}/SegmentationClass/{stem}.png"), raw)  # the original, not read
        truth["voc20"].append((stem, img, no_bg))
        truth["voc21"].append((stem, img, bg))
    for extra in ("2008_000001", "2012_004000"):  # train / unlabelled images: JPEGImages holds them all
        _image(root, f"{VOC12}/JPEGImages/{extra}.jpg", rng, *hw())
    os.makedirs(os.path.join(root, f"{VOC12}/ImageSets/Segmentation"), exist_ok=True)
    with open(os.path.join(root, f"{VOC12}/ImageSets/Segmentation/val.txt"), "w") as f:
        f.write("\n".join(s for s, _, _ in truth["voc20"]) + "\n")

    # Pascal Context (VOC2010): raw 0 = background, 1..59; pc59_val maps 0 -> 255, k -> k - 1
    for i in range(n):
        stem = f"2008_{i:06d}"
        h, w = hw()
        img = _image(root, f"{VOC10}/JPEGImages/{stem}.jpg", rng, h, w, quality=95)
        raw = _blocks(rng, h, w, [0] + [int(c) for c in rng.choice(np.arange(1, 60), 2, replace=False)])
        pc59 = np.where(raw == 0, 255, np.where(raw == 255, 255, raw - 1)).astype(np.uint8)
        _save(os.path.join(root, f"{VOC10}/annotations_detectron2/pc59_val/{stem}.png"), pc59)
        _save(os.path.join(root, f"{VOC10}/annotations_detectron2_bg/pc59_val/{stem}.png"), raw)
        truth["context59"].append((stem, img, pc59))
        truth["context59-bg"].append((stem, img, raw))
    _image(root, f"{VOC10}/JPEGImages/2010_999999.jpg", rng, *hw())

    # ADE20K-150 (annotations_detectron2: 0..149, 255 = other); the original annotations/ sit beside
    for i in range(n):
        stem = f"ADE_val_{i + 1:08d}"
        h, w = hw()
        img = _image(root, f"ADEChallengeData2016/images/validation/{stem}.jpg", rng, h, w, quality=95)
        lab = _blocks(rng, h, w, [int(c) for c in rng.choice(150, 3, replace=False)])
        _save(os.path.join(root, f"ADEChallengeData2016/annotations_detectron2/validation/{stem}.png"), lab)
        _save(os.path.join(root, f"ADEChallengeData2016/annotations/validation/{stem}.png"),
              np.where(lab == 255, 0, lab + 1).astype(np.uint8))
        truth["ade150"].append((stem, img, lab))
    _image(root, "ADEChallengeData2016/images/training/ADE_train_00000001.jpg", rng, *hw())

    # Cityscapes: per-city folders; gtFine holds labelIds, color, instanceIds, polygons next to labelTrainIds
    for i in range(n):
        city = ("frankfurt", "lindau", "munster")[i % 3]
        stem = f"{city}_{i:06d}_000019"
        h, w = hw()
        img = _image(root, f"cityscapes/leftImg8bit/val/{city}/{stem}_leftImg8bit.png", rng, h, w)
        lab = _blocks(rng, h, w, [int(c) for c in rng.choice(19, 3, replace=False)])
        gt = f"cityscapes/gtFine/val/{city}/{stem}_gtFine"
        _save(os.path.join(root, gt + "_labelTrainIds.png"), lab)
        _save(os.path.join(root, gt + "_labelIds.png"), (lab.astype(np.int64) + 7).clip(0, 33).astype(np.uint8))
        _save(os.path.join(root, gt + "_color.png"), rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
        _save(os.path.join(root, gt + "_instanceIds.png"), (lab.astype(np.int32) * 1000 + 1).astype(np.uint16))
        with open(os.path.join(root, gt + "_polygons.json"), "w") as f:
            json.dump({"imgHeight": h, "imgWidth": w, "objects": []}, f)
        truth["cityscapes"].append((f"{stem}_leftImg8bit", img, lab))
    _image(root, "cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", rng, *hw())

    # COCO: annotations_object (0 = background, 1..80), annotations_27_detectron2 (0..26), one image with
    # background and one without; the 171-class annotations_detectron2 sits beside
    for i in range(n):
        stem = f"{i + 139:012d}"
        h, w = hw()
        img = _image(root, f"coco/val2017/{stem}.jpg", rng, h, w, quality=95)
        things = [int(c) for c in rng.choice(np.arange(1, 81), 2, replace=False)]
        obj = _blocks(rng, h, w, [0] + things if i % 2 == 0 else things, ignore=False)
        _save(os.path.join(root, f"coco/annotations_object/val2017/{stem}.png"), obj)
        s27 = _blocks(rng, h, w, [int(c) for c in rng.choice(27, 3, replace=False)])
        _save(os.path.join(root, f"coco/annotations_27_detectron2/val2017/{stem}.png"), s27)
        _save(os.path.join(root, f"coco/annotations_detectron2/val2017/{stem}.png"),
              rng.integers(0, 171, (h, w), dtype=np.uint8))
        truth["coco-object"].append((stem, img, obj))
        truth["coco-stuff27"].append((stem, img, s27))
    _image(root, "coco/val2017/000000999999.jpg", rng, *hw())
    return truth


# ---------------------------------------------------------------------------------------------------------
# a predictor that returns the ground truth through the interface evaluate() uses
class GroundTruthSegmenter:
    """Open-vocab: each pixel gets the prompted class its ground truth names (0 where the ground truth's
    class is not prompted); unsupervised: one segment per ground-truth value. Records the class lists."""

    def __init__(self, items, names, protocol="paper", short_side=None):
        self.truth = {image_key(img): lab.astype(np.int64) for _, img, lab in items}
        self.names = list(names)
        self.protocol = protocol
        self.short_side = short_side
        self.layers, self.num_layers = (0,), 1
        self.calls: list[list[str]] = []

    def __call__(self, images, classes, per_layer=False, layers=None):
        out = []
        for image, names in zip(images, classes):
            self.calls.append(list(names))
            gt = self.truth[image_key(image)]
            label_map = np.zeros(gt.shape, np.int64)
            for i, name in enumerate(names):
                label_map[gt == self.names.index(name)] = i
            out.append(SimpleNamespace(label_map=label_map))
        return out

    def unsupervised(self, images, per_layer=False, layers=None, **kw):
        out = []
        for image in images:
            gt = self.truth[image_key(image)]
            values, label_map = np.unique(gt, return_inverse=True)
            out.append(SimpleNamespace(label_map=label_map.reshape(gt.shape), num_segments=len(values)))
        return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("authors_tree"))
    return root, write_authors_tree(root, np.random.default_rng(np.random.SeedSequence().entropy))


@pytest.mark.parametrize("name", list(AUTHORS))
def test_authors_layout_pairs_labels_names(tree, name):
    root, truth = tree
    ds = SegDataset.standard(name, root)
    images, labels, label_suffix, _, ext = AUTHORS[name]
    assert [os.path.relpath(p[1], os.path.join(root, labels)).replace(os.sep, "/").split("/")[-1]
            for p in ds.pairs] == [f"{s.removesuffix('_leftImg8bit')}{label_suffix}" for s, _, _ in truth[name]]
    assert all(p[0].startswith(os.path.join(root, images)) and p[0].endswith(ext) for p in ds.pairs)
    got = list(ds)
    assert len(got) == len(truth[name])  # unlabelled images skipped, the other gtFine files not read
    for (stem, img, lab), (g_stem, g_img, g_lab) in zip(truth[name], got):
        assert g_stem == stem
        np.testing.assert_array_equal(np.asarray(g_img), img)
        np.testing.assert_array_equal(g_lab, lab.astype(np.int64))
    k, bg, spots = FACTS[name]
    assert len(ds.classes) == k and ds.background == bg
    for i, n in spots.items():
        assert ds.classes[i] == n


@pytest.mark.parametrize("name", list(AUTHORS))
@pytest.mark.parametrize("variant", ["paper", "corrected"])
def test_ground_truth_predictor_scores_100_on_present_classes(tree, name, variant):
    root, truth = tree
    ds = SegDataset.standard(name, root)
    k, bg, _ = FACTS[name]
    present = set()
    for _, _, lab in truth[name]:
        present |= {int(c) for c in np.unique(lab) if c != 255}
    # open-vocabulary: background (if any) excluded
    seg = GroundTruthSegmenter(truth[name], ds.classes, variant, short_side=640)
    res = evaluate(seg, ds, protocol="open-vocab", progress=False)
    assert res["segmenter_protocol"] == variant and res["images"] == len(truth[name])
    scored = present - {bg}
    assert res["mIoU"] == pytest.approx(100.0)
    assert {n for n, v in res["per_class"].items() if v is not None} == {ds.classes[c] for c in scored}
    assert all(v == pytest.approx(100.0) for v in res["per_class"].values() if v is not None)
    assert res["excluded"] == ([] if bg is None else [ds.classes[bg]])
    # unsupervised (corrected matching: one segment per class): background included
    seg = GroundTruthSegmenter(truth[name], ds.classes, "corrected")
    res = evaluate(seg, ds, protocol="unsupervised", progress=False)
    assert res["mIoU"] == pytest.approx(100.0)
    assert {n for n, v in res["per_class"].items() if v is not None} == {ds.classes[c] for c in present}


def test_legacy_layout_still_read(tmp_path):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    root = str(tmp_path)
    written = {}
    for rel_img, rel_lab, name in ((f"{VOC12}/images_detectron2/val", f"{VOC12}/annotations_detectron2/val", "voc20"),
                                   ("coco/val2017", "coco/annotations_detectron2/object_val2017", "coco-object"),
                                   ("coco/val2017", "coco/annotations_detectron2/stuff27_val2017", "coco-stuff27")):
        img = _image(root, f"{rel_img}/x{name}.jpg", rng, 10, 12, quality=95)
        lab = _blocks(rng, 10, 12, [1, 2, 3])
        _save(os.path.join(root, rel_lab, f"x{name}.png"), lab)
        written[name] = (img, lab)
    for name, (img, lab) in written.items():
        ds = SegDataset.standard(name, root)
        assert len(ds) == 1
        _, g_img, g_lab = next(iter(ds))
        np.testing.assert_array_equal(g_lab, lab)
        np.testing.assert_array_equal(np.asarray(g_img), img)
    # the authors' folder wins when both exist
    _image(root, f"{VOC12}/JPEGImages/xvoc20.jpg", rng, 10, 12)
    assert SegDataset.standard("voc20", root).pairs[0][0].endswith(f"{VOC12}/JPEGImages/xvoc20.jpg")


def test_missing_tree_names_the_folders_tried(tmp_path, capsys):
    root = str(tmp_path / "empty")
    os.makedirs(root)
    for name in AUTHORS:
        with pytest.raises(DatasetNotFoundError) as err:
            SegDataset.standard(name, root)
        images, labels = AUTHORS[name][:2]
        for rel in (images, labels):
            assert os.path.join(root, rel) in err.value.tried and os.path.join(root, rel) in str(err.value)
        assert "--root" in str(err.value) and "--images" in str(err.value)
    with pytest.raises(DatasetNotFoundError) as err:  # the earlier names are listed too
        SegDataset.standard("voc20", root)
    assert os.path.join(root, f"{VOC12}/images_detectron2/val") in err.value.tried
    rc = cli.main(["eval", "--dataset", "coco-object", "--root", root, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("seg4diff-fast eval: error: coco-object")
    for rel in ("coco/val2017", "coco/annotations_object/val2017", "coco/annotations_detectron2/object_val2017"):
        assert os.path.join(root, rel) in err


def test_label_without_image_is_an_error(tmp_path):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    root = str(tmp_path)
    truth = write_authors_tree(root, rng, n=3)
    stem = truth["ade150"][1][0]
    os.remove(os.path.join(root, f"ADEChallengeData2016/images/validation/{stem}.jpg"))
    with pytest.raises(FileNotFoundError, match=f"{stem}.png"):
        SegDataset.standard("ade150", root)


# ---------------------------------------------------------------------------------------------------------
# prompting rules
def d2_resize_shape(h: int, w: int, short: int, max_size: int = 2560) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge.get_output_shape, restated."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def authors_gt_indices(lab: np.ndarray, short: int | None) -> list[int]:
    """get_gt_indices on the mapper's resized labels: bincount()[:171].nonzero()."""
    if short is not None:
        nh, nw = d2_resize_shape(*lab.shape, short)
        lab = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    return [int(c) for c in np.flatnonzero(np.bincount(lab.ravel().astype(np.int64))[:171])]


def test_coco_object_background_prompt_paper_vs_corrected(tree):
    root, truth = tree
    ds = SegDataset.standard("coco-object", root)
    for variant in ("paper", "corrected"):
        seg = GroundTruthSegmenter(truth["coco-object"], ds.classes, variant, short_side=640)
        evaluate(seg, ds, protocol="open-vocab", progress=False)
        assert len(seg.calls) == len(truth["coco-object"])
        for (_, _, lab), got in zip(truth["coco-object"], seg.calls):
            if variant == "paper":
                expected = [ds.classes[c] for c in authors_gt_indices(lab, 640)]
            else:
                expected = [ds.classes[c] for c in sorted(set(np.unique(lab).tolist()) | {0}) if c != 255]
            assert got == expected
        with_bg = [("background" in c) for c in seg.calls]
        assert with_bg == ([True, False] if variant == "paper" else [True, True])


def test_paper_prompt_follows_the_resized_labels(tmp_path):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    h, w = 40, 60
    lab = _blocks(rng, h, w, [3, 5, 7], ignore=False)
    lab[int(rng.integers(1, h)), int(rng.integers(1, w))] = 9  # one pixel: gone at short side 8 (most of the time)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    _save(str(tmp_path / "img" / "a.png"), img)
    _save(str(tmp_path / "lab" / "a.png"), lab)
    names = [f"class{i}" for i in range(10)]
    ds = SegDataset(str(tmp_path / "img"), str(tmp_path / "lab"), names)
    items = [("a", img, lab)]
    for short in (8, 20):
        paper = GroundTruthSegmenter(items, names, "paper", short_side=short)
        corrected = GroundTruthSegmenter(items, names, "corrected", short_side=short)
        r_paper = evaluate(paper, ds, progress=False)
        r_corr = evaluate(corrected, ds, progress=False)
        expected = authors_gt_indices(lab, short)
        assert paper.calls == [[names[c] for c in expected]]
        assert corrected.calls == [[names[c] for c in (3, 5, 7, 9)]]
        assert r_corr["mIoU"] == pytest.approx(100.0)
        if 9 not in expected:  # its pixel went to another prompted class: a false negative of class 9
            assert r_paper["per_class"]["class9"] == 0.0 and r_paper["mIoU"] < 100.0
        else:
            assert r_paper["mIoU"] == pytest.approx(100.0)


def test_paper_miou_counts_classes_with_ground_truth_only(tmp_path):
    """detectron2's SemSegEvaluator: a class predicted but never in the ground truth does not enter the mean."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    img = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    lab = np.zeros((8, 10), np.uint8)
    lab[:, 5:] = 1
    _save(str(tmp_path / "img" / "a.png"), img)
    _save(str(tmp_path / "lab" / "a.png"), lab)
    names = ["a", "b", "c"]
    ds = SegDataset(str(tmp_path / "img"), str(tmp_path / "lab"), names)

    class Wrong(GroundTruthSegmenter):  # predicts "c" (never in the ground truth) on the first column
        def __call__(self, images, classes, per_layer=False, layers=None):
            out = super().__call__(images, classes)
            out[0].label_map[:, 0] = classes[0].index("c")
            return out

    res = {v: evaluate(Wrong([("a", img, lab)], names, v), ds, gt_only=False, progress=False)
           for v in ("paper", "corrected")}
    iou_a = 100 * 32 / 40  # class a: 5 columns of 8 pixels, the first one lost to "c"
    assert res["paper"]["per_class"] == {"a": pytest.approx(iou_a), "b": 100.0, "c": None}
    assert res["corrected"]["per_class"] == {"a": pytest.approx(iou_a), "b": 100.0, "c": 0.0}
    assert res["paper"]["mIoU"] == pytest.approx((iou_a + 100) / 2)
    assert res["corrected"]["mIoU"] == pytest.approx((iou_a + 100) / 3)


# ---------------------------------------------------------------------------------------------------------
# the unsupervised scorer: the authors' evaluator restated
def authors_unsupervised_reference(segments: torch.Tensor, working, original) -> np.ndarray:
    """Seg4DiffUnsup.forward's sem_seg_postprocess to (H, W), then test_unsupervised's to the resized size."""
    x = segments.float()[:, : working[0], : working[1]]
    x = F.interpolate(x[None], size=tuple(original), mode="bilinear", align_corners=False)[0]
    x = x[:, : working[0], : working[1]]
    x = F.interpolate(x[None], size=tuple(working), mode="bilinear", align_corners=False)[0]
    return x.argmax(0).numpy()


def authors_hungarian_reference(pred, label, n_class):
    """train_net.py's _fast_hist + hungarian_matching for one image: (tp, fp, fn)."""
    from scipy.optimize import linear_sum_assignment

    label_true, label_pred = label.flatten().astype(np.int64), pred.flatten().astype(np.int64)
    pred_n_class = np.maximum(n_class, label_pred.max() + 1)
    mask = (label_true >= 0) & (label_true < n_class)
    hist = np.bincount(pred_n_class * label_true[mask] + label_pred[mask],
                       minlength=n_class * pred_n_class).reshape(n_class, pred_n_class)
    row_ind, col_ind = linear_sum_assignment(hist, maximize=True)
    fn = np.sum(hist, 1) - hist[row_ind, col_ind]
    tp = hist[row_ind, col_ind]
    hist = hist[:, col_ind]
    fp = np.sum(hist, 0) - np.diag(hist)
    return tp, fp, fn


def authors_miou(tps, fps, fns) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = sum(tps) / (sum(tps) + sum(fps) + sum(fns))
    return float(np.nanmean(iou) * 100)


def test_paper_unsupervised_labels_match_the_authors_resizes():
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    for working, original in (((16, 24), (40, 60)), ((32, 20), (12, 8)), ((16, 16), (16, 16)), ((6, 9), (6, 9))):
        seg = torch.from_numpy(rng.random((11, 8, 8)).astype(np.float32))
        ref = authors_unsupervised_reference(seg, working, original)
        np.testing.assert_array_equal(paper_unsupervised_labels(seg, working, original, chunk=4), ref)
    # a larger original: the prediction is the top-left region, not the whole image resized
    seg = torch.zeros(2, 8, 8)
    seg[1, :, 4:] = 1.0
    whole = authors_unsupervised_reference(seg, (16, 24), (16, 24))
    cropped = paper_unsupervised_labels(seg, (16, 24), (40, 60))
    assert whole[:, -1].all() and not cropped.any()


class RandomSegments:
    """Unsupervised results with random token-grid segments; label_map as the segmenter makes it: corrected,
    upsampled to the padded working size and cropped back; paper, the whole grid at the original size."""

    def __init__(self, protocol, short_side, seed):
        self.protocol, self.short_side = protocol, short_side
        self.layers, self.num_layers = (0,), 1
        self.rng = np.random.default_rng(seed)
        self.seen = []

    def unsupervised(self, images, per_layer=False, layers=None, **kw):
        out = []
        for image in images:
            h0, w0 = np.asarray(image).shape[:2]
            h, w = d2_resize_shape(h0, w0, self.short_side)
            ph, pw = h + (-h) % 32, w + (-w) % 32
            s = int(self.rng.integers(2, 9))
            segments = torch.from_numpy(self.rng.random((s, 8, 8)).astype(np.float32))
            if self.protocol == "paper":
                up = F.interpolate(segments[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
                label_map = up.argmax(0).numpy()
            else:
                up = F.interpolate(segments[None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
                label_map = up.argmax(0)[:h, :w].numpy()
            self.seen.append((segments, (h, w), (h0, w0)))
            out.append(SimpleNamespace(label_map=label_map, segments=segments, num_segments=s))
        return out


@pytest.mark.parametrize("name", ["cityscapes", "context59-bg"])
def test_unsupervised_paper_vs_corrected_scoring(tree, name):
    root, truth = tree
    ds = SegDataset.standard(name, root)
    seed = int(np.random.SeedSequence().entropy % 2**31)
    short = 10  # smaller than the images: the resize shrinks them, so the authors' crop keeps a corner
    results = {}
    for variant in ("paper", "corrected"):
        fake = RandomSegments(variant, short, seed)
        results[variant] = evaluate(fake, ds, protocol="unsupervised", progress=False)
        tps, fps, fns, m = [], [], [], MeanIoU(len(ds.classes))
        for (segments, working, original), (_, _, lab) in zip(fake.seen, truth[name]):
            g = np.asarray(Image.fromarray(lab).resize(working[::-1], Image.NEAREST)).astype(np.int64)
            if variant == "paper":
                n_class = 59 if name == "context59-bg" else len(ds.classes)  # their class JSON's length
                tp, fp, fn = authors_hungarian_reference(authors_unsupervised_reference(segments, working, original),
                                                         g, n_class)
                tps.append(tp)
                fps.append(fp)
                fns.append(fn)
            else:
                up = F.interpolate(segments[None], size=(working[0] + (-working[0]) % 32,
                                                         working[1] + (-working[1]) % 32),
                                   mode="bilinear", align_corners=False)[0].argmax(0)[: working[0], : working[1]]
                m.update(match_segments_to_classes(up.numpy(), g, len(ds.classes), 255, segments.shape[0]), g)
        expected = authors_miou(tps, fps, fns) if variant == "paper" else m.compute()["mIoU"]
        assert results[variant]["mIoU"] == pytest.approx(expected, abs=1e-3)
        assert results[variant]["segmenter_protocol"] == variant
    if name == "context59-bg":  # the authors count labels below 59 only: "wood" (59) is not scored
        assert results["paper"]["excluded"] == ["wood"] and "wood" not in results["paper"]["per_class"]
        assert results["corrected"]["excluded"] == [] and "wood" in results["corrected"]["per_class"]
