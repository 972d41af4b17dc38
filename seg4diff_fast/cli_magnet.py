"""MAGNET LoRA fine-tuning: flow matching + focal/dice mask loss on the expert layer's image→text scores.

Writes OUT/pytorch_lora_weights.safetensors (a stock ``pipe.load_lora_weights(OUT)`` reads it),
OUT/magnet_head.safetensors, OUT/magnet_config.json, OUT/log.jsonl, OUT/summary.json and a checkpoint
every --checkpoint-every steps (OUT/checkpoint.pt, written atomically; --resume continues it exactly).
One device as is, several with accelerate:

    seg4diff-fast magnet --data shapes --out runs/magnet_shapes
    seg4diff-fast magnet --model PATH --data coco:/data/datasets --layer 9 --max-steps 3000 --out runs/magnet
    accelerate launch -m seg4diff_fast.cli magnet --model PATH --data sa1b:/data/sa1b --out runs/magnet_sa1b

--paper (default) trains as the authors' code does; --corrected with this package's choices
(docs/PAPER_PROTOCOL_MAGNET.md).
"""

from __future__ import annotations

import argparse
import sys

HELP = "MAGNET LoRA fine-tuning (shapes | coco:DIR | sa1b:DIR), resumable, accelerate for several GPUs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="shapes | shapes:N | coco:DIR (COCO-Stuff label PNGs in the authors' layout, or "
                                  "COCO instances with --corrected) | sa1b:DIR")
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--paper", dest="protocol", action="store_const", const="paper",
                       help="train as the authors' code does (the default): their data chains, full class names "
                            "located with isin, every head x 77 positions as SA-1B candidates, their focal form, "
                            "the conv head on every token map")
    proto.add_argument("--corrected", dest="protocol", action="store_const", const="corrected",
                       help="this package's choices where it departs from the authors' code "
                            "(docs/PAPER_PROTOCOL_MAGNET.md)")
    p.set_defaults(protocol=None)  # the model's: paper for SD3 (the family the authors trained), else corrected
    p.add_argument("--out", help="output folder")
    p.add_argument("--model", help="local diffusers folder or hub id (default: the embedded ShapesWorld pipeline)")
    p.add_argument("--layer", type=int, help="expert layer (default: the model's; 9 for SD3)")
    p.add_argument("--max-steps", type=int, default=3000, help="optimizer steps (3000)")
    p.add_argument("--batch-size", type=int, default=8, help="images per device per micro-step (8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (1)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (1e-4, the authors' code)")
    p.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up, then cosine (500)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (16); alpha = --alpha (16)")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lambda-focal", type=float, default=0.1)
    p.add_argument("--lambda-dice", type=float, default=0.2)
    p.add_argument("--head-reduce", default="none", choices=["none", "mean"],
                   help="matched (SA-1B) data: per-head candidates (none, the authors') or the head mean")
    p.add_argument("--no-conv-head", action="store_true", help="train without the residual conv head")
    p.add_argument("--resolution", type=int, help="image side (default: 1024; the world size for shapes)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-grad-norm", type=float, default=0.01, help="gradient-norm clip (0.01; 0: off)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")


def _fail(msg: str) -> int:
    print(f"seg4diff-fast magnet: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if not args.data:
        return _fail("--data is required: shapes, shapes:N, coco:DIR or sa1b:DIR")
    if not args.out:
        return _fail("--out DIR is required")

    from .magnet import MagnetConfig, train_magnet
    from .magnet.data import open_magnet_data
    from .models import ModelNotAvailableError, quiet_loading

    try:  # cheap checks before the model loads
        if args.protocol is None:
            from .reader import model_family
            from .shapes.shipped import resolve_model

            args.protocol = "paper" if model_family(resolve_model(args.model)).authors_magnet else "corrected"
        cfg = MagnetConfig(
            protocol=args.protocol, layer=args.layer, rank=args.rank, alpha=args.alpha, lambda_focal=args.lambda_focal,
            lambda_dice=args.lambda_dice, head_reduce=args.head_reduce, conv_head=not args.no_conv_head,
            lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps, batch_size=args.batch_size,
            grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm or None, resolution=args.resolution,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed, checkpoint_every=args.checkpoint_every, num_workers=args.workers,
        )
        data = open_magnet_data(args.data, protocol=args.protocol)
        quiet_loading()
        summary = train_magnet(args.model, data, cfg, output_dir=args.out, resume=args.resume,
                               progress=not args.no_progress)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ModelNotAvailableError) as e:
        return _fail(str(e))
    final = summary["final"]
    print(f"MAGNET: {summary['steps'] - summary['resumed_from']} steps in {summary['seconds']:.1f} s "
          f"(layer {summary['config']['layer']}, protocol {summary['config']['protocol']}); "
          f"final loss {final.get('loss', float('nan')):.4f} "
          f"(fm {final.get('fm', float('nan')):.4f}, focal {final.get('focal', float('nan')):.4f}, "
          f"dice {final.get('dice', float('nan')):.4f}); LoRA in {args.out}")
    if summary["skipped"]:
        print(f"samples without a mask loss: {summary['skipped']}")
    return 0
