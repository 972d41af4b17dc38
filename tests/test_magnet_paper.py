"""MAGNET ``protocol="paper"``: every training sample, token plan and matched pair equals an independent
implementation of the authors' mapper and matcher (written here from the facts, with numpy / PIL / scipy /
pycocotools, not calling the package); short training runs under both protocols; the .pth refusal; the CLI.

The authors' code (cvlab-kaist/Seg4Diff @ bb500ca) these references follow:
- COCO-Stuff: ``mask_former_semantic_dataset_mapper.py`` (ResizeShortestEdge 1024, FixedSizeCrop 1024
  without padding, RandomFlip, pad to SIZE_DIVISIBILITY 640 = the top-left 640²), ``register_coco_stuff.py``
  (the images of the caption file), ``seg4diff_model_train.py`` (ImageList pad to 32, bilinear to 1024²,
  the prompt of the full names, ``isin`` positions in the lowercased prompt cut to 77, the conv head on each
  token map with ``residual + _outputs``);
- SA-1B: ``sa1b_dataset_mapper.py`` (ResizeShortestEdge 1024 / 1333, RandomFlip, masks sorted by area),
  ``prepare_targets`` (pad, area > 0.5 % of the padded size, at most 32), ``matcher.py`` (0.02 · focal with
  the raw logit in the modulating factor + 1.0 · dice, targets nearest-resized to the maps' size).
detectron2's resampling: uint8 images and masks through PIL (bilinear / nearest), float label maps through
``F.interpolate(mode="nearest")``, i.e. source index ``floor(i · float32(in / out))``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from seg4diff_fast.magnet import (
    CocoMagnetData,
    CocoStuffMagnetData,
    MagnetConfig,
    MagnetSample,
    MapHead,
    PaperView,
    SA1BMagnetData,
    ShapesMagnetData,
    add_magnet_lora,
    load_magnet_lora,
    save_magnet_lora,
    train_magnet,
)
from seg4diff_fast.magnet.batch import PaperCollate, PreparedData, plan_tokens, predictions_and_targets
from seg4diff_fast.magnet.data import open_magnet_data
from seg4diff_fast.magnet.lora import lora_state_dict
from seg4diff_fast.testing import tiny_clip_tokenizer, tiny_sd3_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

NAMES_FILE = os.path.join(os.path.dirname(__file__), "..", "seg4diff_fast", "data", "classnames", "coco.json")
with open(NAMES_FILE, encoding="utf-8") as _f:
    NAMES = json.load(_f)  # the authors' datasets/coco.json (data, index = label id)
ID = {n: i for i, n in enumerate(NAMES)}
R = 32  # model resolution of the tiny pipeline


# ------------------------------------------------------------------------------------ independent references
def ref_shortest_edge(h: int, w: int, short: int, max_size: float = float("inf")) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge.get_output_shape."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def ref_torch_nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source indices of torch's legacy "nearest" (float32 scale, floor, clamp)."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def ref_nearest(a: np.ndarray, nh: int, nw: int) -> np.ndarray:
    return a[ref_torch_nearest_index(nh, a.shape[0])][:, ref_torch_nearest_index(nw, a.shape[1])]


def ref_bilinear_stretch(img: np.ndarray, r: int) -> np.ndarray:
    """(C, H, W) float → (C, r, r): bilinear, align_corners=False, no antialias (F.interpolate's formula)."""

    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        return i0, i1, lam

    y0, y1, ly = taps(img.shape[1], r)
    x0, x1, lx = taps(img.shape[2], r)
    rows = img[:, y0] * (1 - ly)[None, :, None] + img[:, y1] * ly[None, :, None]
    return rows[:, :, x0] * (1 - lx)[None, None, :] + rows[:, :, x1] * lx[None, None, :]


def ref_read_rgb(path: str) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def ref_coco_stuff_sample(image_path: str, label_path: str, rng: np.random.Generator):
    """The authors' COCO-Stuff mapper + model input for one image: (uint8 image 640², label 640², class ids)."""
    img = ref_read_rgb(image_path)
    with Image.open(label_path) as lab:
        label = np.asarray(lab).astype(np.float64)  # read as double, as their mapper does
    nh, nw = ref_shortest_edge(img.shape[0], img.shape[1], 1024)
    img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    label = ref_nearest(label, nh, nw)
    u = rng.random()  # FixedSizeCrop: one uniform fraction for both axes
    oy, ox = int(np.round(max(nh - 1024, 0) * u)), int(np.round(max(nw - 1024, 0) * u))
    img, label = img[oy:oy + 1024, ox:ox + 1024], label[oy:oy + 1024, ox:ox + 1024]
    if rng.random() < 0.5:  # RandomFlip (horizontal, p = 0.5)
        img, label = img[:, ::-1], label[:, ::-1]
    img, label = img[:640, :640], label[:640, :640]  # pad to SIZE_DIVISIBILITY 640: negative = crop
    ids = [int(c) for c in np.unique(label) if c != 255]
    return img, label, ids


def ref_model_input(images: list[np.ndarray], r: int, multiple: int = 32) -> np.ndarray:
    """ImageList.from_tensors(images / 255, 32) then the bilinear stretch to r², then 2x − 1."""
    h = -(-max(i.shape[0] for i in images) // multiple) * multiple
    w = -(-max(i.shape[1] for i in images) // multiple) * multiple
    out = []
    for i in images:
        x = np.zeros((3, h, w), np.float32)
        x[:, : i.shape[0], : i.shape[1]] = i.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        out.append(ref_bilinear_stretch(x, r) * 2 - 1)
    return np.stack(out)


def ref_isin_positions(prompt: str, names: list[str], tok) -> list[np.ndarray]:
    ids = np.asarray(tok(prompt.lower())["input_ids"][:77])
    return [np.nonzero(np.isin(ids, np.asarray(tok(n)["input_ids"][1:-1])))[0] for n in names]


def ref_sa1b_sample(image_path: str, json_path: str, rng: np.random.Generator):
    """The authors' SA-1B mapper for one image: (uint8 image, masks sorted by area after the transform)."""
    img = ref_read_rgb(image_path)
    anns = json.load(open(json_path))["annotations"]
    masks = [mask_utils.decode(a["segmentation"]) for a in anns if not a.get("iscrowd", 0)]
    nh, nw = ref_shortest_edge(img.shape[0], img.shape[1], 1024, 1333)
    img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    masks = [np.asarray(Image.fromarray(m).resize((nw, nh), Image.NEAREST)) for m in masks]
    if rng.random() < 0.5:
        img, masks = img[:, ::-1], [m[:, ::-1] for m in masks]
    masks = sorted(masks, key=lambda m: m.sum(), reverse=True)  # Python's sort: stable
    return img, [m for m in masks if m.any()]


def ref_sa1b_targets(masks: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """prepare_targets: pad to (h, w), keep area / (h·w) > 0.005 (float32), largest first, at most 32."""
    padded = np.zeros((len(masks), h, w), np.uint8)
    for k, m in enumerate(masks):
        padded[k, : m.shape[0], : m.shape[1]] = m
    areas = padded.reshape(len(masks), -1).sum(1)
    keep = [k for k in range(len(masks)) if np.float32(areas[k]) / np.float32(h * w) > np.float32(0.005)]
    keep = sorted(keep, key=lambda k: -int(areas[k]))[:32]
    return padded[keep]


def ref_authors_caption(c: str) -> str:
    return c.split(".")[0] + "." + c.split(".")[1] + "."


def ref_match(cand: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """matcher.py: targets nearest-resized to the maps' size, 0.02 · authors' focal + 1.0 · dice, LSA."""
    n, h, w = cand.shape
    t = np.stack([ref_nearest(m.astype(np.float64), h, w) for m in targets]).reshape(len(targets), -1)
    x = cand.reshape(n, -1).astype(np.float64)
    bce_pos, bce_neg = np.logaddexp(0, -x), np.logaddexp(0, x)  # BCE-with-logits for targets 1 and 0
    pos = (1 - x) ** 2 * bce_pos * 0.25 / (h * w)  # prob = inputs: the raw logit in the modulating factor
    neg = x ** 2 * bce_neg * 0.75 / (h * w)
    focal = pos @ t.T + neg @ (1 - t).T
    p = 1 / (1 + np.exp(-x))
    dice = 1 - (2 * p @ t.T + 1) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1)
    return linear_sum_assignment(0.02 * focal + 1.0 * dice)


def ref_conv_head(x: np.ndarray, head: MapHead) -> np.ndarray:
    """AttentionScoreLayer (3×3 convs 1→64→64→1, ReLU, zero padding) plus the input, on (N, h, w) maps."""
    ws = [(c.weight.detach().double().numpy(), c.bias.detach().double().numpy()) for c in head.net if
          isinstance(c, torch.nn.Conv2d)]

    def conv(a, wt, b):  # a: (N, Cin, h, w)
        ap = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((a.shape[0], wt.shape[0], a.shape[2], a.shape[3]))
        for dy in range(3):
            for dx in range(3):
                out += np.einsum("oc,nchw->nohw", wt[:, :, dy, dx], ap[:, :, dy:dy + a.shape[2], dx:dx + a.shape[3]])
        return out + b[None, :, None, None]

    a = x[:, None].astype(np.float64)
    y = conv(np.maximum(conv(np.maximum(conv(a, *ws[0]), 0), *ws[1]), 0), *ws[2])
    return (a + y)[:, 0]


# -------------------------------------------------------------------------------------------- fake trees
def _jpeg(path: str, h: int, w: int, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.BILINEAR).save(path, quality=90)


def _labels(h: int, w: int, seed: int, classes: list[str]) -> np.ndarray:
    """Random rectangles of the given classes over a 255 (unlabelled) background."""
    rng = np.random.default_rng(seed)
    lab = np.full((h, w), 255, np.uint8)
    for c in classes:
        for _ in range(2):
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            lab[y0:y0 + rng.integers(4, h // 2 + 5), x0:x0 + rng.integers(4, w // 2 + 5)] = ID[c]
    return lab


COCO_IMAGES = {  # id: (h, w, classes)
    "000000000001": (48, 64, ["dog", "hot dog", "sky-other", "wall-other"]),
    "000000000002": (70, 50, ["person", "grass", "tree"]),
    "000000000003": (40, 40, ["cat", "snow", "sea", "wall-brick"]),
    "000000000004": (30, 60, ["dog"]),  # not in the caption file: not used
}
CAPTION_ORDER = ["000000000003", "000000000001", "000000000777", "000000000002"]  # 777 has no files


def make_coco_stuff(root) -> str:
    root = str(root)
    for k, (h, w, classes) in COCO_IMAGES.items():
        _jpeg(os.path.join(root, "coco", "train2017", f"{k}.jpg"), h, w, int(k))
        os.makedirs(os.path.join(root, "coco", "annotations_detectron2", "train2017"), exist_ok=True)
        Image.fromarray(_labels(h, w, int(k), classes)).save(
            os.path.join(root, "coco", "annotations_detectron2", "train2017", f"{k}.png"))
    os.makedirs(os.path.join(root, "captions"), exist_ok=True)
    with open(os.path.join(root, "captions", "train_caption_coco.json"), "w") as f:
        json.dump({k: f"A caption of {k}. Second." for k in CAPTION_ORDER}, f)
    return root


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


SA1B_IMAGES = {  # stem: (h, w, caption)
    "sa_101": (30, 45, "A red car on a road. It is parked near trees. The sky is blue."),
    "sa_102": (44, 28, "Two boxes stand in a room. Nothing else is there."),
    "sa_103": (36, 36, "Pi is 3.14 or so. A circle. More text."),
}


def _sa1b_masks(h: int, w: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(6):
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        size = 1 if k == 5 else rng.integers(max(h, w) // 4, max(h, w))  # the last one tiny: filtered out
        m[y0:y0 + size, x0:x0 + size] = True
        out.append(m)
    out.append(out[1].copy())  # an exact duplicate: equal areas keep file order
    return out


def make_sa1b(root) -> str:
    """The authors' layout: images/sa_000020/*.jpg, annotations/sa_000020/*.json, captions/train_caption_sa1b.json."""
    root = str(root)
    caps = {}
    for n, (stem, (h, w, cap)) in enumerate(SA1B_IMAGES.items()):
        _jpeg(os.path.join(root, "images", "sa_000020", stem + ".jpg"), h, w, 50 + n)
        anns = [{"id": k, "segmentation": _rle(m), "area": int(m.sum()), "bbox": [0, 0, 1, 1]}
                for k, m in enumerate(_sa1b_masks(h, w, 60 + n))]
        os.makedirs(os.path.join(root, "annotations", "sa_000020"), exist_ok=True)
        with open(os.path.join(root, "annotations", "sa_000020", stem + ".json"), "w") as f:
            json.dump({"image": {"image_id": n, "height": h, "width": w}, "annotations": anns}, f)
        caps[stem] = cap
    os.makedirs(os.path.join(root, "captions"), exist_ok=True)
    with open(os.path.join(root, "captions", "train_caption_sa1b.json"), "w") as f:
        json.dump(caps, f)
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_coco_stuff(tmp_path_factory.mktemp("cocostuff"))


@pytest.fixture(scope="module")
def sa1b_root(tmp_path_factory):
    return make_sa1b(tmp_path_factory.mktemp("sa1b"))


# ----------------------------------------------------------------------------------------- COCO-Stuff
def test_coco_stuff_paper_samples_equal_the_authors_mapper(coco_root):
    tok = tiny_clip_tokenizer()
    data = CocoStuffMagnetData(coco_root)
    listed = [k for k in CAPTION_ORDER if k in COCO_IMAGES]
    prepared = PreparedData(data, R, protocol="paper", seed=11)
    assert len(data) == len(prepared) == 3
    assert [prepared[i]["key"] for i in range(3)] == listed  # the caption file's order; 777 has no files
    collate = PaperCollate(R)
    for i, key in enumerate(listed):
        img_path = os.path.join(coco_root, "coco", "train2017", f"{key}.jpg")
        lab_path = os.path.join(coco_root, "coco", "annotations_detectron2", "train2017", f"{key}.png")
        for pos in (i, 100 + i, 7 * i + 3):
            want_img, want_lab, ids = ref_coco_stuff_sample(img_path, lab_path, np.random.default_rng([11, pos]))
            item = prepared[(i, pos)]
            got_img = item["image"].numpy()
            np.testing.assert_allclose(got_img, want_img.transpose(2, 0, 1) / np.float32(255), rtol=0, atol=0)
            names = [NAMES[c] for c in ids]
            assert item["names"] == names and item["prompt"] == " ".join(names)
            np.testing.assert_array_equal(item["masks"].numpy(), np.stack([want_lab == c for c in ids]))
            batch = collate([item])
            np.testing.assert_allclose(batch["x"].numpy(), ref_model_input([want_img], R), atol=2e-6)
            assert tuple(batch["masks"][0].shape) == (len(ids), 640, 640)
            plan = plan_tokens(item["prompt"], item["names"], tok, protocol="paper")
            want_pos = ref_isin_positions(item["prompt"], names, tok)
            kept = [j for j, p in enumerate(want_pos) if len(p)]
            assert plan.keep == tuple(kept) and [list(g) for g in plan.groups] == [list(want_pos[j]) for j in kept]
    # the 171-name quirks are live in this tree: "dog" takes the "dog" of "hot dog", "-other" names share tokens
    plan = plan_tokens("dog hot dog sky-other wall-other", ["dog", "hot dog", "sky-other", "wall-other"], tok,
                       protocol="paper")
    dog = tok("dog")["input_ids"][1]
    ids = tok("dog hot dog sky-other wall-other")["input_ids"]
    assert [ids[k] for k in plan.groups[0]] == [dog, dog] and set(plan.groups[2]) & set(plan.groups[3])


def test_coco_stuff_chain_draws_crop_and_flip_from_the_seed(coco_root):
    """Different positions give different crops / flips; the same position the same sample."""
    view = PaperView(CocoStuffMagnetData(coco_root))
    a = [np.asarray(view.sample(1, np.random.default_rng([0, p])).image) for p in range(8)]
    assert len({x.tobytes() for x in a}) > 2  # 48x64 → 1024x1365: crop offsets and flips vary
    b = np.asarray(view.sample(1, np.random.default_rng([0, 3])).image)
    assert np.array_equal(a[3], b)


def test_coco_stuff_corrected_sample_and_errors(coco_root, tmp_path):
    data = CocoStuffMagnetData(coco_root)
    s = data[1]  # 000000000001: dog, hot dog, sky-other, wall-other → cleaned: dog, hot dog, sky, wall
    lab = np.asarray(Image.open(os.path.join(coco_root, "coco", "annotations_detectron2", "train2017",
                                             "000000000001.png")))
    present = [int(c) for c in np.unique(lab) if c != 255]
    assert s.names == [NAMES[c].split("-")[0] for c in present] and s.masks.shape[1:] == lab.shape
    for name, m in zip(s.names, s.masks):
        np.testing.assert_array_equal(m, np.isin(lab, [c for c in present if NAMES[c].split("-")[0] == name]))
    # open_magnet_data picks COCO-Stuff; a folder with instances too gives instances under corrected only
    assert isinstance(open_magnet_data(f"coco:{coco_root}"), CocoStuffMagnetData)
    assert isinstance(open_magnet_data(f"coco:{os.path.join(coco_root, 'coco')}"), CocoStuffMagnetData)
    bad = make_coco_stuff(tmp_path / "bad")
    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(
        os.path.join(bad, "coco", "annotations_detectron2", "train2017", "000000000001.png"))
    with pytest.raises(ValueError, match=r"label ids \[200\]"):
        CocoStuffMagnetData(bad)[1]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(
        os.path.join(bad, "coco", "annotations_detectron2", "train2017", "000000000001.png"))
    with pytest.raises(ValueError, match="labels must be at the image's size"):
        PaperView(CocoStuffMagnetData(bad)).sample(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no COCO-Stuff layout"):
        CocoStuffMagnetData(str(tmp_path))


def test_coco_stuff_paper_head_on_token_maps_then_class_mean(coco_root):
    """Direct predictions under paper: the head mean of the raw maps, the conv head (residual, default
    init) on every token map, then the mean over each class's isin positions; classes without a position
    are dropped with their masks. Against the numpy head."""
    tok = tiny_clip_tokenizer()
    item = PreparedData(CocoStuffMagnetData(coco_root), R, protocol="paper", seed=3)[(1, 5)]
    plan = plan_tokens(item["prompt"], item["names"], tok, protocol="paper")
    torch.manual_seed(0)
    head = MapHead(zero_init=False)
    maps = torch.randn(1, 3, 77, 4, 4, generator=torch.Generator().manual_seed(1))
    pred, tgt = predictions_and_targets(maps, [item["masks"]], [plan], head=head, protocol="paper")
    mean = maps[0].double().mean(0).numpy()
    tokmaps = ref_conv_head(mean, head)  # every one of the 77 maps, as the authors do
    positions = ref_isin_positions(item["prompt"], item["names"], tok)
    want = np.stack([tokmaps[p].mean(0) for p in positions if len(p)])
    np.testing.assert_allclose(pred.detach().double().numpy(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(tgt, item["masks"][[j for j, p in enumerate(positions) if len(p)]])
    # the corrected placement (head on the class means) gives something else with the same head
    pc, _ = predictions_and_targets(maps, [item["masks"]], [plan], head=head, protocol="corrected")
    assert not torch.allclose(pc, pred)


# ---------------------------------------------------------------------------------------------- SA-1B
def test_sa1b_paper_samples_targets_and_pairs_equal_the_authors(sa1b_root):
    tok = tiny_clip_tokenizer()
    data = SA1BMagnetData(sa1b_root)  # the authors' layout: images/ + annotations/ + captions/
    stems = list(SA1B_IMAGES)
    prepared = PreparedData(data, R, protocol="paper", seed=5)
    assert len(prepared) == 3 and [prepared[i]["key"] for i in range(3)] == [st + ".jpg" for st in stems]
    collate = PaperCollate(R)
    g = torch.Generator().manual_seed(2)
    for batch_idx in ([0], [1], [2], [0, 1], [1, 2, 0]):  # alone and in batches of mixed orientation
        keys = [(i, 40 + 3 * i) for i in batch_idx]
        items = [prepared[k] for k in keys]
        batch = collate(items)
        refs = []
        for i, pos in keys:
            img_path = os.path.join(sa1b_root, "images", "sa_000020", stems[i] + ".jpg")
            json_path = os.path.join(sa1b_root, "annotations", "sa_000020", stems[i] + ".json")
            refs.append(ref_sa1b_sample(img_path, json_path, np.random.default_rng([5, pos])))
        h = -(-max(r[0].shape[0] for r in refs) // 32) * 32
        w = -(-max(r[0].shape[1] for r in refs) // 32) * 32
        np.testing.assert_allclose(batch["x"].numpy(), ref_model_input([r[0] for r in refs], R), atol=2e-6)
        for b, ((i, _), (_, masks)) in enumerate(zip(keys, refs)):
            assert batch["prompt"][b] == ref_authors_caption(SA1B_IMAGES[stems[i]][2]) and batch["names"][b] is None
            want = ref_sa1b_targets(masks, h, w)
            np.testing.assert_array_equal(batch["masks"][b].numpy(), want)
        # matched pairs: every head × all 77 positions, the authors' cost, their Hungarian matching
        plans = [plan_tokens(p, None, tok, protocol="paper") for p in batch["prompt"]]
        assert all(pl.caption == tuple(range(77)) for pl in plans)
        maps = torch.randn(len(keys), 3, 77, 4, 4, generator=g) * 3
        if len(batch["masks"][0]):  # plant a perfect candidate for target 0 at a padding position of head 2
            grid0 = ref_nearest(batch["masks"][0][0].numpy().astype(np.float64), 4, 4)
            maps[0, 2, 70] = torch.from_numpy(np.where(grid0 > 0, 8.0, -8.0)).float()
        pred, tgt = predictions_and_targets(maps, batch["masks"], plans, protocol="paper", match_focal_form="authors")
        start = 0
        for b in range(len(keys)):
            m = batch["masks"][b].numpy()
            if not len(m):
                continue
            cand = maps[b].reshape(3 * 77, 4, 4).numpy()  # head-major, as "b l n t -> b n (l t)"
            rows, cols = ref_match(cand, m)
            got_t = tgt[start:start + len(cols)].numpy()
            got_rows = [int(np.nonzero((cand == p.numpy()).all((1, 2)))[0][0]) for p in pred[start:start + len(cols)]]
            start += len(cols)
            np.testing.assert_array_equal(got_t, m[np.sort(cols)])  # every target matched, in target order
            # targets equal on the token grid are interchangeable (an exact tie in any cost): compare per group
            grid = [ref_nearest(t.astype(np.float64), 4, 4).tobytes() for t in m]
            ours = {j: r for j, r in zip(np.sort(cols), got_rows)}
            theirs = dict(zip(cols, rows))
            for key in set(grid):
                group = [j for j in range(len(m)) if grid[j] == key]
                assert sorted(ours[j] for j in group) == sorted(theirs[j] for j in group)
            if b == 0:
                assert ours[0] == 2 * 77 + 70  # the planted padding-position candidate was matched
        assert start == len(pred)


def test_sa1b_paper_view_and_caption_cut(sa1b_root, tmp_path):
    view = PaperView(SA1BMagnetData(sa1b_root))
    s = view.sample(2, np.random.default_rng(0))
    assert s.prompt == "Pi is 3.14 or so."  # split('.'): the decimal point ends the "first sentence"
    assert s.kind == "matched" and s.masks.dtype == bool
    areas = s.masks.reshape(len(s.masks), -1).sum(1)
    assert list(areas) == sorted(areas, reverse=True) and areas.min() > 0
    # the corrected view of the same folder keeps its own rules (first sentences, masks at the original size)
    c = SA1BMagnetData(sa1b_root)[0]
    assert c.prompt == "A red car on a road. It is parked near trees." and c.masks.shape[1:] == (30, 45)


# ------------------------------------------------------------------------------------------ ShapesWorld
def test_shapes_paper_is_the_scene_with_isin_positions():
    tok = tiny_clip_tokenizer()
    data = ShapesMagnetData(6, include_background=True)
    prepared = PreparedData(data, 32, protocol="paper", seed=0)
    for i in range(6):
        s, item = data[i], prepared[(i, 9)]
        assert item["names"] == s.names and item["prompt"] == s.prompt
        np.testing.assert_array_equal(item["masks"].numpy(), s.masks.astype(np.uint8))
        np.testing.assert_array_equal(item["image"].numpy(), np.asarray(s.image).transpose(2, 0, 1) / np.float32(255))
        plan = plan_tokens(s.prompt, s.names, tok, protocol="paper")
        assert [list(g) for g in plan.groups] == [list(p) for p in ref_isin_positions(s.prompt, s.names, tok)]


# ----------------------------------------------------------------------------------------------- training
def _cfg(**kw) -> MagnetConfig:
    base = dict(layer=1, rank=2, max_steps=2, batch_size=2, warmup_steps=1, resolution=R, lr=1e-2,
                max_grad_norm=1.0, log_every=1, checkpoint_every=100)
    base.update(kw)
    return MagnetConfig(**base)


def test_train_paper_and_corrected_on_coco_stuff_and_sa1b(coco_root, sa1b_root, tmp_path):
    # COCO-Stuff: paper trains on the crops' classes, corrected on the whole image's
    runs = {}
    for proto in ("paper", "corrected"):
        s = train_magnet(tiny_sd3_pipeline(t5=False, seed=1), CocoStuffMagnetData(coco_root),
                         _cfg(protocol=proto, max_steps=1, batch_size=3), str(tmp_path / f"coco_{proto}"),
                         progress=False)
        runs[proto] = s
        assert s["steps"] == 1 and np.isfinite(s["final"]["loss"]) and s["final"]["masks"] > 0
        assert s["config"]["protocol"] == proto
        assert s["config"]["focal_form"] == ("authors" if proto == "paper" else "standard")
    data = CocoStuffMagnetData(coco_root)
    tok = tiny_clip_tokenizer()
    want = 0  # one epoch of 3 images at positions 0..2, in the sampler's order: count the kept classes per position
    perm = np.random.default_rng([0, 0]).permutation(3)
    listed = [k for k in CAPTION_ORDER if k in COCO_IMAGES]
    for pos, i in enumerate(perm):
        img = os.path.join(coco_root, "coco", "train2017", f"{listed[i]}.jpg")
        lab = os.path.join(coco_root, "coco", "annotations_detectron2", "train2017", f"{listed[i]}.png")
        _, _, ids = ref_coco_stuff_sample(img, lab, np.random.default_rng([0, pos]))
        names = [NAMES[c] for c in ids]
        want += sum(1 for p in ref_isin_positions(" ".join(names), names, tok) if len(p))
    assert runs["paper"]["totals"]["masks"] == want
    assert runs["corrected"]["totals"]["masks"] == sum(len(data[i].names) for i in range(3))
    # SA-1B under paper: matched over every head × 77 positions, masks at the padded size
    s = train_magnet(tiny_sd3_pipeline(t5=False, seed=2), SA1BMagnetData(sa1b_root),
                     _cfg(max_steps=1, batch_size=2), str(tmp_path / "sa1b"), progress=False)
    assert s["final"]["masks"] > 0 and np.isfinite(s["final"]["dice"]) and s["config"]["protocol"] == "paper"
    # COCO instances cannot train under paper: one clear error with the fix
    coco = tmp_path / "inst"
    os.makedirs(coco / "annotations")
    Image.new("RGB", (8, 8)).save(coco / "a.png")
    os.makedirs(coco / "val2017")
    Image.new("RGB", (8, 8)).save(coco / "val2017" / "a.png")
    json.dump({"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4,
                                "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}],
               "categories": [{"id": 1, "name": "person"}]}, open(coco / "annotations" / "instances_val2017.json", "w"))
    with pytest.raises(ValueError, match="COCO-Stuff.*protocol='corrected'"):
        train_magnet(tiny_sd3_pipeline(t5=False), CocoMagnetData(str(coco)), _cfg(), str(tmp_path / "x"),
                     progress=False)


def test_train_shapes_under_both_protocols(tmp_path):
    heads = {}
    for proto in ("paper", "corrected"):
        out = str(tmp_path / proto)
        s = train_magnet(tiny_sd3_pipeline(t5=False, seed=4), ShapesMagnetData(6, include_background=True),
                         _cfg(protocol=proto, max_steps=2, lr=1e-5), out, progress=False)
        assert s["steps"] == 2 and s["final"]["masks"] > 0 and s["config"]["protocol"] == proto
        from safetensors.torch import load_file

        heads[proto] = load_file(os.path.join(out, "magnet_head.safetensors"))
    # the corrected head starts at zero in its last conv (after 2 steps at lr 1e-5 it is within 2e-5 of it); the
    # paper head keeps PyTorch's default init there (uniform within ±1/√576)
    assert heads["corrected"]["net.4.weight"].abs().max() <= 2.1e-5
    assert 0.02 < heads["paper"]["net.4.weight"].abs().max() <= 1 / 24 + 2.1e-5
    with pytest.raises(ValueError, match="protocol='corrected'.*--corrected"):  # a resume keeps its protocol
        train_magnet(tiny_sd3_pipeline(t5=False, seed=4), ShapesMagnetData(6), _cfg(max_steps=3),
                     str(tmp_path / "corrected"), resume=True, progress=False)


# ---------------------------------------------------------------------------------------------- .pth / CLI
def test_pth_and_folder_for_another_model_are_refused(tmp_path):
    deep = tiny_sd3_pipeline(t5=False, num_layers=4)
    add_magnet_lora(deep.transformer, rank=2)
    model = {f"backbone.transformer.{k.replace('.weight', '.default.weight')}": v
             for k, v in lora_state_dict(deep.transformer).items()}
    torch.save({"model": model}, tmp_path / "deep.pth")
    folder = save_magnet_lora(str(tmp_path / "deep"), deep.transformer)
    for path in (str(tmp_path / "deep.pth"), folder):
        with pytest.raises(ValueError, match=r"transformer_blocks\.3\.attn\.to_q\.lora_A\.weight \(no such layer\)"
                                             r".*another model") as e:
            load_magnet_lora(tiny_sd3_pipeline(t5=False, num_layers=3), path)
        assert "(3 blocks)" in str(e.value) and "8 of " in str(e.value)  # 4 projections × A/B of block 3
    # diffusers alone would load the rest and only warn: the refusal is ours
    tiny_sd3_pipeline(t5=False, num_layers=3).load_lora_weights(folder)
    # another width: every key named by shape
    wide = tiny_sd3_pipeline(t5=False, num_layers=3, head_dim=16)
    add_magnet_lora(wide.transformer, rank=2)
    torch.save({"model": {f"backbone.transformer.{k.replace('.weight', '.default.weight')}": v
                          for k, v in lora_state_dict(wide.transformer).items()}}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"shape \(2, 64\), the layer needs \(rank, 32\)"):
        load_magnet_lora(tiny_sd3_pipeline(t5=False, num_layers=3), str(tmp_path / "wide.pth"))
    # a file that fits still loads
    ok = tiny_sd3_pipeline(t5=False, num_layers=3)
    add_magnet_lora(ok.transformer, rank=2)
    torch.save({"model": {f"backbone.transformer.{k.replace('.weight', '.default.weight')}": v
                          for k, v in lora_state_dict(ok.transformer).items()}}, tmp_path / "ok.pth")
    assert "magnet" in load_magnet_lora(tiny_sd3_pipeline(t5=False, num_layers=3), str(tmp_path / "ok.pth")
                                        ).transformer.peft_config


def test_cli_protocol_flags(monkeypatch, tmp_path, capsys):
    import argparse

    import seg4diff_fast.magnet as magnet
    from seg4diff_fast import cli_magnet

    p = argparse.ArgumentParser()
    cli_magnet.add_arguments(p)
    assert p.parse_args(["--data", "shapes"]).protocol is None  # the model's: its recipe, else paper for SD3
    assert p.parse_args(["--corrected"]).protocol == "corrected" and p.parse_args(["--paper"]).protocol == "paper"
    with pytest.raises(SystemExit):
        p.parse_args(["--paper", "--corrected"])
    seen = {}

    def fake_train(model, data, cfg, output_dir, resume, progress, device=None):
        seen["cfg"] = cfg
        return {"steps": 1, "resumed_from": 0, "seconds": 0.0, "final": {}, "skipped": {},
                "config": {"layer": 1, "protocol": cfg.protocol}}

    monkeypatch.setattr(magnet, "train_magnet", fake_train)
    # the embedded model's recipe says corrected; --paper and --corrected override it
    for flags, want in (([], "corrected"), (["--paper"], "paper"), (["--corrected"], "corrected")):
        args = p.parse_args(["--data", "shapes:2", "--out", str(tmp_path), "--no-heldout", *flags])
        assert cli_magnet.run(args) == 0 and seen["cfg"].protocol == want
        assert f"protocol {want}" in capsys.readouterr().out


def test_config_protocol_defaults():
    paper, corr = MagnetConfig(), MagnetConfig(protocol="corrected")
    assert paper.protocol == "paper" and (paper.loss_focal_form, paper.cost_focal_form) == ("authors", "authors")
    assert (corr.loss_focal_form, corr.cost_focal_form) == ("standard", "standard")
    assert MagnetConfig(focal_form="standard").loss_focal_form == "standard"  # an explicit choice wins
    old = corr.to_dict()
    del old["protocol"], old["match_focal_form"]
    assert MagnetConfig.from_dict(old).protocol == "corrected"  # configs saved before protocols existed
    assert MagnetConfig.from_dict(paper.to_dict()).to_dict() == paper.to_dict()
    with pytest.raises(ValueError, match="protocol"):
        MagnetConfig(protocol="authors")
    # a generic dataset of MagnetSample trains under paper as it is (no chain applies to it)
    s = MagnetSample(Image.new("RGB", (8, 8)), "a cat.", np.ones((1, 8, 8), bool), None, "k")
    assert PaperView([s]).sample(0, np.random.default_rng(0)) is s
