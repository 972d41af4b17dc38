"""YOLO segmentation export of ``label`` (``--format yolo-seg``): the polygons Ultralytics trains on.

Layout, for an input at relative path ``a/b.jpg``:

- ``OUT/yolo/labels/a/b.txt``: one line per polygon, ``class x1 y1 x2 y2 ...``, the class its index in the
  class list, the coordinates normalized to [0, 1] by the image's width and height (pixel-centre indices over
  W and H, the convention of Ultralytics' own mask converter; 6 decimals);
- ``OUT/yolo/images/a/b.jpg``: a symbolic link to the input, so that Ultralytics, which finds an image's
  labels by replacing ``/images/`` with ``/labels/`` in its path, pairs them as they are;
- ``OUT/yolo/data.yaml`` (``path``, ``train``/``val`` = ``images``, ``nc``, ``names``) and
  ``OUT/yolo/classes.txt`` (one name a line): ``yolo segment train data=OUT/yolo/data.yaml`` runs on it.

Polygons from a label map (:func:`mask_polygons`), class by class:

- every 8-connected piece of a class is its own line (several pieces, several lines);
- boundaries are traced by OpenCV (``cv2.findContours``, two-level hierarchy: outer boundaries and holes)
  and simplified by Douglas–Peucker (``cv2.approxPolyDP``) with ``tolerance`` pixels as the largest distance
  between a simplified polygon and the boundary it replaces (default 1 px; 0 keeps every corner: lossless);
- the format has no holes, so each hole is **bridged**: the polygon walks from its outer boundary to the
  nearest point of the hole along a zero-width cut, around the hole the other way, and back, which any
  even-odd or non-zero filler (``cv2.fillPoly``, what Ultralytics rasterizes with) leaves empty;
- pieces and holes whose simplified polygon has an area below ``tolerance²`` square pixels are dropped
  (single pixels and one-pixel-wide lines at the default; nothing at 0, where a degenerate polygon of one or
  two points is repeated to three).

Rasterized back (:func:`polygons_to_mask`: ``cv2.fillPoly`` of the rounded coordinates) a class's mask is
the original exactly at ``tolerance=0`` and within ``tolerance`` pixels of its boundary otherwise.

Needs OpenCV (``pip install 'seg4diff-fast[label]'`` or ``opencv-python-headless``), imported when used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .inputs import ImageItem
from .outputs import atomic_write, label_path

__all__ = ["DEFAULT_TOLERANCE", "YOLO_DIR", "encode_yolo", "mask_polygons", "polygons_to_mask", "read_yolo",
           "require_cv2", "write_yolo_dataset", "yolo_label_path"]

#: Default Douglas–Peucker tolerance (pixels).
DEFAULT_TOLERANCE = 1.0
#: The export's folder under OUT.
YOLO_DIR = "yolo"


def require_cv2() -> Any:
    """The ``cv2`` module, or an ImportError that says how to install it."""
    try:
        import cv2
    except ImportError:
        raise ImportError("--format yolo-seg needs OpenCV: pip install 'seg4diff-fast[label]' (or "
                          "opencv-python-headless)") from None
    return cv2


def yolo_label_path(out_dir: str, rel: str) -> str:
    """``OUT/yolo/labels/a/b.txt`` for the input ``a/b.jpg``.

    Example:
        >>> yolo_label_path("out", "a/b.jpg")
        'out/yolo/labels/a/b.txt'
    """
    return os.path.join(out_dir, YOLO_DIR, "labels", os.path.splitext(rel)[0] + ".txt")


def _nearest(points: np.ndarray, targets: np.ndarray) -> tuple[float, int, int]:
    """(squared distance, index in ``targets``, index in ``points``) of the nearest pair."""
    best = (np.inf, 0, 0)
    for s in range(0, len(points), 256):
        d = ((points[s:s + 256, None, :] - targets[None, :, :]) ** 2).sum(-1)
        k = int(d.argmin())
        j, i = divmod(k, d.shape[1])
        if d.flat[k] < best[0]:
            best = (float(d.flat[k]), i, s + j)
    return best


def _approx(cv2: Any, points: np.ndarray, tol: float, closed: bool) -> np.ndarray:
    return cv2.approxPolyDP(points.reshape(-1, 1, 2).astype(np.int32), tol, closed).reshape(-1, 2)


def _piece_polygon(cv2: Any, outer: np.ndarray, holes: list[np.ndarray], tol: float) -> np.ndarray:
    """One piece's outer boundary with its holes bridged in, simplified by Douglas–Peucker between the
    bridges' ends (which stay, so a cut always joins the two points it was made between)."""
    nodes = [outer, *holes]
    children: dict[int, list[tuple[int, int, int]]] = {n: [] for n in range(len(nodes))}
    anchors: dict[int, set[int]] = {n: set() for n in range(len(nodes))}
    pts, owner, index = outer.astype(np.float64), np.zeros(len(outer), int), np.arange(len(outer))
    # holes nearest to the boundary first; each joins the nearest point of what is joined already
    order = sorted(range(1, len(nodes)), key=lambda k: _nearest(nodes[k].astype(np.float64), pts)[0])
    for k in order:
        hole = nodes[k].astype(np.float64)
        _, t, j = _nearest(hole, pts)
        parent, i = int(owner[t]), int(index[t])
        children[parent].append((i, k, j))
        anchors[parent].add(i)
        anchors[k].add(j)
        pts = np.concatenate([pts, hole])
        owner = np.concatenate([owner, np.full(len(hole), k)])
        index = np.concatenate([index, np.arange(len(hole))])

    def simplify(n: int) -> list[tuple[int | None, np.ndarray]]:
        c, cuts = nodes[n], sorted(anchors[n])
        if not cuts:
            return [(None, _approx(cv2, c, tol, True))]
        segs = []
        for t, a in enumerate(cuts):
            b = cuts[(t + 1) % len(cuts)]
            seg = c[a:b + 1] if b > a else np.concatenate([c[a:], c[:b + 1]])
            # a loop from one cut back to it: split at its farthest point (Douglas–Peucker needs two ends)
            far = int(((seg - seg[0]) ** 2).sum(1).argmax()) if (seg[0] == seg[-1]).all() else len(seg) - 1
            parts = [seg[: far + 1], seg[far:]] if 0 < far < len(seg) - 1 else [seg]
            simp = np.concatenate([_approx(cv2, p, tol, False)[:-1] for p in parts])
            segs.append((a, simp))
        return segs

    simplified = {n: simplify(n) for n in range(len(nodes))}

    def emit(n: int, start: int | None) -> list[np.ndarray]:
        segs = simplified[n]
        if start is not None:
            r = next(t for t, (a, _) in enumerate(segs) if a == start)
            segs = segs[r:] + segs[:r]
        out: list[np.ndarray] = []
        for a, seg in segs:
            out.append(seg[0])
            for i, child, j in children[n]:
                if i == a:
                    out += emit(child, j)
                    out.append(seg[0])
            out += list(seg[1:])
        if start is not None:
            out.append(segs[0][1][0])
        return out

    return np.array(emit(0, None), dtype=np.int64).reshape(-1, 2)


def mask_polygons(mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> list[np.ndarray]:
    """The polygons of a binary (H, W) mask: one (N, 2) int array of (x, y) pixel indices per 8-connected
    piece, its holes bridged in (module docs).

    Example:
        >>> import numpy as np
        >>> m = np.zeros((9, 9), bool); m[1:7, 1:7] = True; m[3:5, 3:5] = False; m[8, 8] = True
        >>> [p.tolist() for p in mask_polygons(m, tolerance=0)]  # the lone pixel; the ring with its hole
        [[[8, 8], [8, 8], [8, 8]], [[1, 3], [2, 3], [3, 2], [4, 2], [5, 3], [5, 4], [4, 5], [3, 5], [2, 4], [2, 3], \
[1, 3], [1, 6], [6, 6], [6, 1], [1, 1]]]
        >>> len(mask_polygons(m))  # at 1 px the lone pixel goes
        1
    """
    cv2 = require_cv2()
    tol = float(tolerance)
    if not tol >= 0:
        raise ValueError(f"the polygon tolerance must be >= 0 pixels, got {tolerance}")
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return []
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    hierarchy = hierarchy[0]

    def kept(c: np.ndarray) -> bool:
        return tol == 0 or abs(cv2.contourArea(c)) >= tol * tol

    polygons = []
    for i, (_, _, child, parent) in enumerate(hierarchy):
        if parent != -1 or not kept(contours[i]):
            continue
        holes = []
        while child != -1:
            if kept(contours[child]):
                holes.append(contours[child].reshape(-1, 2))
            child = hierarchy[child][0]
        ring = _piece_polygon(cv2, contours[i].reshape(-1, 2), holes, tol)
        if len(ring) < 3:
            ring = np.concatenate([ring, ring[-1:].repeat(3 - len(ring), 0)])
        polygons.append(ring)
    return polygons


def encode_yolo(labels: np.ndarray, num_classes: int, tolerance: float = DEFAULT_TOLERANCE) -> bytes:
    """The ``.txt`` of an (H, W) label map: a line per polygon of every class present, classes in order.

    Example:
        >>> import numpy as np
        >>> print(encode_yolo(np.array([[0, 0, 1, 1]] * 2), 2, tolerance=0).decode(), end="")
        0 0.000000 0.000000 0.000000 0.500000 0.250000 0.500000 0.250000 0.000000
        1 0.500000 0.000000 0.500000 0.500000 0.750000 0.500000 0.750000 0.000000
    """
    h, w = labels.shape
    scale = np.array([w, h], dtype=np.float64)
    lines = []
    for c in np.unique(labels).tolist():
        if not 0 <= c < num_classes:
            continue
        for poly in mask_polygons(labels == c, tolerance):
            xy = (poly / scale).clip(0.0, 1.0).ravel()
            lines.append(f"{c} " + " ".join(f"{v:.6f}" for v in xy))
    return "".join(line + "\n" for line in lines).encode()


def read_yolo(text: str) -> list[tuple[int, np.ndarray]]:
    """(class, (N, 2) normalized polygon) of each line of a YOLO segmentation ``.txt``."""
    out = []
    for line in text.splitlines():
        values = line.split()
        if values:
            out.append((int(values[0]), np.array([float(v) for v in values[1:]], dtype=np.float64).reshape(-1, 2)))
    return out


def polygons_to_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterize normalized polygons to a bool (H, W) mask: ``cv2.fillPoly`` of the rounded pixel coordinates
    (how Ultralytics draws its training masks)."""
    cv2 = require_cv2()
    m = np.zeros((height, width), dtype=np.uint8)
    pts = [np.round(np.asarray(p) * [width, height]).astype(np.int32) for p in polygons]
    if pts:
        cv2.fillPoly(m, pts, 1)
    return m.astype(bool)


def _yaml_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_yolo_dataset(out_dir: str, items: Sequence[ImageItem], classes: Sequence[str]) -> str:
    """``OUT/yolo/data.yaml``, ``classes.txt`` and the ``images/`` links of every input that has its label
    PNG and ``.txt``; returns the data.yaml path. Inputs that cannot be linked (a file system without
    symbolic links) are counted in a comment of data.yaml: copy them into ``images/`` by hand."""
    root = os.path.join(out_dir, YOLO_DIR)
    unlinked = 0
    for item in items:
        if not (os.path.isfile(label_path(out_dir, item.rel)) and os.path.isfile(yolo_label_path(out_dir, item.rel))):
            continue
        link = os.path.join(root, "images", item.rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        tmp = os.path.join(os.path.dirname(link), f".{os.path.basename(link)}.{os.getpid()}.link-tmp")
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(os.path.abspath(item.path), tmp)
            os.replace(tmp, link)
        except OSError:
            unlinked += 1
    atomic_write(os.path.join(root, "classes.txt"), "".join(c + "\n" for c in classes).encode())
    lines = ["# seg4diff-fast label --format yolo-seg: an Ultralytics segmentation dataset"]
    if unlinked:
        lines.append(f"# {unlinked} inputs could not be linked into images/ (no symbolic links here): copy them")
    lines += [
        f"path: {_yaml_string(os.path.abspath(root))}",
        "train: images",
        "val: images",
        f"nc: {len(classes)}",
        "names:",
        *(f"  {k}: {_yaml_string(c)}" for k, c in enumerate(classes)),
    ]
    path = os.path.join(root, "data.yaml")
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path
