"""Evaluate Seg4Diff on a segmentation benchmark (the paper's protocols) and write results.json.

Open-vocabulary (voc20, coco-object, context59, ade150, cityscapes; default for those): GT-only prompt
(--no-gt-only-prompt prompts every class), background excluded, short-side-640 pre-resize, labels at
full resolution, dataset-level confusion matrix. Unsupervised (voc21, coco-stuff27; --protocol to
choose): empty prompt, KL merging, Hungarian matching per image. --layers all sweeps every block in one
pass per image and prints mIoU per layer. --dataset folder takes your own data:
--images DIR --labels DIR --classes FILE.json (label = image stem + .png).

Example:
    seg4diff-fast eval --dataset voc20 --root datasets --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --out results.json
"""

from __future__ import annotations

import argparse
import sys

HELP = "evaluate zero-shot / unsupervised segmentation on a benchmark (mIoU, per-class table, results.json)"

DATASET_CHOICES = ("voc20", "voc21", "coco-object", "context59", "ade150", "cityscapes", "coco-stuff27", "folder")


def _layers(text: str):
    if text == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes 'all' or comma-separated ints, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASET_CHOICES, help="the benchmark (required)")
    p.add_argument("--root", default="datasets", help="datasets root (detectron2 layout; default: datasets)")
    p.add_argument("--images", help="image folder (overrides the standard layout; required for folder)")
    p.add_argument("--labels", help="label folder (overrides the standard layout; required for folder)")
    p.add_argument("--classes", help="folder: JSON list of class names (index = label id)")
    p.add_argument("--ignore-index", type=int, default=255, help="ground-truth label not scored (255)")
    p.add_argument("--model", help="local diffusers folder or hub id (default: the embedded ShapesWorld pipeline)")
    p.add_argument("--protocol", choices=("open-vocab", "unsupervised"),
                   help="default: the dataset's table in the paper (unsupervised for voc21, coco-stuff27)")
    p.add_argument("--gt-only-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="prompt only each image's ground-truth classes (the paper's protocol; default on)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="capture layer(s), comma-separated, or 'all' (default: the model's expert layer; 9 for SD3)")
    p.add_argument("--resolution", type=int, help="input side (default: the model's; 1024 for SD3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=28, help="num_inference_steps (28)")
    p.add_argument("--noise-step", type=int, default=8, help="t = timesteps[-noise_step] (8)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--pre-resize", type=int, default=640,
                   help="resize the short side to this first (the authors' test mapper, 640); 0: off")
    p.add_argument("--threshold", type=float, default=None, help="unsupervised KL threshold (0.1)")
    p.add_argument("--power", type=float, default=None, help="unsupervised power p (1.0)")
    p.add_argument("--batch-size", type=int, default=1, help="images per transformer call (1)")
    p.add_argument("--limit", type=int, help="evaluate at most N images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="results.json", help="results JSON (default: results.json)")


def _fail(msg: str) -> int:
    print(f"seg4diff-fast eval: error: {msg}", file=sys.stderr)
    return 2


def _table(result: dict) -> str:
    lines = [f"{'class':<24} {'IoU':>7}", "-" * 32]
    for name, iou in result["per_class"].items():
        lines.append(f"{name.strip():<24} {'n/a' if iou is None else f'{iou:7.2f}':>7}")
    lines.append("-" * 32)
    m = result["mIoU"]
    lines.append(f"{'mIoU':<24} {'n/a' if m is None else f'{m:7.2f}':>7}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .evaluation.datasets import DATASETS, SegDataset, load_classnames
    from .evaluation.runner import evaluate
    from .models import ModelNotAvailableError, load_pipeline, quiet_loading
    from .reader import PipelineReader
    from .segment import Seg4DiffSegmenter
    from .utils.files import write_json

    if args.dataset is None:
        return _fail(f"--dataset is required (one of {', '.join(DATASET_CHOICES)})")
    try:
        if args.dataset == "folder":
            if not (args.images and args.labels and args.classes):
                return _fail("--dataset folder needs --images DIR --labels DIR --classes FILE.json")
            dataset = SegDataset(args.images, args.labels, load_classnames(args.classes),
                                 ignore_index=args.ignore_index, name="folder")
            protocol = args.protocol or "open-vocab"
        else:
            dataset = SegDataset.standard(args.dataset, args.root, args.images, args.labels, args.ignore_index)
            protocol = args.protocol or DATASETS[args.dataset].protocol
        if args.limit is not None and args.limit < 1:
            return _fail("--limit must be >= 1")
        quiet_loading()
        pipe = load_pipeline(args.model, args.dtype, args.device)
        reader = PipelineReader(pipe, num_inference_steps=args.steps, noise_step=args.noise_step,
                                resolution=args.resolution, seed=args.seed)
        layers = args.layers if args.layers is not None else [reader.defaults.layer]
        if layers != "all":
            layers = list(reader.check_layers(layers, "--layers"))
        segmenter = Seg4DiffSegmenter(reader, layer=layers if layers != "all" else list(range(reader.num_layers)),
                                      short_side=args.pre_resize or None, batch_size=args.batch_size)
        result = evaluate(segmenter, dataset, protocol=protocol, gt_only=args.gt_only_prompt,
                          layers="all" if layers == "all" else None, limit=args.limit, batch_size=args.batch_size,
                          threshold=args.threshold, power=args.power, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, TypeError, ModelNotAvailableError, OSError) as e:
        return _fail(str(e))

    result["model"] = args.model
    result["settings"] = {
        "resolution": segmenter.resolution, "seed": args.seed, "num_inference_steps": args.steps,
        "noise_step": args.noise_step, "dtype": str(segmenter.transformer.dtype).replace("torch.", ""),
        "pre_resize": args.pre_resize or None, "timestep": segmenter.timestep,
        "t5": f"{segmenter.t5_length} zero positions",
    }
    print(_table(result))
    if "per_layer" in result:
        print("mIoU per layer: " + ", ".join(f"{k}: {'n/a' if v is None else f'{v:.2f}'}"
                                             for k, v in result["per_layer"].items()))
        print(f"best layer: {result['layer']}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0
