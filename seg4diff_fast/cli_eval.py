"""Evaluate Seg4Diff on a segmentation benchmark (the paper's protocols) and write results.json, or run a
whole table of the paper with --preset.

Open-vocabulary (voc20, coco-object, context59, ade150, cityscapes; default for those): GT-only prompt
(--no-gt-only-prompt prompts every class), background excluded, short-side-640 pre-resize, labels at
full resolution, dataset-level confusion matrix. Unsupervised (voc21, context59-bg, coco-stuff27; --protocol
to choose): empty prompt, KL merging, Hungarian matching per image. --paper (default) scores as the
authors' code does, --corrected fixes its quirks (docs/PAPER_PROTOCOL_EVAL.md lists them). --layers all
sweeps every block in one pass per image and prints mIoU per layer. --dataset folder takes your own data:
--images DIR --labels DIR --classes FILE.json (label = image stem + .png).

--preset NAME runs every dataset of one table of the paper with its settings and prints the numbers beside
the paper's (--out DIR gets NAME.json and NAME.md); a dataset missing under --root is reported and the
others still run; the exit status is 1 if any was missing or failed.

Example:
    seg4diff-fast eval --dataset voc20 --root datasets --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --out results.json
    seg4diff-fast eval --preset ovss-sd3 --root datasets --model PATH --out results/
"""

from __future__ import annotations

import argparse
import os

from .cli_common import (
    CLIError,
    add_model_arguments,
    add_parallel_arguments,
    check_device,
    load_model,
    parallelism,
    run_command,
)

HELP = "evaluate zero-shot / unsupervised segmentation on a benchmark or a whole paper table (--preset)"

DATASET_CHOICES = ("voc20", "voc21", "coco-object", "context59", "context59-bg", "ade150", "cityscapes",
                   "coco-stuff27", "folder")


def _preset_names() -> tuple[str, ...]:
    from .evaluation.presets import PRESETS

    return tuple(PRESETS)


def _layers(text: str):
    if text == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes 'all' or comma-separated ints, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASET_CHOICES, help="the benchmark (this or --preset is required)")
    p.add_argument("--preset", choices=_preset_names(),
                   help="a table of the paper: every dataset of it with the paper's settings, beside its numbers")
    p.add_argument("--root", default="datasets", help="datasets root (detectron2 layout; default: datasets)")
    p.add_argument("--images", help="image folder (overrides the standard layout; required for folder)")
    p.add_argument("--labels", help="label folder (overrides the standard layout; required for folder)")
    p.add_argument("--classes", help="folder: JSON list of class names (index = label id)")
    p.add_argument("--ignore-index", type=int, default=255, help="ground-truth label not scored (255)")
    add_model_arguments(p)  # --model (required with --preset), --lora, --dtype, --device
    p.add_argument("--protocol", choices=("open-vocab", "unsupervised"),
                   help="default: the dataset's table in the paper (unsupervised for voc21, context59-bg, "
                        "coco-stuff27)")
    rules = p.add_mutually_exclusive_group()
    rules.add_argument("--paper", dest="segmenter_protocol", action="store_const", const="paper",
                       help="score as the authors' code does (default; docs/PAPER_PROTOCOL_EVAL.md)")
    rules.add_argument("--corrected", dest="segmenter_protocol", action="store_const", const="corrected",
                       help="score with the authors' quirks fixed (docs/PAPER_PROTOCOL_EVAL.md)")
    p.set_defaults(segmenter_protocol="paper")
    p.add_argument("--gt-only-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="prompt only each image's ground-truth classes (the paper's protocol; default on)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="capture layer(s), comma-separated, or 'all' (default: the model's expert layer, 9 for SD3; "
                        "with --preset: the preset's)")
    p.add_argument("--resolution", type=int, help="input side (default: the model's; 1024 for SD3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="num_inference_steps (default: the model's; 28 for SD3, 50 for Flux.1)")
    p.add_argument("--noise-step", type=int, help="t = timesteps[-noise_step] (default: the model's; 8)")
    p.add_argument("--pre-resize", type=int, default=None,
                   help="resize the short side to this first (the authors' test mapper, 640, the default); 0: off")
    p.add_argument("--threshold", type=float, default=None, help="unsupervised KL threshold (0.1)")
    p.add_argument("--power", type=float, default=None, help="unsupervised power p (1.0)")
    p.add_argument("--batch-size", type=int, default=1, help="images per transformer call (1)")
    p.add_argument("--limit", type=int, help="evaluate at most N images (per dataset)")
    add_parallel_arguments(p, workers=False)  # images are read in the main process, one batch at a time
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None,
                   help="results JSON (default: results.json); with --preset a folder (default: eval_<preset>)")


def _table(result: dict) -> str:
    lines = [f"{'class':<24} {'IoU':>7}", "-" * 32]
    for name, iou in result["per_class"].items():
        lines.append(f"{name.strip():<24} {'n/a' if iou is None else f'{iou:7.2f}':>7}")
    lines.append("-" * 32)
    m = result["mIoU"]
    lines.append(f"{'mIoU':<24} {'n/a' if m is None else f'{m:7.2f}':>7}")
    return "\n".join(lines)


def _segmenter(reader, layers, short_side, batch_size, protocol):
    from .segment import Seg4DiffSegmenter

    return Seg4DiffSegmenter(reader, layer=layers, short_side=short_side, batch_size=batch_size, protocol=protocol)


def _load(args: argparse.Namespace):
    """(pipe, reader) for --model / --lora (:func:`~seg4diff_fast.cli_common.load_model`: every failure one
    :class:`CLIError` line) and the reader settings."""
    from .reader import PipelineReader

    pipe = load_model(args)
    reader = PipelineReader(pipe, num_inference_steps=args.steps, noise_step=args.noise_step,
                            resolution=args.resolution, seed=args.seed)
    return pipe, reader


def _provenance(args: argparse.Namespace, pipe) -> dict:
    """The model's record (:func:`~seg4diff_fast.utils.provenance.model_record`) with the LoRA read into it."""
    from .utils.provenance import model_record

    record = model_record(pipe, args.model)
    record["lora"] = os.path.abspath(args.lora) if args.lora else None
    return record


def _settings(args: argparse.Namespace, segmenter, pre_resize: int | None) -> dict:
    return {
        "protocol": args.segmenter_protocol,
        "resolution": segmenter.resolution, "seed": args.seed, "num_inference_steps": segmenter.num_inference_steps,
        "noise_step": segmenter.noise_step, "family": segmenter.reader.family.name,
        "dtype": str(segmenter.transformer.dtype).replace("torch.", ""),
        "pre_resize": pre_resize, "timestep": segmenter.timestep,
        "t5": f"{segmenter.t5_length} zero positions", "lora": args.lora,
    }


def run(args: argparse.Namespace) -> int:
    return run_command("eval", _run, args)


def _run(args: argparse.Namespace) -> int:
    check_device(args.device)  # before anything loads
    parallelism(args, uses_workers=False)
    if args.preset is not None:
        return _run_preset(args)
    return _run_dataset(args)


def _run_dataset(args: argparse.Namespace) -> int:
    from .evaluation.datasets import DATASETS, SegDataset, load_classnames
    from .evaluation.runner import evaluate
    from .models import ModelNotAvailableError
    from .utils.files import write_json

    if args.dataset is None:
        raise CLIError(f"--dataset or --preset is required (datasets: {', '.join(DATASET_CHOICES)}; "
                       f"presets: {', '.join(_preset_names())})")
    out_path = args.out or "results.json"
    pre_resize = 640 if args.pre_resize is None else (args.pre_resize or None)
    try:
        if args.dataset == "folder":
            if not (args.images and args.labels and args.classes):
                raise CLIError("--dataset folder needs --images DIR --labels DIR --classes FILE.json")
            dataset = SegDataset(args.images, args.labels, load_classnames(args.classes),
                                 ignore_index=args.ignore_index, name="folder")
            protocol = args.protocol or "open-vocab"
        else:
            dataset = SegDataset.standard(args.dataset, args.root, args.images, args.labels, args.ignore_index)
            protocol = args.protocol or DATASETS[args.dataset].protocol
        if args.limit is not None and args.limit < 1:
            raise CLIError("--limit must be >= 1")
        pipe, reader = _load(args)
        layers = args.layers if args.layers is not None else [reader.defaults.layer]
        if layers != "all":
            layers = list(reader.check_layers(layers, "--layers"))
        segmenter = _segmenter(reader, layers if layers != "all" else list(range(reader.num_layers)),
                               pre_resize, args.batch_size, args.segmenter_protocol)
        result = evaluate(segmenter, dataset, protocol=protocol, gt_only=args.gt_only_prompt,
                          layers="all" if layers == "all" else None, limit=args.limit, batch_size=args.batch_size,
                          threshold=args.threshold, power=args.power, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, TypeError, ModelNotAvailableError, OSError) as e:
        raise CLIError(str(e)) from None

    record = _provenance(args, pipe)
    result["model"] = record["model"]
    result["settings"] = _settings(args, segmenter, pre_resize)
    result["provenance"] = record
    print(_table(result))
    if "per_layer" in result:
        print("mIoU per layer: " + ", ".join(f"{k}: {'n/a' if v is None else f'{v:.2f}'}"
                                             for k, v in result["per_layer"].items()))
        print(f"best layer: {result['layer']}")
    write_json(out_path, result)
    print(f"wrote {out_path}")
    return 0


def _run_preset(args: argparse.Namespace) -> int:
    from .evaluation.presets import PRESETS, format_report, preset_unavailable, run_preset
    from .models import ModelNotAvailableError
    from .utils.files import atomic_write, write_json

    preset = PRESETS[args.preset]
    for flag, value in (("--dataset", args.dataset), ("--images", args.images), ("--labels", args.labels),
                        ("--classes", args.classes), ("--protocol", args.protocol)):
        if value is not None:
            raise CLIError(f"--preset runs its own datasets and task; {flag} cannot be combined with it")
    if args.layers == "all":
        raise CLIError("--preset runs the paper's layer; --layers all (a sweep) is for --dataset")
    reason = preset_unavailable(preset)
    if reason is not None:
        raise CLIError(reason)
    if not args.model:
        raise CLIError(f"--preset {preset.name} needs --model PATH (the paper's model: {preset.model})")
    if preset.lora and not args.lora:
        raise CLIError(f"--preset {preset.name} needs --lora PATH (the paper's MAGNET weights: {preset.lora})")
    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be >= 1")
    pre_resize = preset.pre_resize if args.pre_resize is None else (args.pre_resize or None)
    try:
        pipe, reader = _load(args)
        if reader.family.name != preset.family:
            raise CLIError(f"--preset {preset.name} reads a {preset.family} pipeline (the paper's model: "
                           f"{preset.model}); --model {args.model} is a {reader.family.name} pipeline")
        layers = list(reader.check_layers(args.layers or list(preset.layers), "--layers"))
        segmenter = _segmenter(reader, layers, pre_resize, args.batch_size, args.segmenter_protocol)
    except (FileNotFoundError, ValueError, TypeError, ModelNotAvailableError, OSError) as e:
        raise CLIError(str(e)) from None

    report = run_preset(preset, segmenter, args.root, limit=args.limit, batch_size=args.batch_size,
                        progress=not args.no_progress, threshold=args.threshold, power=args.power)
    overrides = {name: value for name, value, paper in (
        ("layers", layers, list(preset.layers)), ("pre_resize", pre_resize, preset.pre_resize),
        ("resolution", segmenter.resolution, preset.resolution), ("steps", segmenter.num_inference_steps, preset.steps),
        ("noise_step", segmenter.noise_step, preset.noise_step), ("limit", args.limit, None),
        ("threshold", args.threshold, None), ("power", args.power, None),
        ("protocol", args.segmenter_protocol, "paper")) if value != paper}
    record = _provenance(args, pipe)
    report.update(model=record["model"], paper_model=preset.model, layers=layers, root=args.root,
                  settings=_settings(args, segmenter, pre_resize), overrides=overrides, provenance=record)
    if preset.lora:
        report["paper_lora"] = preset.lora
    if preset.note:
        report["note"] = preset.note
    text = format_report(report)
    if overrides:
        text += "\nnot the paper's settings: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    print(text)
    out_dir = args.out or f"eval_{preset.name}"
    json_path = os.path.join(out_dir, f"{preset.name}.json")
    write_json(json_path, report)
    atomic_write(os.path.join(out_dir, f"{preset.name}.md"), ("```\n" + text + "\n```\n").encode())
    print(f"wrote {json_path}")
    return 0 if not (report["missing"] or report["failed"]) else 1
