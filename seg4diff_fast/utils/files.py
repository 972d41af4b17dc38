"""Small file helpers shared by every command that writes results: atomic writes and the label palette.

A file is written to a hidden temporary name in its folder (``.<name>.<pid>.<n>.s4d-tmp``), flushed and
fsynced, then renamed over the final name, so a file at a final name is always whole. It gets the permissions a
plain ``open(path, "w")`` would give (:func:`plain_file_mode`): ``0o666 & ~umask`` for a new file, the old
file's mode when it replaces one; writers that create their files privately (safetensors writes ``0o600``)
are corrected with :func:`set_plain_mode`.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
from collections.abc import Callable
from typing import Any

__all__ = ["TMP_SUFFIX", "atomic_torch_save", "atomic_write", "current_umask", "palette", "plain_file_mode",
           "set_plain_mode", "write_json"]

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


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def plain_file_mode(path: str | None = None) -> int:
    """The permission bits a plain ``open(path, "w")`` leaves ``path`` with: an existing regular file's own
    mode (a write keeps it), else ``0o666 & ~umask``.

    Example:
        >>> old = os.umask(0o027)
        >>> oct(plain_file_mode())
        '0o640'
        >>> _ = os.umask(old)
    """
    if path is not None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    return 0o666 & ~current_umask()


def set_plain_mode(path: str, final: str | None = None) -> None:
    """Give the file ``path`` the mode a plain write of ``final`` (default: ``path``) would have
    (:func:`plain_file_mode`); for files written by code that creates them ``0o600`` before they are moved to
    ``final``."""
    os.chmod(path, plain_file_mode(final if final is not None else path))


def atomic_write(path: str, data: bytes | Callable[[Any], None], fsync: bool = True) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file object) to ``path`` atomically: a
    temporary file in the same folder, flushed (and fsynced), renamed over ``path``; the folder is created.
    The file gets the mode a plain write would give it (:func:`plain_file_mode`).

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
    mode = plain_file_mode(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        with open(fd, "wb") as f:
            os.chmod(tmp, mode)  # what a plain write gives (umask applied, or the replaced file's mode)
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
