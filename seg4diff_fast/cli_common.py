"""What every subcommand that reads a model shares: its options, and turning them into a pipeline.

- :func:`add_model_arguments`: ``--model``, ``--lora``, ``--dtype``, ``--device``;
- :func:`add_parallel_arguments`: ``--threads``, ``--workers`` (:func:`seg4diff_fast.utils.parallel.plan_parallelism`
  decides the defaults from the cores, once per command);
- :func:`check_device`: a CUDA request on a torch without CUDA is one clear error, before anything loads;
- :func:`load_model`: the pipeline (``--model`` or the embedded one), with ``--lora`` loaded, every failure a
  :class:`CLIError` with one line that names the problem and the fix;
- :func:`require_out`, :func:`check_out_folder`, :func:`check_batch_size`: the checks of ``--out`` and
  ``--batch-size`` that several subcommands share, with one wording;
- :func:`run_command`: a subcommand's body with every :class:`CLIError` printed by :func:`fail` (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["CLIError", "add_model_arguments", "add_parallel_arguments", "check_batch_size", "check_device",
           "check_out_folder", "fail", "load_model", "parallelism", "require_out", "run_command"]


class CLIError(Exception):
    """A bad argument or input: the message is the one line the user sees."""


def fail(command: str, message: str) -> int:
    """Print ``seg4diff-fast COMMAND: error: MESSAGE`` on stderr; the exit status of a usage error, 2."""
    print(f"seg4diff-fast {command}: error: {message}", file=sys.stderr)
    return 2


def run_command(command: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``body(args)``'s exit status, or a :class:`CLIError` it raises printed by :func:`fail` (2)."""
    try:
        return body(args)
    except CLIError as e:
        return fail(command, str(e))


def require_out(out: str | None) -> None:
    """``--out DIR`` must be given."""
    if not out:
        raise CLIError("--out DIR is required")


def check_out_folder(out: str) -> None:
    """``--out`` may be missing (it is made) or a folder, not a file."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: a file is in the way; give a folder")


def check_batch_size(batch_size: int) -> None:
    """``--batch-size`` must be >= 1."""
    if batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {batch_size}")


def add_model_arguments(p: argparse.ArgumentParser, *, lora: bool = True) -> None:
    """``--model``, ``--lora`` (optional), ``--dtype``, ``--device``."""
    p.add_argument("--model", help="local diffusers folder or hub id of an SD3 / SD3.5 / Flux.1 / Flux.2 / "
                                   "Qwen-Image pipeline (default: the embedded ShapesWorld pipeline)")
    if lora:
        p.add_argument("--lora", help="MAGNET LoRA: an output folder of `seg4diff-fast magnet`, a diffusers LoRA "
                                      ".safetensors, or the authors' .pth")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def add_parallel_arguments(p: argparse.ArgumentParser, *, workers: bool = True) -> None:
    """``--threads`` and (optionally) ``--workers``; defaults from the cores (:func:`parallelism`)."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores the workers leave)")
    if workers:
        p.add_argument("--workers", type=int, metavar="N",
                       help="image-loading worker processes (default: 0 on <= 2 cores, else min(4, cores/4))")


def parallelism(args: argparse.Namespace, uses_workers: bool = True) -> Any:
    """The run's threads × workers (:class:`~seg4diff_fast.utils.parallel.Parallelism`), applied to torch
    (``torch.set_num_threads``); raises :class:`CLIError` for bad values.

    Call it once at the start of ``run`` (before loading the model) and pass ``.workers`` on, e.g.
    ``label_images(..., workers=par.workers)``; ``uses_workers=False`` for commands without a DataLoader.
    """
    from .utils.parallel import plan_parallelism

    try:
        return plan_parallelism(getattr(args, "threads", None), getattr(args, "workers", None),
                                uses_workers=uses_workers).apply()
    except ValueError as e:
        raise CLIError(str(e)) from None


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use, with the fix."""
    if not device:
        return
    import torch

    kind = str(device).split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise CLIError(f"--device {device!r}: use cpu or cuda (cuda:N for one GPU)")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise CLIError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu, or install a "
                       "CUDA build of torch on a machine with a GPU")


def load_model(args: argparse.Namespace, *, device: str | None = None, dtype: str | None = None) -> Any:
    """The pipeline of ``--model`` (None: the embedded ShapesWorld one) on ``--device`` / ``--dtype``, with
    ``--lora`` loaded; raises :class:`CLIError` with one line for every failure."""
    from .models import ModelNotAvailableError, load_pipeline, quiet_loading

    device = device if device is not None else getattr(args, "device", None)
    check_device(device)
    quiet_loading()
    model = getattr(args, "model", None)
    if model is not None and not os.path.exists(model) and not _looks_like_hub_id(model):
        raise CLIError(f"--model {model}: no such folder; give a local diffusers folder (with model_index.json) "
                       "or a hub id such as stabilityai/stable-diffusion-3-medium-diffusers")
    try:
        pipe = load_pipeline(model, dtype or getattr(args, "dtype", "auto"), device)
    except ModelNotAvailableError as e:
        raise CLIError(str(e)) from None
    except Exception as e:  # noqa: BLE001 — diffusers / huggingface_hub raise many types for a bad path or id
        if isinstance(e, ValueError) and "not a supported pipeline" in str(e) or "dtype must be" in str(e):
            raise CLIError(f"--model {model}: {e}") from None  # an unsupported pipeline class, a bad dtype
        if model is not None and os.path.isdir(model):
            raise CLIError(f"--model {model}: not a loadable diffusers folder ({type(e).__name__}: {_first_line(e)}); "
                           "it needs model_index.json and the components it lists") from None
        if model is not None and not _looks_like_hub_id(model):
            raise CLIError(f"--model {model}: no such folder; give a local diffusers folder (with model_index.json) "
                           "or a hub id such as stabilityai/stable-diffusion-3-medium-diffusers") from None
        raise CLIError(f"--model {model}: cannot load it ({type(e).__name__}: {_first_line(e)}); give a local "
                       "diffusers folder (with model_index.json) or a hub id you can reach") from None
    lora = getattr(args, "lora", None)
    if lora:
        from .magnet.lora import load_magnet_lora

        try:
            pipe = load_magnet_lora(pipe, lora)
        except ModuleNotFoundError as e:
            raise CLIError(f"--lora needs the [train] extras ({e.name} is missing): pip install "
                           "'seg4diff-fast[train]'") from None
        except (OSError, ValueError, KeyError) as e:
            raise CLIError(f"--lora {lora}: {_first_line(e)}") from None
    return pipe


def _looks_like_hub_id(model: str) -> bool:
    if os.path.exists(model) or os.path.isabs(model) or model.startswith((".", "~")):
        return False
    parts = model.split("/")
    return len(parts) == 2 and all(parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
