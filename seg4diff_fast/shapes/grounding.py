"""How well a ShapesWorld pipeline grounds words: protocols A and B, one definition for every caller.

- **A**: prompt = the object classes present, background pixels ignored, scenes with ≥ 2 object classes;
  baseline: a uniformly random present class per pixel (``numpy.random.default_rng(seed)``, drawn in the
  order scenes are added). Split into scenes whose objects all differ in colour (a colour word tells them
  apart) and scenes where two share a colour (only the shape words do).
- **B**: background included as a class, every scene; baseline: all background.

mIoU is over the world's 13 classes (:data:`~seg4diff_fast.shapes.world.CLASSES`), dataset-level
(:class:`~seg4diff_fast.evaluation.metrics.MeanIoU`), in percent.

:class:`GroundingScore` is the scorer (used by the trainer's checkpoints, the probe, the layer sweep, the
demo and the tests); :func:`evaluate_grounding` scores every block through
:class:`~seg4diff_fast.Seg4DiffSegmenter`; :func:`layer_sweep` every block and head from one pass per batch
through the reader; :func:`attention_budget` where image rows put their attention; :func:`word_grounding`
whether a colour or a shape word's map alone finds its object; :func:`layer_stability` whether the best block
stays the same across noise seeds and scene sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..evaluation.metrics import MeanIoU
from .world import CLASSES, Scene

__all__ = ["PROTOCOLS", "GroundingScore", "attention_budget", "evaluate_grounding", "generation_grounding",
           "in_protocol_a", "layer_stability", "layer_sweep", "protocol_rows", "word_grounding"]

PROTOCOLS = ("A", "B")


def in_protocol_a(scene: Scene) -> bool:
    """Whether a scene is scored under protocol A: at least two object classes."""
    return len(scene.object_classes) >= 2


def protocol_rows(scene: Scene) -> list[tuple[str, list[str]]]:
    """The (protocol, class names) a scene is scored with: B always, A first when it qualifies."""
    rows = [("A", list(scene.object_classes))] if in_protocol_a(scene) else []
    return rows + [("B", list(scene.classes))]


def _distinct_colours(scene: Scene) -> bool:
    colours = [c.split()[0] for c in scene.object_classes]
    return len(set(colours)) == len(colours)


class GroundingScore:
    """Protocol A / B mIoU of predictions for a set of keys (blocks, (block, head) pairs, ...).

    Args:
        keys: what predictions are given for (every :meth:`add` gives one label map per key).
        seed: protocol A's random-baseline generator.

    Example:
        >>> from seg4diff_fast.shapes import ShapesWorld
        >>> score = GroundingScore(keys=["perfect"])
        >>> for i in range(4):
        ...     s = ShapesWorld(i).sample()
        ...     for proto, names in protocol_rows(s):
        ...         score.add(s, proto, names, {"perfect": s.label_map if proto == "B" else
        ...                                     (s.label_map - 1).clip(0)})
        >>> score.miou("B")["perfect"], score.miou("A")["perfect"]
        (100.0, 100.0)
    """

    def __init__(self, keys: Sequence[Hashable], seed: int = 0):
        self.keys = list(keys)
        k = len(CLASSES)
        self.meters = {p: {key: MeanIoU(k) for key in self.keys} for p in PROTOCOLS}
        self.split = {flag: {key: MeanIoU(k) for key in self.keys} for flag in (True, False)}
        self.baseline = {p: MeanIoU(k) for p in PROTOCOLS}
        self.counts = {"A": 0, "B": 0, True: 0, False: 0}
        self._rng = np.random.default_rng(seed)

    @staticmethod
    def target(scene: Scene, proto: str) -> np.ndarray:
        """Ground truth over :data:`CLASSES` (A: background pixels ignored, 255)."""
        gt = scene.global_label_map()
        return np.where(scene.label_map == 0, 255, gt) if proto == "A" else gt

    def add(self, scene: Scene, proto: str, names: Sequence[str], predictions: dict[Hashable, Any]) -> None:
        """Score one scene under ``proto`` (``"A"`` / ``"B"``); ``predictions[key]`` is a label map whose
        values index ``names``; draws protocol A's baseline."""
        if proto not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {proto!r}")
        lut = np.array([CLASSES.index(c) for c in names])
        gt = self.target(scene, proto)
        self.counts[proto] += 1
        if proto == "A":
            distinct = _distinct_colours(scene)
            self.counts[distinct] += 1
            self.baseline["A"].update(lut[self._rng.integers(0, len(names), size=gt.shape)], gt)
        else:
            self.baseline["B"].update(np.zeros_like(gt), gt)
        for key in self.keys:
            pred = lut[np.asarray(predictions[key])]
            self.meters[proto][key].update(pred, gt)
            if proto == "A":
                self.split[distinct][key].update(pred, gt)

    def miou(self, proto: str, split: bool | None = None) -> dict[Hashable, float]:
        """``{key: mIoU %}`` of a protocol (A's colour-distinct / shared-colour part with ``split``)."""
        meters = self.meters[proto] if split is None else self.split[split]
        return {key: float(m.compute()["mIoU"]) for key, m in meters.items()}

    def baseline_miou(self, proto: str) -> float:
        return float(self.baseline[proto].compute()["mIoU"])


# ----------------------------------------------------------------------------------------------------
# every block through the segmenter (the trainer's checkpoints, the probe)
def evaluate_grounding(pipe: Any, scenes: list[Scene], size: int, t5_length: int = 77,
                       batch_size: int = 16, map_head: Any = None) -> dict[str, Any]:
    """Per-block mIoU (percent) of the head-mean I2T maps, protocols A and B, and their baselines, plus
    :func:`attention_budget` on the first 16 scenes. ``map_head``: read the maps through a MAGNET conv head
    (``Seg4DiffSegmenter(map_head=)``)."""
    from ..segment import Seg4DiffSegmenter

    n_layers = len(pipe.transformer.transformer_blocks)
    layers = list(range(n_layers))
    seg = Seg4DiffSegmenter(pipe, layer=layers, resolution=size, t5_length=t5_length, batch_size=batch_size,
                            map_head=map_head)
    a_scenes = [s for s in scenes if in_protocol_a(s)]
    out: dict[str, Any] = {"n_A": len(a_scenes), "n_B": len(scenes)}
    score = GroundingScore(layers)
    for proto, sc in (("A", a_scenes), ("B", scenes)):
        if not sc:
            continue
        names = [s.object_classes if proto == "A" else s.classes for s in sc]
        res = seg([s.image for s in sc], classes=names, per_layer=True)
        for s, cls, r in zip(sc, names, res):
            score.add(s, proto, cls, {layer: r[layer].label_map for layer in layers})
        out[proto] = [round(v, 2) for v in score.miou(proto).values()]
        out[f"{proto}_baseline"] = round(score.baseline_miou(proto), 2)
        if proto == "A":
            for key, flag in (("A_distinct_colours", True), ("A_shared_colour", False)):
                out[key] = [round(v, 2) for v in score.miou("A", flag).values()]
                out[f"n_{key}"] = score.counts[flag]
    out.update(attention_budget(seg.reader, scenes[:16]))
    return out


def attention_budget(reader: Any, scenes: list[Scene]) -> dict[str, list[float]]:
    """Where image rows put their attention, per block (head mean, mean over pixels and scenes), with the
    protocol-B prompt: ``text_mass`` = share of all text keys; ``word_key`` / ``pad_key`` / ``t5_key`` =
    mean probability per caption-word key / per CLIP EOS-and-pad key / per zero T5 key. Grounding needs
    words singled out (``word_key`` ≫ ``pad_key``); issue #4's failed probes had them equal.

    Args:
        reader: a :class:`~seg4diff_fast.reader.PipelineReader` (every block), or a segmenter (its reader
            and its layers).
    """
    layers = list(getattr(reader, "layers", ())) or None
    reader = getattr(reader, "reader", reader)
    prompts = [" ".join(s.classes) for s in scenes]
    tensors, _ = reader.prepare([s.image for s in scenes])
    latents = reader.latents(tensors)
    text = reader.encode_text(prompts)
    layers = layers or list(range(reader.num_layers))
    maps = reader.read(latents, text, layers, all_text=True)  # (B, L, T, h, w)
    per_key = maps.mean((-1, -2))  # (B, L, T)
    tok = reader.tokenizer
    n_clip = int(tok.model_max_length)
    word, pad = torch.zeros_like(per_key[:, :, 0]), torch.zeros_like(per_key[:, :, 0])
    for i, p in enumerate(prompts):
        n = len(tok(p, add_special_tokens=False).input_ids)
        word[i] = per_key[i, :, 1:1 + n].mean(-1)
        pad[i] = per_key[i, :, 1 + n:n_clip].mean(-1)
    t5 = per_key[:, :, n_clip:].mean(-1) if per_key.shape[-1] > n_clip else torch.zeros_like(word)
    r = lambda x: [float(f"{v:.3g}") for v in x.mean(0).tolist()]  # noqa: E731
    return {"text_mass": r(per_key.sum(-1)), "word_key": r(word), "pad_key": r(pad), "t5_key": r(t5)}


# ----------------------------------------------------------------------------------------------------
# every block and head from one pass per batch (the layer analysis)
def _head_mean(maps: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over heads summed in head order, then divided: the fused op's own ``head_reduce="mean"``
    arithmetic, so the head-mean maps are those the segmenter reads (bit for bit on the torch backend)."""
    acc = maps.select(dim, 0).clone()
    for i in range(1, maps.shape[dim]):
        acc.add_(maps.select(dim, i))
    return acc.div_(maps.shape[dim])


def _scene_rows(reader: Any, scenes: Sequence[Scene], rows_of: Callable[[Scene], list[tuple[str, list[str]]]],
                layers: Sequence[int], head_reduce: str,
                batch_size: int) -> Iterator[tuple[Scene, str, list[str], Any, Any]]:
    """``(scene, tag, names, plan, maps)`` for every row ``(tag, names)`` of ``rows_of(scene)``: the class names as
    one prompt (``plan``: their token positions), read at ``layers`` (maps: (L, [H,] T, h, w)). One transformer
    pass per ``batch_size`` scenes, each encoded once however many rows it has."""
    def plan(names: list[str]) -> Any:
        chunks = reader.token_positions(names)
        if len(chunks) != 1:
            raise ValueError(f"the classes {names} do not fit one prompt")
        return chunks[0]

    for s0 in range(0, len(scenes), batch_size):
        part = scenes[s0:s0 + batch_size]
        latents = reader.latents(reader.prepare([s.image for s in part])[0])
        rows = [(j, tag, names) for j, s in enumerate(part) for tag, names in rows_of(s)]
        plans = [plan(names) for _, _, names in rows]
        text = reader.encode_text(list(dict.fromkeys(p.prompt for p in plans)))
        which = {p: n for n, p in enumerate(text.prompts)}
        maps = reader.read_rows(latents, text, [(j, which[p.prompt]) for (j, _, _), p in zip(rows, plans)], layers,
                                head_reduce=head_reduce)
        for (j, tag, names), p, m in zip(rows, plans, maps):
            yield part[j], tag, names, p, m


@torch.no_grad()
def layer_sweep(
    pipe: Any,
    scenes: Sequence[Scene],
    per_head: bool = True,
    *,
    layers: Sequence[int] | None = None,
    resolution: int | None = None,
    t5_length: int | None = None,
    seed: int = 0,
    noise_step: int = 8,
    num_inference_steps: int = 28,
    batch_size: int = 16,
    backend: str | None = None,
) -> dict[str, Any]:
    """Protocol A and B mIoU of every block's image→text maps (head mean, and each head when
    ``per_head``) on ShapesWorld scenes, with both baselines.

    A block's class map is the mean of the class's CLIP token maps (positions from the reader's
    :meth:`~seg4diff_fast.reader.PipelineReader.token_positions`), upsampled bilinearly to the scene's size
    by :func:`~seg4diff_fast.ops.upsample_argmax.upsample_argmax`, argmax over classes: the segmenter's
    path, with a head's own probability maps in place of the head mean for the per-head scores. One
    transformer pass per batch of ``batch_size`` scenes (their A and B prompts as rows) captures every
    block at once (``head_reduce="none"``) and stops after the last one.

    Args:
        pipe: a ``StableDiffusion3Pipeline``.
        scenes: :class:`~seg4diff_fast.shapes.Scene` s; class names must come from :data:`CLASSES`.
        per_head: also score each head alone.
        layers: blocks to sweep (default all).
        resolution, t5_length, seed, noise_step, num_inference_steps, backend: the reader's.
        batch_size: scenes per transformer pass.

    Returns:
        ``{"layers", "num_heads", "n_A", "n_B", "A", "B": [per block] mIoU %, "A_heads", "B_heads":
        [per block][per head] (when ``per_head``), "A_baseline", "B_baseline"}``.

    Example:
        >>> from seg4diff_fast.shapes import ShapesWorld, load_shapes_pipeline
        >>> scenes = [ShapesWorld(i).sample() for i in range(4)]
        >>> r = layer_sweep(load_shapes_pipeline(device="cpu"), scenes)
        >>> len(r["A"]), len(r["B_heads"][0]), r["n_B"]
        (6, 4, 4)
    """
    from ..ops.upsample_argmax import upsample_argmax
    from ..reader import PipelineReader

    scenes = list(scenes)
    if not scenes:
        raise ValueError("layer_sweep: give at least one scene")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reader = PipelineReader(pipe, resolution=resolution, num_inference_steps=num_inference_steps,
                            noise_step=noise_step, seed=seed, text_length=t5_length, backend=backend)
    layers_t = tuple(range(reader.num_layers)) if layers is None else reader.check_layers(list(layers))
    num_heads = int(reader.transformer.config.num_attention_heads)
    keys: list[Any] = list(range(len(layers_t)))
    if per_head:
        keys += [(li, h) for li in range(len(layers_t)) for h in range(num_heads)]
    score = GroundingScore(keys)

    rows = _scene_rows(reader, scenes, protocol_rows, layers_t, "none" if per_head else "mean", batch_size)
    for scene, proto, names, chunk, m in rows:
        size = scene.label_map.shape
        mean_maps = _head_mean(m, 1) if per_head else m  # (L, T, h, w)
        scores = torch.stack([mean_maps[:, list(pos)].mean(1) for pos in chunk.positions], dim=1)
        pred = {li: upsample_argmax(scores[li], size)[0].cpu().numpy() for li in range(len(layers_t))}
        if per_head:
            head_scores = torch.stack([m[:, :, list(pos)].mean(2) for pos in chunk.positions], dim=2)
            for li in range(len(layers_t)):
                for h in range(num_heads):
                    pred[(li, h)] = upsample_argmax(head_scores[li, h], size)[0].cpu().numpy()
        score.add(scene, proto, names, pred)

    n_a = score.counts["A"]
    out: dict[str, Any] = {"layers": list(layers_t), "num_heads": num_heads, "n_A": n_a, "n_B": len(scenes)}
    for p in PROTOCOLS:
        empty = p == "A" and n_a == 0
        miou = score.miou(p)
        out[p] = [math.nan if empty else round(miou[li], 2) for li in range(len(layers_t))]
        if per_head:
            out[f"{p}_heads"] = [[math.nan if empty else round(miou[(li, h)], 2) for h in range(num_heads)]
                                 for li in range(len(layers_t))]
        out[f"{p}_baseline"] = math.nan if empty else round(score.baseline_miou(p), 2)
    return out


@torch.no_grad()
def word_grounding(pipe: Any, scenes: Sequence[Scene], layer: int, *, resolution: int | None = None,
                   t5_length: int | None = None, seed: int = 0, batch_size: int = 16) -> dict[str, Any]:
    """Does one word's map alone pick its own object? Per protocol-A scene (the object classes as the prompt), each
    object pixel is given to the object whose word map (head mean, block ``layer``, upsampled bilinearly to the
    scene) is highest there, once with the objects' colour words and once with their shape words; the rate is the
    share of object pixels given to their own object.

    Colour words are scored on the scenes whose objects all differ in colour (elsewhere two objects share the
    word), shape words on every protocol-A scene (two objects in a scene never share both words). ``chance``: the
    rate of a uniformly random object per pixel (the mean of 1 / objects, pixel-weighted).

    Returns:
        ``{"colour", "shape", "colour_chance", "shape_chance", "n_colour_scenes", "n_shape_scenes"}`` (rates in %).

    Example:
        >>> from seg4diff_fast.shapes import ShapesWorld, load_shapes_pipeline
        >>> scenes = [ShapesWorld(i).sample() for i in range(8)]
        >>> r = word_grounding(load_shapes_pipeline(device="cpu"), scenes, layer=1)
        >>> 0 <= r["shape"] <= 100 and r["n_shape_scenes"] == sum(len(s.object_classes) >= 2 for s in scenes)
        True
    """
    import torch.nn.functional as F

    from ..reader import PipelineReader

    reader = PipelineReader(pipe, resolution=resolution, seed=seed, text_length=t5_length)
    (layer,) = reader.check_layers(layer)
    a_scenes = [s for s in scenes if in_protocol_a(s)]
    hits = {"colour": [0, 0, 0.0], "shape": [0, 0, 0.0]}  # right pixels, object pixels, chance-weighted pixels
    n_scenes = {"colour": 0, "shape": 0}
    for scene, _, _, plan, m in _scene_rows(reader, a_scenes, lambda s: [("A", list(s.object_classes))], (layer,),
                                            "mean", batch_size):
        gt = torch.as_tensor(scene.label_map)
        objects = [int(i) for i in np.unique(scene.label_map) if i > 0]  # label 1.. = drawing order
        for kind, w in (("colour", 0), ("shape", -1)):
            if kind == "colour" and not _distinct_colours(scene):
                continue
            pos = [list(plan.positions[i - 1])[w] for i in objects]  # the class's colour / shape token
            word_maps = m[0][pos][None].float()  # (1, objects, h, w)
            up = F.interpolate(word_maps, size=gt.shape, mode="bilinear", align_corners=False)[0]
            picked = torch.tensor(objects)[up.argmax(0)]
            obj = gt > 0
            hits[kind][0] += int((picked == gt)[obj].sum())
            hits[kind][1] += int(obj.sum())
            hits[kind][2] += float(obj.sum()) / len(objects)
            n_scenes[kind] += 1
    out: dict[str, Any] = {}
    for kind, (right, total, chance) in hits.items():
        out[kind] = round(100.0 * right / total, 2) if total else math.nan
        out[f"{kind}_chance"] = round(100.0 * chance / total, 2) if total else math.nan
        out[f"n_{kind}_scenes"] = n_scenes[kind]
    return out


def layer_stability(pipe: Any, scene_sets: Sequence[Sequence[Scene]], seeds: Sequence[int] = (0, 1, 2),
                    **sweep_kwargs: Any) -> dict[str, Any]:
    """The block with the best protocol A and the best protocol B mIoU (head mean) for every noise seed × scene
    set (:func:`layer_sweep`): the expert block is stable when every pick is the same block.

    Returns:
        ``{"runs": [{"seed", "set", "A", "B", "best_A", "best_B"}], "best_A", "best_B": sorted set of picks,
        "stable": one block wins A and B in every run}``.
    """
    runs = []
    for k, scenes in enumerate(scene_sets):
        for seed in seeds:
            r = layer_sweep(pipe, scenes, per_head=False, seed=seed, **sweep_kwargs)
            runs.append({"seed": seed, "set": k, "A": r["A"], "B": r["B"], "best_A": int(np.nanargmax(r["A"])),
                         "best_B": int(np.nanargmax(r["B"]))})
    best_a = sorted({r["best_A"] for r in runs})
    best_b = sorted({r["best_B"] for r in runs})
    return {"runs": runs, "best_A": best_a, "best_B": best_b, "stable": len(set(best_a) | set(best_b)) == 1}


# ----------------------------------------------------------------------------------------------------
# generation
@torch.no_grad()
def generation_grounding(pipe: Any, layer: int, n: int = 12, steps: int = 20, guidance: float = 4.0,
                         t5_length: int | None = None, size: int | None = None) -> dict[str, float]:
    """Generate "<colour> <shape> on background" images with capture at ``layer`` (mean over the last
    half of the steps); the object's predicted mask = pixels whose class map (mean of its tokens' maps)
    beats the background token's. Score: the share of images whose most frequent palette colour inside
    that mask is the caption's (chance 1/4), and the mean share of the mask's pixels in that colour."""
    from ..capture import disable_fast_capture, enable_fast_capture
    from .shipped import SIZE, T5_LENGTH
    from .world import BACKGROUND, BACKGROUND_RGB, COLORS, SHAPES, caption_for

    t5_length = T5_LENGTH if t5_length is None else t5_length
    size = SIZE if size is None else size

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
