"""MAGNET LoRA fine-tuning: flow matching + focal/dice mask loss on the expert layer's image→text scores.

Writes OUT/pytorch_lora_weights.safetensors (a stock ``pipe.load_lora_weights(OUT)`` reads it),
OUT/magnet_head.safetensors, OUT/magnet_config.json, OUT/log.jsonl, OUT/summary.json and a checkpoint
every --checkpoint-every steps (OUT/checkpoint.pt, written atomically; --resume continues it exactly).
One device as is, several with accelerate:

    seg4diff-fast magnet --data shapes --out runs/magnet_shapes
    seg4diff-fast magnet --model PATH --data coco:/data/datasets --layer 9 --max-steps 3000 --out runs/magnet
    accelerate launch -m seg4diff_fast.cli magnet --model PATH --data sa1b:/data/sa1b --out runs/magnet_sa1b

--paper (the default for SD3 models) trains as the authors' code does; --corrected with this package's choices
(docs/PAPER_PROTOCOL_MAGNET.md). Settings not given come from the model, as the expert layer does: a model
folder may ship its own MAGNET recipe (:mod:`seg4diff_fast.magnet.recipe`; the embedded ShapesWorld model's:
--corrected, lr 3e-3, 50 warm-up steps of 2000, batch 16, the zero-initialised conv head, the LoRA on every
linear layer of each block, the background class trained, 30 % same-colour scenes), else the authors' SD3
settings (--paper, lr 1e-4, 500 of 3000, batch 8, the conv head).

Every argument is checked before anything is written (a bad one leaves no OUT folder). On ShapesWorld data
the run ends with the trained layer's mIoU (protocols A and B) on --heldout-scenes held-out scenes, before
and after, the saved LoRA loaded into a fresh pipeline as `eval --lora` would (--no-heldout skips it);
summary.json records it with the model, its hash, the layer, the protocol and the package version.
A --max-steps no longer than --warmup-steps is trained as asked, with a one-line warning (the learning rate
then never leaves the linear warm-up).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .cli_common import (
    CLIError,
    add_model_arguments,
    add_parallel_arguments,
    check_device,
    check_out_folder,
    load_model,
    parallelism,
    require_out,
    run_command,
)

#: held-out ShapesWorld scenes for the before/after mIoU (a few dozen: seconds on the embedded model)
HELDOUT_SCENES = 48

HELP = "MAGNET LoRA fine-tuning (shapes | coco:DIR | sa1b:DIR), resumable, accelerate for several GPUs"

#: what ``magnet`` imports from the [train] extras (pycocotools only for COCO / SA-1B masks)
TRAIN_EXTRAS = ("accelerate", "peft")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="shapes | shapes:N | coco:DIR (COCO-Stuff label PNGs in the authors' layout, or "
                                  "COCO instances with --corrected) | sa1b:DIR")
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--paper", dest="protocol", action="store_const", const="paper",
                       help="train as the authors' code does (the default for SD3 models without a recipe): "
                            "their data chains, full class names located with isin, every head x 77 positions as "
                            "SA-1B candidates, their focal form, the conv head on every token map")
    proto.add_argument("--corrected", dest="protocol", action="store_const", const="corrected",
                       help="this package's choices where it departs from the authors' code "
                            "(docs/PAPER_PROTOCOL_MAGNET.md)")
    p.set_defaults(protocol=None)  # the model's: paper for SD3 (the family the authors trained), else corrected
    p.add_argument("--out", help="output folder")
    add_model_arguments(p, lora=False)  # --dtype auto: float32 here (the training precision is --mixed-precision)
    p.add_argument("--layer", type=int, help="expert layer (default: the model's; 9 for SD3)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the model's recipe, else 3000)")
    p.add_argument("--batch-size", type=int, help="images per device per micro-step (default: the model's recipe, "
                                                   "else 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (1)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the model's recipe, else 1e-4, the "
                                             "authors' code)")
    p.add_argument("--warmup-steps", type=int,
                   help="linear warm-up, then cosine (default: the model's recipe, else 500); longer than "
                        "--max-steps: a warning, kept as given")
    p.add_argument("--rank", type=int, help="LoRA rank (default: the model's recipe, else 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the model's recipe, else 16)")
    p.add_argument("--target-modules", type=_module_list,
                   help="comma-separated linear layers of every block that get the LoRA, e.g. "
                        "to_q,to_k,to_v,to_out.0,ff.net.0.proj (default: the model's recipe, else the family's "
                        "attention projections)")
    p.add_argument("--lambda-focal", type=float, help="focal loss weight (default: the model's recipe, else 0.1)")
    p.add_argument("--lambda-dice", type=float, help="dice loss weight (default: the model's recipe, else 0.2)")
    p.add_argument("--head-reduce", default="none", choices=["none", "mean"],
                   help="matched (SA-1B) data: per-head candidates (none, the authors') or the head mean")
    p.add_argument("--conv-head", action=argparse.BooleanOptionalAction, default=None,
                   help="train the residual conv head beside the LoRA (default: the model's recipe, else on, as the "
                        "authors do); segmentation reads the maps without it")
    p.add_argument("--background", action=argparse.BooleanOptionalAction, default=None,
                   help="shapes data: train the world's background class too (default: the model's recipe, else on)")
    p.add_argument("--same-colour", type=float,
                   help="shapes data: share of scenes whose objects all have one colour, told apart by their shape "
                        "words alone (default: the model's recipe, else 0)")
    p.add_argument("--resolution", type=int, help="image side (default: 1024; the world size for shapes)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-grad-norm", type=float, default=0.01, help="gradient-norm clip (0.01; 0: off)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    add_parallel_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    p.add_argument("--heldout-scenes", type=int, default=HELDOUT_SCENES,
                   help=f"ShapesWorld data: held-out scenes the trained layer's mIoU is measured on before and "
                        f"after ({HELDOUT_SCENES})")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out before/after mIoU")
    p.add_argument("--no-progress", action="store_true")


def _module_list(text: str) -> tuple[str, ...]:
    """``--target-modules a,b,c`` as a tuple of names; an empty list is refused."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one module name, e.g. to_q,to_k,to_v,to_out.0")
    return names


def _warn(msg: str) -> None:
    print(f"seg4diff-fast magnet: warning: {msg}", file=sys.stderr)


def require_train_extras(data: str | None = None) -> None:
    """Refuse to start without the [train] extras, naming the missing module and the install command."""
    names = TRAIN_EXTRAS + (("pycocotools",) if str(data or "").split(":", 1)[0].lower() in ("coco", "sa1b", "sa-1b")
                            else ())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing = getattr(e, "name", None) or name
            raise CLIError(f"magnet needs the [train] extras ({missing} is missing): pip install "
                           "'seg4diff-fast[train]'") from None


def warmup_warning(max_steps: int, warmup_steps: int) -> str | None:
    """The one-line warning for a warm-up as long as the run or longer (None when the run leaves it)."""
    if warmup_steps <= 0 or max_steps > warmup_steps:
        return None
    peak = max_steps / warmup_steps
    return (f"--max-steps {max_steps} <= --warmup-steps {warmup_steps}: the learning rate never leaves the linear "
            f"warm-up (it peaks at {100 * peak:.0f} % of --lr) and the cosine decay never starts; pass e.g. "
            f"--warmup-steps {max_steps // 10} for warm-up then cosine")


def run(args: argparse.Namespace) -> int:
    return run_command("magnet", _run, args)


def _run(args: argparse.Namespace) -> int:
    # cheap checks first: nothing loads and nothing is written until every argument is known to be good
    if not args.data:
        raise CLIError("--data is required: shapes, shapes:N, coco:DIR or sa1b:DIR")
    require_out(args.out)
    check_out_folder(args.out)
    if args.heldout_scenes < 1:
        raise CLIError("--heldout-scenes must be >= 1 (--no-heldout skips the measurement)")
    par = parallelism(args)
    check_device(args.device)
    require_train_extras(args.data)

    from .magnet import MagnetConfig, ShapesMagnetData, train_magnet
    from .magnet.data import open_magnet_data
    from .magnet.train import check_precision
    from .models import ModelNotAvailableError

    try:
        from .magnet.recipe import model_recipe
        from .reader import model_family
        from .shapes.shipped import resolve_model

        model_path = resolve_model(args.model)
        recipe = model_recipe(model_path)  # the model's own settings, where the user gave none
        given = {"lr": args.lr, "warmup_steps": args.warmup_steps, "max_steps": args.max_steps,
                 "batch_size": args.batch_size, "conv_head": args.conv_head, "protocol": args.protocol,
                 "rank": args.rank, "alpha": args.alpha, "target_modules": args.target_modules,
                 "lambda_focal": args.lambda_focal, "lambda_dice": args.lambda_dice}
        settings = {k: recipe[k] for k in given if given[k] is None and k in recipe}
        settings.update({k: v for k, v in given.items() if v is not None})
        steps = settings.get("max_steps", MagnetConfig.max_steps)
        if args.warmup_steps is None and steps <= settings.get("warmup_steps", MagnetConfig.warmup_steps):
            settings["warmup_steps"] = steps // 10  # a default warm-up scaled to a short run (a given one: warned)
        if "protocol" not in settings:
            settings["protocol"] = "paper" if model_family(model_path).authors_magnet else "corrected"
        args.protocol = settings["protocol"]
        cfg = MagnetConfig(
            layer=args.layer, head_reduce=args.head_reduce, grad_accum=args.grad_accum,
            max_grad_norm=args.max_grad_norm or None, resolution=args.resolution,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed, checkpoint_every=args.checkpoint_every, num_workers=par.workers, **settings,
        )
        import torch

        on_cpu = (args.device or "").startswith("cpu") or not torch.cuda.is_available()
        check_precision(cfg.mixed_precision, on_cpu)
        kind = args.data.split(":", 1)[0].strip().lower()
        if args.background is not None and kind != "shapes":
            raise CLIError("--background/--no-background choose whether ShapesWorld data trains its background "
                           f"class; --data {args.data} has no such class (drop the option)")
        if args.same_colour is not None and kind != "shapes":
            raise CLIError(f"--same-colour sets the share of same-colour ShapesWorld scenes; --data {args.data} is "
                           "not ShapesWorld (drop the option)")
        shapes_kw = {"include_background": args.background if args.background is not None
                     else recipe.get("include_background", True),
                     "same_colour": args.same_colour if args.same_colour is not None
                     else recipe.get("same_colour", 0.0)}
        data = open_magnet_data(args.data, protocol=args.protocol, **(shapes_kw if kind == "shapes" else {}))
    except (ValueError, TypeError, ModelNotAvailableError) as e:
        raise CLIError(str(e).removeprefix("MagnetConfig: ")) from None
    warning = warmup_warning(cfg.max_steps, cfg.warmup_steps)
    if warning:
        _warn(warning)

    # float32 weights unless asked otherwise (the trained transformer is float32 without mixed precision)
    dtype = "float32" if args.dtype == "auto" else args.dtype
    pipe = load_model(args, device=_load_device(args.device), dtype=dtype)
    existed = os.path.exists(args.out)
    try:
        summary = train_magnet(pipe, data, cfg, output_dir=args.out, resume=args.resume,
                               progress=not args.no_progress, device=args.device)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        if not existed and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # a failure before the first file: leave no empty folder behind
        raise CLIError(str(e)) from None
    del pipe
    if not _is_main_process():
        return 0
    final = summary["final"]
    print(f"MAGNET: {summary['steps'] - summary['resumed_from']} steps in {summary['seconds']:.1f} s "
          f"(layer {summary['config']['layer']}, protocol {summary['config']['protocol']}); "
          f"final loss {final.get('loss', float('nan')):.4f} "
          f"(fm {final.get('fm', float('nan')):.4f}, focal {final.get('focal', float('nan')):.4f}, "
          f"dice {final.get('dice', float('nan')):.4f}); LoRA in {args.out}")
    if summary["skipped"]:
        print(f"samples without a mask loss: {summary['skipped']}")
    if isinstance(data, ShapesMagnetData) and not args.no_heldout:
        _heldout(args, data, summary)
    if summary.get("head_polarity", 1.0) < 0:
        _report_inverted_head(summary)
    return 0


def _report_inverted_head(summary: dict) -> None:
    """A head with negative polarity may have trained the raw maps to the opposite sign: where the held-out
    check measured the raw maps, say what it found; else warn with the advice."""
    from .magnet.head import inverted_head_message

    lift = summary.get("heldout", {}).get("lift", {})
    gains = [v for v in (lift.get("A"), lift.get("B")) if v is not None]
    if gains and min(gains) > 0:
        print(f"note: the trained conv head inverts its input (polarity {summary['head_polarity']:.3f}), but the raw "
              "maps the segmenter reads got better on the held-out scenes (above), so the LoRA is sound")
    else:
        _warn(inverted_head_message(summary["head_polarity"]))


def _load_device(device: str | None) -> str | None:
    """Where the model loads: --device, or under ``accelerate launch`` this process's GPU (not all on GPU 0)."""
    if device is None and os.environ.get("LOCAL_RANK") is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _heldout(args: argparse.Namespace, data, summary: dict) -> None:
    """The trained layer's held-out mIoU before and after, printed and added to summary.json."""
    import gc

    from .magnet.shapes_check import heldout_lift
    from .utils.files import write_json

    gc.collect()  # the training pipeline is gone: free its memory before a fresh one loads
    cfg = summary["config"]
    try:
        res = heldout_lift(lambda: load_model(args), args.out, cfg["layer"], scenes=args.heldout_scenes,
                           size=cfg["resolution"], render_size=data.size, t5_length=cfg["t5_length"])
    except (ValueError, TypeError, OSError) as e:  # the LoRA is written; only the measurement failed
        _warn(f"held-out mIoU not measured: {e}")
        return
    summary["heldout"] = res
    write_json(os.path.join(args.out, "summary.json"), summary)
    parts = [f"{p} {res['before'][p]:.1f} -> {res['after'][p]:.1f} ({res['lift'][p]:+.1f})"
             for p in ("A", "B") if res["lift"][p] is not None]
    print(f"held-out mIoU of layer {res['layer']} on {res['scenes']} ShapesWorld scenes, the LoRA loaded into a "
          f"fresh pipeline: {', '.join(parts)}")
