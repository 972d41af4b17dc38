"""Segment images with class names: a palette label PNG, an overlay PNG and a JSON per image.

For each IMG, OUT gets ``<stem>_labels.png`` (palette PNG; pixel value = class index in --classes),
``<stem>_overlay.png`` (the image blended with the class colours) and ``<stem>.json`` (classes, the
class ids present with their pixel counts, prompts, model, layer, timestep). Every input is checked
before anything is written, and each file is written to a temporary name and renamed, so a bad input
leaves nothing half-written.

Example:
    seg4diff-fast segment photo.jpg --classes "cat,sofa,background" --model PATH --out out/seg
"""

from __future__ import annotations

import argparse
import os
import sys

from .utils.files import atomic_write, palette, write_json

HELP = "segment images with a list of class names (label PNG, overlay PNG, JSON per image)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # nothing is required at parse time (every subcommand parses bare); run() reports what is missing
    p.add_argument("images", nargs="*", metavar="IMG", help="image files")
    p.add_argument("--classes", help='comma-separated class names, e.g. "cat,sofa,background" (required)')
    p.add_argument("--model", help="local diffusers folder or hub id (default: the embedded ShapesWorld pipeline)")
    p.add_argument("--out", help="output folder (required)")
    p.add_argument("--layer", type=int, help="capture layer (default: the model's expert layer; 9 for SD3)")
    p.add_argument("--resolution", type=int, help="input side (default: the model's; 1024 for SD3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=4, help="images per transformer call (4)")
    p.add_argument("--keep-dashes", action="store_true",
                   help="keep the text after '-' in class names (the authors' prompts cut it)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (0.5)")


def _fail(msg: str) -> int:
    print(f"seg4diff-fast segment: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from .models import ModelNotAvailableError, load_pipeline, quiet_loading
    from .segment import Seg4DiffSegmenter

    if not args.images:
        return _fail("give at least one image: seg4diff-fast segment IMG... --classes \"a,b\" --out DIR")
    if args.classes is None:
        return _fail("--classes is required, e.g. --classes \"cat,sofa,background\"")
    if not args.out:
        return _fail("--out DIR is required")
    classes = [c.strip() for c in args.classes.split(",")]
    if not any(classes):
        return _fail("the class list is empty; pass --classes \"name1,name2,...\"")
    if any(not c for c in classes):
        return _fail(f"--classes {args.classes!r} has an empty class name")
    if len(classes) > 256:
        return _fail("at most 256 classes fit a palette PNG")
    images, stems = [], []
    for path in args.images:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            return _fail(f"cannot read image {path}: {e}")
        stems.append(os.path.splitext(os.path.basename(path))[0])
    if len(set(stems)) != len(stems):
        return _fail("two images share a file name stem; their outputs would overwrite each other")
    try:
        quiet_loading()
        pipe = load_pipeline(args.model, args.dtype, args.device)
        seg = Seg4DiffSegmenter(pipe, layer=args.layer, resolution=args.resolution, seed=args.seed,
                                batch_size=args.batch_size, split_dash=not args.keep_dashes)
        seg.plan(classes)  # bad names fail before any work
        results = seg(images, classes)
    except (ValueError, TypeError, ModelNotAvailableError, OSError) as e:
        return _fail(str(e))

    try:
        args.layer = seg.layers[0] if len(seg.layers) == 1 else list(seg.layers)
        _write_outputs(args, classes, images, stems, results, seg.timestep)
    except OSError as e:
        return _fail(f"cannot write to {args.out}: {e}")
    return 0


def _write_outputs(args, classes, images, stems, results, timestep) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(args.out, exist_ok=True)
    pal = palette(len(classes))
    flat_pal = [v for rgb in pal for v in rgb]
    colours = np.asarray(pal, dtype=np.float32)
    for image, stem, res in zip(images, stems, results):
        labels = res.label_map
        label_png = Image.fromarray(labels.astype(np.uint8), mode="P")
        label_png.putpalette(flat_pal)
        rgb = np.asarray(image, dtype=np.float32)
        overlay = (1 - args.alpha) * rgb + args.alpha * colours[labels]
        overlay_png = Image.fromarray(overlay.round().clip(0, 255).astype(np.uint8))
        ids, counts = np.unique(labels, return_counts=True)
        info = {
            "image": stem,
            "size": [int(labels.shape[1]), int(labels.shape[0])],
            "classes": classes,
            "present": {classes[int(i)]: {"id": int(i), "pixels": int(c)} for i, c in zip(ids, counts)},
            "mean_confidence": float(res.confidence.mean()),
            "prompts": res.prompts,
            "model": args.model,
            "layer": args.layer,
            "timestep": timestep,
            "colours": {c: list(p) for c, p in zip(classes, pal)},
        }
        atomic_write(os.path.join(args.out, f"{stem}_labels.png"), lambda f, im=label_png: im.save(f, format="PNG"))
        atomic_write(os.path.join(args.out, f"{stem}_overlay.png"), lambda f, im=overlay_png: im.save(f, format="PNG"))
        write_json(os.path.join(args.out, f"{stem}.json"), info)
        print(f"{stem}: {', '.join(f'{classes[int(i)]} {100 * c / labels.size:.1f}%' for i, c in zip(ids, counts))}")
