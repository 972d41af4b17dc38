"""MAGNET training data sources: tiny COCO / SA-1B folders in the real formats, ShapesWorld determinism."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from seg4diff_fast.label.coco import rle_encode
from seg4diff_fast.magnet.data import (
    SPEC_FORMS,
    CocoMagnetData,
    MagnetSample,
    SA1BMagnetData,
    ShapesMagnetData,
    collate_magnet,
    first_sentences,
    open_magnet_data,
)
from seg4diff_fast.shapes import ShapesWorld


def _rle_str(mask: np.ndarray) -> dict:
    """Compressed RLE as COCO / SA-1B store it (counts as a str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _image(path, w: int, h: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), (10, 20, 30)).save(path)


def _write_json(path, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


# ------------------------------------------------------------------------------------------------- COCO

H1, W1 = 8, 10
POLY_GT = _box(H1, W1, 1, 4, 2, 6)  # polygon (2,1)-(6,1)-(6,4)-(2,4): pixels x 2..5, y 1..3
PERSON2_GT = _box(H1, W1, 5, 8, 0, 3)  # uncompressed RLE
CAR_GT = np.zeros((H1, W1), bool)
CAR_GT[2:7, 6:9] = True
CAR_GT[0, 0] = True
CROWD_GT = _box(H1, W1, 6, 8, 5, 10)
CROWD3_GT = _box(6, 6, 0, 3, 0, 6)


def _coco(root, *, categories=None, image_dir="val2017", extra_anns=()) -> str:
    cats = categories or [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 5, "name": "traffic light"}]
    images = [
        {"id": 1, "file_name": "a.png", "width": W1, "height": H1},
        {"id": 2, "file_name": "b.png", "width": 12, "height": 6},  # no annotation
        {"id": 3, "file_name": "c.png", "width": 6, "height": 6},  # only a crowd annotation
        {"id": 4, "file_name": "missing.png", "width": 6, "height": 6},  # annotated, file missing
    ]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 3, "segmentation": _rle_str(CAR_GT), "area": int(CAR_GT.sum()),
         "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]], "area": 12.0,
         "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 9,
         "segmentation": {"size": [H1, W1], "counts": rle_encode(PERSON2_GT)}},
        {"id": 13, "image_id": 1, "category_id": 5, "iscrowd": 1, "area": 10,
         "segmentation": {"size": [H1, W1], "counts": rle_encode(CROWD_GT)}},
        {"id": 14, "image_id": 3, "category_id": 3, "iscrowd": 1, "area": 18,
         "segmentation": {"size": [6, 6], "counts": rle_encode(CROWD3_GT)}},
        {"id": 15, "image_id": 4, "category_id": 3, "iscrowd": 0, "area": 4, "segmentation": [[0, 0, 2, 0, 2, 2]]},
        *extra_anns,
    ]
    root = str(root)
    for im in images[:3]:
        _image(os.path.join(root, image_dir, im["file_name"]), im["width"], im["height"])
    path = os.path.join(root, "annotations", "instances_val2017.json")
    _write_json(path, {"images": images, "annotations": anns, "categories": cats})
    return path


def test_coco_masks_merging_and_skips(tmp_path, caplog):
    _coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="seg4diff_fast.magnet.data"):
        data = CocoMagnetData(str(tmp_path))
    assert len(data) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 of 4 images" in warnings[0]
    assert "2 without usable annotations" in warnings[0] and "1 with a missing image file" in warnings[0]
    s = data[0]
    assert s.kind == "direct" and s.key == "a.png" and s.image.size == (W1, H1) and s.image.mode == "RGB"
    assert s.names == ["person", "car"]  # category-id order, each class once
    assert s.prompt == "person car"
    assert s.masks.dtype == bool and s.masks.shape == (2, H1, W1)
    np.testing.assert_array_equal(s.masks[0], POLY_GT | PERSON2_GT)  # polygon + uncompressed RLE merged
    np.testing.assert_array_equal(s.masks[1], CAR_GT)  # compressed RLE
    assert "1 images" in data.describe() and "2 crowd annotations skipped" in data.describe()
    s2 = data[0]
    assert s2.names == s.names and np.array_equal(s2.masks, s.masks)
    assert data[-1].key == "a.png"
    with pytest.raises(IndexError):
        data[1]


def test_coco_include_crowd_and_explicit_paths(tmp_path):
    ann = _coco(tmp_path, image_dir="pics")
    data = CocoMagnetData(images_dir=str(tmp_path / "pics"), annotations=ann, include_crowd=True)
    assert len(data) == 2
    s = data[0]
    assert s.names == ["person", "car", "traffic light"] and s.prompt == "person car traffic light"
    np.testing.assert_array_equal(s.masks[2], CROWD_GT)
    s3 = data[1]
    assert s3.key == "c.png" and s3.names == ["car"]
    np.testing.assert_array_equal(s3.masks[0], CROWD3_GT)


def test_coco_layouts(tmp_path):
    _coco(tmp_path / "a", image_dir="images")
    assert CocoMagnetData(str(tmp_path / "a")).images_dir == str(tmp_path / "a" / "images")
    _coco(tmp_path / "b", image_dir=os.path.join("images", "val2017"))
    assert len(CocoMagnetData(str(tmp_path / "b"))) == 1
    # two splits: must choose
    _coco(tmp_path / "c")
    _write_json(str(tmp_path / "c" / "annotations" / "instances_train2017.json"),
                {"images": [], "annotations": [], "categories": []})
    with pytest.raises(ValueError, match="several annotation files.*split="):
        CocoMagnetData(str(tmp_path / "c"))
    assert len(CocoMagnetData(str(tmp_path / "c"), split="val2017")) == 1
    with pytest.raises(ValueError, match="no instances_test2017.json"):
        CocoMagnetData(str(tmp_path / "c"), split="test2017")


def test_coco_dash_names_are_cleaned(tmp_path):
    cats = [{"id": 1, "name": "wall-brick"}, {"id": 3, "name": "wall-stone"}, {"id": 5, "name": "sky"}]
    _coco(tmp_path / "a", categories=cats)
    s = CocoMagnetData(str(tmp_path / "a"))[0]
    assert s.names == ["wall"] and s.prompt == "wall"  # one class: the segmenter's prompt word
    np.testing.assert_array_equal(s.masks[0], POLY_GT | PERSON2_GT | CAR_GT)
    _coco(tmp_path / "b", categories=cats)
    s = CocoMagnetData(str(tmp_path / "b"), split_dash=False)[0]
    assert s.names == ["wall-brick", "wall-stone"]


def test_coco_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CocoMagnetData(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no instances_\*\.json"):
        CocoMagnetData(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="give a COCO folder"):
        CocoMagnetData()
    with pytest.raises(ValueError, match="annotation file .* does not exist"):
        CocoMagnetData(annotations=str(tmp_path / "x.json"), images_dir=str(tmp_path))
    # empty / whitespace-only category names: the category id is named
    for bad in ("", "   "):
        d = tmp_path / f"bad{len(bad)}"
        _coco(d, categories=[{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 5, "name": bad}])
        with pytest.raises(ValueError, match="category id 5 has an empty name"):
            CocoMagnetData(str(d))
    # an annotation of an unknown category
    d = tmp_path / "unknown"
    _coco(d, extra_anns=[{"id": 99, "image_id": 1, "category_id": 42, "segmentation": [[0, 0, 1, 0, 1, 1]],
                          "iscrowd": 0}])
    with pytest.raises(ValueError, match="annotation 99 has category id 42"):
        CocoMagnetData(str(d))
    # an RLE at another size than its image
    d = tmp_path / "rlesize"
    _coco(d, extra_anns=[{"id": 98, "image_id": 1, "category_id": 1, "iscrowd": 0,
                          "segmentation": _rle_str(np.ones((4, 4), bool))}])
    with pytest.raises(ValueError, match="annotation 98 has an RLE of size"):
        CocoMagnetData(str(d))
    # no images folder
    d = tmp_path / "noimages"
    _coco(d, image_dir="elsewhere")
    with pytest.raises(ValueError, match="no images folder .*pass images_dir"):
        CocoMagnetData(str(d))
    # nothing usable
    d = tmp_path / "nothing"
    _coco(d)
    os.remove(d / "val2017" / "a.png")
    with pytest.raises(ValueError, match="no usable image"):
        CocoMagnetData(str(d))
    # the image on disk is not the size the json says: fails at __getitem__, naming the file
    d = tmp_path / "resized"
    _coco(d)
    Image.new("RGB", (5, 4)).save(d / "val2017" / "a.png")
    data = CocoMagnetData(str(d))
    with pytest.raises(ValueError, match=r"a.png: the image is 5x4 but .* says 10x8"):
        data[0]


# ------------------------------------------------------------------------------------------------ SA-1B

SH, SW = 30, 40  # 1200 pixels: min_area 0.005 → masks must exceed 6 pixels


def _sa1b_masks() -> list[np.ndarray]:
    return [
        _box(SH, SW, 0, 5, 0, 5),  # 25
        _box(SH, SW, 10, 30, 10, 40),  # 600
        _box(SH, SW, 0, 2, 20, 22),  # 4: under the threshold
        _box(SH, SW, 5, 15, 0, 10),  # 100
        _box(SH, SW, 20, 22, 0, 4),  # 8
    ]


def _sa1b_json(path, masks, h=SH, w=SW, with_area=True) -> None:
    anns = []
    for k, m in enumerate(masks):
        a = {"id": k, "segmentation": _rle_str(m), "bbox": [0, 0, 1, 1], "predicted_iou": 0.9}
        if with_area:
            a["area"] = int(m.sum())
        anns.append(a)
    stem = os.path.splitext(os.path.basename(path))[0]
    _write_json(path, {"image": {"image_id": 1, "width": w, "height": h, "file_name": stem + ".jpg"},
                       "annotations": anns})


def _sa1b(root) -> None:
    root = str(root)
    masks = _sa1b_masks()
    for name in ("sa_1", "sa_2", "sa_3", "sa_4"):
        _image(os.path.join(root, name + ".jpg"), SW, SH)
    _sa1b_json(os.path.join(root, "sa_1.json"), masks)
    with open(os.path.join(root, "sa_1.txt"), "w") as f:
        f.write("A red car on a road.  It is parked!\nTrees stand behind it. The sky is blue.\n")
    _sa1b_json(os.path.join(root, "sa_2.json"), masks[:2], with_area=False)  # caption by file name
    _sa1b_json(os.path.join(root, "sa_3.json"), [masks[2]])  # caption by stem; only a small mask
    _sa1b_json(os.path.join(root, "sa_4.json"), masks)  # no caption
    _write_json(os.path.join(root, "captions.json"), {"sa_2.jpg": "Two boxes. Nothing else? Yes.", "sa_3": "Tiny."})


def test_sa1b_filtering_sorting_captions(tmp_path, caplog):
    _sa1b(tmp_path)
    with caplog.at_level(logging.WARNING, logger="seg4diff_fast.magnet.data"):
        data = SA1BMagnetData(str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 of 4 images" in warnings[0]
    assert "1 without a caption" in warnings[0] and "1 without a mask above min_area=0.005" in warnings[0]
    assert len(data) == 2 and "2 images" in data.describe()
    gt = _sa1b_masks()
    s = data[0]
    assert s.kind == "matched" and s.names is None and s.key == "sa_1.jpg" and s.image.size == (SW, SH)
    assert s.prompt == "A red car on a road. It is parked!"
    assert s.masks.dtype == bool and s.masks.shape == (4, SH, SW)
    for got, want in zip(s.masks, [gt[1], gt[3], gt[0], gt[4]]):  # area > 6 px, largest first
        np.testing.assert_array_equal(got, want)
    s2 = data[1]
    assert s2.key == "sa_2.jpg" and s2.prompt == "Two boxes. Nothing else?"  # captions.json, area from the RLE
    np.testing.assert_array_equal(s2.masks, np.stack([gt[1], gt[0]]))
    again = data[0]
    assert again.prompt == s.prompt and np.array_equal(again.masks, s.masks)


def test_sa1b_options(tmp_path):
    _sa1b(tmp_path)
    data = SA1BMagnetData(str(tmp_path), max_masks=2, caption_sentences=None)
    assert data[0].masks.shape[0] == 2
    gt = _sa1b_masks()
    np.testing.assert_array_equal(data[0].masks, np.stack([gt[1], gt[3]]))
    assert data[0].prompt == "A red car on a road. It is parked! Trees stand behind it. The sky is blue."
    data = SA1BMagnetData(str(tmp_path), min_area=0.0, caption_sentences=1)
    assert len(data) == 3  # sa_3's 4-pixel mask now counts
    assert data[0].masks.shape[0] == 5 and data[0].prompt == "A red car on a road."
    assert data[2].key == "sa_3.jpg" and data[2].prompt == "Tiny."
    data = SA1BMagnetData(str(tmp_path), min_area=0.4)  # only the 600-px mask (0.5 of the image) survives
    assert len(data) == 2 and [s.masks.shape[0] for s in (data[0], data[1])] == [1, 1]


def test_sa1b_txt_beats_captions_json_and_nested_folders(tmp_path):
    _sa1b(tmp_path / "a")
    _write_json(str(tmp_path / "a" / "captions.json"), {"sa_1": "Ignored.", "sa_2.jpg": "Used."})
    data = SA1BMagnetData(str(tmp_path / "a"))
    assert data[0].prompt.startswith("A red car") and data[1].prompt == "Used."
    nested = tmp_path / "b" / "part0"
    _image(str(nested / "sa_9.jpg"), SW, SH)
    _sa1b_json(str(nested / "sa_9.json"), _sa1b_masks())
    _write_json(str(tmp_path / "b" / "captions.json"), {"part0/sa_9.jpg": "Nested."})
    assert SA1BMagnetData(str(tmp_path / "b"))[0].prompt == "Nested."


def test_sa1b_errors(tmp_path):
    with pytest.raises(ValueError, match="SA-1B folder .*nope does not exist"):
        SA1BMagnetData(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        SA1BMagnetData(str(tmp_path / "empty"))
    d = tmp_path / "resized"
    _sa1b(d)
    Image.new("RGB", (20, 15)).save(d / "sa_2.jpg")  # resized image, masks still at 40x30
    with pytest.raises(ValueError, match=r"sa_2.json: mask 0 has RLE size \[30, 40\].*\[15, 20\].*original"):
        SA1BMagnetData(str(d))
    d = tmp_path / "nocaptions"
    _sa1b(d)
    os.remove(d / "captions.json")
    os.remove(d / "sa_1.txt")
    with pytest.raises(ValueError, match="no usable image .*4 without a caption"):
        SA1BMagnetData(str(d))
    d = tmp_path / "badcaptions"
    _sa1b(d)
    _write_json(str(d / "captions.json"), ["not", "a", "map"])
    with pytest.raises(ValueError, match="captions.json: must be a JSON object"):
        SA1BMagnetData(str(d))
    for kw, msg in (({"min_area": 1.5}, "min_area"), ({"max_masks": 0}, "max_masks"),
                    ({"caption_sentences": 0}, "caption_sentences")):
        with pytest.raises(ValueError, match=msg):
            SA1BMagnetData(str(tmp_path / "resized"), **kw)


def test_first_sentences():
    assert first_sentences("One. Two. Three.", 2) == "One. Two."
    assert first_sentences('He said "hi." Then left. End.', 2) == 'He said "hi." Then left.'
    assert first_sentences("Version 1.5 is out. Yes.", 1) == "Version 1.5 is out."
    assert first_sentences("  a   b \n c ", None) == "a b c"
    assert first_sentences("One.", 3) == "One."


# ----------------------------------------------------------------------------------------------- Shapes


def test_shapes_deterministic_and_equal_to_scene():
    data = ShapesMagnetData(n=6, seed=123, size=32)
    assert len(data) == 6
    for i in (0, 3, 5):
        a, b = data[i], data[i]
        scene = ShapesWorld(123 + i, size=32).sample()
        assert a.key == f"shapes:{123 + i}" and a.kind == "direct"
        assert a.names == b.names == scene.object_classes
        assert a.prompt == b.prompt == " ".join(scene.object_classes)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(np.asarray(a.image), np.asarray(scene.image))
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.masks, np.stack(scene.masks))
    assert data[-1].key == "shapes:128"
    with pytest.raises(IndexError):
        data[6]
    bg = ShapesMagnetData(n=2, seed=123, include_background=True)[1]
    scene = ShapesWorld(124).sample()
    assert bg.names == scene.classes and bg.prompt == " ".join(scene.classes)
    np.testing.assert_array_equal(bg.masks[0], scene.label_map == 0)
    np.testing.assert_array_equal(bg.masks.argmax(0), scene.label_map)  # a partition of the image
    assert bg.masks.sum(0).max() == 1
    with pytest.raises(ValueError, match="n must be"):
        ShapesMagnetData(n=0)
    with pytest.raises(ValueError, match="size"):
        ShapesMagnetData(size=4)


def test_shapes_prompt_matches_plan_prompts():
    from seg4diff_fast.segment.prompts import plan_prompts
    from seg4diff_fast.testing import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    for s in (ShapesMagnetData(n=1, seed=5, include_background=True)[0], ShapesMagnetData(n=1, seed=6)[0]):
        chunks = plan_prompts(s.names, tok)
        assert len(chunks) == 1 and chunks[0].prompt == s.prompt


# -------------------------------------------------------------------------------------- open / collate


def test_open_magnet_data(tmp_path):
    assert len(open_magnet_data("shapes")) == 10_000
    d = open_magnet_data("shapes:5", seed=7, include_background=True)
    assert isinstance(d, ShapesMagnetData) and len(d) == 5 and d.seed == 7 and d.include_background
    for bad in ("shapes:x", "shapes:0", "shapes:-3"):
        with pytest.raises(ValueError, match="positive integer") as e:
            open_magnet_data(bad)
        assert SPEC_FORMS in str(e.value)
    with pytest.raises(ValueError, match="says 5 scenes but n=3"):
        open_magnet_data("shapes:5", n=3)
    _coco(tmp_path / "coco")
    assert isinstance(open_magnet_data(f"coco:{tmp_path / 'coco'}"), CocoMagnetData)
    _sa1b(tmp_path / "sa")
    sa = open_magnet_data(f"sa1b:{tmp_path / 'sa'}", max_masks=1)
    assert isinstance(sa, SA1BMagnetData) and sa[0].masks.shape[0] == 1
    for bad in ("imagenet:/x", "", f"coco:{tmp_path / 'missing'}", "sa1b:", "coco"):
        with pytest.raises(ValueError) as e:
            open_magnet_data(bad)
        assert SPEC_FORMS in str(e.value) and '"coco:DIR"' in str(e.value)


def test_collate_and_dataloader():
    from torch.utils.data import DataLoader

    data = ShapesMagnetData(n=5)
    batch = collate_magnet([data[0], data[1]])
    assert isinstance(batch, list) and [s.key for s in batch] == ["shapes:1000000", "shapes:1000001"]
    batches = list(DataLoader(data, batch_size=2, collate_fn=collate_magnet))
    assert [len(b) for b in batches] == [2, 2, 1] and all(isinstance(s, MagnetSample) for b in batches for s in b)


def test_sample_validation():
    img = Image.new("RGB", (4, 3))
    with pytest.raises(ValueError, match="2 names for 1 masks"):
        MagnetSample(img, "a b", np.zeros((1, 3, 4), bool), ["a", "b"], "k")
    with pytest.raises(ValueError, match="masks are"):
        MagnetSample(img, "a", np.zeros((1, 4, 3), bool), ["a"], "k")
    with pytest.raises(ValueError, match="bool"):
        MagnetSample(img, "a", np.zeros((1, 3, 4), np.uint8), ["a"], "k")
    with pytest.raises(ValueError, match="RGB"):
        MagnetSample(Image.new("L", (4, 3)), "a", np.zeros((1, 3, 4), bool), ["a"], "k")


def test_shapes_data_same_colour_share():
    """same_colour=1: every scene's objects share one colour (only shape words tell them apart); 0: the world's
    own mix, identical to ShapesWorld's samples; the share is in the description."""
    from seg4diff_fast.shapes.world import ShapesWorld

    d = ShapesMagnetData(n=40, include_background=True, same_colour=1.0)
    assert "100 % same-colour" in d.describe()
    for i in range(40):
        objects = d[i].names[1:]
        assert len({n.split()[0] for n in objects}) == 1, objects
    plain = ShapesMagnetData(n=5)
    for i in range(5):
        assert plain[i].names == ShapesWorld(plain.seed + i).sample().object_classes
    with pytest.raises(ValueError, match="same_colour"):
        ShapesMagnetData(n=2, same_colour=1.5)
