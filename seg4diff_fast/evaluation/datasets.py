"""Benchmark datasets in their standard prepared layouts, and the class-name lists shipped as package data.

Each dataset is images plus single-channel label PNGs (label id i = class i of the dataset's list,
255 = ignore), as the CAT-Seg / PixelCLIP preparation scripts write them. Paths are relative to
``--root`` (detectron2's ``DETECTRON2_DATASETS`` folder, usually ``datasets/``):

- voc20: ``VOCdevkit/VOC2012/images_detectron2/val`` + ``VOCdevkit/VOC2012/annotations_detectron2/val``
- voc21: ``VOCdevkit/VOC2012/images_detectron2/val`` + ``VOCdevkit/VOC2012/annotations_detectron2_bg/val``
  (background = 20, last)
- context59: ``VOCdevkit/VOC2010/JPEGImages`` + ``VOCdevkit/VOC2010/annotations_detectron2/pc59_val``
- ade150: ``ADEChallengeData2016/images/validation`` + ``ADEChallengeData2016/annotations_detectron2/validation``
- cityscapes: ``cityscapes/leftImg8bit/val/<city>/*_leftImg8bit.png`` +
  ``cityscapes/gtFine/val/<city>/*_gtFine_labelTrainIds.png``
- coco-object: ``coco/val2017`` + ``coco/annotations_detectron2/object_val2017`` (background = 0)
- coco-stuff27: ``coco/val2017`` + ``coco/annotations_detectron2/stuff27_val2017``

The label folder is walked (recursively, sorted) and each label finds its image by stem (any usual
extension), so image folders holding more images than labels (VOC2010's JPEGImages) work. COCO-Object
labels use ``coco_object.json`` (0 = background, 1…80 things) and COCO-Stuff-27 ``coco_stuff_27.json``;
there is no one standard script for these two, so their folders are this package's convention (give
``--images``/``--labels`` to point anywhere). ``folder`` is a user's own data: ``--images DIR --labels
DIR --classes FILE.json``, label = image stem + ``.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import numpy as np

__all__ = ["DATASETS", "DatasetSpec", "SegDataset", "load_classnames", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: its class list, folders, label naming, background handling and default protocol.

    Attributes:
        classnames: JSON file in ``seg4diff_fast/data/classnames/``.
        images, labels: folders relative to the root.
        label_suffix: label file name = (image stem without ``image_suffix``) + this.
        image_suffix: end of the image stem that the label name lacks (Cityscapes' ``_leftImg8bit``).
        background: index of "background" in the class list, or None.
        protocol: "open-vocab" or "unsupervised" (the paper's table the dataset belongs to).
    """

    classnames: str
    images: str
    labels: str
    label_suffix: str = ".png"
    image_suffix: str = ""
    background: int | None = None
    protocol: str = "open-vocab"


DATASETS: dict[str, DatasetSpec] = {
    "voc20": DatasetSpec("voc20.json", "VOCdevkit/VOC2012/images_detectron2/val",
                         "VOCdevkit/VOC2012/annotations_detectron2/val"),
    "voc21": DatasetSpec("voc21.json", "VOCdevkit/VOC2012/images_detectron2/val",
                         "VOCdevkit/VOC2012/annotations_detectron2_bg/val", background=20, protocol="unsupervised"),
    "context59": DatasetSpec("pc59.json", "VOCdevkit/VOC2010/JPEGImages",
                             "VOCdevkit/VOC2010/annotations_detectron2/pc59_val"),
    "ade150": DatasetSpec("ade150.json", "ADEChallengeData2016/images/validation",
                          "ADEChallengeData2016/annotations_detectron2/validation"),
    "cityscapes": DatasetSpec("cityscapes.json", "cityscapes/leftImg8bit/val", "cityscapes/gtFine/val",
                              label_suffix="_gtFine_labelTrainIds.png", image_suffix="_leftImg8bit"),
    "coco-object": DatasetSpec("coco_object.json", "coco/val2017", "coco/annotations_detectron2/object_val2017",
                               background=0),
    "coco-stuff27": DatasetSpec("coco_stuff_27.json", "coco/val2017", "coco/annotations_detectron2/stuff27_val2017",
                                protocol="unsupervised"),
}


def load_classnames(name_or_path: str) -> list[str]:
    """A class-name list: a shipped one by file name (``"voc20.json"``) or dataset name (``"ade150"``),
    or any JSON list of strings by path.

    Example:
        >>> len(load_classnames("ade150")), load_classnames("voc21")[-1]
        (150, 'background')
    """
    if name_or_path in DATASETS:
        name_or_path = DATASETS[name_or_path].classnames
    if os.path.sep not in name_or_path and not os.path.exists(name_or_path):
        ref = resources.files("seg4diff_fast") / "data" / "classnames" / name_or_path
        text = ref.read_text(encoding="utf-8")
    else:
        with open(name_or_path, encoding="utf-8") as f:
            text = f.read()
    names = json.loads(text)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{name_or_path}: a class-name file must hold a non-empty JSON list of strings")
    return names


class SegDataset:
    """Pairs of (image path, label path) from an image folder and a label folder.

    Args:
        images, labels: the two folders.
        classes: class names (index = label id).
        label_suffix, image_suffix: label naming (see :class:`DatasetSpec`).
        background: index of "background", or None.
        ignore_index: label not scored.

    Iterating yields ``(name, PIL.Image (RGB), labels int64 (H, W))``.
    """

    def __init__(self, images: str, labels: str, classes: list[str], label_suffix: str = ".png",
                 image_suffix: str = "", background: int | None = None, ignore_index: int = 255,
                 name: str = "folder"):
        for what, d in (("image", images), ("label", labels)):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"{name}: {what} folder {d} does not exist")
        self.name = name
        self.images, self.labels = images, labels
        self.classes = list(classes)
        self.background = background
        self.ignore_index = ignore_index
        self.pairs = self._pairs(label_suffix, image_suffix)
        if not self.pairs:
            raise FileNotFoundError(f"{name}: no label files *{label_suffix} with a matching image under "
                                    f"{labels} / {images}")

    @classmethod
    def standard(cls, dataset: str, root: str, images: str | None = None, labels: str | None = None,
                 ignore_index: int = 255) -> SegDataset:
        """A benchmark of :data:`DATASETS` under ``root`` (folders overridable)."""
        spec = DATASETS[dataset]
        return cls(images or os.path.join(root, spec.images), labels or os.path.join(root, spec.labels),
                   load_classnames(spec.classnames), spec.label_suffix, spec.image_suffix, spec.background,
                   ignore_index, name=dataset)

    def _pairs(self, label_suffix: str, image_suffix: str) -> list[tuple[str, str]]:
        label_files = []
        for dirpath, _, files in os.walk(self.labels):
            label_files += [os.path.join(dirpath, f) for f in files if f.endswith(label_suffix)]
        pairs = []
        for label in sorted(label_files):
            rel = os.path.relpath(label, self.labels)
            stem = rel[: -len(label_suffix)] + image_suffix
            base = os.path.join(self.images, stem)
            for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
                if os.path.isfile(base + ext):
                    pairs.append((base + ext, label))
                    break
        return pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[tuple[str, object, np.ndarray]]:
        from PIL import Image

        for image_path, label_path in self.pairs:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
            with Image.open(label_path) as lab:
                if lab.mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(f"{label_path}: labels must be a single-channel PNG, got mode {lab.mode}")
                labels = np.asarray(lab).astype(np.int64)
            if labels.shape != (image.height, image.width):
                raise ValueError(f"{label_path}: label size {labels.shape[::-1]} differs from the image's "
                                 f"{image.size}")
            bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= len(self.classes)))
            if bad.any():
                raise ValueError(f"{label_path}: label ids {sorted(set(labels[bad].tolist()))[:5]} are outside "
                                 f"0..{len(self.classes) - 1} and not {self.ignore_index}")
            yield os.path.splitext(os.path.basename(image_path))[0], image, labels
