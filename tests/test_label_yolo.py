"""``label --format yolo-seg``: polygons from label maps, rasterized back the way Ultralytics draws its masks
(``cv2.fillPoly`` of the denormalized coordinates), against the masks they came from.

The round trip's threshold: Douglas–Peucker with tolerance ε keeps every point of the simplified polygon
within ε of the traced boundary, so the area between the two — the pixels that change — is at most
ε × L, L the boundary's length (outer boundaries and holes; pieces and holes dropped for being under ε²
square pixels lie inside that band too). Hence the test's bound |A Δ B| ≤ ε·L for every class mask, i.e.
IoU ≥ 1 − ε·L / |A ∪ B| (a 40-pixel disc at ε = 1: L ≈ 125, A ≈ 1250, IoU ≥ 0.9), and at ε = 0 equality:
every corner of the traced boundary is kept and holes are bridged along cuts over the piece's own pixels.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from seg4diff_fast import Seg4DiffSegmenter, cli, label_images
from seg4diff_fast.label.yolo import encode_yolo, mask_polygons, polygons_to_mask, read_yolo, yolo_label_path
from seg4diff_fast.models import load_pipeline
from seg4diff_fast.testing import tiny_sd3_pipeline

try:  # the export's optional dependency (pip install 'seg4diff-fast[label]'); only the last test runs without it
    import cv2
except ImportError:
    cv2 = None
needs_cv2 = pytest.mark.skipif(cv2 is None, reason="OpenCV (opencv-python-headless) is not installed")


def _label_maps(rng, n: int, smooth=(0.7, 5.0)):
    """Random label maps: smoothed noise argmax (several pieces per class, holes, thin parts)."""
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(12, 90, 2))
        k = int(rng.integers(2, 6))
        sigma = rng.uniform(*smooth)
        yield ndimage.gaussian_filter(rng.random((k, h, w)), (0, sigma, sigma)).argmax(0), k


def _boundary_length(mask: np.ndarray) -> float:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    return sum(cv2.arcLength(c, True) for c in contours) + len(contours)


def _check_format(text: str, num_classes: int) -> list[tuple[int, np.ndarray]]:
    """Ultralytics' segmentation format: ``class x1 y1 x2 y2 ...``, ≥ 3 points, coordinates in [0, 1]."""
    for line in text.splitlines():
        values = line.split()
        assert values[0].isdigit() and 0 <= int(values[0]) < num_classes, line
        assert len(values) % 2 == 1 and len(values) >= 7, line
        assert all(0.0 <= float(v) <= 1.0 for v in values[1:]), line
    return read_yolo(text)


@needs_cv2
def test_round_trip_is_exact_at_zero_tolerance():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    for labels, k in _label_maps(rng, 60):
        h, w = labels.shape
        lines = _check_format(encode_yolo(labels, k, tolerance=0).decode(), k)
        for c in range(k):
            got = polygons_to_mask([p for cc, p in lines if cc == c], h, w)
            np.testing.assert_array_equal(got, labels == c, err_msg=f"seed {seed}, class {c}")


@needs_cv2
@pytest.mark.parametrize("tolerance", [1.0, 2.0])
def test_round_trip_is_within_the_tolerance(tolerance):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    for labels, k in _label_maps(rng, 40):
        h, w = labels.shape
        lines = _check_format(encode_yolo(labels, k, tolerance).decode(), k)
        for c in range(k):
            mask = labels == c
            if not mask.any():
                continue
            got = polygons_to_mask([p for cc, p in lines if cc == c], h, w)
            changed = int((got != mask).sum())
            assert changed <= tolerance * _boundary_length(mask), (seed, c, changed)
    # a smooth blob: the bound gives IoU >= 0.9, and simplification does shrink the file
    yy, xx = np.mgrid[:100, :100]
    disc = (yy - 50) ** 2 + (xx - 45) ** 2 <= 40**2
    (poly,) = mask_polygons(disc, tolerance)
    got = polygons_to_mask([poly / [100, 100]], 100, 100)
    assert (got & disc).sum() / (got | disc).sum() >= 0.9
    assert len(poly) < len(mask_polygons(disc, 0)[0]) / 2


@needs_cv2
def test_holes_and_pieces():
    """A ring is one line, its hole bridged in (and empty when drawn); each piece of a class is its own line
    (an island inside the hole too); at 1 px a lone pixel is dropped."""
    labels = np.zeros((40, 50), np.int64)
    labels[5:30, 5:30] = 1
    labels[12:20, 12:20] = 0  # hole
    labels[14:18, 14:18] = 1  # island in the hole: a piece of its own
    labels[33:38, 40:48] = 1  # another piece
    labels[2, 45] = 1  # a lone pixel
    labels[25:27, 24:26] = 0  # a small hole
    lines = _check_format(encode_yolo(labels, 2, tolerance=0).decode(), 2)
    assert sum(c == 1 for c, _ in lines) == 4
    np.testing.assert_array_equal(polygons_to_mask([p for c, p in lines if c == 1], 40, 50), labels == 1)
    lines = _check_format(encode_yolo(labels, 2, tolerance=1).decode(), 2)
    assert sum(c == 1 for c, _ in lines) == 3  # the lone pixel is gone
    got = polygons_to_mask([p for c, p in lines if c == 1], 40, 50)
    assert not got[13:19, 13].any() and not got[13, 13:19].any()  # the hole stays empty (beyond the 1 px band)
    assert got[14:18, 14:18].all() and got[34:37, 41:47].all() and got[6:11, 6:28].all()
    # the background has a hole where the square is: bridged, and empty when drawn
    assert not polygons_to_mask([p for c, p in lines if c == 0], 40, 50)[6:11, 6:28].any()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    path = str(tmp_path_factory.mktemp("tiny_sd3"))
    tiny_sd3_pipeline(num_layers=3, t5=False).save_pretrained(path)
    return path


def _images(root, n: int):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    rels = []
    for i in range(n):
        rel = f"{'sub/' if i % 2 else ''}im{i}.{'jpg' if i % 2 else 'png'}"
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        h, w = (int(v) for v in rng.integers(20, 60, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, rel))
        rels.append(rel)
    return rels


@needs_cv2
def test_label_cli_writes_an_ultralytics_dataset(model_dir, tmp_path, capsys):
    root = str(tmp_path / "in")
    rels = _images(root, 4)
    out = str(tmp_path / "out")
    classes = ["cat", "dog", "sky"]
    argv = ["label", "--images", root, "--classes", ",".join(classes), "--out", out, "--model", model_dir,
            "--layer", "1", "--resolution", "32", "--no-progress", "--format", "yolo-seg", "--coco",
            "--yolo-tolerance", "0"]
    assert cli.main(argv) == 0
    info = json.load(open(os.path.join(out, "labels.json")))
    assert info["formats"] == ["png", "coco", "yolo-seg"] and info["yolo_tolerance"] == 0
    assert os.path.isfile(os.path.join(out, "coco.json"))
    yolo = os.path.join(out, "yolo")
    assert open(os.path.join(yolo, "classes.txt")).read().splitlines() == classes
    data = open(os.path.join(yolo, "data.yaml")).read()
    assert f'path: "{os.path.abspath(yolo)}"' in data and "train: images" in data and "nc: 3" in data
    assert all(f'  {k}: "{c}"' in data for k, c in enumerate(classes))
    for rel in rels:
        labels = np.array(Image.open(os.path.join(out, os.path.splitext(rel)[0] + ".png")))
        lines = _check_format(open(yolo_label_path(out, rel)).read(), len(classes))
        for c in range(len(classes)):
            got = polygons_to_mask([p for cc, p in lines if cc == c], *labels.shape)
            np.testing.assert_array_equal(got, labels == c)
        link = os.path.join(yolo, "images", rel)  # Ultralytics: images/<rel> pairs with labels/<rel stem>.txt
        assert os.path.samefile(link, os.path.join(root, rel))
    # resumed with the same export: everything complete; with another tolerance: refused
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 0
    assert " 0 labeled, 4 already done" in capsys.readouterr().out
    assert cli.main([*argv[:-1], "1", "--resume"]) == 2
    assert "tolerance" in capsys.readouterr().err


@needs_cv2
def test_yolo_export_from_the_api_and_resume_adds_it(model_dir, tmp_path):
    seg = Seg4DiffSegmenter(load_pipeline(model_dir), layer=1, resolution=32)
    root = str(tmp_path / "in")
    rels = _images(root, 3)
    out = str(tmp_path / "out")
    label_images(root, ["cat", "sky"], out, segmenter=seg, workers=0, progress=False)
    assert not os.path.exists(os.path.join(out, "yolo"))
    s = label_images(root, ["cat", "sky"], out, segmenter=seg, workers=0, progress=False, resume=True, yolo=True)
    assert s.labeled == 3  # the .txt files were missing: the images are redone
    assert all(os.path.isfile(yolo_label_path(out, r)) for r in rels)


def test_yolo_without_opencv_is_a_clear_error(model_dir, tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "in")
    _images(root, 1)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 → ImportError
    out = tmp_path / "out"
    with pytest.raises(ImportError, match=r"pip install 'seg4diff-fast\[label\]'"):
        label_images(root, ["cat"], str(out), model=model_dir, workers=0, progress=False, yolo=True)
    assert cli.main(["label", "--images", root, "--classes", "cat", "--out", str(out), "--model", model_dir,
                     "--format", "png,yolo-seg", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "opencv-python-headless" in err[0] and err[0].startswith("seg4diff-fast label: error:")
    assert not out.exists()
