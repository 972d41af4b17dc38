"""ShapesWorld scenes: determinism, and every annotation checked against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest

from seg4diff_fast.shapes import BACKGROUND, CLASSES, COLORS, SHAPES, ShapesWorld
from seg4diff_fast.shapes.world import BACKGROUND_RGB

SEEDS = range(120)


def _scene(seed: int, size: int = 32, texture: bool | None = None):
    return ShapesWorld(seed, size=size, texture=texture).sample()


def _full_shape(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The unoccluded shape from its box, written independently of world.py (loops over pixel centres)."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    out = np.zeros((size, size), bool)
    for y in range(size):
        for x in range(size):
            px, py = x + 0.5, y + 0.5
            if shape == "circle":
                out[y, x] = np.hypot(px - cx, py - cy) <= r + 1e-9
            elif shape == "square":
                out[y, x] = x0 - 1e-9 <= px <= x1 + 1e-9 and y0 - 1e-9 <= py <= y1 + 1e-9
            else:  # apex (cx, y0), base y1 from x0 to x1
                frac = (py - y0) / (y1 - y0)
                out[y, x] = 0 <= frac <= 1 and abs(px - cx) <= r * frac + 1e-9
    return out


def test_classes_list():
    assert CLASSES[0] == BACKGROUND
    assert len(CLASSES) == 1 + len(COLORS) * len(SHAPES) and len(set(CLASSES)) == len(CLASSES)


def test_deterministic_by_seed():
    a, b, c = _scene(7), _scene(7), _scene(8)
    assert a.caption == b.caption and a.classes == b.classes
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.label_map, b.label_map)
    assert not (np.array_equal(np.asarray(a.image), np.asarray(c.image)) and a.caption == c.caption)
    w1, w2 = ShapesWorld(3), ShapesWorld(3)
    assert [s.caption for s in w1.samples(5)] == [s.caption for s in w2.samples(5)]


@pytest.mark.parametrize("size", [32, 64])
def test_label_map_matches_pixel_colours(size):
    """Pixel colour ⇒ colour of the labelled class (background ⇔ background colour), in the flat world (the
    textured one: test_textured_scenes_show_each_shape_in_every_patch)."""
    rgb_to_colour = {v: k for k, v in COLORS.items()}
    for seed in range(40):
        s = _scene(seed, size, texture=False)
        img = np.asarray(s.image)
        assert s.image.mode == "RGB" and img.shape == (size, size, 3)
        assert s.label_map.dtype == np.int64 and s.label_map.shape == (size, size)
        for y in range(size):
            for x in range(size):
                px = tuple(int(v) for v in img[y, x])
                name = s.classes[s.label_map[y, x]]
                if px == BACKGROUND_RGB:
                    assert name == BACKGROUND
                else:
                    assert name.split()[0] == rgb_to_colour[px]


def test_masks_are_the_visible_part_of_each_shape():
    for seed in SEEDS:
        s = _scene(seed)
        full = [_full_shape(name.split()[1], box, 32) for name, box in zip(s.object_classes, s.boxes)]
        for j, mask in enumerate(s.masks):
            hidden = np.zeros_like(mask)
            for later in full[j + 1:]:
                hidden |= later
            assert np.array_equal(mask, full[j] & ~hidden), (seed, j)
            assert mask.sum() >= 0.5 * full[j].sum()  # never (nearly) hidden
            assert np.array_equal(mask, s.label_map == j + 1)
        assert np.array_equal(s.label_map == 0, ~np.any(np.stack(s.masks), 0))


def test_caption_names_exactly_the_visible_classes():
    for seed in SEEDS:
        s = _scene(seed)
        assert s.caption.endswith(" on background")
        named = s.caption[: -len(" on background")].split(" and ")
        assert named == s.object_classes
        assert 1 <= len(named) <= 3 and len(set(named)) == len(named)
        present = set(np.unique(s.label_map).tolist())
        assert present == set(range(len(s.classes)))  # every listed class visible, background included
        assert all(c in CLASSES for c in s.classes)


def test_every_class_and_count_appears():
    seen, counts = set(), set()
    for seed in range(300):
        s = _scene(seed)
        seen.update(s.classes)
        counts.add(len(s.object_classes))
    assert seen == set(CLASSES)
    assert counts == {1, 2, 3}


def test_global_label_map():
    s = _scene(11)
    g = s.global_label_map()
    for j, name in enumerate(s.classes):
        assert np.all(g[s.label_map == j] == CLASSES.index(name))


def test_same_colour_scenes():
    """same_colour=1: every scene's objects share one colour and have distinct shapes; the annotations stay
    exact; 0 gives the default stream; anything else is refused."""
    colours_seen = set()
    for seed in range(60):
        s = ShapesWorld(seed, same_colour=1.0, texture=False).sample()
        cols = {c.split()[0] for c in s.object_classes}
        shapes = [c.split()[1] for c in s.object_classes]
        assert len(cols) == 1 and len(set(shapes)) == len(shapes)
        colours_seen |= cols
        rgb = np.asarray(s.image)
        for j, name in enumerate(s.classes):
            want = BACKGROUND_RGB if name == BACKGROUND else COLORS[name.split()[0]]
            assert np.all(rgb[s.label_map == j] == want)
        d = ShapesWorld(seed, same_colour=0.0, texture=False).sample()
        assert d.caption == _scene(seed).caption and np.array_equal(d.label_map, _scene(seed).label_map)
    assert colours_seen == set(COLORS)
    mixed = [ShapesWorld(seed, same_colour=0.5).sample() for seed in range(200)]
    share = np.mean([len({c.split()[0] for c in s.object_classes}) == 1 for s in mixed if len(s.classes) >= 3])
    assert 0.4 < share < 0.75  # half forced, plus the default's own same-colour pairs
    with pytest.raises(ValueError, match="same_colour"):
        ShapesWorld(0, same_colour=1.5)


@pytest.mark.parametrize("size", [32, 48])
def test_textured_scenes_show_each_shape_in_every_patch(size):
    """texture=True draws the same scene as texture=False (layout, caption, label map), with each shape's own
    texture checked pixel by pixel against a loop written here: a circle solid, a square darker on odd rows, a
    triangle darker on odd columns (at TEXTURE_SHADE of its colour). Every pixel's nearest palette colour stays
    its class's, and every grid-aligned 2×2 patch lying in one object tells its shape from its pixels alone."""
    from seg4diff_fast.shapes.world import TEXTURE_SHADE

    assert ShapesWorld(0).texture and not ShapesWorld(0, texture=False).texture  # textured by default
    palette = [BACKGROUND_RGB] + list(COLORS.values())
    owners = [BACKGROUND] + list(COLORS)
    patches = {shape: 0 for shape in SHAPES}
    for seed in range(40):
        flat = ShapesWorld(seed, size, texture=False).sample()
        tex = ShapesWorld(seed, size, texture=True).sample()
        assert (tex.caption, tex.classes) == (flat.caption, flat.classes)
        assert np.array_equal(tex.label_map, flat.label_map)
        img, ref = np.asarray(tex.image).astype(int), np.asarray(flat.image).astype(int)
        for y in range(size):
            for x in range(size):
                name = tex.classes[tex.label_map[y, x]]
                want = ref[y, x]
                if name != BACKGROUND:
                    shape = name.split()[1]
                    if (shape == "square" and y % 2) or (shape == "triangle" and x % 2):
                        want = np.round(want * TEXTURE_SHADE)
                assert np.array_equal(img[y, x], want), (seed, y, x, name)
                nearest = owners[int(np.argmin([np.sum((img[y, x] - np.array(c)) ** 2) for c in palette]))]
                assert nearest == name.split()[0], (seed, y, x, name)
        for y in range(0, size, 2):
            for x in range(0, size, 2):
                labels = tex.label_map[y:y + 2, x:x + 2]
                if labels.min() != labels.max() or labels[0, 0] == 0:
                    continue
                p = img[y:y + 2, x:x + 2].sum(-1)
                seen = ("square" if p[0, 0] != p[1, 0] else "triangle" if p[0, 0] != p[0, 1] else "circle")
                shape = tex.classes[labels[0, 0]].split()[1]
                assert seen == shape, (seed, y, x, shape)
                patches[shape] += 1
    assert min(patches.values()) > 100, patches
