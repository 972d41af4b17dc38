"""Benchmark datasets in the layouts the Seg4Diff authors' code registers, and the class-name lists shipped as
package data.

Each dataset is images plus single-channel label PNGs (label id i = class i of the dataset's list,
255 = ignore). Paths are relative to ``--root`` (detectron2's ``DETECTRON2_DATASETS`` folder, usually
``datasets/``). The first folder is the one the authors' registration reads (cvlab-kaist/Seg4Diff
``seg4diff/data/datasets/register_*.py``); the ones after it are earlier names this package used, still
accepted when the first is absent:

- voc20: ``VOCdevkit/VOC2012/JPEGImages`` (or ``VOCdevkit/VOC2012/images_detectron2/val``) +
  ``VOCdevkit/VOC2012/annotations_detectron2/val``
- voc21: the same images + ``VOCdevkit/VOC2012/annotations_detectron2_bg/val`` (background = 20, last)
- context59: ``VOCdevkit/VOC2010/JPEGImages`` + ``VOCdevkit/VOC2010/annotations_detectron2/pc59_val``
- context59-bg: the same images + ``VOCdevkit/VOC2010/annotations_detectron2_bg/pc59_val`` (background = 0,
  first; the authors' unsupervised Pascal-Context)
- ade150: ``ADEChallengeData2016/images/validation`` + ``ADEChallengeData2016/annotations_detectron2/validation``
- cityscapes: ``cityscapes/leftImg8bit/val/<city>/*_leftImg8bit.png`` +
  ``cityscapes/gtFine/val/<city>/*_gtFine_labelTrainIds.png`` (the other gtFine files are not read)
- coco-object: ``coco/val2017`` + ``coco/annotations_object/val2017`` (or
  ``coco/annotations_detectron2/object_val2017``); 0 = background, 1…80 objects
- coco-stuff27: ``coco/val2017`` + ``coco/annotations_27_detectron2/val2017`` (or
  ``coco/annotations_detectron2/stuff27_val2017``)

Pairs are driven by the label files: the label folder is walked (recursively, sorted) and each label finds
its image by stem (any usual extension), so image folders holding more images than labels (VOC's
JPEGImages: train, val and unlabelled images) work; a label whose image is missing is an error that names
it. ``folder`` is a user's own data: ``--images DIR --labels DIR --classes FILE.json``, label = image stem +
``.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import numpy as np

__all__ = ["DATASETS", "DatasetNotFoundError", "DatasetSpec", "SegDataset", "load_classnames", "IMAGE_EXTENSIONS",
           "dataset_classes"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetNotFoundError(FileNotFoundError):
    """A benchmark's folders are not under the root. ``tried`` lists every folder looked at, in order."""

    def __init__(self, message: str, tried: list[str]):
        super().__init__(message)
        self.tried = list(tried)


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: its class list, folders, label naming, background handling and default protocol.

    Attributes:
        classnames: JSON file in ``seg4diff_fast/data/classnames/``.
        images, labels: folders relative to the root, as the authors' code registers them.
        label_suffix: label file name = (image stem without ``image_suffix``) + this.
        image_suffix: end of the image stem that the label name lacks (Cityscapes' ``_leftImg8bit``).
        background: index of "background" in the class list, or None.
        protocol: "open-vocab" or "unsupervised" (the paper's table the dataset belongs to).
        legacy_images, legacy_labels: earlier folder names, tried in order when the first is absent.
        prepend_classes: names put before the shipped list (``context59-bg``: "background").
        paper_num_classes: the authors' unsupervised scorer counts only labels below this (the length of the
            class JSON their script passes); None: every class.
        authors_name: the name the authors' code registers the split under.
    """

    classnames: str
    images: str
    labels: str
    label_suffix: str = ".png"
    image_suffix: str = ""
    background: int | None = None
    protocol: str = "open-vocab"
    legacy_images: tuple[str, ...] = ()
    legacy_labels: tuple[str, ...] = ()
    prepend_classes: tuple[str, ...] = ()
    paper_num_classes: int | None = None
    authors_name: str = ""

    def folders(self, kind: str) -> tuple[str, ...]:
        """The candidate folders (relative to the root) of ``kind`` ("images" or "labels"), in search order."""
        if kind == "images":
            return (self.images, *self.legacy_images)
        if kind == "labels":
            return (self.labels, *self.legacy_labels)
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")


_VOC12 = "VOCdevkit/VOC2012"
_VOC10 = "VOCdevkit/VOC2010"

DATASETS: dict[str, DatasetSpec] = {
    "voc20": DatasetSpec("voc20.json", f"{_VOC12}/JPEGImages", f"{_VOC12}/annotations_detectron2/val",
                         legacy_images=(f"{_VOC12}/images_detectron2/val",), authors_name="voc_2012_train_sem_seg"),
    "voc21": DatasetSpec("voc21.json", f"{_VOC12}/JPEGImages", f"{_VOC12}/annotations_detectron2_bg/val",
                         background=20, protocol="unsupervised", legacy_images=(f"{_VOC12}/images_detectron2/val",),
                         authors_name="voc_2012_train_background_sem_seg"),
    "context59": DatasetSpec("pc59.json", f"{_VOC10}/JPEGImages", f"{_VOC10}/annotations_detectron2/pc59_val",
                             authors_name="context_59_test_sem_seg"),
    "context59-bg": DatasetSpec("pc59.json", f"{_VOC10}/JPEGImages", f"{_VOC10}/annotations_detectron2_bg/pc59_val",
                                background=0, protocol="unsupervised", prepend_classes=("background",),
                                paper_num_classes=59, authors_name="context_59_test_background_sem_seg"),
    "ade150": DatasetSpec("ade150.json", "ADEChallengeData2016/images/validation",
                          "ADEChallengeData2016/annotations_detectron2/validation",
                          authors_name="ade20k_150_test_sem_seg"),
    "cityscapes": DatasetSpec("cityscapes.json", "cityscapes/leftImg8bit/val", "cityscapes/gtFine/val",
                              label_suffix="_gtFine_labelTrainIds.png", image_suffix="_leftImg8bit",
                              authors_name="cityscapes_fine_sem_seg_val"),
    "coco-object": DatasetSpec("coco_object.json", "coco/val2017", "coco/annotations_object/val2017", background=0,
                               legacy_labels=("coco/annotations_detectron2/object_val2017",),
                               authors_name="coco_2017_test_object_wo_bg_stuff_all_sem_seg"),
    "coco-stuff27": DatasetSpec("coco_stuff_27.json", "coco/val2017", "coco/annotations_27_detectron2/val2017",
                                protocol="unsupervised",
                                legacy_labels=("coco/annotations_detectron2/stuff27_val2017",),
                                authors_name="coco_2017_test_27_stuff_all_sem_seg"),
}


def load_classnames(name_or_path: str) -> list[str]:
    """A class-name list: a shipped one by file name (``"voc20.json"``) or dataset name (``"ade150"``),
    or any JSON list of strings by path.

    Example:
        >>> len(load_classnames("ade150")), load_classnames("voc21")[-1], load_classnames("context59-bg")[:2]
        (150, 'background', ['background', 'aeroplane'])
    """
    if name_or_path in DATASETS:
        return dataset_classes(name_or_path)
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


def dataset_classes(dataset: str) -> list[str]:
    """The class list of a benchmark of :data:`DATASETS` (index = label id).

    Example:
        >>> names = dataset_classes("coco-object")
        >>> len(names), names[0], names[1]
        (81, 'background', 'person')
    """
    spec = DATASETS[dataset]
    return list(spec.prepend_classes) + load_classnames(spec.classnames)


def _find(root: str, candidates: tuple[str, ...]) -> str | None:
    for rel in candidates:
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            return path
    return None


class SegDataset:
    """Pairs of (image path, label path) from an image folder and a label folder.

    Args:
        images, labels: the two folders.
        classes: class names (index = label id).
        label_suffix, image_suffix: label naming (see :class:`DatasetSpec`).
        background: index of "background", or None.
        ignore_index: label not scored.
        name: shown in messages and results.
        paper_num_classes: see :class:`DatasetSpec`.

    Pairs are driven by the label files; an image without a label is skipped, a label without an image is
    an error (:class:`FileNotFoundError` naming it). Iterating yields ``(name, PIL.Image (RGB), labels
    int64 (H, W))``.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> for sub in ("img", "lab"):
        ...     os.makedirs(os.path.join(d, sub))
        >>> Image.new("RGB", (6, 4)).save(os.path.join(d, "img", "a.jpg"))
        >>> Image.new("RGB", (6, 4)).save(os.path.join(d, "img", "unlabelled.jpg"))
        >>> Image.fromarray(np.ones((4, 6), np.uint8)).save(os.path.join(d, "lab", "a.png"))
        >>> ds = SegDataset(os.path.join(d, "img"), os.path.join(d, "lab"), ["x", "y"])
        >>> len(ds), int(next(iter(ds))[2].max())
        (1, 1)
    """

    def __init__(self, images: str, labels: str, classes: list[str], label_suffix: str = ".png",
                 image_suffix: str = "", background: int | None = None, ignore_index: int = 255,
                 name: str = "folder", paper_num_classes: int | None = None):
        for what, d in (("image", images), ("label", labels)):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"{name}: {what} folder {d} does not exist")
        self.name = name
        self.images, self.labels = images, labels
        self.classes = list(classes)
        self.background = background
        self.ignore_index = ignore_index
        self.paper_num_classes = paper_num_classes
        self.pairs = self._pairs(label_suffix, image_suffix)
        if not self.pairs:
            raise FileNotFoundError(f"{name}: no label files *{label_suffix} under {labels}")

    @classmethod
    def standard(cls, dataset: str, root: str, images: str | None = None, labels: str | None = None,
                 ignore_index: int = 255) -> SegDataset:
        """A benchmark of :data:`DATASETS` under ``root``: the authors' folders, else the earlier names
        (``images`` / ``labels`` override the search).

        Raises:
            DatasetNotFoundError: a folder is in none of the places tried (the message lists them).
        """
        spec = DATASETS[dataset]
        found, tried = {}, []
        for kind, given in (("images", images), ("labels", labels)):
            if given is not None:
                found[kind] = given
                continue
            found[kind] = _find(root, spec.folders(kind))
            if found[kind] is None:
                tried += [os.path.join(root, rel) for rel in spec.folders(kind)]
        if tried:
            missing = [k for k in ("images", "labels") if found[k] is None]
            raise DatasetNotFoundError(
                f"{dataset}: no {' and no '.join(m[:-1] for m in missing)} folder under {root}; tried "
                + ", ".join(tried)
                + " (fix: --root DIR, the folder holding VOCdevkit/, coco/, ADEChallengeData2016/, cityscapes/; "
                "or --images DIR / --labels DIR)", tried)
        return cls(found["images"], found["labels"], dataset_classes(dataset), spec.label_suffix,
                   spec.image_suffix, spec.background, ignore_index, name=dataset,
                   paper_num_classes=spec.paper_num_classes)

    def _pairs(self, label_suffix: str, image_suffix: str) -> list[tuple[str, str]]:
        label_files = []
        for dirpath, _, files in os.walk(self.labels):
            label_files += [os.path.join(dirpath, f) for f in files if f.endswith(label_suffix)]
        pairs, orphans = [], []
        extensions = IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)
        for label in sorted(label_files):
            rel = os.path.relpath(label, self.labels)
            base = os.path.join(self.images, rel[: -len(label_suffix)] + image_suffix)
            image = next((base + ext for ext in extensions if os.path.isfile(base + ext)), None)
            if image is None:
                orphans.append(label)
            else:
                pairs.append((image, label))
        if orphans:
            shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
            raise FileNotFoundError(f"{self.name}: {len(orphans)} label file(s) have no image in {self.images} "
                                    f"(looked for <stem>{image_suffix}.jpg/.png/...): {shown}")
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
