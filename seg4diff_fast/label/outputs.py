"""Output files of ``label``: where they go, how they are encoded, written atomically, checked complete.

For an input at relative path ``a/b.jpg`` (see :mod:`.inputs`):

- ``OUT/a/b.png``: the label map at the image's own size; ``np.array(Image.open(path))`` gives class
  indices. Palette PNG (mode ``P``, uint8, the PASCAL VOC colours) up to 256 classes, 16-bit grayscale
  (uint16) above.
- ``OUT/a/b.conf.png`` (optional): uint8 grayscale, ``round(255 · confidence)``, the confidence being the
  segmenter's (the top class's upsampled score over the sum of all classes' at that pixel).

Every file is written to a hidden temporary name in its folder (``.<name>.<pid>.<n>.s4d-tmp``), flushed
and fsynced, then renamed over the final name, so a file at a final name is always whole. A file counts
as complete when it exists and ends with PNG's ``IEND`` chunk (:func:`png_complete`), which also catches a
file cut short by anything other than this writer. Leftover temporaries (a killed run) are removed by
:func:`remove_temporaries` at the end of a run.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..utils.files import TMP_SUFFIX, atomic_write, palette, write_json

__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "write_json",
    "label_path",
    "confidence_path",
    "encode_labels",
    "encode_confidence",
    "png_complete",
    "outputs_complete",
    "palette",
    "remove_temporaries",
]

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def label_path(out_dir: str, rel: str) -> str:
    """``OUT/a/b.png`` for the input ``a/b.jpg``.

    Example:
        >>> label_path("out", "a/b.jpg")
        'out/a/b.png'
    """
    return os.path.join(out_dir, os.path.splitext(rel)[0] + ".png")


def confidence_path(out_dir: str, rel: str) -> str:
    """``OUT/a/b.conf.png`` for the input ``a/b.jpg``.

    Example:
        >>> confidence_path("out", "a/b.jpg")
        'out/a/b.conf.png'
    """
    return os.path.join(out_dir, os.path.splitext(rel)[0] + ".conf.png")


def encode_labels(labels: np.ndarray, num_classes: int) -> bytes:
    """PNG bytes of an (H, W) label map: palette PNG for ``num_classes`` ≤ 256, 16-bit grayscale above.

    Example:
        >>> import io
        >>> import numpy as np
        >>> from PIL import Image
        >>> lab = np.array([[0, 1], [2, 1]])
        >>> im = Image.open(io.BytesIO(encode_labels(lab, 3)))
        >>> im.mode, np.array(im).tolist()
        ('P', [[0, 1], [2, 1]])
        >>> np.array(Image.open(io.BytesIO(encode_labels(lab + 300, 400)))).tolist()
        [[300, 301], [302, 301]]
    """
    from PIL import Image

    buf = io.BytesIO()
    if num_classes <= 256:
        im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
        im.putpalette([v for rgb in palette(num_classes) for v in rgb])
    else:
        im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16))
    im.save(buf, format="PNG")
    return buf.getvalue()


def encode_confidence(confidence_u8: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) uint8 confidence map (``round(255 · confidence)``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(confidence_u8, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def png_complete(path: str) -> bool:
    """True when ``path`` exists and ends with PNG's ``IEND`` chunk (a whole file; a cut one does not).

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "x.png")
        >>> data = encode_labels(np.zeros((4, 4), np.int64), 2)
        >>> _ = open(p, "wb").write(data[:-5]); png_complete(p)
        False
        >>> _ = open(p, "wb").write(data); png_complete(p)
        True
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 8 + len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False


def outputs_complete(out_dir: str, rel: str, confidence: bool, yolo: bool = False) -> bool:
    """True when every output of the input ``rel`` is complete (the label PNG, the confidence PNG when
    ``confidence``, the YOLO ``.txt`` when ``yolo``: written whole by a rename, so its presence is enough)."""
    if not png_complete(label_path(out_dir, rel)):
        return False
    if yolo and not os.path.isfile(os.path.join(out_dir, "yolo", "labels", os.path.splitext(rel)[0] + ".txt")):
        return False
    return not confidence or png_complete(confidence_path(out_dir, rel))


def remove_temporaries(out_dir: str) -> int:
    """Delete leftover temporary files of :func:`atomic_write` under ``out_dir``; returns how many."""
    n = 0
    for folder, _, files in os.walk(out_dir):
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                try:
                    os.remove(os.path.join(folder, name))
                    n += 1
                except OSError:
                    pass
    return n
