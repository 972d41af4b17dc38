"""``seg4diff-fast``: the command line. Thin: each subcommand lives in its own module.

A subcommand module exposes

- ``HELP``: one line for ``seg4diff-fast --help``;
- ``add_arguments(parser)``: its options on an ``argparse.ArgumentParser``;
- ``run(args) -> int``: the work, returning the exit status;

and is listed in :data:`COMMANDS` (name → module path), or registered at run time with
:func:`register`. Modules should import heavy dependencies (torch, diffusers) inside ``run`` so that
``seg4diff-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .utils.version import __version__

# name -> module implementing HELP, add_arguments(parser), run(args).
COMMANDS: dict[str, str] = {
    "demo": "seg4diff_fast.demo",
    "segment": "seg4diff_fast.cli_segment",
    "eval": "seg4diff_fast.cli_eval",
    "label": "seg4diff_fast.cli_label",
    "magnet": "seg4diff_fast.cli_magnet",
    "layers": "seg4diff_fast.cli_layers",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seg4diff-fast",
        description="Seg4Diff: zero-shot open-vocabulary segmentation from the joint attention of MM-DiT "
        "diffusion transformers (SD3), fast and memory-lean.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        help_line = getattr(module, "HELP", None)
        p = sub.add_parser(
            name,
            help=help_line,
            description=module.__doc__ or help_line,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
