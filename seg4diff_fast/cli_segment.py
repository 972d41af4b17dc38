"""Segment images with class names: a palette label PNG, an overlay PNG and a JSON per image.

For each IMG, OUT gets

- ``<stem>_labels.png``: palette PNG at the image's size; pixel value = class index in --classes;
- ``<stem>_overlay.png``: the image blended with the class colours (--alpha), upscaled (nearest, a whole
  factor) until its short side is at least 256 px when it is smaller (a 32×32 image becomes 256×256), with a
  legend below it: a colour swatch, the name and the pixel share of every class present;
- ``<stem>.json``: the classes, the class ids present with their pixel counts, the prompts, and what made it:
  ``model`` (a folder's absolute path, the embedded model's too, or the hub id), ``lora``, ``layer``,
  ``timestep``, ``protocol``, ``package_version`` and ``provenance``
  (:func:`seg4diff_fast.utils.provenance.model_record`: family, diffusers version, a hash of
  ``model_index.json``, the hub revision when it came from the hub cache).

Class names are checked against the model's tokenizer before anything runs: a name given twice is an error;
a word the tokenizer does not know whole (the embedded ShapesWorld model reads "cat" as ``c a t``) gives a
warning that lists the words the model knows (a big tokenizer: the split word and its pieces), and
--strict makes it an error. Every input is checked before anything is written, and each file is written to
a temporary name and renamed, so a bad input leaves nothing half-written. Exit status: 0 done, 2 a bad
argument or input (one line on stderr; nothing written).

Example:
    seg4diff-fast segment photo.jpg --classes "cat,sofa,background" --model PATH --out out/seg
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
    check_batch_size,
    load_model,
    parallelism,
    require_out,
    run_command,
)
from .utils.files import atomic_write, palette, write_json

HELP = "segment images with a list of class names (label PNG, overlay PNG, JSON per image)"

#: Overlays of images whose short side is below this are upscaled (nearest, a whole factor) to reach it.
OVERLAY_MIN_SIDE = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    # nothing is required at parse time (every subcommand parses bare); run() reports what is missing
    p.add_argument("images", nargs="*", metavar="IMG", help="image files")
    p.add_argument("--classes", help='comma-separated class names, e.g. "cat,sofa,background" (required)')
    p.add_argument("--out", help="output folder (required)")
    add_model_arguments(p)
    p.add_argument("--layer", type=int, help="capture layer (default: the model's expert layer; 9 for SD3)")
    p.add_argument("--resolution", type=int, help="input side (default: the model's; 1024 for SD3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="images per transformer call (4)")
    p.add_argument("--keep-dashes", action="store_true",
                   help="keep the text after '-' in class names (the authors' prompts cut it)")
    p.add_argument("--strict", action="store_true",
                   help="refuse class names the model's tokenizer does not know as words (default: warn)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (0.5)")
    add_parallel_arguments(p, workers=False)


def _warn(msg: str) -> None:
    print(f"seg4diff-fast segment: warning: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    return run_command("segment", _run, args)


def parse_classes(spec: str) -> list[str]:
    """The comma list of --classes, checked: no empty name, no repeat, at most 256 (a palette PNG).

    Raises:
        CLIError: the one line to print.
    """
    from .reader.vocabulary import check_repeated

    classes = [c.strip() for c in spec.split(",")]
    if not any(classes):
        raise CLIError('the class list is empty; pass --classes "name1,name2,..."')
    if any(not c for c in classes):
        raise CLIError(f"--classes {spec!r} has an empty class name")
    try:
        check_repeated(classes)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if len(classes) > 256:
        raise CLIError(f"--classes has {len(classes)} names; at most 256 fit a palette PNG (use `seg4diff-fast "
                       "label` for more)")
    return classes


def check_class_words(seg, classes: list[str], strict: bool, warn) -> None:
    """Warn about (``strict``: refuse) class names the segmenter's tokenizer splits or merges."""
    from .reader.vocabulary import check_vocabulary

    check = check_vocabulary(classes, seg.reader.tokenizer, seg.split_dash)
    if check.ok:
        return
    if strict:
        raise CLIError(f"--strict: {check.message()}")
    warn(check.message())


def _run(args: argparse.Namespace) -> int:
    from PIL import Image

    if not args.images:
        raise CLIError("give at least one image: seg4diff-fast segment IMG... --classes \"a,b\" --out DIR")
    if args.classes is None:
        raise CLIError("--classes is required, e.g. --classes \"cat,sofa,background\"")
    require_out(args.out)
    check_batch_size(args.batch_size)
    if not 0.0 <= args.alpha <= 1.0:
        raise CLIError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.resolution is not None and args.resolution < 1:
        raise CLIError(f"--resolution must be >= 1, got {args.resolution}")
    classes = parse_classes(args.classes)
    parallelism(args, uses_workers=False)
    images, stems = [], {}
    for path in args.images:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read image {path}: {e}") from None
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise CLIError(f"{stems[stem]} and {path} share the file name stem {stem!r}: their outputs "
                           f"({stem}_labels.png, {stem}_overlay.png, {stem}.json) would overwrite each other; rename "
                           "one, or segment them into different --out folders")
        stems[stem] = path

    from .segment import Seg4DiffSegmenter
    from .utils.provenance import model_record

    pipe = load_model(args)
    try:
        seg = Seg4DiffSegmenter(pipe, layer=args.layer, resolution=args.resolution, seed=args.seed,
                                batch_size=args.batch_size, split_dash=not args.keep_dashes)
        seg.plan(classes)  # bad names fail before any work
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    check_class_words(seg, classes, args.strict, _warn)
    try:
        results = seg(images, classes)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None

    provenance = model_record(pipe, args.model)
    provenance["lora"] = os.path.abspath(args.lora) if args.lora else None
    record = {
        "model": provenance["model"],
        "lora": provenance["lora"],
        "layer": seg.layers[0] if len(seg.layers) == 1 else list(seg.layers),
        "timestep": seg.timestep,
        "protocol": seg.protocol,
        "package_version": provenance["package_version"],
        "provenance": provenance,
    }
    try:
        _write_outputs(args.out, args.alpha, classes, images, list(stems), results, record)
    except OSError as e:
        raise CLIError(f"cannot write to {args.out}: {e}") from None
    return 0


# ----------------------------------------------------------------------------------------------
# overlay
def overlay_scale(height: int, width: int) -> int:
    """The whole factor that brings the short side to at least :data:`OVERLAY_MIN_SIDE` (1 when it is).

    Example:
        >>> overlay_scale(32, 32), overlay_scale(32, 300), overlay_scale(100, 90), overlay_scale(256, 512)
        (8, 8, 3, 1)
    """
    short = max(1, min(height, width))
    return 1 if short >= OVERLAY_MIN_SIDE else math.ceil(OVERLAY_MIN_SIDE / short)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def legend_image(names: list[str], colours: list[tuple[int, int, int]], width: int):
    """A white strip ``width`` wide: a swatch and a label per entry, wrapped over as many rows as needed."""
    from PIL import Image, ImageDraw

    size = max(12, min(32, width // 24))
    font = _font(size)
    pad, gap = max(4, size // 3), size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(name, colour, size + pad + int(probe.textlength(name, font=font))) for name, colour in
             zip(names, colours)]
    rows: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    x = pad
    for item in items:
        if rows[-1] and x + item[2] > width - pad:
            rows.append([])
            x = pad
        rows[-1].append(item)
        x += item[2] + gap
    row_h = size + pad
    strip = Image.new("RGB", (width, pad + row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = pad, pad + r * row_h
        for name, colour, w in row:
            draw.rectangle((x, y, x + size - 1, y + size - 1), fill=tuple(colour), outline=(0, 0, 0))
            draw.text((x + size + pad, y), name, fill=(0, 0, 0), font=font)
            x += w + gap
    return strip


def overlay_image(image, labels, classes: list[str], pal: list[tuple[int, int, int]], alpha: float):
    """The image blended with its label colours, upscaled (:func:`overlay_scale`), the legend below: every
    class present, in class order, with its pixel share."""
    import numpy as np
    from PIL import Image

    colours = np.asarray(pal, dtype=np.float32)
    rgb = np.asarray(image, dtype=np.float32)
    blend = Image.fromarray(((1 - alpha) * rgb + alpha * colours[labels]).round().clip(0, 255).astype(np.uint8))
    h, w = labels.shape
    k = overlay_scale(h, w)
    if k > 1:
        blend = blend.resize((w * k, h * k), Image.NEAREST)
    ids, counts = np.unique(labels, return_counts=True)
    names = [f"{classes[int(i)]} {100 * c / labels.size:.1f}%" for i, c in zip(ids, counts)]
    legend = legend_image(names, [pal[int(i)] for i in ids], blend.width)
    canvas = Image.new("RGB", (blend.width, blend.height + legend.height), (255, 255, 255))
    canvas.paste(blend, (0, 0))
    canvas.paste(legend, (0, blend.height))
    return canvas


def _write_outputs(out, alpha, classes, images, stems, results, record) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    pal = palette(len(classes))
    flat_pal = [v for rgb in pal for v in rgb]
    for image, stem, res in zip(images, stems, results):
        labels = res.label_map
        label_png = Image.fromarray(labels.astype(np.uint8), mode="P")
        label_png.putpalette(flat_pal)
        overlay_png = overlay_image(image, labels, classes, pal, alpha)
        ids, counts = np.unique(labels, return_counts=True)
        info = {
            "image": stem,
            "size": [int(labels.shape[1]), int(labels.shape[0])],
            "classes": classes,
            "present": {classes[int(i)]: {"id": int(i), "pixels": int(c)} for i, c in zip(ids, counts)},
            "mean_confidence": float(res.confidence.mean()),
            "prompts": res.prompts,
            **record,
            "overlay_scale": overlay_scale(*labels.shape),
            "colours": {c: list(p) for c, p in zip(classes, pal)},
        }
        atomic_write(os.path.join(out, f"{stem}_labels.png"), lambda f, im=label_png: im.save(f, format="PNG"))
        atomic_write(os.path.join(out, f"{stem}_overlay.png"), lambda f, im=overlay_png: im.save(f, format="PNG"))
        write_json(os.path.join(out, f"{stem}.json"), info)
        print(f"{stem}: {', '.join(f'{classes[int(i)]} {100 * c / labels.size:.1f}%' for i, c in zip(ids, counts))}")
