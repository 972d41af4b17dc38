"""Training data for MAGNET LoRA fine-tuning: samples of (image, prompt, per-class or per-region masks).

Four sources, each a ``torch.utils.data.Dataset`` whose ``__getitem__(i)`` is deterministic and returns a
:class:`MagnetSample`:

- :class:`ShapesMagnetData`: ShapesWorld scenes (``ShapesWorld(seed + i, size).sample()``); "direct"
  samples, one mask per object class (and "background" first on request).
- :class:`CocoMagnetData`: a COCO *instances* json + its images; "direct" samples, one mask per category
  present (instances of one category merged), crowd annotations skipped by default.
- :class:`CocoStuffMagnetData`: COCO-Stuff-171 label PNGs in the authors' layout (``coco/train2017`` +
  ``coco/annotations_detectron2/train2017``, the images listed in their caption file); "direct" samples.
- :class:`SA1BMagnetData`: SA-1B ``sa_XXXX.jpg`` + ``sa_XXXX.json`` + a caption per image; "matched"
  samples (class-agnostic masks, largest first, to be matched to the caption's tokens by Hungarian
  matching).

``source[i]`` is the sample as ``protocol="corrected"`` trains on it. ``protocol="paper"`` trains on
:class:`PaperView` ``(source)``: ``view.sample(i, rng)`` runs the authors' transform chain for that source
(:mod:`seg4diff_fast.magnet.transforms`) with the given numpy Generator (docs/PAPER_PROTOCOL_MAGNET.md).

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
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..evaluation.datasets import IMAGE_EXTENSIONS, load_classnames
from ..reader.prompts import clean_name
from ..shapes.world import BACKGROUND, ShapesWorld
from .transforms import CocoStuffChain, SA1BChain, authors_short_caption

__all__ = [
    "MagnetSample",
    "ShapesMagnetData",
    "CocoMagnetData",
    "CocoStuffMagnetData",
    "SA1BMagnetData",
    "PaperView",
    "open_magnet_data",
    "collate_magnet",
    "first_sentences",
    "SPEC_FORMS",
]

log = logging.getLogger(__name__)

#: The data specs :func:`open_magnet_data` accepts (quoted in its error messages).
SPEC_FORMS = ('"shapes" (10000 ShapesWorld scenes), "shapes:N" (N scenes), '
              '"coco:DIR" (COCO-Stuff label PNGs: DIR[/coco]/train2017 + annotations_detectron2/train2017, or '
              'COCO instances: DIR/annotations/instances_*.json + images), '
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
        same_colour: share of scenes whose objects all have one colour, so that only the shape words tell
            them apart (:class:`~seg4diff_fast.shapes.ShapesWorld`'s ``same_colour``; 0: the world as it is).

    Example:
        >>> s = ShapesMagnetData(n=3, include_background=True)[2]
        >>> s.names[0], s.prompt.startswith("background "), int(s.masks.sum(0).max())
        ('background', True, 1)
    """

    def __init__(self, n: int = 10_000, seed: int = 1_000_000, size: int = 32, include_background: bool = False,
                 same_colour: float = 0.0):
        if int(n) < 1:
            raise ValueError(f"ShapesMagnetData: n must be >= 1, got {n}")
        ShapesWorld(int(seed), size=int(size), same_colour=same_colour)  # bad values fail here, not at a sample
        self.n, self.seed, self.size = int(n), int(seed), int(size)
        self.include_background = bool(include_background)
        self.same_colour = float(same_colour)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> MagnetSample:
        i = _index(i, self.n)
        scene = ShapesWorld(self.seed + i, size=self.size, same_colour=self.same_colour).sample()
        names = list(scene.object_classes)
        masks = [np.asarray(m, dtype=bool) for m in scene.masks]
        if self.include_background:
            names.insert(0, BACKGROUND)
            masks.insert(0, scene.label_map == 0)
        names, masks = _merge_by_name(names, masks)
        return MagnetSample(scene.image, " ".join(clean_name(n) for n in names), np.stack(masks), names,
                            f"shapes:{self.seed + i}")

    def paper_sample(self, i: int, rng: np.random.Generator | None = None) -> MagnetSample:
        """The sample ``protocol="paper"`` trains on: ``self[i]`` unchanged. The authors' transform chains bring
        photos of any size to 1024² and augment them; a scene is rendered at the model's resolution and every
        sample is a fresh scene, so no chain applies (``rng`` is not drawn from). The names are already the
        full, lowercased class names; the trainer locates them in the prompt with the authors' ``isin`` rule."""
        return self[i]

    def describe(self) -> str:
        """One line for logs."""
        bg = ", background class" if self.include_background else ""
        same = f", {100 * self.same_colour:g} % same-colour scenes" if self.same_colour else ""
        return (f"shapes: {self.n} ShapesWorld scenes (seeds {self.seed}..{self.seed + self.n - 1}, "
                f"{self.size}x{self.size}{bg}{same}), direct samples")


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

    def paper_check(self) -> None:
        """``protocol="paper"`` trains on COCO-Stuff-171 label PNGs, not on instances: refused, naming the fix."""
        raise ValueError(
            f"protocol='paper' trains on COCO-Stuff-171 label PNGs as the authors did (171 classes, stuff "
            f"included), but {self.annotations} is a COCO instances file (80 thing classes). Give the folder "
            "in the authors' layout (DIR/coco/train2017/*.jpg + DIR/coco/annotations_detectron2/train2017/*.png "
            "from their datasets/prepare_coco_stuff.py, optionally DIR/captions/train_caption_coco.json) to "
            "CocoStuffMagnetData, or train on the instances with protocol='corrected' (CLI: --corrected)")

    def describe(self) -> str:
        """One line for logs."""
        crowd = "crowd kept" if self.include_crowd else f"{self.crowd_skipped} crowd annotations skipped"
        skipped = _skip_summary(self.skipped, len(self) + sum(self.skipped.values()))
        return (f"coco: {len(self)} images from {self.annotations} + {self.images_dir}, {len(self.classes)} "
                f"classes, direct samples ({crowd}; {skipped})")


#: The COCO-Stuff-171 names (index = label id in the prepared PNGs), the authors' ``datasets/coco.json``.
COCO_STUFF_CLASSES_FILE = "coco.json"
_COCO_CAPTIONS = "train_caption_coco.json"


def coco_stuff_layout(root: str, split: str = "train2017") -> tuple[str, str] | None:
    """(images folder, label folder) of a COCO-Stuff tree in the authors' layout under ``root`` (the folder
    holding ``coco/``, or the ``coco`` folder itself), or None.

    Example:
        >>> coco_stuff_layout("/nonexistent") is None
        True
    """
    for base in (root, os.path.join(root, "coco")):
        images, labels = os.path.join(base, split), os.path.join(base, "annotations_detectron2", split)
        if os.path.isdir(images) and os.path.isdir(labels):
            return images, labels
    return None


class CocoStuffMagnetData(Dataset):
    """COCO-Stuff-171 label PNGs as direct samples (the authors' MAGNET COCO data).

    Layout (the authors' ``register_coco_stuff.py``): ``root/coco/train2017/<id>.jpg`` and
    ``root/coco/annotations_detectron2/train2017/<id>.png`` (label ids 0..170 index
    ``data/classnames/coco.json``, 255 unlabelled; made by their ``datasets/prepare_coco_stuff.py``);
    ``root`` may also be the ``coco`` folder itself. The images used are the keys of the caption file, in its
    order, as in the authors' ``coco_2017_train_subset``: ``captions=PATH``, else
    ``root/captions/train_caption_coco.json``, ``root/train_caption_coco.json`` or
    ``root/../captions/train_caption_coco.json`` (``root`` being ``coco``); without one, every label
    PNG whose image exists (sorted; logged). Listed images whose files are missing are dropped while indexing
    (one logged warning line).

    ``data[i]`` (``protocol="corrected"``): the whole image, one mask per class present, names cleaned as the
    segmenter cleans them (text before the first ``-``; names that clean alike merged), in label-id order.
    :meth:`paper_sample` (``protocol="paper"``): the authors' chain
    (:class:`~seg4diff_fast.magnet.transforms.CocoStuffChain`, then one mask per class present in the
    640² crop, in label-id order, with the full names: ``sky-other`` stays ``sky-other``).

    Args:
        root: the folder (see above).
        split: the image / label subfolder (``train2017``).
        captions: the caption JSON (image id → caption); only its keys are used.
        split_dash: ``data[i]``'s name cleaning (the paper samples always keep the full names).

    Raises:
        ValueError: a missing folder or layout, a malformed caption file, no usable image; at load, a label
            map whose size differs from its image's or that holds ids other than 0..170 and 255.
    """

    paper_pad_multiple = 32  # the authors' model pads each batch to a multiple of 32 (ImageList)

    def __init__(self, root: str, split: str = "train2017", captions: str | None = None, split_dash: bool = True):
        if not os.path.isdir(root):
            raise ValueError(f"COCO-Stuff folder {root} does not exist; give the folder holding coco/train2017 "
                             "and coco/annotations_detectron2/train2017")
        layout = coco_stuff_layout(root, split)
        if layout is None:
            raise ValueError(f"{root}: no COCO-Stuff layout; expected ROOT[/coco]/{split}/<id>.jpg + "
                             f"ROOT[/coco]/annotations_detectron2/{split}/<id>.png (the authors' "
                             "datasets/prepare_coco_stuff.py makes the label PNGs)")
        self.root, self.split, self.split_dash = root, split, bool(split_dash)
        self.images_dir, self.labels_dir = layout
        self.classes: list[str] = load_classnames(COCO_STUFF_CLASSES_FILE)
        if captions is None:
            tried = [os.path.join(root, "captions", _COCO_CAPTIONS), os.path.join(root, _COCO_CAPTIONS),
                     os.path.join(os.path.dirname(os.path.normpath(root)), "captions", _COCO_CAPTIONS)]
            captions = next((p for p in tried if os.path.isfile(p)), None)
        elif not os.path.isfile(captions):
            raise ValueError(f"COCO caption file {captions} does not exist")
        self.captions = captions
        self.skipped: Counter = Counter()
        self._items: list[tuple[str, str, str]] = []  # (image path, label path, key)
        if captions is not None:
            with open(captions, encoding="utf-8") as f:
                try:
                    ids = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{captions}: not valid JSON ({e}); it must map image id -> caption") from e
            if not isinstance(ids, dict):
                raise ValueError(f"{captions}: must be a JSON object mapping image id (file stem) -> caption")
            for key in ids:
                image, label = os.path.join(self.images_dir, f"{key}.jpg"), os.path.join(self.labels_dir, f"{key}.png")
                if os.path.isfile(image) and os.path.isfile(label):
                    self._items.append((image, label, str(key)))
                else:
                    self.skipped["listed in the caption file but without an image or a label PNG"] += 1
            total = len(ids)
        else:
            log.warning("coco-stuff %s: no caption file (%s); every label PNG with its image is used (the authors "
                        "train on the images of their train_caption_coco.json only)", root, _COCO_CAPTIONS)
            labels = sorted(f for f in os.listdir(self.labels_dir) if f.endswith(".png") and not f.startswith("."))
            for f in labels:
                key = f[:-len(".png")]
                image = next((os.path.join(self.images_dir, key + e) for e in (".jpg",) + tuple(IMAGE_EXTENSIONS)
                              if os.path.isfile(os.path.join(self.images_dir, key + e))), None)
                if image is None:
                    self.skipped["with a label PNG but no image"] += 1
                    continue
                self._items.append((image, os.path.join(self.labels_dir, f), key))
            total = len(labels)
        if self.skipped:
            log.warning("coco-stuff %s: %s", root, _skip_summary(self.skipped, total))
        if not self._items:
            raise ValueError(f"{root}: no usable image ({_skip_summary(self.skipped, total)}); each image needs "
                             f"{self.images_dir}/<id>.jpg and {self.labels_dir}/<id>.png")

    def __len__(self) -> int:
        return len(self._items)

    def _load(self, i: int, exif: bool) -> tuple[np.ndarray, np.ndarray, str]:
        path, label_path, key = self._items[i]
        with Image.open(path) as im:
            image = np.asarray((ImageOps.exif_transpose(im) if exif else im).convert("RGB"))
        with Image.open(label_path) as lab:
            label = np.asarray(lab)
        if label.ndim != 2:
            raise ValueError(f"{label_path}: a label map must be single-channel (mode L or P), got shape "
                             f"{label.shape}")
        if label.shape != image.shape[:2]:
            raise ValueError(f"{label_path}: the label map is {label.shape[1]}x{label.shape[0]} but {path} is "
                             f"{image.shape[1]}x{image.shape[0]}; labels must be at the image's size")
        ids = np.unique(label)
        bad = ids[(ids >= len(self.classes)) & (ids != 255)]
        if bad.size:
            raise ValueError(f"{label_path}: label ids {bad.tolist()[:8]} are neither COCO-Stuff-171 classes "
                             "(0..170) nor unlabelled (255); use the label PNGs of prepare_coco_stuff.py")
        return image, label.astype(np.uint8), key

    def _sample(self, i: int) -> MagnetSample | None:
        image, label, key = self._load(i, exif=False)
        present = [int(c) for c in np.unique(label) if c != 255]
        if not present:
            return None
        names, masks = _merge_by_name([clean_name(self.classes[c], self.split_dash) for c in present],
                                      [label == c for c in present])
        return MagnetSample(Image.fromarray(image), " ".join(names), np.stack(masks), names, key)

    def __getitem__(self, i: int) -> MagnetSample:
        i = _index(i, len(self))
        for k in range(len(self)):  # an image without a labelled pixel gives the next one's sample
            s = self._sample((i + k) % len(self))
            if s is not None:
                return s
            log.warning("coco-stuff: %s: no labelled pixel; using the next image", self._items[(i + k) % len(self)][2])
        raise ValueError(f"{self.root}: no image has a labelled pixel")

    def paper_sample(self, i: int, rng: np.random.Generator) -> MagnetSample:
        """Image ``i`` as the authors' mapper gives it: EXIF orientation applied (detectron2's ``read_image``),
        :class:`~seg4diff_fast.magnet.transforms.CocoStuffChain` with ``rng``, then one mask per label id present
        in the crop (255 excluded), in id order, named with the full COCO-Stuff-171 names; the prompt is the
        names joined by spaces. A crop without a labelled pixel gives a sample without masks (no mask loss)."""
        image, label, key = self._load(_index(i, len(self)), exif=True)
        image, label = CocoStuffChain()(image, label, rng)
        present = [int(c) for c in np.unique(label) if c != 255]
        names = [self.classes[c] for c in present]
        masks = (np.stack([label == c for c in present]) if present
                 else np.zeros((0, label.shape[0], label.shape[1]), bool))
        return MagnetSample(Image.fromarray(image), " ".join(names), masks, names, key)

    def describe(self) -> str:
        """One line for logs."""
        cap = f"images of {self.captions}" if self.captions else "every labelled image (no caption file)"
        skipped = _skip_summary(self.skipped, len(self) + sum(self.skipped.values()))
        return (f"coco-stuff: {len(self)} images from {self.images_dir} + {self.labels_dir} ({cap}), 171 classes, "
                f"direct samples ({skipped})")


class PaperView(Dataset):
    """A data source as ``protocol="paper"`` trains on it: ``sample(i, rng)`` is the source's
    ``paper_sample(i, rng)`` (the authors' transform chain for that source, drawing from ``rng``), or, for a
    source without one (your own ``Dataset`` of :class:`MagnetSample`), ``source[i]`` unchanged. A source
    the paper protocol cannot train on (:class:`CocoMagnetData`: instances) is refused here with the fix.

    Attributes:
        pad_multiple: the batch is padded to a multiple of this (the authors' ``ImageList``: 32 for
            COCO-Stuff and SA-1B; None: to the batch's largest image only).
        mask_filter: (least area fraction of the padded size, most masks) applied per sample after padding
            (SA-1B), or None.

    Example:
        >>> view = PaperView(ShapesMagnetData(n=3))
        >>> len(view), view.sample(1, np.random.default_rng(0)).key
        (3, 'shapes:1000001')
    """

    def __init__(self, source: Any):
        check = getattr(source, "paper_check", None)
        if check is not None:
            check()
        self.source = source
        self.n = int(source.paper_len()) if hasattr(source, "paper_len") else len(source)
        self.pad_multiple: int | None = getattr(source, "paper_pad_multiple", None)
        self.mask_filter: tuple[float, int] | None = getattr(source, "paper_mask_filter", None)

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int, rng: np.random.Generator) -> MagnetSample:
        i = _index(i, self.n)
        fn = getattr(self.source, "paper_sample", None)
        return fn(i, rng) if fn is not None else self.source[i]

    def __getitem__(self, i: int) -> MagnetSample:
        """``sample(i, numpy.random.default_rng(i))``."""
        return self.sample(i, np.random.default_rng(int(i)))


class SA1BMagnetData(Dataset):
    """SA-1B images with captions as matched samples: the masks (area > ``min_area`` of the image, largest
    first, at most ``max_masks``) carry no class; the trainer matches them to the caption's tokens.

    Layout (searched recursively, sorted): ``sa_XXXX.jpg`` + ``sa_XXXX.json`` (SA-1B's ``{"image": {...},
    "annotations": [{"segmentation": {"size": [h, w], "counts": str}, "area": int, ...}]}``) beside it, or
    in the parallel folder with ``images`` replaced by ``annotations`` (the authors' layout
    ``images/sa_000020/sa_X.jpg`` + ``annotations/sa_000020/sa_X.json``), + a caption: ``sa_XXXX.txt``
    beside the image (plain text; it wins), or a JSON map from the image's file name, relative path or
    stem to its caption: ``captions=PATH``, else ``root/captions.json``, ``root/train_caption_sa1b.json`` or
    ``root/captions/train_caption_sa1b.json`` (the authors' file). The prompt is the caption's first
    ``caption_sentences`` sentences (the authors keep two; None keeps all). Images without an annotation
    json, a caption, or a mask left after filtering are dropped while indexing (one logged warning line);
    the index reads every json once (mask sizes and areas), so opening a large folder takes a while.

    Under ``protocol="paper"`` (:meth:`paper_sample`) every image with a json and a caption is used; its
    masks are filtered after the authors' transform chain (above ``min_area`` of the padded batch size, at
    most ``max_masks``: :class:`~seg4diff_fast.magnet.batch.PaperCollate`) and the prompt is their cut
    :func:`~seg4diff_fast.magnet.transforms.authors_short_caption`.

    Args:
        root: the folder.
        min_area: least mask area, as a fraction of the image's pixels (strictly above).
        max_masks: most masks per sample (the largest kept).
        caption_sentences: sentences of the caption kept (None: all).
        captions: a JSON file mapping image (file name, relative path or stem) → caption.

    Raises:
        ValueError: a missing folder, a folder without images, a mask whose RLE size differs from its
            image's size (naming the json), a malformed ``captions.json``, no usable image.

    Example:
        >>> data = SA1BMagnetData("datasets/sa1b")  # doctest: +SKIP
        >>> s = data[0]; s.kind, s.prompt, s.masks.shape  # doctest: +SKIP
        ('matched', 'A red car parked on a street. Trees line the road.', (32, 1500, 2250))
    """

    paper_pad_multiple = 32  # the authors' model pads each batch to a multiple of 32 (ImageList)

    def __init__(self, root: str, min_area: float = 0.005, max_masks: int = 32, caption_sentences: int | None = 2,
                 captions: str | None = None):
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
        if captions is not None and not os.path.isfile(captions):
            raise ValueError(f"SA-1B caption file {captions} does not exist")
        self.captions_file = captions

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
        # protocol="paper": (image path, json path, key, caption) of every image with a json and a caption
        self._paper_items: list[tuple[str, str, str, str]] = []
        for path in image_files:
            stem = os.path.splitext(path)[0]
            rel = os.path.relpath(path, root)
            key = os.path.basename(path)
            json_path = self._json_path(stem, rel)
            if json_path is None:
                self.skipped["without an annotation json"] += 1
                continue
            caption = self._caption(stem, rel, captions)
            if not caption:
                self.skipped["without a caption"] += 1
                continue
            kept = self._kept(path, json_path)
            self._paper_items.append((path, json_path, key, caption))
            if not kept:
                self.skipped[f"without a mask above min_area={self.min_area}"] += 1
                continue
            self._items.append((path, json_path, key, first_sentences(caption, self.caption_sentences), kept))
        if self.skipped:
            log.warning("sa1b %s: %s", root, _skip_summary(self.skipped, len(image_files)))
        if not self._items:
            raise ValueError(f"{root}: no usable image ({_skip_summary(self.skipped, len(image_files))}); each "
                             "image needs its sa_XXXX.json, a caption (sa_XXXX.txt or captions.json) and a mask "
                             "above min_area")

    def _json_path(self, stem: str, rel: str) -> str | None:
        """``stem.json`` beside the image, else in the parallel ``annotations`` folder (the authors' layout)."""
        if os.path.isfile(stem + ".json"):
            return stem + ".json"
        parts = os.path.splitext(rel)[0].split(os.sep)
        if "images" in parts[:-1]:
            parts[parts.index("images")] = "annotations"
            alt = os.path.join(self.root, *parts) + ".json"
            if os.path.isfile(alt):
                return alt
        base = os.path.basename(os.path.normpath(self.root))
        if base == "images":  # root is the authors' images/ folder itself
            alt = os.path.join(os.path.dirname(os.path.normpath(self.root)), "annotations", *parts) + ".json"
            if os.path.isfile(alt):
                return alt
        return None

    def _caption_map(self) -> dict[str, str]:
        found = [self.captions_file] if self.captions_file else [
            p for p in (os.path.join(self.root, "captions.json"), os.path.join(self.root, "train_caption_sa1b.json"),
                        os.path.join(self.root, "captions", "train_caption_sa1b.json")) if os.path.isfile(p)]
        if not found:
            return {}
        path = found[0]
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

    def paper_len(self) -> int:
        """Images ``protocol="paper"`` trains on: every one with an annotation json and a caption."""
        return len(self._paper_items)

    @property
    def paper_mask_filter(self) -> tuple[float, int]:
        """(least area as a fraction of the padded batch size, most masks), applied after the transform."""
        return self.min_area, self.max_masks

    def paper_sample(self, i: int, rng: np.random.Generator) -> MagnetSample:
        """Image ``i`` of the paper index through the authors' SA-1B chain: EXIF orientation applied (detectron2's
        ``read_image``), :class:`~seg4diff_fast.magnet.transforms.SA1BChain` on the image and every non-crowd
        mask, the masks sorted by area after the transform (largest first, ties in file order) with empty ones
        dropped; the prompt :func:`~seg4diff_fast.magnet.transforms.authors_short_caption` of the caption. The
        area filter and the cap need the batch's padded size: :class:`~seg4diff_fast.magnet.batch.PaperCollate`.
        """
        path, json_path, key, caption = self._paper_items[_index(i, len(self._paper_items))]
        with Image.open(path) as im:
            image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        with open(json_path, encoding="utf-8") as f:
            anns = json.load(f)["annotations"]
        masks = []
        for k, a in enumerate(anns):
            if a.get("iscrowd", 0):
                continue
            seg = a["segmentation"]
            if [int(v) for v in seg["size"]] != [image.shape[0], image.shape[1]]:
                raise ValueError(f"{json_path}: mask {k} has RLE size {seg['size']} but {path} is "
                                 f"[{image.shape[0]}, {image.shape[1]}] (after its EXIF orientation); masks must "
                                 "be at the image's resolution")
            masks.append(_decode_rle(seg).astype(np.uint8))
        image, masks = SA1BChain()(image, masks, rng)
        areas = [int(m.sum()) for m in masks]
        order = sorted((k for k in range(len(masks)) if areas[k] > 0), key=lambda k: -areas[k])  # stable
        stack = (np.stack([masks[k] for k in order]).astype(bool) if order
                 else np.zeros((0, image.shape[0], image.shape[1]), bool))
        return MagnetSample(Image.fromarray(image), authors_short_caption(caption), stack, None, key)

    def describe(self) -> str:
        """One line for logs."""
        sentences = "all" if self.caption_sentences is None else f"first {self.caption_sentences}"
        total = len(self) + sum(self.skipped.values())
        return (f"sa1b: {len(self)} images from {self.root}, matched samples (masks > {self.min_area:g} of the "
                f"image, <= {self.max_masks} per image, largest first; captions: {sentences} sentences; "
                f"{_skip_summary(self.skipped, total)})")


def open_magnet_data(spec: str, protocol: str | None = None,
                     **kw: Any) -> ShapesMagnetData | CocoMagnetData | CocoStuffMagnetData | SA1BMagnetData:
    """Open a data source from a spec: ``"shapes"``, ``"shapes:N"`` (N scenes), ``"coco:DIR"``,
    ``"sa1b:DIR"``; ``kw`` go to the source's constructor.

    ``"coco:DIR"`` opens COCO-Stuff label PNGs (:class:`CocoStuffMagnetData`, the authors' layout) or COCO
    instances (:class:`CocoMagnetData`, ``DIR/annotations/instances_*.json``), whichever DIR holds; when it
    holds both, ``protocol="corrected"`` takes the instances and otherwise COCO-Stuff.

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
        if scheme != "coco":
            return SA1BMagnetData(arg, **kw)
        stuff = coco_stuff_layout(arg, kw.get("split") or "train2017") is not None
        ann_dir = os.path.join(arg, "annotations")
        instances = os.path.isdir(ann_dir) and any(f.startswith("instances_") and f.endswith(".json")
                                                   for f in os.listdir(ann_dir))
        if stuff and not (instances and protocol == "corrected"):
            return CocoStuffMagnetData(arg, **kw)
        return CocoMagnetData(arg, **kw)
    raise ValueError(f"unknown data spec {spec!r}; accepted: {SPEC_FORMS}")
