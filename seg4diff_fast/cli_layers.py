"""Layer analysis: attention mass per block and head (I2I / I2T / T2I / T2T) and per-block / per-head
grounding (mIoU, protocols A and B), written to OUT/layers.json, layers.md and layers.png.

On the embedded ShapesWorld model (the default), the mass is measured on the first --mass-scenes held-out
scenes with their captions as prompts, and the grounding sweep runs on --scenes held-out scenes
(``ShapesWorld(i).sample()``, i = 0 … N−1; protocol A: the object classes present, background ignored,
scenes with ≥ 2 objects; B: background included, all scenes). Any other SD3 model (--model) gets the
mass analysis only, on synthetic ShapesWorld images stretched to the model's resolution (there is no
labelled data to sweep grounding on; the images are out of domain for it, and the report says so).
Progress bars on stderr follow both stages (--no-progress turns them off). layers.json records the model
(``model``: the resolved path of the embedded one too, or the hub id; ``lora``; ``provenance``), the model's
expert ``layer``, the ``protocol`` and the ``package_version``.

Example:
    seg4diff-fast layers --scenes 200 --out out/layers
    seg4diff-fast layers --model stabilityai/stable-diffusion-3-medium-diffusers --mass-scenes 4 --out out/sd3
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .cli_common import (
    CLIError,
    add_model_arguments,
    add_parallel_arguments,
    check_out_folder,
    load_model,
    parallelism,
    run_command,
)

HELP = "layer analysis: attention mass (I2I/I2T/T2I/T2T) and grounding mIoU per block and head"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--scenes", type=int, default=200, help="held-out ShapesWorld scenes for the grounding sweep (200)")
    p.add_argument("--mass-scenes", type=int, default=16, help="images the attention mass is averaged over (16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the segmenter's; 0)")
    p.add_argument("--out", default=os.path.join("out", "layers"), help="output folder (out/layers)")
    p.add_argument("--no-plot", action="store_true", help="skip layers.png (no matplotlib needed)")
    p.add_argument("--resolution", type=int, help="model input side (default: the model's; 1024 for SD3)")
    p.add_argument("--batch-size", type=int, default=8, help="images per transformer call (8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_parallel_arguments(p, workers=False)


def run(args: argparse.Namespace) -> int:
    return run_command("layers", _run, args)


def _run(args: argparse.Namespace) -> int:
    from .evaluation.layers import attention_block_mass, format_layer_table, transformer_progress, write_layer_report
    from .reader import MODEL_CONFIG_FILE, resolve_defaults
    from .shapes.grounding import layer_sweep, protocol_rows
    from .shapes.train import heldout_scenes
    from .shapes.world import ShapesWorld
    from .utils.provenance import model_record

    if args.scenes < 1 or args.mass_scenes < 1:
        raise CLIError("--scenes and --mass-scenes must be >= 1")
    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    check_out_folder(args.out)
    parallelism(args, uses_workers=False)
    pipe = load_model(args)
    defaults = resolve_defaults(pipe)
    shapes = defaults.source.endswith(MODEL_CONFIG_FILE)  # a ShapesWorld model: its held-out scenes are labelled
    kw = {"resolution": args.resolution, "seed": args.seed, "batch_size": args.batch_size}
    show = not args.no_progress
    provenance = model_record(pipe, args.model)
    provenance["lora"] = os.path.abspath(args.lora) if args.lora else None
    result: dict = {"model": provenance["model"], "lora": provenance["lora"], "layer": defaults.layer,
                    "protocol": "paper", "package_version": provenance["package_version"], "provenance": provenance}
    try:
        if shapes:
            size = defaults.resolution
            mass_scenes = heldout_scenes(args.mass_scenes, size)
            result["mass"] = attention_block_mass(pipe, [s.image for s in mass_scenes],
                                                  [s.caption for s in mass_scenes], progress=show, **kw)
            result["mass"]["images"] = (f"ShapesWorld held-out scenes 0..{args.mass_scenes - 1}, "
                                        "captions as prompts")
            sweep_scenes = heldout_scenes(args.scenes, size)
            with transformer_progress(pipe, [len(protocol_rows(s)) for s in sweep_scenes], "grounding sweep",
                                      "scene", enabled=show):
                result["sweep"] = layer_sweep(pipe, sweep_scenes, **kw)
            result["sweep"]["scenes"] = f"ShapesWorld held-out scenes 0..{args.scenes - 1}"
        else:
            note = ("not a ShapesWorld model: only the attention-mass analysis is run, on synthetic ShapesWorld "
                    "images (out of domain for this model) stretched to its resolution, captions as prompts; "
                    "no grounding sweep (no labelled data).")
            print(f"seg4diff-fast layers: note: {note}", file=sys.stderr)
            scenes = [ShapesWorld(i, 64).sample() for i in range(args.mass_scenes)]
            result["note"] = note
            result["mass"] = attention_block_mass(pipe, [s.image for s in scenes], [s.caption for s in scenes],
                                                  progress=show, **kw)
            result["mass"]["images"] = f"synthetic ShapesWorld scenes 0..{args.mass_scenes - 1} (64 px, stretched)"
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    try:
        try:
            paths = write_layer_report(result, args.out, plot=not args.no_plot)
        except ImportError as e:
            print(f"seg4diff-fast layers: warning: {e}; writing the report without layers.png", file=sys.stderr)
            paths = write_layer_report(result, args.out, plot=False)
    except OSError as e:
        raise CLIError(f"cannot write to {args.out}: {e}") from None
    print(format_layer_table(result))
    sweep = result.get("sweep")
    if sweep is not None:
        for p in ("A", "B"):
            vals = [(v, layer) for v, layer in zip(sweep[p], sweep["layers"]) if math.isfinite(v)]
            if vals:
                v, layer = max(vals)
                print(f"best block, protocol {p}: {layer} ({v:.1f} mIoU on {sweep[f'n_{p}']} scenes; "
                      f"baseline {sweep[f'{p}_baseline']:.1f})")
    print("wrote " + ", ".join(paths[k] for k in sorted(paths)))
    return 0
