"""Label a folder (or list) of images with a class list: one label PNG per image, resumable, sharded.

For an input ``a/b.jpg`` under --images, writes ``OUT/a/b.png`` (class indices at the image's size;
palette PNG, uint16 above 256 classes), with --confidence ``OUT/a/b.conf.png`` (uint8), with --coco
``OUT/coco.json`` (RLE masks); always ``OUT/labels.json`` (the run's settings) and ``OUT/errors.jsonl`` (one
line per unreadable input; such inputs never stop the run). Every file is written atomically; --resume
skips images whose outputs are complete. Several processes split the images:

    seg4diff-fast label --images photos/ --classes classes.txt --out labels/ --model PATH --confidence
    torchrun --nproc-per-node 8 -m seg4diff_fast.label --images photos/ --classes "cat,dog" --out labels/
"""

from __future__ import annotations

import argparse
import sys

HELP = "label a folder of images with a class list (label PNGs, resumable, multi-process)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="a folder (searched recursively) or a text file with one image path a line")
    p.add_argument("--classes", help='a file with one class name a line, or a comma list "cat,dog,sky"')
    p.add_argument("--out", help="output folder")
    p.add_argument("--model", help="local diffusers folder or hub id (default: the embedded ShapesWorld pipeline)")
    p.add_argument("--layer", type=int, help="capture layer (default: the model's expert layer; 9 for SD3)")
    p.add_argument("--resolution", type=int, help="input side (default: the model's; 1024 for SD3)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=4, help="image decoding worker processes (4)")
    p.add_argument("--confidence", action="store_true", help="also write OUT/a/b.conf.png")
    p.add_argument("--coco", action="store_true", help="also write OUT/coco.json (RLE masks)")
    p.add_argument("--resume", action="store_true", help="skip images whose outputs are complete")
    p.add_argument("--keep-dashes", action="store_true",
                   help="keep the text after '-' in class names (the authors' prompts cut it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(msg: str) -> int:
    print(f"seg4diff-fast label: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if not args.images:
        return _fail("--images DIR_OR_LIST is required")
    if args.classes is None:
        return _fail('--classes is required: a file with one name a line, or "cat,dog,sky"')
    if not args.out:
        return _fail("--out DIR is required")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        return _fail(f"--workers must be >= 0, got {args.workers}")

    from .label import label_images
    from .label.inputs import discover_images, load_classes
    from .label.runner import check_out_dir
    from .models import ModelNotAvailableError, default_model_path, quiet_loading

    try:  # everything cheap is checked before the model loads
        load_classes(args.classes)
        discover_images(args.images, args.out)
        check_out_dir(args.out)
        if args.model is None:
            default_model_path()
        quiet_loading()
        summary = label_images(
            args.images, args.classes, args.out, model=args.model, layer=args.layer, resolution=args.resolution,
            seed=args.seed, dtype=args.dtype, device=args.device, batch_size=args.batch_size, workers=args.workers,
            confidence=args.confidence, coco=args.coco, resume=args.resume, progress=not args.no_progress,
            split_dash=not args.keep_dashes,
        )
    except (ValueError, TypeError, ModelNotAvailableError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"seg4diff-fast label: {summary.line()}")
    return 0
