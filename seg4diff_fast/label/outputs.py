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
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

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

TMP_SUFFIX = ".s4d-tmp"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_counter = itertools.count()


def palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), ``n`` colours; class 0 is not black.

    Example:
        >>> palette(3)
        [(128, 0, 0), (0, 128, 0), (128, 128, 0)]
    """
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i + 1
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes | Callable[[Any], None], fsync: bool = True) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file object) to ``path`` atomically: a
    temporary file in the same folder, flushed (and fsynced), renamed over ``path``; the folder is created.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> atomic_write(os.path.join(d, "x", "a.txt"), b"hello")
        >>> open(os.path.join(d, "x", "a.txt"), "rb").read(), os.listdir(os.path.join(d, "x"))
        (b'hello', ['a.txt'])
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{next(_counter)}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(folder)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (keys in the given order, trailing newline), written atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


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


def outputs_complete(out_dir: str, rel: str, confidence: bool) -> bool:
    """True when every output of the input ``rel`` is complete (the label PNG, and the confidence PNG
    when ``confidence``)."""
    if not png_complete(label_path(out_dir, rel)):
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
