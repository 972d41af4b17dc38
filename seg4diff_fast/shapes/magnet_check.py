"""MAGNET on ShapesWorld: does a LoRA trained on a weak block raise that block's zero-shot mIoU?

Measures on held-out scenes, before and after :func:`~seg4diff_fast.magnet.train_magnet` on the
embedded pipeline: per-block mIoU (protocols A and B, as :func:`.train.evaluate_grounding`), the held-out
flow-matching loss (same σ and noise before and after), and generation grounding (images generated
from single-object captions: the caption's colour must dominate inside the object's own predicted
mask, read from the maps captured during generation).

    python -m seg4diff_fast.shapes.magnet_check --layer 2 --steps 600 --out runs/magnet_shapes
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch

from .shipped import EXPERT_LAYER, SIZE, T5_LENGTH
from .world import BACKGROUND, BACKGROUND_RGB, COLORS, SHAPES, caption_for

__all__ = ["generation_grounding", "magnet_check"]


@torch.no_grad()
def generation_grounding(pipe: Any, layer: int, n: int = 12, steps: int = 20, guidance: float = 4.0,
                         t5_length: int = T5_LENGTH, size: int = SIZE) -> dict[str, float]:
    """Generate "<colour> <shape> on background" images with capture at ``layer`` (mean over the last
    half of the steps); the object's predicted mask = pixels whose class map (mean of its tokens' maps)
    beats the background token's. Score: the share of images whose most frequent palette colour inside
    that mask is the caption's (chance 1/4), and the mean share of the mask's pixels in that colour."""
    from ..capture import disable_fast_capture, enable_fast_capture

    palette = np.array([BACKGROUND_RGB] + list(COLORS.values()), dtype=np.float32)
    names = list(COLORS)
    hits, purity = 0, []
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names) + i) % len(SHAPES)]
        obj = f"{colour} {shape}"
        prompt = caption_for([obj])
        ids = pipe.tokenizer(prompt)["input_ids"]
        word_ids = {w: pipe.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (colour, shape, BACKGROUND)}
        pos = {w: ids.index(t) for w, t in word_ids.items()}  # the words' positions in the caption
        cap = enable_fast_capture(pipe, layers=[layer], steps=range(steps // 2, steps), cfg=True)
        try:
            img = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       max_sequence_length=t5_length, generator=torch.Generator().manual_seed(i)).images[0]
            maps = cap.maps[0, 0]  # (T, h, w)
        finally:
            disable_fast_capture(pipe)
        obj_map = (maps[pos[colour]] + maps[pos[shape]]) / 2
        up = torch.nn.functional.interpolate(torch.stack([obj_map, maps[pos[BACKGROUND]]])[None], (size, size),
                                             mode="bilinear", align_corners=False)[0]
        mask = (up[0] > up[1]).numpy()
        px = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        nearest = np.argmin(((px[:, None] - palette[None]) ** 2).sum(-1), axis=1).reshape(size, size)
        inside = nearest[mask]
        if inside.size == 0:
            purity.append(0.0)
            continue
        counts = np.bincount(inside, minlength=len(palette))[1:]
        hits += int(names[int(np.argmax(counts))] == colour)
        purity.append(float((inside == 1 + names.index(colour)).mean()))
    return {"gen_mask_colour_acc": round(hits / n, 3), "gen_mask_colour_purity": round(float(np.mean(purity)), 3),
            "gen_chance": round(1 / len(names), 3)}


def _measure(pipe: Any, scenes: list, layer: int, t5_length: int, size: int, generate: int) -> dict[str, Any]:
    from .train import evaluate_grounding, heldout_losses

    pipe.transformer.eval()
    res = evaluate_grounding(pipe, scenes, size, t5_length=t5_length)
    out = {k: res[k] for k in ("A", "B", "A_baseline", "B_baseline", "n_A", "n_B")}
    out.update(heldout_losses(pipe, scenes[:64], t5_length))
    if generate:
        out.update(generation_grounding(pipe, layer, n=generate, t5_length=t5_length, size=size))
    return out


def magnet_check(layer: int = 2, steps: int = 600, scenes: int = 200, out: str | None = None, batch_size: int = 16,
                 lr: float = 1e-3, include_background: bool = True, generate: int = 12, seed: int = 0,
                 progress: bool = True, pipe: Any = None, **config: Any) -> dict[str, Any]:
    """Before/after MAGNET on ``layer`` of the embedded pipeline (or ``pipe``); returns both measurements
    and the training summary (and writes ``magnet_check.json`` / ``.md`` into ``out`` when given)."""
    import tempfile

    from ..magnet import MagnetConfig, ShapesMagnetData, train_magnet
    from .pipeline import load_pipeline
    from .train import heldout_scenes

    pipe = pipe if pipe is not None else load_pipeline()
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
    result = {"layer": layer, "expert_layer": EXPERT_LAYER, "steps": steps, "batch_size": batch_size, "lr": lr,
              "include_background": include_background, "scenes": scenes, "before": before, "after": after,
              "lift_A": round(after["A"][layer] - before["A"][layer], 2),
              "lift_B": round(after["B"][layer] - before["B"][layer], 2),
              "fm_loss_change": round(after["loss_caption"] / before["loss_caption"] - 1.0, 4),
              "expert_A_change": round(after["A"][EXPERT_LAYER] - before["A"][EXPERT_LAYER], 2),
              "expert_B_change": round(after["B"][EXPERT_LAYER] - before["B"][EXPERT_LAYER], 2),
              "train": {k: summary[k] for k in ("final", "totals", "seconds")},
              "seconds": round(time.perf_counter() - t0, 1)}
    if out:
        from ..utils.files import atomic_write, write_json

        write_json(os.path.join(out, "magnet_check.json"), result)
        md = markdown(result)
        atomic_write(os.path.join(out, "magnet_check.md"), lambda f: f.write(md.encode()))
    return result


def markdown(r: dict[str, Any]) -> str:
    """The before/after per-block table of :func:`magnet_check`'s result."""
    n = len(r["before"]["A"])
    head = "| | " + " | ".join(f"b{i}" + (" (trained)" if i == r["layer"] else "") for i in range(n)) + " | baseline |"
    rows = [head, "|---" * (n + 2) + "|"]
    for proto in ("A", "B"):
        for when in ("before", "after"):
            vals = " | ".join(f"{v:.1f}" for v in r[when][proto])
            rows.append(f"| {proto} {when} | {vals} | {r[when][f'{proto}_baseline']:.1f} |")
    b, a = r["before"], r["after"]
    rows.append("")
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
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    r = magnet_check(layer=args.layer, steps=args.steps, scenes=args.scenes, out=args.out, batch_size=args.batch_size,
                     lr=args.lr, include_background=not args.no_background, generate=args.generate, seed=args.seed)
    print(markdown(r))
    print(json.dumps({k: r[k] for k in ("lift_A", "lift_B", "fm_loss_change", "expert_A_change", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
