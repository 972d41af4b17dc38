"""Measure a saved ShapesWorld pipeline: per-block grounding (protocols A and B), attention budget, and the
held-out loss with and without the caption.

Usage::

    python -m seg4diff_fast.shapes.probe PIPELINE_DIR [--scenes 200] [--t5-length 77] [--shape-probe]

``--shape-probe`` adds :func:`~seg4diff_fast.shapes.token_probe.shape_probe`: how well a linear probe reads an
object's shape from the image tokens entering each block (fitted on 500 training-range scenes, scored on the
held-out ones).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from .grounding import evaluate_grounding
from .pipeline import ShapesConfig, load_shapes_pipeline
from .train import heldout_losses, heldout_scenes
from .world import BACKGROUND_RGB, COLORS, SHAPES, caption_for

#: the shape probe's training scenes: seeds PROBE_TRAIN_SEED.. (apart from the held-out seeds 0.. and MAGNET's 10⁶..)
PROBE_TRAIN_SEED, PROBE_TRAIN_SCENES = 500_000, 500


def generation_colour_accuracy(pipe: Any, t5_length: int, size: int, n: int = 12, steps: int = 20,
                               guidance: float = 4.0) -> dict[str, float]:
    """Generate single-object scenes from captions ("red circle on background", colours and shapes in
    turn) and score the image with the world's palette, renderer-free: each pixel goes to its nearest
    palette colour (background included); the caption's colour must be the most frequent object colour.
    Returns the accuracy and the chance level (1 / number of colours)."""
    import torch

    palette = np.array([BACKGROUND_RGB] + list(COLORS.values()), dtype=np.float32)
    names = list(COLORS)
    hits = 0
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[i % len(SHAPES)]
        img = pipe(caption_for([f"{colour} {shape}"]), num_inference_steps=steps, guidance_scale=guidance,
                   height=size, width=size, max_sequence_length=t5_length,
                   generator=torch.Generator().manual_seed(i)).images[0]
        px = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        nearest = np.argmin(((px[:, None] - palette[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(nearest, minlength=len(palette))[1:]
        hits += int(names[int(np.argmax(counts))] == colour)
    return {"gen_colour_acc": round(hits / n, 3), "gen_colour_chance": round(1 / len(names), 3)}


def main(argv: list[str] | None = None) -> int:
    """Print one JSON object with the measurements."""
    ap = argparse.ArgumentParser(prog="python -m seg4diff_fast.shapes.probe", description=__doc__.split("\n")[0])
    ap.add_argument("pipeline", help="a folder written by save_pipeline (e.g. RUN/pipeline)")
    ap.add_argument("--scenes", type=int, default=200, help="held-out scenes (seeds 0..N-1)")
    ap.add_argument("--t5-length", type=int, default=None, help="zero T5 positions (default: the model's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--generate", type=int, default=0, help="also generate N single-object scenes and score colours")
    ap.add_argument("--shape-probe", action="store_true",
                    help="also probe the image tokens entering every block for their object's shape")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    cfg = ShapesConfig()
    cfg_path = os.path.join(a.pipeline, "shapes_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = ShapesConfig.from_dict(json.load(f))
    t5 = cfg.t5_length if a.t5_length is None else a.t5_length
    pipe = load_shapes_pipeline(a.pipeline)
    scenes = heldout_scenes(a.scenes, cfg.size)
    out = {"pipeline": a.pipeline, "t5_length": t5, **evaluate_grounding(pipe, scenes, cfg.size, t5),
           **heldout_losses(pipe, scenes[:64], t5)}
    if a.generate:
        out.update(generation_colour_accuracy(pipe, t5, cfg.size, a.generate))
    if a.shape_probe:
        from .token_probe import shape_probe
        from .world import ShapesWorld

        train = [ShapesWorld(PROBE_TRAIN_SEED + i, size=cfg.size).sample() for i in range(PROBE_TRAIN_SCENES)]
        out["shape_probe"] = shape_probe(pipe, train, scenes, blocks=range(cfg.num_layers))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
