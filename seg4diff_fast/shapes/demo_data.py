"""The ShapesWorld scenes bundled with the package for ``seg4diff-fast demo`` (``seg4diff_fast/data/demo/``).

Each scene ``scene_XX`` is three files:

- ``scene_XX.png``: the RGB image (32×32);
- ``scene_XX_labels.png``: the label map, a palette PNG whose pixel values index the scene's ``classes``;
- ``scene_XX.json``: ``{"name", "seed", "size", "caption", "classes", "image", "labels"}`` (file names are
  relative to the folder).

The scenes are ``ShapesWorld(seed, size=32).sample()`` for the first seeds 0, 1, 2, … whose scene has 2–3
objects (seeds below 10⁶ are held out from training, see :mod:`.train`). :func:`make_demo_images` writes
them (run once, the files are committed); the demo reads the files with :func:`load_demo_scenes`, never
the generator, so it shows exactly what ships.

Regenerate with ``python -m seg4diff_fast.shapes.demo_data [--out DIR] [-n 8]``.
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
from .world import Scene, ShapesWorld

__all__ = ["DEMO_DIR", "DEMO_SIZE", "NUM_DEMO_SCENES", "DemoScene", "demo_seeds", "load_demo_scenes",
           "make_demo_images"]

#: The bundled scenes' folder (package data).
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")
#: Image side of the bundled scenes (the shipped model's resolution).
DEMO_SIZE = 32
#: How many scenes ship.
NUM_DEMO_SCENES = 8


@dataclass
class DemoScene:
    """One bundled scene as read from its files.

    Attributes:
        name: ``"scene_XX"`` (the stem of its files).
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
