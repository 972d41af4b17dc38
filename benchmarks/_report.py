"""Shared by the benchmark scripts: replace a marked block of a markdown file with new results."""

from __future__ import annotations

import os


def write_block(path: str, start: str, end: str, block: str, heading: str = "") -> None:
    """Put ``start\\nblock\\nend`` between the markers ``start``/``end`` of ``path``, or append it (after
    ``heading``) when the markers are not there yet. ``block`` may already begin and end with them."""
    if not block.startswith(start):
        block = f"{start}\n{block}\n{end}"
    text = open(path).read() if os.path.exists(path) else ""
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)
