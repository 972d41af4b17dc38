"""Training data for MAGNET LoRA fine-tuning: samples of (image, prompt, per-class or per-region masks).

Three sources, each a ``torch.utils.data.Dataset`` whose ``__getitem__(i)`` is deterministic and returns a
:class:`MagnetSample`:

- :class:`ShapesMagnetData`: ShapesWorld scenes (``ShapesWorld(seed + i, size).sample()``); "direct"
  samples, one mask per object class (and "background" first on request).
- :class:`CocoMagnetData`: a COCO *instances* json + its images; "direct" samples, one mask per category
  present (instances of one category merged), crowd annotations skipped by default.
- :class:`SA1BMagnetData`: SA-1B ``sa_XXXX.jpg`` + ``sa_XXXX.json`` + a caption per image; "matched"
  samples (class-agnostic masks, largest first, to be matched to the caption's tokens by Hungarian
  matching).

A "direct" sample's prompt is its names, each cleaned as the segmenter cleans a class name
(:func:`~seg4diff_fast.reader.prompts.clean_name`), joined by single spaces: exactly the prompt
``plan_prompts(sample.names, tokenizer)`` builds when the names fit in one prompt, so its positions
give each mask's tokens. Images that cannot give a usable sample (no annotation, no caption, no mask
left after filtering) are dropped while the index is built, with one logged warning line per source
saying how many and why; malformed inputs (empty category names, masks at another resolution than
their image) raise ``ValueError`` at load, naming the file and the fix.

:func:`open_magnet_data` opens a source from a short spec (``"shapes:1000"``, ``"coco:DIR"``,
``"sa1b:DIR"``); :func:`collate_magnet` is the DataLoader ``collate_fn`` (samples stay a list).

Example:
    >>> data = open_magnet_data("shapes:4")
    >>> s = data[0]
    >>> s.kind, s.prompt == " ".join(s.names), s.masks.shape[1:], s.image.size
    ('direct', True, (32, 32), (32, 32))
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..evaluation.datasets import IMAGE_EXTENSIONS
from ..reader.prompts import clean_name
from ..shapes.world import BACKGROUND, ShapesWorld

__all__ = [
    "MagnetSample",
    "ShapesMagnetData",
    "CocoMagnetData",
    "SA1BMagnetData",
    "open_magnet_data",
    "collate_magnet",
    "first_sentences",
    "SPEC_FORMS",
]

log = logging.getLogger(__name__)

#: The data specs :func:`open_magnet_data` accepts (quoted in its error messages).
SPEC_FORMS = ('"shapes" (10000 ShapesWorld scenes), "shapes:N" (N scenes), '
              '"coco:DIR" (COCO instances: DIR/annotations/instances_*.json + images), '
              '"sa1b:DIR" (SA-1B: sa_*.jpg + sa_*.json + captions)')


@dataclass
class MagnetSample:
    """One training sample.

    Attributes:
        image: RGB image.
        prompt: the text prompt (direct: the class names joined by spaces; matched: the caption).
        masks: bool (K, H, W) at the image's size; for direct samples mask k is class ``names[k]``.
        names: one class name per mask ("direct" samples), or None ("matched" samples: the masks are
            matched to the caption's tokens by Hungarian matching).
        key: an identifier for logs (file name, ``shapes:<seed>``).

    Example:
        >>> import numpy as np
        >>> from PIL import Image
        >>> s = MagnetSample(Image.new("RGB", (4, 3)), "cat", np.zeros((1, 3, 4), bool), ["cat"], "x.jpg")
        >>> s.kind, MagnetSample(s.image, "a cat.", s.masks, None, "y.jpg").kind
        ('direct', 'matched')
    """

    image: Image.Image
    prompt: str
    masks: np.ndarray
    names: list[str] | None
    key: str

    def __post_init__(self) -> None:
        if self.image.mode != "RGB":
            raise ValueError(f"{self.key}: the image must be RGB, got mode {self.image.mode}")
        if not isinstance(self.masks, np.ndarray) or self.masks.dtype != bool or self.masks.ndim != 3:
            raise ValueError(f"{self.key}: masks must be a bool (K, H, W) array")
        if self.masks.shape[1:] != (self.image.height, self.image.width):
            raise ValueError(f"{self.key}: masks are {self.masks.shape[1:]} (H, W) but the image is "
                             f"{(self.image.height, self.image.width)}")
        if self.names is not None and len(self.names) != len(self.masks):
            raise ValueError(f"{self.key}: {len(self.names)} names for {len(self.masks)} masks")

    @property
    def kind(self) -> str:
        """``"direct"`` (one class name per mask) or ``"matched"`` (no names: masks matched to tokens)."""
        return "matched" if self.names is None else "direct"


def collate_magnet(samples: list[MagnetSample]) -> list[MagnetSample]:
    """DataLoader ``collate_fn``: the samples as a list (images and mask counts differ between samples).

    Example:
        >>> data = ShapesMagnetData(n=2)
        >>> [s.key for s in collate_magnet([data[0], data[1]])]
        ['shapes:1000000', 'shapes:1000001']
    """
    return list(samples)


_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def first_sentences(text: str, n: int | None) -> str:
    """The first ``n`` sentences of ``text`` (all when ``n`` is None), whitespace collapsed. A sentence ends
    at ``.``, ``!`` or ``?`` (closing quotes / brackets kept) followed by a space or the end.

    Example:
        >>> first_sentences("A dog runs.  It is brown!\\nThe sky is blue.", 2)
        'A dog runs. It is brown!'
        >>> first_sentences("no full stop here", 2)
        'no full stop here'
    """
    text = " ".join(text.split())
    if n is None:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[n - 1]] if len(ends) >= n else text


def _index(i: int, n: int) -> int:
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample index out of range 0..{n - 1}")
    return i


def _merge_by_name(names: Sequence[str], masks: Sequence[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """One mask per distinct name (union of its masks), names in order of first appearance."""
    merged: dict[str, np.ndarray] = {}
    for name, m in zip(names, masks):
        if name in merged:
            merged[name] |= m
        else:
            merged[name] = m.astype(bool, copy=True)
    return list(merged), list(merged.values())


def _skip_summary(skipped: Counter, total: int) -> str:
    if not skipped:
        return "none skipped"
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    return f"skipped {sum(skipped.values())} of {total} images: {why}"


def _decode_rle(rle: Any) -> np.ndarray:
    """pycocotools' decode of one RLE as a bool (H, W) array (its numpy-2 copy-keyword warning silenced)."""
    mask_utils = _pycocotools_mask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def _pycocotools_mask() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - pycocotools is a dev / train dependency
        raise ImportError("COCO / SA-1B masks need pycocotools: pip install pycocotools") from e
    return mask_utils


class ShapesMagnetData(Dataset):
    """ShapesWorld scenes as direct samples: sample ``i`` is ``ShapesWorld(seed + i, size).sample()``, one
    mask per object class present (drawing order; the classes of a scene are distinct), "background"
    first when ``include_background``. The default seeds (10⁶ on) are the shapes trainer's training
    stream, disjoint from its held-out scenes (seeds 0…N−1).

    Args:
        n: number of scenes.
        seed: seed of scene 0.
        size: image side in pixels.
        include_background: add the "background" class (its mask: the pixels no object covers).

    Example:
        >>> s = ShapesMagnetData(n=3, include_background=True)[2]
        >>> s.names[0], s.prompt.startswith("background "), int(s.masks.sum(0).max())
        ('background', True, 1)
    """

    def __init__(self, n: int = 10_000, seed: int = 1_000_000, size: int = 32, include_background: bool = False):
        if int(n) < 1:
            raise ValueError(f"ShapesMagnetData: n must be >= 1, got {n}")
        ShapesWorld(int(seed), size=int(size))  # bad sizes fail here, not at the first sample
        self.n, self.seed, self.size = int(n), int(seed), int(size)
        self.include_background = bool(include_background)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> MagnetSample:
        i = _index(i, self.n)
        scene = ShapesWorld(self.seed + i, size=self.size).sample()
        names = list(scene.object_classes)
        masks = [np.asarray(m, dtype=bool) for m in scene.masks]
        if self.include_background:
            names.insert(0, BACKGROUND)
            masks.insert(0, scene.label_map == 0)
        names, masks = _merge_by_name(names, masks)
        return MagnetSample(scene.image, " ".join(clean_name(n) for n in names), np.stack(masks), names,
                            f"shapes:{self.seed + i}")

    def describe(self) -> str:
        """One line for logs."""
        bg = ", background class" if self.include_background else ""
        return (f"shapes: {self.n} ShapesWorld scenes (seeds {self.seed}..{self.seed + self.n - 1}, "
                f"{self.size}x{self.size}{bg}), direct samples")


def _coco_paths(root: str | None, images_dir: str | None, annotations: str | None,
                split: str | None) -> tuple[str, str]:
    if annotations is None:
        if root is None:
            raise ValueError("CocoMagnetData: give a COCO folder (root) or annotations=PATH.json (+ images_dir)")
        if not os.path.isdir(root):
            raise ValueError(f"COCO folder {root} does not exist; give the folder holding "
                             "annotations/instances_*.json and the images")
        ann_dir = os.path.join(root, "annotations")
        found = sorted(f for f in (os.listdir(ann_dir) if os.path.isdir(ann_dir) else [])
                       if f.startswith("instances_") and f.endswith(".json"))
        if split is not None:
            found = [f for f in found if f == f"instances_{split}.json"]
        if not found:
            want = f"instances_{split}.json" if split is not None else "instances_*.json"
            raise ValueError(f"{ann_dir}: no {want}; expected the COCO layout ROOT/annotations/instances_<split>"
                             ".json + ROOT/<split>/ (or ROOT/images/), or pass annotations=PATH.json, images_dir=DIR")
        if len(found) > 1:
            raise ValueError(f"{ann_dir}: several annotation files {found}; choose one with split=... "
                             f"(e.g. split={found[0][len('instances_'):-len('.json')]!r}) or annotations=PATH.json")
        annotations = os.path.join(ann_dir, found[0])
    elif not os.path.isfile(annotations):
        raise ValueError(f"COCO annotation file {annotations} does not exist")
    if images_dir is None:
        base = root if root is not None else os.path.dirname(os.path.dirname(os.path.abspath(annotations)))
        stem = os.path.splitext(os.path.basename(annotations))[0]
        name = stem[len("instances_"):] if stem.startswith("instances_") else stem
        tried = [os.path.join(base, name), os.path.join(base, "images", name), os.path.join(base, "images")]
        images_dir = next((d for d in tried if os.path.isdir(d)), None)
        if images_dir is None:
            raise ValueError(f"no images folder for {annotations}: tried {tried}; pass images_dir=DIR")
    elif not os.path.isdir(images_dir):
        raise ValueError(f"COCO images folder {images_dir} does not exist")
    return images_dir, annotations


class CocoMagnetData(Dataset):
    """COCO instances as direct samples: per image, one mask per category present (its instances merged,
    polygons / RLE / uncompressed RLE decoded by pycocotools), names in category-id order, the prompt
    their (cleaned) names joined by spaces.

    Layout: ``root/annotations/instances_<split>.json`` with images in ``root/<split>/`` (or
    ``root/images/<split>/``, or ``root/images/``); ``split`` picks a json when there are several. Or
    explicit ``annotations=PATH.json`` and ``images_dir=DIR`` (``file_name`` is relative to it).

    Images without a usable annotation (all crowd, empty segmentations, zero area) or whose file is
    missing are dropped while indexing (one logged warning line). An image whose actual size differs from
    the json's raises at ``__getitem__`` (the masks would not fit it).

    Args:
        root: the COCO folder (optional when ``annotations`` is given).
        images_dir, annotations: explicit paths.
        split: which ``instances_<split>.json`` (when ``annotations`` is not given).
        include_crowd: keep ``iscrowd`` annotations (skipped by default).
        split_dash: clean names as the segmenter does (text before the first ``-``); names that clean to
            the same text are one class. Give the trainer's ``plan_prompts`` the same setting.

    Raises:
        ValueError: missing files / folders, a category whose name is empty or whitespace (naming its id),
            an annotation of an unknown category, an RLE whose size is not its image's, no usable image.

    Example:
        >>> data = CocoMagnetData("datasets/coco", split="train2017")  # doctest: +SKIP
        >>> s = data[0]; s.names, s.prompt, s.masks.shape  # doctest: +SKIP
        (['person', 'dog'], 'person dog', (2, 480, 640))
    """

    def __init__(self, root: str | None = None, *, images_dir: str | None = None, annotations: str | None = None,
                 split: str | None = None, include_crowd: bool = False, split_dash: bool = True):
        self.images_dir, self.annotations = _coco_paths(root, images_dir, annotations, split)
        self.include_crowd, self.split_dash = bool(include_crowd), bool(split_dash)
        with open(self.annotations, encoding="utf-8") as f:
            coco = json.load(f)
        if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
            raise ValueError(f"{self.annotations}: not a COCO instances file (needs images, annotations, "
                             "categories)")
        ann_file = self.annotations
        names: dict[int, str] = {}
        for c in coco["categories"]:
            raw = c.get("name")
            name = clean_name(raw, self.split_dash) if isinstance(raw, str) else ""
            if not name:
                raise ValueError(f"{ann_file}: category id {c.get('id')} has an empty name {raw!r}; give every "
                                 "category a non-empty name (it becomes the prompt word)")
            names[int(c["id"])] = name
        # class order: first category id of each (cleaned) name
        self.classes: list[str] = list(dict.fromkeys(names[k] for k in sorted(names)))
        order = {n: j for j, n in enumerate(self.classes)}

        images = {int(im["id"]): im for im in coco["images"]}
        per_image: dict[int, list[tuple[int, Any]]] = {}
        self.crowd_skipped = 0
        for a in coco["annotations"]:
            if a.get("iscrowd", 0) and not self.include_crowd:
                self.crowd_skipped += 1
                continue
            cid, iid = int(a["category_id"]), int(a["image_id"])
            if cid not in names:
                raise ValueError(f"{ann_file}: annotation {a.get('id')} has category id {cid}, which is not in "
                                 "categories")
            if iid not in images:
                continue
            seg = a.get("segmentation")
            if isinstance(seg, list):  # polygons: drop degenerate parts (< 3 points; 4 numbers read as a box)
                seg = [p for p in seg if isinstance(p, list) and len(p) >= 6]
            elif isinstance(seg, dict):
                h, w = int(images[iid]["height"]), int(images[iid]["width"])
                if [int(v) for v in seg.get("size", ())] != [h, w]:
                    raise ValueError(f"{ann_file}: annotation {a.get('id')} has an RLE of size {seg.get('size')} "
                                     f"but image {iid} is {h}x{w} (height x width); the RLE must be at the "
                                     "image's size: fix or drop that annotation")
            if not seg or ("area" in a and float(a["area"]) <= 0):
                continue
            per_image.setdefault(iid, []).append((order[names[cid]], seg))

        self.skipped: Counter = Counter()
        # per image: (path, height, width, file_name, json of [(class index, segmentation)]) - one string per
        # image keeps the index compact (and DataLoader workers' copy-on-write pages untouched)
        self._items: list[tuple[str, int, int, str, str]] = []
        for iid in sorted(images):
            im = images[iid]
            anns = per_image.get(iid)
            if not anns:
                self.skipped["without usable annotations"] += 1
                continue
            path = os.path.join(self.images_dir, im["file_name"])
            if not os.path.isfile(path):
                self.skipped["with a missing image file"] += 1
                continue
            self._items.append((path, int(im["height"]), int(im["width"]), str(im["file_name"]),
                                json.dumps(anns, separators=(",", ":"))))
        if self.skipped:
            log.warning("coco %s: %s", ann_file, _skip_summary(self.skipped, len(images)))
        if not self._items:
            raise ValueError(f"{ann_file}: no usable image ({_skip_summary(self.skipped, len(images))}); check "
                             f"that the images are in {self.images_dir} and have non-crowd annotations")

    def __len__(self) -> int:
        return len(self._items)

    def _decode(self, seg: Any, h: int, w: int) -> np.ndarray:
        mask_utils = _pycocotools_mask()
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return _decode_rle(rle)

    def _sample(self, i: int) -> MagnetSample | None:
        path, h, w, file_name, anns = self._items[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        if image.size != (w, h):
            raise ValueError(f"{path}: the image is {image.width}x{image.height} but {self.annotations} says "
                             f"{w}x{h}; use the images the annotations were made for")
        by_class: dict[int, np.ndarray] = {}
        for j, seg in json.loads(anns):
            m = self._decode(seg, h, w)
            by_class[j] = by_class[j] | m if j in by_class else m
        keep = [j for j in sorted(by_class) if by_class[j].any()]
        if not keep:
            return None
        names = [self.classes[j] for j in keep]
        return MagnetSample(image, " ".join(names), np.stack([by_class[j] for j in keep]), names, file_name)

    def __getitem__(self, i: int) -> MagnetSample:
        i = _index(i, len(self))
        for k in range(len(self)):  # an image whose masks all rasterize empty gives the next one's sample
            s = self._sample((i + k) % len(self))
            if s is not None:
                return s
            log.warning("coco: %s: every mask rasterizes empty; using the next image",
                        self._items[(i + k) % len(self)][3])
        raise ValueError(f"{self.annotations}: every mask of every image rasterizes empty")

    def describe(self) -> str:
        """One line for logs."""
        crowd = "crowd kept" if self.include_crowd else f"{self.crowd_skipped} crowd annotations skipped"
        skipped = _skip_summary(self.skipped, len(self) + sum(self.skipped.values()))
        return (f"coco: {len(self)} images from {self.annotations} + {self.images_dir}, {len(self.classes)} "
                f"classes, direct samples ({crowd}; {skipped})")


class SA1BMagnetData(Dataset):
    """SA-1B images with captions as matched samples: the masks (area > ``min_area`` of the image, largest
    first, at most ``max_masks``) carry no class; the trainer matches them to the caption's tokens.

    Layout (searched recursively, sorted): ``sa_XXXX.jpg`` + ``sa_XXXX.json`` (SA-1B's ``{"image": {...},
    "annotations": [{"segmentation": {"size": [h, w], "counts": str}, "area": int, ...}]}``) + a caption:
    ``sa_XXXX.txt`` beside the image (plain text; it wins), or ``root/captions.json`` mapping the image's
    file name, relative path or stem to its caption. The prompt is the caption's first ``caption_sentences``
    sentences (the authors keep two; None keeps all). Images without an annotation json, a caption, or a
    mask left after filtering are dropped while indexing (one logged warning line); the index reads every
    json once (mask sizes and areas), so opening a large folder takes a while.

    Args:
        root: the folder.
        min_area: least mask area, as a fraction of the image's pixels (strictly above).
        max_masks: most masks per sample (the largest kept).
        caption_sentences: sentences of the caption kept (None: all).

    Raises:
        ValueError: a missing folder, a folder without images, a mask whose RLE size differs from its
            image's size (naming the json), a malformed ``captions.json``, no usable image.

    Example:
        >>> data = SA1BMagnetData("datasets/sa1b")  # doctest: +SKIP
        >>> s = data[0]; s.kind, s.prompt, s.masks.shape  # doctest: +SKIP
        ('matched', 'A red car parked on a street. Trees line the road.', (32, 1500, 2250))
    """

    def __init__(self, root: str, min_area: float = 0.005, max_masks: int = 32, caption_sentences: int | None = 2):
        if not os.path.isdir(root):
            raise ValueError(f"SA-1B folder {root} does not exist; give the folder holding sa_XXXX.jpg + "
                             "sa_XXXX.json + captions (sa_XXXX.txt or captions.json)")
        if not 0 <= float(min_area) < 1:
            raise ValueError(f"min_area is a fraction of the image in [0, 1), got {min_area}")
        if int(max_masks) < 1:
            raise ValueError(f"max_masks must be >= 1, got {max_masks}")
        if caption_sentences is not None and int(caption_sentences) < 1:
            raise ValueError(f"caption_sentences must be >= 1 or None, got {caption_sentences}")
        self.root, self.min_area, self.max_masks = root, float(min_area), int(max_masks)
        self.caption_sentences = None if caption_sentences is None else int(caption_sentences)

        image_files = []
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            image_files += [os.path.join(dirpath, f) for f in sorted(files)
                            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not image_files:
            raise ValueError(f"{root}: no images (expected SA-1B's sa_XXXX.jpg + sa_XXXX.json, with captions as "
                             "sa_XXXX.txt or captions.json); point to the extracted SA-1B folder")
        captions = self._caption_map()

        self.skipped: Counter = Counter()
        # per image: (image path, json path, key, prompt, kept annotation indices, largest first)
        self._items: list[tuple[str, str, str, str, tuple[int, ...]]] = []
        for path in image_files:
            stem = os.path.splitext(path)[0]
            rel = os.path.relpath(path, root)
            key = os.path.basename(path)
            if not os.path.isfile(stem + ".json"):
                self.skipped["without an annotation json"] += 1
                continue
            caption = self._caption(stem, rel, captions)
            if not caption:
                self.skipped["without a caption"] += 1
                continue
            kept = self._kept(path, stem + ".json")
            if not kept:
                self.skipped[f"without a mask above min_area={self.min_area}"] += 1
                continue
            self._items.append((path, stem + ".json", key, first_sentences(caption, self.caption_sentences), kept))
        if self.skipped:
            log.warning("sa1b %s: %s", root, _skip_summary(self.skipped, len(image_files)))
        if not self._items:
            raise ValueError(f"{root}: no usable image ({_skip_summary(self.skipped, len(image_files))}); each "
                             "image needs its sa_XXXX.json, a caption (sa_XXXX.txt or captions.json) and a mask "
                             "above min_area")

    def _caption_map(self) -> dict[str, str]:
        path = os.path.join(self.root, "captions.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            try:
                captions = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); it must map image file name -> caption") from e
        if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
            raise ValueError(f"{path}: must be a JSON object mapping image file name (or stem) -> caption string")
        return captions

    @staticmethod
    def _caption(stem: str, rel: str, captions: dict[str, str]) -> str:
        if os.path.isfile(stem + ".txt"):
            with open(stem + ".txt", encoding="utf-8") as f:
                return f.read().strip()
        base = os.path.basename(rel)
        for k in (rel, rel.replace(os.sep, "/"), base, os.path.splitext(base)[0], os.path.splitext(rel)[0]):
            if k in captions:
                return captions[k].strip()
        return ""

    def _kept(self, image_path: str, json_path: str) -> tuple[int, ...]:
        with Image.open(image_path) as im:
            w, h = im.size
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list):
            raise ValueError(f"{json_path}: not an SA-1B annotation file (needs an \"annotations\" list)")
        areas = []
        for k, a in enumerate(anns):
            seg = a.get("segmentation") or {}
            size = [int(v) for v in seg.get("size", ())]
            if size != [h, w]:
                raise ValueError(f"{json_path}: mask {k} has RLE size {size} (height, width) but {image_path} is "
                                 f"[{h}, {w}]; masks must be at the image's resolution: use the original "
                                 "(not resized) SA-1B images, or re-encode the masks at the new size")
            area = a.get("area")
            if area is None:
                area = int(_pycocotools_mask().area(seg))
            areas.append((float(area), k))
        big = [(area, k) for area, k in areas if area > self.min_area * h * w]
        big.sort(key=lambda t: -t[0])  # stable: ties keep file order
        return tuple(k for _, k in big[: self.max_masks])

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> MagnetSample:
        path, json_path, key, prompt, kept = self._items[_index(i, len(self))]
        with Image.open(path) as im:
            image = im.convert("RGB")
        with open(json_path, encoding="utf-8") as f:
            anns = json.load(f)["annotations"]
        masks = []
        for k in kept:
            seg = anns[k]["segmentation"]
            if [int(v) for v in seg["size"]] != [image.height, image.width]:
                raise ValueError(f"{json_path}: mask {k} has RLE size {seg['size']} but {path} is "
                                 f"[{image.height}, {image.width}]; the files changed since the index was built")
            masks.append(_decode_rle(seg))
        return MagnetSample(image, prompt, np.stack(masks), None, key)

    def describe(self) -> str:
        """One line for logs."""
        sentences = "all" if self.caption_sentences is None else f"first {self.caption_sentences}"
        total = len(self) + sum(self.skipped.values())
        return (f"sa1b: {len(self)} images from {self.root}, matched samples (masks > {self.min_area:g} of the "
                f"image, <= {self.max_masks} per image, largest first; captions: {sentences} sentences; "
                f"{_skip_summary(self.skipped, total)})")


def open_magnet_data(spec: str, **kw: Any) -> ShapesMagnetData | CocoMagnetData | SA1BMagnetData:
    """Open a data source from a spec: ``"shapes"``, ``"shapes:N"`` (N scenes), ``"coco:DIR"``,
    ``"sa1b:DIR"``; ``kw`` go to the source's constructor.

    Raises:
        ValueError: an unknown scheme, a bad N, a missing folder (the message lists the accepted forms).

    Example:
        >>> open_magnet_data("shapes:8", include_background=True).describe()
        'shapes: 8 ShapesWorld scenes (seeds 1000000..1000007, 32x32, background class), direct samples'
    """
    scheme, sep, arg = str(spec).partition(":")
    scheme = scheme.strip().lower()
    if scheme == "shapes":
        if sep:
            try:
                n = int(arg)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"data spec {spec!r}: N must be a positive integer; accepted: {SPEC_FORMS}")
            if "n" in kw and int(kw["n"]) != n:
                raise ValueError(f"data spec {spec!r} says {n} scenes but n={kw['n']} was also given")
            kw["n"] = n
        return ShapesMagnetData(**kw)
    if scheme in ("coco", "sa1b", "sa-1b"):
        if not arg or not os.path.isdir(arg):
            raise ValueError(f"data spec {spec!r}: folder {arg!r} does not exist; accepted: {SPEC_FORMS}")
        return CocoMagnetData(arg, **kw) if scheme == "coco" else SA1BMagnetData(arg, **kw)
    raise ValueError(f"unknown data spec {spec!r}; accepted: {SPEC_FORMS}")
