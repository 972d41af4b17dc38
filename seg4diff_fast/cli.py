"""``seg4diff-fast``: the command line. Thin: each subcommand lives in its own module.

A subcommand module exposes

- ``HELP``: one line for ``seg4diff-fast --help``;
- ``add_arguments(parser)``: its options on an ``argparse.ArgumentParser``;
- ``run(args) -> int``: the work, returning the exit status;

and is listed in :data:`COMMANDS` (name → module path), or registered at run time with
:func:`register`. Modules should import heavy dependencies (torch, diffusers) inside ``run`` so that
``seg4diff-fast --help`` stays fast.

``seg4diff-fast --version`` prints the version, then what this install can run (:func:`environment_report`):
the ops' backends (triton, and whether it can run here; torch; reference), whether the C++ extension
``seg4diff_fast._C`` is built, and the CPU threads × workers a command would use.
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
    "app": "seg4diff_fast.cli_app",
}


def environment_report() -> str:
    """``seg4diff-fast VERSION`` and what this install can run: torch, the ops' backends (triton: installed,
    and runnable here on CUDA or through ``TRITON_INTERPRET``; torch; reference), the C++ extension
    ``seg4diff_fast._C`` (built or not, and the consequence), and the default threads × workers."""
    import importlib.util
    import os

    import torch

    from .ops.backends import interpreting, triton_available
    from .ops.upsample_argmax import has_cpp_extension
    from .utils.parallel import available_cores, plan_parallelism

    cuda = torch.cuda.is_available()
    torch_line = f"torch {torch.__version__}"
    if cuda:
        torch_line += f", CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name()}"
    elif torch.version.cuda is None:
        torch_line += ", CPU-only build"
    else:
        torch_line += f", CUDA {torch.version.cuda} build, no GPU visible"

    if not triton_available():
        triton = "triton: not installed (the torch backend is used)"
    else:
        import triton as _triton

        if cuda:
            how = "runs on CUDA (the default there)"
        elif interpreting():
            how = "runs on the CPU through TRITON_INTERPRET=1 (slow; for tests)"
        else:
            how = "cannot run here (no CUDA GPU; TRITON_INTERPRET=1 runs it on the CPU interpreter)"
        triton = f"triton {getattr(_triton, '__version__', '?')}: {how}"
    default = "triton" if cuda and triton_available() else "torch"
    chosen = os.environ.get("SEG4DIFF_BACKEND")

    if has_cpp_extension():
        ext = "built (CPU upsample_argmax runs the C++ kernel)"
    elif importlib.util.find_spec("seg4diff_fast._C") is not None:
        ext = ("present but does NOT import (built against another torch?); CPU upsample_argmax uses the slower "
               "pure-torch fallback; reinstall with `pip install --no-build-isolation .`")
    else:
        ext = ("NOT built; CPU upsample_argmax uses the slower pure-torch fallback (install torch first, then "
               "`pip install --no-build-isolation .` with a C++ compiler; see README, Install)")
    par = plan_parallelism()
    lines = [
        f"seg4diff-fast {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {sys.version.split()[0]}, {torch_line}",
        "backends of joint_attention and focal_dice_loss (default here: "
        f"{default}{f'; SEG4DIFF_BACKEND={chosen}' if chosen else ''}):",
        f"  {triton}",
        "  torch: available (memory-lean chunked attention, any device)",
        "  reference: available (materialises the softmax; for checks)",
        f"C++ extension seg4diff_fast._C: {ext}",
        f"CPU: {available_cores()} cores; a command started now would use {par.line()}; --threads, --workers "
        "override",
    ]
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """``--version``: :func:`environment_report` on stdout, exit 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(environment_report())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seg4diff-fast",
        description="Seg4Diff: zero-shot open-vocabulary segmentation from the joint attention of MM-DiT "
        "diffusion transformers (SD3), fast and memory-lean.",
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="print the version, the available backends and whether the C++ extension is built")
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
