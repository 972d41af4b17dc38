"""``seg4diff-fast eval`` end to end: datasets written in the standard layouts, a tiny SD3 pipeline saved
with save_pretrained and loaded back through --model, results.json checked against an independent
evaluation built from the segmenter and MeanIoU directly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast import MeanIoU, Seg4DiffSegmenter, cli
from seg4diff_fast.evaluation import DATASETS, load_classnames, match_segments_to_classes
from seg4diff_fast.models import load_pipeline
from seg4diff_fast.testing import tiny_sd3_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    path = str(tmp_path_factory.mktemp("tiny_sd3"))
    tiny_sd3_pipeline(num_layers=3, t5=False, seed=int(np.random.SeedSequence().entropy % 1000)).save_pretrained(path)
    return path


def _write_dataset(root, name, n, num_classes, rng, background=None):
    spec = DATASETS[name]
    items = []
    for i in range(n):
        h, w = int(rng.integers(16, 30)), int(rng.integers(16, 30))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        classes = rng.choice(num_classes, size=int(rng.integers(1, 4)), replace=False)
        lab = np.full((h, w), classes[0], np.uint8)
        lab[: h // 2, : w // 2] = classes[-1]
        lab[h // 2:, w // 3:] = classes[len(classes) // 2]
        lab[rng.random((h, w)) < 0.1] = 255
        if background is not None:
            lab[:2] = background
        os.makedirs(os.path.join(root, spec.images), exist_ok=True)
        os.makedirs(os.path.join(root, spec.labels), exist_ok=True)
        Image.fromarray(img).save(os.path.join(root, spec.images, f"img{i:03d}.jpg"), quality=95)
        Image.fromarray(lab).save(os.path.join(root, spec.labels, f"img{i:03d}.png"))
        # what the loader will read back (JPEG is lossy)
        items.append((np.asarray(Image.open(os.path.join(root, spec.images, f"img{i:03d}.jpg")).convert("RGB")), lab))
    return items


def _open_vocab_reference(seg, items, names, k, background=None, layer=None):
    m = MeanIoU(k)
    for img, lab in items:
        gt = lab.astype(np.int64)
        ids = sorted(int(c) for c in np.unique(gt) if c != 255)
        if background is not None and background not in ids:
            ids = sorted(ids + [background])
        res = seg(img, [names[i] for i in ids], layers=layer)
        pred = np.asarray(ids)[res.label_map]
        m.update(pred, gt if background is None else np.where(gt == background, 255, gt))
    return m.compute(() if background is None else (background,))


def _run(args):
    return cli.main(["eval", "--no-progress", "--resolution", "32", *args])


def test_eval_open_vocab_and_layer_sweep(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    root = str(tmp_path / "datasets")
    items = _write_dataset(root, "voc20", 3, 20, rng)
    out = str(tmp_path / "res" / "results.json")
    assert _run(["--dataset", "voc20", "--root", root, "--model", model_dir, "--layers", "1", "--out", out]) == 0
    result = json.load(open(out))
    assert {"dataset", "mIoU", "per_class", "layer", "model", "protocol", "images"} <= set(result)
    assert result["dataset"] == "voc20" and result["images"] == 3 and result["layer"] == 1
    assert result["protocol"] == "open-vocab" and result["prompt"] == "gt-only" and result["model"] == model_dir
    names = load_classnames("voc20")
    assert list(result["per_class"]) == names
    seg = Seg4DiffSegmenter(load_pipeline(model_dir), layer=1, resolution=32, short_side=640)
    ref = _open_vocab_reference(seg, items, names, 20)
    assert result["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-3)
    for name, iou in zip(names, ref["IoU"]):
        assert (result["per_class"][name] is None) == np.isnan(iou)
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "aeroplane" in printed

    # --layers all: every layer in one pass per image
    out_all = str(tmp_path / "all.json")
    assert _run(["--dataset", "voc20", "--root", root, "--model", model_dir, "--layers", "all", "--limit", "2",
                 "--out", out_all]) == 0
    sweep = json.load(open(out_all))
    assert sweep["images"] == 2 and set(sweep["per_layer"]) == {"0", "1", "2"}
    for layer in range(3):
        ref = _open_vocab_reference(seg, items[:2], names, 20, layer=layer)
        assert sweep["per_layer"][str(layer)] == pytest.approx(ref["mIoU"], abs=1e-3)
    assert sweep["mIoU"] == max(v for v in sweep["per_layer"].values())
    assert "mIoU per layer" in capsys.readouterr().out


def test_eval_background_unsupervised_and_folder(model_dir, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    root = str(tmp_path / "datasets")
    items = _write_dataset(root, "voc21", 3, 21, rng, background=20)
    names = load_classnames("voc21")
    pipe = load_pipeline(model_dir)

    # voc21 defaults to the unsupervised protocol: Hungarian matching per image, background included
    out = str(tmp_path / "unsup.json")
    assert _run(["--dataset", "voc21", "--root", root, "--model", model_dir, "--layers", "2",
                 "--pre-resize", "0", "--corrected", "--out", out]) == 0
    result = json.load(open(out))
    assert result["protocol"] == "unsupervised" and "background" in result["per_class"]
    seg = Seg4DiffSegmenter(pipe, layer=2, resolution=32, protocol="corrected")
    m = MeanIoU(21)
    for img, lab in items:
        res = seg.unsupervised(img)
        m.update(match_segments_to_classes(res.label_map, lab, 21, 255, res.num_segments), lab)
    assert result["mIoU"] == pytest.approx(m.compute()["mIoU"], abs=1e-3)

    # open-vocab on a dataset with background: prompted, its pixels not scored, excluded from the mean
    out = str(tmp_path / "ov.json")
    assert _run(["--dataset", "voc21", "--protocol", "open-vocab", "--root", root, "--model", model_dir,
                 "--layers", "1", "--out", out]) == 0
    result = json.load(open(out))
    assert result["excluded"] == ["background"] and "background" not in result["per_class"]
    ref = _open_vocab_reference(Seg4DiffSegmenter(pipe, layer=1, resolution=32, short_side=640), items, names, 21,
                                background=20)
    assert result["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-3)

    # a user's own folder, all classes prompted
    spec = DATASETS["voc21"]
    classes = str(tmp_path / "classes.json")
    json.dump(names, open(classes, "w"))
    out = str(tmp_path / "folder.json")
    assert _run(["--dataset", "folder", "--images", os.path.join(root, spec.images), "--labels",
                 os.path.join(root, spec.labels), "--classes", classes, "--no-gt-only-prompt", "--model", model_dir,
                 "--layers", "1", "--limit", "1", "--out", out]) == 0
    result = json.load(open(out))
    assert result["images"] == 1 and result["prompt"] == "all-classes" and len(result["per_class"]) == 21

    # errors: one line, exit 2
    capsys.readouterr()
    assert _run(["--dataset", "ade150", "--root", root, "--model", model_dir, "--out", out]) == 2
    assert _run(["--dataset", "voc21", "--root", root, "--model", model_dir, "--layers", "7", "--out", out]) == 2
    import seg4diff_fast.shapes.shipped as shipped

    monkeypatch.setattr(shipped, "WEIGHTS_DIR", str(tmp_path / "no_weights"))
    assert _run(["--dataset", "voc21", "--root", root, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("seg4diff-fast eval: error:") for line in err)
    assert "out of range" in err[1] and "--model PATH" in err[2]
