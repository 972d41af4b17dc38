"""Label a folder (or list) of images with a class list: one label PNG per image, resumable, sharded.

For an input ``a/b.jpg`` under --images, writes ``OUT/a/b.png`` (class indices at the image's size;
palette PNG, uint16 above 256 classes), with --confidence ``OUT/a/b.conf.png`` (uint8), and always
``OUT/labels.json`` (the run's settings and what made it: ``model`` — a folder's absolute path, the
embedded model's too, or the hub id —, ``lora``, ``layer``, ``protocol``, ``package_version`` and
``provenance``) and ``OUT/errors.jsonl`` (one line per unreadable input). --format adds exports (a comma
list, or repeat it; the label PNGs are always written: --resume and the exports read them):

- ``coco``: ``OUT/coco.json``, RLE masks per class per image (``--coco`` is the same);
- ``yolo-seg``: the Ultralytics segmentation format under ``OUT/yolo/``: ``labels/a/b.txt`` (``class x1 y1
  x2 y2 ...`` normalized to [0, 1], one polygon per piece of a class, holes bridged in), ``images/a/b.jpg``
  (links to the inputs), ``data.yaml`` and ``classes.txt``. Polygons are simplified to --yolo-tolerance
  pixels (Douglas–Peucker; 0: lossless); pieces and holes under tolerance² pixels are dropped. Needs OpenCV:
  ``pip install 'seg4diff-fast[label]'``.

Class names are checked first (a name given twice is an error), then against the model's tokenizer: words
it does not know whole give a warning (--strict: an error). Unreadable inputs never stop the run, but the
exit status is 1 when any input failed (they are listed in OUT/errors.jsonl), unless --allow-failures.
Exit status: 0 done, 1 done but some inputs could not be read, 2 a bad argument (one line; nothing
written). Every file is written atomically; --resume skips images whose outputs are complete. Several
processes split the images:

    seg4diff-fast label --images photos/ --classes classes.txt --out labels/ --model PATH --confidence
    seg4diff-fast label --images photos/ --classes "person,car,tree" --out labels/ --format yolo-seg,coco
    torchrun --nproc-per-node 8 -m seg4diff_fast.label --images photos/ --classes "cat,dog" --out labels/
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_common import (
    CLIError,
    add_model_arguments,
    add_parallel_arguments,
    check_batch_size,
    load_model,
    parallelism,
    require_out,
    run_command,
)

HELP = "label a folder of images with a class list (label PNGs, COCO / YOLO exports, resumable, multi-process)"

FORMATS = ("png", "coco", "yolo-seg")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="a folder (searched recursively) or a text file with one image path a line")
    p.add_argument("--classes", help='a file with one class name a line, or a comma list "cat,dog,sky"')
    p.add_argument("--out", help="output folder")
    add_model_arguments(p)
    p.add_argument("--layer", type=int, help="capture layer (default: the model's expert layer; 9 for SD3)")
    p.add_argument("--resolution", type=int, help="input side (default: the model's; 1024 for SD3)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    add_parallel_arguments(p)
    p.add_argument("--confidence", action="store_true", help="also write OUT/a/b.conf.png")
    p.add_argument("--format", action="append", metavar="FMT",
                   help="outputs: png (always), coco, yolo-seg; a comma list or repeated (default: png)")
    p.add_argument("--coco", action="store_true", help="also write OUT/coco.json (RLE masks): --format coco")
    p.add_argument("--yolo-tolerance", type=float, default=1.0, metavar="PX",
                   help="yolo-seg polygons: the largest distance (pixels) from the mask boundary (1.0; 0: lossless)")
    p.add_argument("--resume", action="store_true", help="skip images whose outputs are complete")
    p.add_argument("--keep-dashes", action="store_true",
                   help="keep the text after '-' in class names (the authors' prompts cut it)")
    p.add_argument("--strict", action="store_true",
                   help="refuse class names the model's tokenizer does not know as words (default: warn)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some inputs could not be read (they are listed in OUT/errors.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _warn(msg: str) -> None:
    if _main_rank():
        print(f"seg4diff-fast label: warning: {msg}", file=sys.stderr)


def parse_formats(values: list[str] | None, coco: bool = False) -> list[str]:
    """The formats of --format (comma lists, repeated) and --coco, in :data:`FORMATS` order; png always.

    Example:
        >>> parse_formats(["yolo-seg", "png,coco"]), parse_formats(None, coco=True), parse_formats(None)
        (['png', 'coco', 'yolo-seg'], ['png', 'coco'], ['png'])
    """
    chosen = {"png"} | ({"coco"} if coco else set())
    for value in values or []:
        for name in value.split(","):
            name = name.strip().lower()
            if name in ("yolo", "yolo-seg", "yolov8-seg"):
                name = "yolo-seg"
            if name not in FORMATS:
                raise CLIError(f"--format {name!r}: use png, coco or yolo-seg (a comma list, or repeat --format)")
            chosen.add(name)
    return [f for f in FORMATS if f in chosen]


def _device(args: argparse.Namespace) -> str | None:
    """--device, or under torchrun ``cuda:LOCAL_RANK`` for a plain cuda (one GPU per process)."""
    from .label.distributed import env_world

    try:
        _, world, local = env_world()
    except ValueError as e:
        raise CLIError(str(e)) from None
    device = args.device
    if world > 1 and (device is None or device == "cuda"):
        import torch

        if device == "cuda" or torch.cuda.is_available():
            return f"cuda:{local}"
    return device


def run(args: argparse.Namespace) -> int:
    return run_command("label", _run, args)


def _run(args: argparse.Namespace) -> int:
    if not args.images:
        raise CLIError("--images DIR_OR_LIST is required")
    if args.classes is None:
        raise CLIError('--classes is required: a file with one name a line, or "cat,dog,sky"')
    require_out(args.out)
    check_batch_size(args.batch_size)
    formats = parse_formats(args.format, args.coco)
    yolo = "yolo-seg" in formats
    if yolo:
        if not args.yolo_tolerance >= 0:
            raise CLIError(f"--yolo-tolerance must be >= 0 pixels, got {args.yolo_tolerance}")
        from .label.yolo import require_cv2

        try:
            require_cv2()
        except ImportError as e:
            raise CLIError(str(e)) from None
    par = parallelism(args)

    from .label import label_images
    from .label.inputs import discover_images, load_classes
    from .label.runner import check_out_dir
    from .segment import Seg4DiffSegmenter

    created = not os.path.exists(args.out)
    try:  # everything cheap is checked before the model loads
        try:
            classes = load_classes(args.classes)
            discover_images(args.images, args.out)
            check_out_dir(args.out)
        except ValueError as e:
            raise CLIError(str(e)) from None
        except OSError as e:
            raise CLIError(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e)) from None
        pipe = load_model(args, device=_device(args))
        try:
            seg = Seg4DiffSegmenter(pipe, layer=args.layer, resolution=args.resolution, seed=args.seed,
                                    split_dash=not args.keep_dashes)
            seg.plan(classes)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
        from .cli_segment import check_class_words

        check_class_words(seg, classes, args.strict, _warn)
    except CLIError:
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # nothing written, not even the folder
        raise

    try:
        summary = label_images(
            args.images, classes, args.out, segmenter=seg, model=args.model, lora=args.lora,
            batch_size=args.batch_size, workers=par.workers, confidence=args.confidence, coco="coco" in formats,
            yolo=yolo, yolo_tolerance=args.yolo_tolerance, resume=args.resume, progress=not args.no_progress,
        )
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e)) from None

    if _main_rank():
        print(f"seg4diff-fast label: {summary.line()}")
    if summary.errors and not args.allow_failures:
        if _main_rank():
            print(f"seg4diff-fast label: error: {summary.errors} of {summary.images} inputs could not be read (see "
                  f"{os.path.join(args.out, 'errors.jsonl')}); the others are labeled. Fix or remove them, or pass "
                  "--allow-failures to exit 0 anyway", file=sys.stderr)
        return 1
    return 0
