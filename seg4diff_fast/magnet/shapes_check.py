"""MAGNET on ShapesWorld: does a LoRA trained on a weak block raise that block's zero-shot mIoU?

Measures on held-out scenes, before and after :func:`~seg4diff_fast.magnet.train_magnet` on the
embedded pipeline: per-block mIoU (protocols A and B, as
:func:`seg4diff_fast.shapes.grounding.evaluate_grounding`), the held-out flow-matching loss (same σ and
noise before and after), and generation grounding
(:func:`seg4diff_fast.shapes.grounding.generation_grounding`: images generated from single-object captions;
the caption's colour must dominate inside the object's own predicted mask).

    python -m seg4diff_fast.magnet.shapes_check --layer 2 --steps 600 --out runs/magnet_shapes
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from ..shapes.grounding import evaluate_grounding, generation_grounding
from ..shapes.shipped import EXPERT_LAYER, SIZE, T5_LENGTH

# generation_grounding: re-exported
__all__ = ["generation_grounding", "heldout_lift", "layer_grounding", "lora_check", "magnet_check"]


def _measure(pipe: Any, scenes: list, layer: int, t5_length: int, size: int, generate: int) -> dict[str, Any]:
    from ..shapes.train import heldout_losses

    pipe.transformer.eval()
    res = evaluate_grounding(pipe, scenes, size, t5_length=t5_length)
    out = {k: res[k] for k in ("A", "B", "A_baseline", "B_baseline", "n_A", "n_B", "A_distinct_colours",
                               "A_shared_colour", "n_A_distinct_colours") if k in res}
    out.update(heldout_losses(pipe, scenes[:64], t5_length))
    if generate:
        out.update(generation_grounding(pipe, layer, n=generate, t5_length=t5_length, size=size))
    return out


def layer_grounding(pipe: Any, scenes: list, layer: int, size: int, t5_length: int,
                    batch_size: int = 16) -> dict[str, Any]:
    """One block's held-out mIoU (percent), protocols A and B, with their baselines: the numbers
    :func:`~seg4diff_fast.shapes.grounding.evaluate_grounding` gives for that block, from a pass that stops
    after it."""
    from ..segment import Seg4DiffSegmenter
    from ..shapes.grounding import GroundingScore, in_protocol_a

    seg = Seg4DiffSegmenter(pipe, layer=[layer], resolution=size, t5_length=t5_length, batch_size=batch_size)
    score = GroundingScore([layer])
    a_scenes = [s for s in scenes if in_protocol_a(s)]
    out: dict[str, Any] = {"n_A": len(a_scenes), "n_B": len(scenes)}
    for proto, sc in (("A", a_scenes), ("B", scenes)):
        if not sc:
            out[proto] = out[f"{proto}_baseline"] = None
            continue
        names = [s.object_classes if proto == "A" else s.classes for s in sc]
        res = seg([s.image for s in sc], classes=names, per_layer=True)
        for s, cls, r in zip(sc, names, res):
            score.add(s, proto, cls, {layer: r[layer].label_map})
        out[proto] = round(score.miou(proto)[layer], 2)
        out[f"{proto}_baseline"] = round(score.baseline_miou(proto), 2)
    return out


def heldout_lift(load_pipe: Any, lora: str, layer: int, scenes: int = 48, size: int = SIZE,
                 render_size: int | None = None, t5_length: int = T5_LENGTH, batch_size: int = 16) -> dict[str, Any]:
    """A MAGNET run's trained block on held-out ShapesWorld scenes, before and after, as a user sees it: a fresh
    pipeline (``load_pipe()``) is scored, the LoRA saved at ``lora`` is loaded into it
    (:func:`~seg4diff_fast.magnet.lora.load_magnet_lora`, as ``eval --lora`` does: no conv head) and it is
    scored again.

    Args:
        load_pipe: returns a fresh pipeline of the model the LoRA was trained on.
        lora: the run's output folder (or its ``.safetensors``).
        layer: the trained block.
        scenes: held-out scenes ``ShapesWorld(i, render_size)``, i = 0 … scenes−1 (training scenes start at 10⁶).
        size: the segmenter's resolution (the run's).
        render_size: the scenes' side (None: ``size``).
        t5_length: zero T5 positions (the run's).

    Returns:
        ``{"scenes", "layer", "resolution", "before": {"A", "B", ...}, "after": {...}, "lift": {"A", "B"},
        "reading"}`` (mIoU in percent; A is None when no scene has two objects).
    """
    from ..shapes.train import heldout_scenes
    from .lora import load_magnet_lora

    if scenes < 1:
        raise ValueError(f"scenes must be >= 1, got {scenes}")
    held = heldout_scenes(scenes, render_size or size)
    pipe = load_pipe()
    before = layer_grounding(pipe, held, layer, size, t5_length, batch_size)
    pipe = load_magnet_lora(pipe, lora)
    after = layer_grounding(pipe, held, layer, size, t5_length, batch_size)
    lift = {p: None if before[p] is None else round(after[p] - before[p], 2) or 0.0 for p in ("A", "B")}  # no -0.0
    return {"scenes": scenes, "layer": layer, "resolution": size, "before": before, "after": after, "lift": lift,
            "reading": "the saved LoRA loaded into a fresh pipeline (no conv head), head-mean maps of the layer; "
                       "held-out scenes ShapesWorld(i), i = 0.." + str(scenes - 1)}


def magnet_check(layer: int = 2, steps: int = 600, scenes: int = 200, out: str | None = None, batch_size: int = 16,
                 lr: float = 1e-3, include_background: bool = True, generate: int = 12, seed: int = 0,
                 progress: bool = True, pipe: Any = None, **config: Any) -> dict[str, Any]:
    """Before/after MAGNET on ``layer`` of the embedded pipeline (or ``pipe``); returns both measurements
    and the training summary (and writes ``magnet_check.json`` / ``.md`` into ``out`` when given)."""
    import tempfile

    from ..shapes.pipeline import load_shapes_pipeline
    from ..shapes.train import heldout_scenes
    from .config import MagnetConfig
    from .data import ShapesMagnetData
    from .train import train_magnet

    pipe = pipe if pipe is not None else load_shapes_pipeline()
    held = heldout_scenes(scenes, SIZE)
    t0 = time.perf_counter()
    before = _measure(pipe, held, layer, T5_LENGTH, SIZE, generate)
    cfg = MagnetConfig(layer=layer, max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(50, steps // 10),
                       resolution=SIZE, t5_length=T5_LENGTH, seed=seed, log_every=10,
                       checkpoint_every=max(steps, 1), **config)
    data = ShapesMagnetData(n=max(steps * batch_size, 1000), include_background=include_background)
    run_dir = out or tempfile.mkdtemp(prefix="magnet_shapes_")
    summary = train_magnet(pipe, data, cfg, os.path.join(run_dir, "lora"), progress=progress)
    after = _measure(pipe, held, layer, T5_LENGTH, SIZE, generate)
    from .lora import load_magnet_head

    head = load_magnet_head(os.path.join(run_dir, "lora"))
    with_head = {}
    if head is not None:  # the trained head read as the authors' evaluation applies it, and as it was trained
        for reading in ("paper", "corrected"):
            res = evaluate_grounding(pipe, held, SIZE, t5_length=T5_LENGTH, map_head=head.reader(reading))
            with_head[reading] = {k: res[k] for k in ("A", "B")}
    result = {**_compare(before, after, layer), "protocol": cfg.protocol, "after_with_head": with_head,
              "lift_with_head": {r: {"A": round(v["A"][layer] - before["A"][layer], 2),
                                     "B": round(v["B"][layer] - before["B"][layer], 2)} for r, v in with_head.items()},
              "steps": steps, "batch_size": batch_size, "lr": lr, "include_background": include_background,
              "scenes": scenes, "train": {k: summary[k] for k in ("final", "totals", "seconds")},
              "seconds": round(time.perf_counter() - t0, 1)}
    if out:
        _write_report(out, "magnet_check", result)
    return result


def _compare(before: dict[str, Any], after: dict[str, Any], layer: int) -> dict[str, Any]:
    """Before/after measurements (:func:`_measure`) and the changes the tables and the README report."""
    return {"layer": layer, "expert_layer": EXPERT_LAYER, "before": before, "after": after,
            "lift_A": round(after["A"][layer] - before["A"][layer], 2),
            "lift_B": round(after["B"][layer] - before["B"][layer], 2),
            "fm_loss_change": round(after["loss_caption"] / before["loss_caption"] - 1.0, 4),
            "expert_A_change": round(after["A"][EXPERT_LAYER] - before["A"][EXPERT_LAYER], 2),
            "expert_B_change": round(after["B"][EXPERT_LAYER] - before["B"][EXPERT_LAYER], 2)}


def lora_check(lora: str, layer: int | None = None, scenes: int = 200, generate: int = 12,
               out: str | None = None) -> dict[str, Any]:
    """A saved MAGNET LoRA (e.g. the shipped :data:`~seg4diff_fast.shapes.shipped.MAGNET_LORA_DIR`) measured as a
    user loads it: the embedded pipeline fresh, then with the LoRA (:func:`~.lora.load_magnet_lora`, no conv head):
    per-block mIoU (A and B, and A split by colour-distinct / shared-colour scenes), the colour and shape words'
    grounding at ``layer`` (:func:`~seg4diff_fast.shapes.grounding.word_grounding`), the held-out flow-matching
    loss and generation grounding. ``layer`` None: the LoRA's trained block (its ``magnet_config.json``)."""
    from ..shapes.grounding import word_grounding
    from ..shapes.pipeline import load_shapes_pipeline
    from ..shapes.train import heldout_scenes
    from .lora import load_magnet_lora

    if layer is None:
        with open(os.path.join(lora, "magnet_config.json")) as f:
            layer = int(json.load(f)["layer"])
    held = heldout_scenes(scenes, SIZE)
    measured = []
    for with_lora in (False, True):
        pipe = load_shapes_pipeline()
        if with_lora:
            pipe = load_magnet_lora(pipe, lora)
        m = _measure(pipe, held, layer, T5_LENGTH, SIZE, generate)
        m["words"] = word_grounding(pipe, held, layer, t5_length=T5_LENGTH)
        measured.append(m)
    result = {**_compare(*measured, layer), "lora": lora, "scenes": scenes}
    if out:
        _write_report(out, "lora_check", result)
    return result


def _write_report(out: str, stem: str, result: dict[str, Any]) -> None:
    """``out/<stem>.json`` and the :func:`markdown` table as ``out/<stem>.md``, each written atomically."""
    from ..utils.files import atomic_write, write_json

    write_json(os.path.join(out, f"{stem}.json"), result)
    atomic_write(os.path.join(out, f"{stem}.md"), markdown(result).encode())


def markdown(r: dict[str, Any]) -> str:
    """The before/after per-block table of :func:`magnet_check`'s result."""
    n = len(r["before"]["A"])
    head = "| | " + " | ".join(f"b{i}" + (" (trained)" if i == r["layer"] else "") for i in range(n)) + " | baseline |"
    rows = [head, "|---" * (n + 2) + "|"]
    for proto in ("A", "B"):
        for when in ("before", "after"):
            vals = " | ".join(f"{v:.1f}" for v in r[when][proto])
            rows.append(f"| {proto} {when} | {vals} | {r[when][f'{proto}_baseline']:.1f} |")
    for key, label in (("A_distinct_colours", "A colour-distinct"), ("A_shared_colour", "A shared-colour")):
        if key in r["before"]:
            for when in ("before", "after"):
                rows.append(f"| {label} {when} | " + " | ".join(f"{v:.1f}" for v in r[when][key]) + " | |")
    b, a = r["before"], r["after"]
    rows.append("")
    if "words" in b:
        wb, wa = b["words"], a["words"]
        rows.append(f"A word's map alone picks its own object at block {r['layer']} (% of object pixels): colour "
                    f"{wb['colour']:.1f} → {wa['colour']:.1f} (chance {wb['colour_chance']:.1f}), shape "
                    f"{wb['shape']:.1f} → {wa['shape']:.1f} (chance {wb['shape_chance']:.1f}).")
    rows.append(f"Held-out flow-matching loss {b['loss_caption']:.4f} → {a['loss_caption']:.4f} "
                f"({100 * r['fm_loss_change']:+.1f} %). Lift at block {r['layer']}: A {r['lift_A']:+.1f}, "
                f"B {r['lift_B']:+.1f}; expert block {r['expert_layer']}: A {r['expert_A_change']:+.1f}, "
                f"B {r['expert_B_change']:+.1f}.")
    if "gen_mask_colour_acc" in a:
        rows.append(f"Generation grounding (caption colour dominant inside the object's own mask): "
                    f"{b['gen_mask_colour_acc']:.2f} → {a['gen_mask_colour_acc']:.2f} (chance {a['gen_chance']:.2f}); "
                    f"purity {b['gen_mask_colour_purity']:.2f} → {a['gen_mask_colour_purity']:.2f}.")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=2, help="the weak block to train (default 2)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scenes", type=int, default=200, help="held-out scenes for the mIoU")
    ap.add_argument("--generate", type=int, default=12, help="generated images for the generation check (0: off)")
    ap.add_argument("--no-background", action="store_true", help="train on object classes only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocol", choices=("paper", "corrected"), default="paper",
                    help="MAGNET's protocol (docs/PAPER_PROTOCOL_MAGNET.md); default paper")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the embedded model's ops are too small for more to pay, and two "
                         "runs side by side on two cores each asking for two threads ran 5x slower)")
    ap.add_argument("--lora", default=None,
                    help="measure this saved LoRA (e.g. the shipped one) instead of training: before/after on "
                         "--scenes held-out scenes, the LoRA loaded into a fresh pipeline")
    args = ap.parse_args(argv)
    from ..utils.parallel import plan_parallelism

    try:
        plan_parallelism(args.threads, uses_workers=False).apply()
    except ValueError as e:
        ap.error(str(e))
    if args.lora:
        r = lora_check(args.lora, scenes=args.scenes, generate=args.generate, out=args.out)
        print(markdown(r))
        return 0
    r = magnet_check(layer=args.layer, steps=args.steps, scenes=args.scenes, out=args.out, batch_size=args.batch_size,
                     lr=args.lr, include_background=not args.no_background, generate=args.generate, seed=args.seed,
                     protocol=args.protocol)
    print(markdown(r))
    print(json.dumps({k: r[k] for k in ("protocol", "lift_A", "lift_B", "lift_with_head", "fm_loss_change",
                                        "expert_A_change", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
