"""COCO export of ``label``: one JSON with an RLE mask per class present in each image, read back from
the label PNGs (so it always describes exactly what is on disk).

Layout: ``images`` (``id`` = 1 + the image's index in the sorted input list, ``file_name`` = its relative
path, ``width``, ``height``), ``categories`` (``id`` = 1 + class index, ``name``), ``annotations`` (one per
class present in an image: ``segmentation`` = compressed RLE ``{"size": [h, w], "counts": str}`` as
``pycocotools.mask.encode`` writes it, ``area``, ``bbox`` [x, y, w, h], ``iscrowd`` 0). Images without a
label PNG (unreadable inputs) are left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .inputs import ImageItem
from .outputs import label_path, write_json

__all__ = ["rle_encode", "rle_string", "build_coco"]


def rle_encode(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a binary (H, W) mask: run lengths in column-major order, starting
    with a run of zeros.

    Example:
        >>> import numpy as np
        >>> rle_encode(np.array([[0, 1], [1, 1]], bool))
        [1, 3]
    """
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def rle_string(counts: Sequence[int]) -> str:
    """COCO's compressed counts string (``rleToString`` of pycocotools' maskApi.c).

    Example:
        >>> rle_string([1, 3])
        '13'
    """
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _annotations(labels: np.ndarray, num_classes: int) -> list[dict]:
    anns = []
    h, w = labels.shape
    for c in np.unique(labels).tolist():
        if not 0 <= c < num_classes:
            continue
        mask = labels == c
        ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        anns.append({
            "category_id": int(c) + 1,
            "segmentation": {"size": [int(h), int(w)], "counts": rle_string(rle_encode(mask))},
            "area": int(mask.sum()),
            "bbox": [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)],
            "iscrowd": 0,
        })
    return anns


def build_coco(out_dir: str, items: Sequence[ImageItem], classes: Sequence[str], path: str | None = None,
               threads: int = 4) -> str:
    """Write the COCO JSON of the label PNGs under ``out_dir`` for ``items`` (sorted input list) to
    ``path`` (default ``OUT/coco.json``), atomically; returns its path.

    Example:
        >>> import os, tempfile, json
        >>> import numpy as np
        >>> from seg4diff_fast.label.outputs import atomic_write, encode_labels
        >>> d = tempfile.mkdtemp()
        >>> atomic_write(os.path.join(d, "a.png"), encode_labels(np.array([[0, 1], [1, 1]]), 2))
        >>> coco = json.load(open(build_coco(d, [ImageItem("a.jpg", "a.jpg")], ["cat", "dog"])))
        >>> [(a["category_id"], a["area"], a["segmentation"]["counts"]) for a in coco["annotations"]]
        [(1, 1, '013'), (2, 3, '13')]
    """
    from PIL import Image

    def read(item: ImageItem):
        p = label_path(out_dir, item.rel)
        if not os.path.isfile(p):
            return None
        with Image.open(p) as im:
            labels = np.array(im)
        return labels, _annotations(labels, len(classes))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        read_back = list(pool.map(read, items))
    images, annotations = [], []
    for i, (item, got) in enumerate(zip(items, read_back)):
        if got is None:
            continue
        labels, anns = got
        images.append({"id": i + 1, "file_name": item.rel, "width": int(labels.shape[1]),
                       "height": int(labels.shape[0])})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    coco = {
        "info": {"description": "seg4diff-fast label", "version": "1.0"},
        "images": images,
        "categories": [{"id": k + 1, "name": name, "supercategory": ""} for k, name in enumerate(classes)],
        "annotations": annotations,
    }
    path = path or os.path.join(out_dir, "coco.json")
    write_json(path, coco)
    return path
