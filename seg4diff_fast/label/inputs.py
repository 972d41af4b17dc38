"""Inputs of ``label``: finding the images, reading the class list, decoding and resizing in loader workers.

``--images`` is a folder (searched recursively for image files; hidden files and folders skipped) or a
text file listing image paths, one a line (relative lines are relative to the list file's folder). Each
image gets a relative path ``rel`` (to the folder, or to the list's folder, or else to the deepest folder
common to all entries) that names its outputs; the list is sorted by ``rel`` so that every process sees the
same order whatever the file system's.

:class:`LabelDataset` turns item ``i`` into the segmenter's model input, exactly as
``Seg4DiffSegmenter`` would for that image alone (RGB, optional short-side pre-resize, bilinear stretch to
``resolution``², ``2x − 1``), or into the reason it could not be read; it runs in DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..reader import ModelFamily, as_float, resize_short_side, to_rgb
from ..reader.vocabulary import check_repeated
from .outputs import confidence_path, label_path

__all__ = ["IMAGE_EXTENSIONS", "ImageItem", "discover_images", "load_classes", "LabelDataset", "collate"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


@dataclass(frozen=True)
class ImageItem:
    """One input: ``path`` (as opened) and ``rel`` (POSIX relative path naming its outputs)."""

    path: str
    rel: str


def _walk(root: str, skip: str | None) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip is None or os.path.realpath(os.path.join(folder, d)) != skip))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(folder, name))
    return found


def discover_images(images: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | None = None
                    ) -> list[ImageItem]:
    """The inputs, sorted by relative path.

    Args:
        images: a folder, a text file with one image path a line (``#`` comments and blank lines skipped),
            one image file, or a list of image paths.
        out_dir: an output folder inside the input folder is not searched.

    Raises:
        ValueError: nothing found, a missing path, or two inputs whose outputs would collide
            (``a/b.jpg`` and ``a/b.png``).

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); os.makedirs(os.path.join(d, "x"))
        >>> for p in ("b.jpg", "x/a.png", "notes.txt"):
        ...     _ = open(os.path.join(d, p), "wb").write(b"")
        >>> [i.rel for i in discover_images(d)]
        ['b.jpg', 'x/a.png']
    """
    skip = os.path.realpath(out_dir) if out_dir is not None else None
    if isinstance(images, (str, os.PathLike)):
        src = os.fspath(images)
        if os.path.isdir(src):
            root = src
            paths = _walk(src, skip)
        elif os.path.isfile(src) and src.lower().endswith(IMAGE_EXTENSIONS):
            paths, root = [src], os.path.dirname(os.path.abspath(src))
        elif os.path.isfile(src):
            base = os.path.dirname(os.path.abspath(src))
            try:
                with open(src, encoding="utf-8") as f:
                    lines = [ln.strip() for ln in f]
            except UnicodeDecodeError:
                raise ValueError(f"--images {src}: not a folder, an image or a text list of image paths") from None
            paths = [ln if os.path.isabs(ln) else os.path.join(base, ln)
                     for ln in lines if ln and not ln.startswith("#")]
            root = base
        else:
            raise ValueError(f"--images {src}: no such folder or list file")
    else:
        paths, root = [os.fspath(p) for p in images], None
    if not paths:
        where = os.fspath(images) if isinstance(images, (str, os.PathLike)) else "the list"
        raise ValueError(f"no images found in {where}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"image not found: {missing[0]}{more}")
    absolute = [os.path.abspath(p) for p in paths]
    if root is None or not all(a.startswith(os.path.abspath(root) + os.sep) for a in absolute):
        root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    items = [ImageItem(p, os.path.relpath(a, os.path.abspath(root)).replace(os.sep, "/"))
             for p, a in zip(paths, absolute)]
    items.sort(key=lambda it: it.rel)
    seen: dict[str, ImageItem] = {}
    for it in items:
        for out in (label_path("", it.rel), confidence_path("", it.rel)):
            if out in seen and seen[out].rel != it.rel:
                raise ValueError(f"inputs {seen[out].path} and {it.path} share the name stem of OUT/{out}: their "
                                 "outputs would overwrite each other; rename one, or label them into different "
                                 "--out folders")
            seen[out] = it
    return items


def load_classes(spec: str | Sequence[str]) -> list[str]:
    """The class list: a list as is, a file with one name a line (blank lines skipped), or a comma list.

    Raises:
        ValueError: the list is empty, has an empty name or names a class twice.

    Example:
        >>> load_classes("cat, sofa ,grass")
        ['cat', 'sofa', 'grass']
    """
    if isinstance(spec, str):
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                names = [ln.strip() for ln in f if ln.strip()]
            where = f"class file {spec}"
        else:
            names = [c.strip() for c in spec.split(",")]
            if not any(names):
                names = []
            where = f"--classes {spec!r}"
    else:
        names, where = [str(c).strip() for c in spec], "the class list"
    if not names:
        raise ValueError(f"{where}: the class list is empty")
    if any(not n for n in names):
        raise ValueError(f"{where} has an empty class name")
    check_repeated(names, where)
    return names


class LabelDataset(torch.utils.data.Dataset):
    """Item ``i`` → ``{"index": i, "x": (3, R, R) float32 in [−1, 1] or None, "size": (H, W), "error": str|None}``.

    ``x`` is what ``Seg4DiffSegmenter`` feeds its VAE for that image alone (``family.model_input``, in
    [−1, 1] unless ``signed=False``: the reader's ``defaults.signed_input``); ``size`` the image's own size
    (the label map's). Unreadable, truncated or empty files give ``x=None`` and the reason.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp(); Image.new("L", (30, 20)).save(os.path.join(d, "g.png"))
        >>> _ = open(os.path.join(d, "bad.jpg"), "wb").write(b"junk")
        >>> ds = LabelDataset(discover_images(d), resolution=16)
        >>> ds[0]["error"].split(":")[0], tuple(ds[1]["x"].shape), ds[1]["size"]
        ('UnidentifiedImageError', (3, 16, 16), (20, 30))
    """

    def __init__(self, items: Sequence[ImageItem], resolution: int, short_side: int | None = None,
                 family: ModelFamily | None = None, signed: bool = True):
        self.items = list(items)
        self.family = family if family is not None else ModelFamily()
        self.signed = bool(signed)
        self.resolution = int(resolution)
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        item = self.items[i]
        try:
            if os.path.getsize(item.path) == 0:
                raise ValueError("empty file (0 bytes)")
            with Image.open(item.path) as im:
                im.load()
                if im.width == 0 or im.height == 0:
                    raise ValueError(f"zero-size image ({im.width}x{im.height})")
                rgb = to_rgb(im)
            size = tuple(int(s) for s in rgb.shape[:2])
            if self.short_side is not None:
                rgb = resize_short_side(rgb, self.short_side)
            x = self.family.model_input([as_float(rgb)], self.resolution, None, signed=self.signed)[0]
            return {"index": i, "x": x, "size": size, "error": None}
        except Exception as e:  # any decoder failure is this image's error, never the run's
            return {"index": i, "x": None, "size": None, "error": f"{type(e).__name__}: {e}"}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: ``index``, ``size``, ``error`` lists (all samples) and ``x`` (B', 3, R, R), the readable
    ones stacked in order (None when none is)."""
    ok = [s["x"] for s in samples if s["x"] is not None]
    return {
        "index": [s["index"] for s in samples],
        "size": [s["size"] for s in samples],
        "error": [s["error"] for s in samples],
        "x": torch.stack(ok) if ok else None,
    }
