"""Small file helpers shared by every command that writes results: atomic writes and the label palette.

A file is written to a hidden temporary name in its folder (``.<name>.<pid>.<n>.s4d-tmp``), flushed and
fsynced, then renamed over the final name, so a file at a final name is always whole.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["TMP_SUFFIX", "atomic_torch_save", "atomic_write", "write_json", "palette"]

TMP_SUFFIX = ".s4d-tmp"
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


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`): checkpoints are never half-written."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (keys in the given order, trailing newline), written atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())
