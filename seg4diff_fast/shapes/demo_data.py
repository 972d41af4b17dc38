"""The ShapesWorld scenes of ``seg4diff-fast demo`` and the class palette its pictures use.

**The demo's scenes** (:func:`heldout_demo_scenes`) are ``ShapesWorld(seed, size=32).sample()`` for seeds
0 … N−1 (default :data:`DEMO_SCENES` = 32): the first N of the 200 held-out scenes the README's ShapesWorld
table is measured on (:func:`seg4diff_fast.shapes.train.heldout_scenes`; training draws seeds from 10⁶ on),
every scene, 1–3 objects, no selection. They are generated, not shipped: the world is a few lines of seeded
numpy and PIL drawing (~0.3 ms a scene).

**The bundled scenes** (``seg4diff_fast/data/demo/``, :func:`load_demo_scenes`; the web app's scene picker):
8 scenes, each three files:

- ``scene_XX.png``: the RGB image (32×32);
- ``scene_XX_labels.png``: the label map, a palette PNG whose pixel values index the scene's ``classes``;
- ``scene_XX.json``: ``{"name", "seed", "size", "caption", "classes", "image", "labels"}`` (file names are
  relative to the folder).

They are ``ShapesWorld(seed, size=32).sample()`` for the first seeds 0, 1, 2, … whose scene has 2–3
objects; :func:`make_demo_images` writes them (run once, the files are committed). Regenerate with
``python -m seg4diff_fast.shapes.demo_data [--out DIR] [-n 8]``.

**The palette** (:data:`CLASS_COLOURS`): each class is drawn in its own colour word's family, the shape
telling the shade apart — circle light, square full, triangle dark (a red circle pink, a red square red, a
red triangle maroon) — and background a neutral mid grey. Why not a fixed 12-colour categorical palette:
the first thing a reader checks is "did it find the red circle?", and with the family palette that is read
off the hue without the legend, and a colour confusion (the common failure: "blue circle" painted over
background or over a red object) shows as the wrong hue at once; a categorical palette would paint a red
object green when the answer is right, so every panel needs the legend and a correct panel looks wrong.
Shape confusions (the model's weak point) show as the wrong shade of the right hue, which the error panel
marks. Every pair of classes (any two can share a scene) is at least :data:`PALETTE_MIN_DELTA_E` apart in
CIEDE2000 (:func:`seg4diff_fast.utils.palette.ciede2000`; a test checks it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..utils.files import atomic_write, palette, write_json
from .world import BACKGROUND, Scene, ShapesWorld

__all__ = ["CLASS_COLOURS", "DEMO_DIR", "DEMO_SCENES", "DEMO_SIZE", "NUM_DEMO_SCENES", "PALETTE_MIN_DELTA_E",
           "DemoScene", "demo_seeds", "heldout_demo_scenes", "load_demo_scenes", "make_demo_images"]

#: The bundled scenes' folder (package data).
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")
#: Image side of the bundled scenes (the shipped model's resolution).
DEMO_SIZE = 32
#: How many scenes ship in ``data/demo/`` (the web app's picker).
NUM_DEMO_SCENES = 8
#: How many held-out scenes ``seg4diff-fast demo`` scores by default (seeds 0 … 31).
DEMO_SCENES = 32

#: The demo's colour of every class (8-bit sRGB): the colour word's family, circle light / square full /
#: triangle dark, background neutral grey (module docs: why).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    BACKGROUND: (128, 128, 128),
    "red circle": (255, 150, 150), "red square": (225, 30, 30), "red triangle": (120, 0, 0),
    "green circle": (170, 245, 190), "green square": (30, 165, 50), "green triangle": (0, 85, 25),
    "blue circle": (150, 185, 255), "blue square": (40, 80, 235), "blue triangle": (10, 20, 120),
    "yellow circle": (255, 245, 130), "yellow square": (230, 160, 0), "yellow triangle": (135, 100, 0),
}
#: Least CIEDE2000 difference between any two classes' colours (20: told apart at a glance on a patch; the
#: palette's closest pairs, red square / red triangle and blue square / blue triangle, are 21.6 apart).
PALETTE_MIN_DELTA_E = 20.0


@dataclass
class DemoScene:
    """One demo scene: a bundled one read from its files, or a generated held-out one.

    Attributes:
        name: ``"scene_XX"`` (the stem of its files; the demo's picture is ``scene_XX.png``).
        seed: the ``ShapesWorld`` seed it was drawn from.
        scene: the :class:`~seg4diff_fast.shapes.Scene` (image, caption, classes, label map, masks).
    """

    name: str
    seed: int
    scene: Scene


def demo_seeds(n: int = NUM_DEMO_SCENES, size: int = DEMO_SIZE, min_objects: int = 2,
               max_objects: int = 3) -> list[int]:
    """The first ``n`` seeds 0, 1, 2, … whose ``ShapesWorld(seed, size).sample()`` has between
    ``min_objects`` and ``max_objects`` objects (all held out from training)."""
    seeds: list[int] = []
    seed = 0
    while len(seeds) < n:
        k = len(ShapesWorld(seed, size).sample().object_classes)
        if min_objects <= k <= max_objects:
            seeds.append(seed)
        seed += 1
    return seeds


def heldout_demo_scenes(n: int = DEMO_SCENES, size: int = DEMO_SIZE) -> list[DemoScene]:
    """The demo's scenes: ``ShapesWorld(seed, size).sample()`` for seeds 0 … n−1, named ``scene_XX`` (the
    first n of the held-out set, :func:`seg4diff_fast.shapes.train.heldout_scenes`; every scene kept)."""
    width = max(2, len(str(n - 1)))
    return [DemoScene(name=f"scene_{seed:0{width}d}", seed=seed, scene=ShapesWorld(seed, size).sample())
            for seed in range(n)]


def _save_png(path: str, image: Image.Image) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def make_demo_images(out_dir: str = DEMO_DIR, n: int = NUM_DEMO_SCENES, size: int = DEMO_SIZE) -> list[str]:
    """Write the ``n`` demo scenes (image, label PNG, JSON each) to ``out_dir``; returns the JSON paths.

    Deterministic: the same arguments always give the same pixels and JSON.
    """
    flat = [v for rgb in palette(256) for v in rgb]
    paths = []
    for i, seed in enumerate(demo_seeds(n, size)):
        scene = ShapesWorld(seed, size).sample()
        name = f"scene_{i:02d}"
        labels = Image.fromarray(scene.label_map.astype(np.uint8), "P")
        labels.putpalette(flat)
        _save_png(os.path.join(out_dir, f"{name}.png"), scene.image)
        _save_png(os.path.join(out_dir, f"{name}_labels.png"), labels)
        path = os.path.join(out_dir, f"{name}.json")
        write_json(path, {"name": name, "seed": seed, "size": size, "caption": scene.caption,
                          "classes": list(scene.classes), "image": f"{name}.png", "labels": f"{name}_labels.png"})
        paths.append(path)
    return paths


def load_demo_scenes(folder: str = DEMO_DIR) -> list[DemoScene]:
    """The scenes in ``folder`` (every ``scene_*.json``, sorted by name), read from their files.

    Raises:
        FileNotFoundError: no ``scene_*.json`` in ``folder``.
        ValueError: a label map has values outside its class list, or its size differs from the image's.
    """
    files = sorted(glob.glob(os.path.join(folder, "scene_*.json")))
    if not files:
        raise FileNotFoundError(f"no demo scenes (scene_*.json) in {folder}; regenerate them with "
                                "python -m seg4diff_fast.shapes.demo_data")
    out = []
    for path in files:
        with open(path) as f:
            meta = json.load(f)
        with Image.open(os.path.join(folder, meta["image"])) as im:
            image = im.convert("RGB")
        with Image.open(os.path.join(folder, meta["labels"])) as im:
            label_map = np.asarray(im, dtype=np.int64).copy()
        classes = list(meta["classes"])
        if label_map.shape != (image.height, image.width):
            raise ValueError(f"{path}: label map {label_map.shape} vs image {image.height}×{image.width}")
        if label_map.min() < 0 or label_map.max() >= len(classes):
            raise ValueError(f"{path}: label values {label_map.min()}..{label_map.max()} outside 0..{len(classes) - 1}")
        masks = [label_map == j for j in range(1, len(classes))]
        scene = Scene(image=image, caption=meta["caption"], classes=classes, label_map=label_map, masks=masks)
        out.append(DemoScene(name=meta["name"], seed=int(meta["seed"]), scene=scene))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m seg4diff_fast.shapes.demo_data [--out DIR] [-n N]``: (re)write the demo scenes."""
    p = argparse.ArgumentParser(description="write the bundled ShapesWorld demo scenes")
    p.add_argument("--out", default=DEMO_DIR, help=f"output folder (default: {DEMO_DIR})")
    p.add_argument("-n", type=int, default=NUM_DEMO_SCENES, help=f"number of scenes ({NUM_DEMO_SCENES})")
    args = p.parse_args(argv)
    paths = make_demo_images(args.out, args.n)
    print(f"wrote {len(paths)} scenes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
