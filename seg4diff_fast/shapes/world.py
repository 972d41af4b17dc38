"""ShapesWorld: a tiny synthetic world of coloured shapes with exact captions and label maps.

A scene is a plain background with 1–3 objects, each a distinct (colour, shape) pair such as
"red circle", at a random size and position. Objects are drawn in order, later ones occluding earlier
ones; masks and the label map describe what is *visible*, and an object is re-placed (or dropped) when
less than ``min_visible`` of its own area would stay visible, so no object is (nearly) hidden. Drawing is
hard-edged (no anti-aliasing) and every shape has its own texture (a circle solid, a square in horizontal
stripes, a triangle in vertical stripes, the dark stripes at :data:`TEXTURE_SHADE` of the colour): every
pixel's nearest palette colour is its class's colour and every 2×2 patch inside an object shows its shape,
which makes the label map checkable from the pixels alone, even where two objects of one colour touch.
``texture=False`` draws the flat world of the first shipped model (one colour per object, so two touching
objects of one colour merge into a single blob).

Example:
    >>> from seg4diff_fast.shapes import ShapesWorld, CLASSES
    >>> scene = ShapesWorld(0).sample()
    >>> scene.image.size, scene.label_map.shape, scene.classes[0]
    ((32, 32), (32, 32), 'background')
    >>> all(c in CLASSES for c in scene.classes)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUND",
    "BACKGROUND_RGB",
    "CLASSES",
    "COLORS",
    "SHAPES",
    "Scene",
    "ShapesWorld",
    "WORDS",
    "caption_for",
]

#: Object colours (name → RGB). Far apart from each other and from the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = "background"
BACKGROUND_RGB: tuple[int, int, int] = (60, 60, 60)

#: Every class of the world, "background" first, then "<colour> <shape>" (colour-major).
CLASSES: tuple[str, ...] = (BACKGROUND,) + tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
#: Every word a caption or class name uses.
WORDS: tuple[str, ...] = tuple(COLORS) + SHAPES + ("and", "on", BACKGROUND)


#: Default of :class:`ShapesWorld`'s ``texture``.
TEXTURED: bool = True
#: Brightness of a textured shape's dark rows or columns (a fraction of its colour).
TEXTURE_SHADE: float = 0.75
#: Which pixel rows (0) or columns (1) are darkened, per textured shape (a circle stays solid).
_STRIPE_AXIS = {"square": 0, "triangle": 1}


def caption_for(names: list[str]) -> str:
    """The caption of a scene whose visible objects are ``names`` (drawing order):
    ``"red circle and blue square on background"``."""
    return " and ".join(names) + " on " + BACKGROUND


@dataclass
class Scene:
    """One rendered scene.

    Attributes:
        image: PIL RGB image (size × size).
        caption: e.g. ``"red circle and blue square on background"`` (the visible objects, drawing order).
        classes: ``["background", <object classes in drawing order>]``.
        label_map: int64 (H, W), values index ``classes``.
        masks: one bool (H, W) mask per object (its visible pixels), aligned with ``classes[1:]``.
        boxes: per object (x0, y0, x1, y1) of its full (unoccluded) extent, in pixels.
    """

    image: Image.Image
    caption: str
    classes: list[str]
    label_map: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def object_classes(self) -> list[str]:
        """The object classes present (``classes`` without the background)."""
        return self.classes[1:]

    def global_label_map(self) -> np.ndarray:
        """The label map with values indexing :data:`CLASSES` instead of ``classes``."""
        lut = np.array([CLASSES.index(c) for c in self.classes], dtype=np.int64)
        return lut[self.label_map]


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Bool (size, size) mask of a shape centred at (cx, cy) with half-extent r (pixel centres)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    if shape == "triangle":  # upward isosceles triangle in the box [cx ± r] × [cy ± r]
        t = (ys - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= r * t)
    raise ValueError(f"unknown shape {shape!r}")


class ShapesWorld:
    """Deterministic sampler of :class:`Scene` s.

    Args:
        seed: the scene stream's seed; ``ShapesWorld(s).sample()`` is always the same scene.
        size: image side in pixels (32: the shipped model's resolution).
        min_objects, max_objects: objects per scene (1–3).
        min_radius, max_radius: half-extent of an object as a fraction of ``size``.
        min_visible: least visible fraction of an object's own area (else it is re-placed, then dropped).
        same_colour: probability that all objects of a scene share one colour (distinct shapes), so that
            only the shape words tell them apart. 0 (the default) leaves the stream unchanged.
        texture: draw each shape with its own fine texture, aligned to the pixel grid: a circle solid, a
            square in horizontal stripes, a triangle in vertical stripes (every other row or column at
            :data:`TEXTURE_SHADE` of the colour). A shape is then visible in every 2×2 patch of the object,
            as a real object's identity is in its texture, not only in its outline. None: :data:`TEXTURED`
            (True); False: the flat world.
    """

    def __init__(self, seed: int = 0, size: int = 32, min_objects: int = 1, max_objects: int = 3,
                 min_radius: float = 0.14, max_radius: float = 0.28, min_visible: float = 0.5,
                 same_colour: float = 0.0, texture: bool | None = None):
        if not 1 <= min_objects <= max_objects <= len(CLASSES) - 1:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(CLASSES) - 1}")
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        if not 0 < min_radius <= max_radius < 0.5:
            raise ValueError("need 0 < min_radius <= max_radius < 0.5")
        self.rng = np.random.default_rng(seed)
        self.size = int(size)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.min_radius, self.max_radius = float(min_radius), float(max_radius)
        self.min_visible = float(min_visible)
        if not 0.0 <= same_colour <= 1.0:
            raise ValueError(f"same_colour must be a probability, got {same_colour}")
        self.same_colour = float(same_colour)
        self.texture = TEXTURED if texture is None else bool(texture)

    def sample(self) -> Scene:
        """The next scene of this world's stream."""
        rng, size = self.rng, self.size
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        if self.same_colour and rng.random() < self.same_colour:
            colour = list(COLORS)[int(rng.integers(len(COLORS)))]
            chosen = [(colour, SHAPES[i]) for i in rng.permutation(len(SHAPES))[:n]]
        else:
            chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
        owner = np.full((size, size), -1, dtype=np.int64)  # index into `placed`, -1 background
        placed: list[tuple[str, str, tuple[float, float, float, float], int]] = []
        for color, shape in chosen:
            for _ in range(20):
                r = rng.uniform(self.min_radius, self.max_radius) * size
                cx, cy = rng.uniform(r, size - r, size=2)
                mask = _shape_mask(shape, cx, cy, r, size)
                area = int(mask.sum())
                if area == 0:
                    continue
                trial = owner.copy()
                trial[mask] = len(placed)
                # every earlier object must keep enough of itself; the new one is fully visible
                ok = all((trial == j).sum() >= self.min_visible * a for j, (_, _, _, a) in enumerate(placed))
                if ok and (trial == -1).any():
                    owner = trial
                    placed.append((color, shape, (cx - r, cy - r, cx + r, cy + r), area))
                    break
        if not placed:  # cannot happen with sane radii; keep the contract anyway
            raise RuntimeError("ShapesWorld: could not place any object")
        names = [f"{c} {s}" for c, s, _, _ in placed]
        label_map = owner + 1
        rgb = np.empty((size, size, 3), dtype=np.uint8)
        rgb[:] = BACKGROUND_RGB
        odd = np.arange(size) % 2 == 1  # the dark rows (square) or columns (triangle) of a textured shape
        for j, (color, shape, _, _) in enumerate(placed):
            mine = owner == j
            rgb[mine] = COLORS[color]
            if self.texture and shape in _STRIPE_AXIS:
                stripes = np.expand_dims(odd, 1 - _STRIPE_AXIS[shape])  # (size, 1) rows or (1, size) columns
                rgb[mine & stripes] = np.round(np.asarray(COLORS[color], dtype=np.float64) * TEXTURE_SHADE)
        return Scene(
            image=Image.fromarray(rgb, "RGB"),
            caption=caption_for(names),
            classes=[BACKGROUND] + names,
            label_map=label_map.astype(np.int64),
            masks=[owner == j for j in range(len(placed))],
            boxes=[b for _, _, b, _ in placed],
        )

    def samples(self, n: int) -> list[Scene]:
        """The next ``n`` scenes."""
        return [self.sample() for _ in range(n)]
