"""``python -m seg4diff_fast.label ARGS``: ``seg4diff-fast label ARGS``, for launchers that run a module
(``torchrun --nproc-per-node N -m seg4diff_fast.label ...``; ``accelerate launch -m seg4diff_fast.label ...``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["label", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
