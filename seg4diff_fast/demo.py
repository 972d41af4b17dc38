"""Zero-shot and MAGNET segmentation of held-out ShapesWorld scenes with the embedded SD3 pipeline, on the CPU.

The package ships a tiny real diffusers ``StableDiffusion3Pipeline`` trained on ShapesWorld (coloured
circles, squares and triangles on a plain background, :mod:`seg4diff_fast.shapes`) and a MAGNET LoRA on its
expert block (``seg4diff_fast/shapes/magnet_lora/``). The demo

1. checks every argument and loads the pipeline twice before any work: as it is (**zero-shot**) and with the
   LoRA (**MAGNET**: the shipped one, or ``--lora PATH``; ``--no-magnet``: zero-shot only; with ``--model``
   only a ``--lora`` gives a MAGNET side). A bad argument is refused in seconds, with one line and exit 2;
2. checks the core op: ``joint_attention(..., backend="torch")`` (memory-lean, nothing N² allocated)
   against ``backend="reference"`` (the full softmax) at B=1, 2 heads, N = 1024 image + 77 text tokens,
   D=64, on the captured maps and the attention output; it fails (exit 1) if they disagree;
3. segments ``--scenes N`` held-out scenes (default 32: ``ShapesWorld(seed).sample()`` for seeds 0 … N−1,
   the first N of the 200 the README's ShapesWorld table is measured on;
   :func:`~seg4diff_fast.shapes.demo_data.heldout_demo_scenes`) the Seg4Diff way with each side
   (:class:`~seg4diff_fast.Seg4DiffSegmenter`: noise the latent to t, one transformer pass, the head-mean
   image→text attention maps of every block, argmax over the class names), same noise seed for both;
4. scores every block (mIoU in %, dataset-level, :class:`~seg4diff_fast.shapes.grounding.GroundingScore`
   over the world's 13 classes), each beside its trivial baseline:

   - protocol A: prompt = the object classes present, background pixels ignored, scenes with ≥ 2 objects;
     baseline: a uniformly random present class per pixel;
   - protocol B: prompt = the scene's classes, background included; baseline: everything background;

5. draws ``OUT/scene_XX.png`` per scene: the image, the ground truth, and per side (one row each) the
   prediction at the expert block (protocol B; ``--layer``) blended over the faded grey image with its pixel
   accuracy and mIoU, an error panel (wrong pixels magenta), and for the first :data:`HEAT_SCENES` scenes each
   class name's raw image→text attention map at that block; a legend names every colour (palette:
   :data:`~seg4diff_fast.shapes.demo_data.CLASS_COLOURS`);
6. writes ``OUT/demo.md``, ``OUT/demo.json`` (both tables, per-scene scores, the model's and the LoRA's
   record) and ``OUT/index.html`` (static, every picture with its caption, relative paths only).

A transformer under 50 M parameters, like the embedded one, runs on one thread unless ``--threads`` says
otherwise (its ops are too small for intra-op threads to pay). About 10–20 s on two CPU cores, most of it
importing torch and diffusers.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

from .cli_common import (
    CLIError,
    add_model_arguments,
    add_parallel_arguments,
    check_out_folder,
    load_model,
    parallelism,
    run_command,
)

HELP = (
    "zero-shot vs MAGNET segmentation of held-out ShapesWorld scenes with the embedded SD3 pipeline on the CPU: "
    "pictures, per-block mIoU tables (OUT/demo.md, demo.json, index.html) and a check of the core op"
)

#: Core-op check shape: image tokens, text tokens, heads, head size (B = 1, float32, CPU).
N_IMG, N_TXT, HEADS, HEAD_DIM = 1024, 77, 2, 64
OUT_TOL, MAPS_TOL = 1e-4, 1e-5
#: Transformers smaller than this (parameters) segment on one thread: their ops are too small for intra-op
#: threads to pay, and the threads' spin-waits collapse when other processes share the cores (10-100x slower).
TINY_PARAMS = 50_000_000
#: Most scenes ``--scenes`` takes (held-out seeds stay far below the training stream's 10⁶).
MAX_SCENES = 10_000
#: Scenes whose pictures carry the per-word attention maps (the first ones).
HEAT_SCENES = 4
#: Prompt rows per transformer call.
BATCH = 16
#: The two sides, in the order they are shown.
SIDES = ("zero-shot", "magnet")
SIDE_TITLES = {"zero-shot": "zero-shot", "magnet": "MAGNET"}

#: Picture layout (pixels): upscale factor of a 32×32 scene, gap between panels, row-label column, header
#: line, panel titles, two caption lines under a panel, legend rows.
SCALE, GAP, LABEL_W, HEADER_H, TITLE_H, CAPTION_H, LEGEND_ROW = 6, 8, 92, 24, 18, 36, 22
#: Blending: class colour weight over the image, how far the grey image is pulled toward white underneath.
#: At 0.8 any two class colours stay ≥ 18 CIEDE2000 apart as drawn, over any grey (the palette's own ≥ 21.6).
ALPHA, FADE = 0.8, 0.55
#: Error panel: wrong pixels' colour; heat-map outlines of the ground-truth objects.
ERROR_RGB, OUTLINE_RGB = (255, 0, 255), (255, 255, 255)
#: viridis (perceptually uniform, colour-blind safe), 9 anchors, for the attention maps.
VIRIDIS = ((68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
           (92, 200, 99), (170, 220, 50), (253, 231, 37))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument("--out", default=os.path.join("out", "demo"), help="output folder (default: out/demo)")
    parser.add_argument("--scenes", type=int, default=None,
                        help="how many held-out scenes to score: ShapesWorld seeds 0..N-1 (default: 32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the diffusion noise, the random baseline and the core-op inputs (default: 0)")
    add_model_arguments(parser)
    parser._option_string_actions["--lora"].help = (
        "MAGNET LoRA shown as the MAGNET side (default: the shipped one, seg4diff_fast/shapes/magnet_lora)")
    parser.add_argument("--no-magnet", action="store_true", help="zero-shot only (no MAGNET side)")
    parser.set_defaults(device="cpu")
    parser._option_string_actions["--device"].help = "cpu or cuda (default: cpu)"
    parser.add_argument("--layer", type=int,
                        help="block shown in the pictures and marked in the tables (default: the model's expert block)")
    add_parallel_arguments(parser, workers=False)


# ----------------------------------------------------------------------------------------------
# core op
def check_core_op(seed: int = 0) -> dict[str, Any]:
    """``joint_attention`` torch vs reference backend on random q, k, v of shape (1, HEADS, N_IMG + N_TXT,
    HEAD_DIM): the largest differences of the output and of the captured maps, times, and ``ok``."""
    import torch

    from .ops.joint_attention import joint_attention

    n = N_IMG + N_TXT
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
    cols, rows = torch.arange(N_IMG, n), (0, N_IMG)
    res, seconds = {}, {}
    for backend in ("torch", "reference"):
        t0 = time.perf_counter()
        res[backend] = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, backend=backend)
        seconds[backend] = time.perf_counter() - t0
    out_diff = float((res["torch"][0] - res["reference"][0]).abs().max())
    maps_diff = float((res["torch"][1] - res["reference"][1]).abs().max())
    return {
        "shape": {"B": 1, "H": HEADS, "N": n, "N_img": N_IMG, "N_txt": N_TXT, "D": HEAD_DIM, "dtype": "float32",
                  "device": "cpu"},
        "capture": {"cols_range": [N_IMG, n], "rows": list(rows), "mode": "probs", "head_reduce": "mean"},
        "max_abs_diff": {"out": out_diff, "maps": maps_diff},
        "tolerance": {"out": OUT_TOL, "maps": MAPS_TOL},
        "seconds": seconds,
        "ok": out_diff <= OUT_TOL and maps_diff <= MAPS_TOL,
    }


# ----------------------------------------------------------------------------------------------
# scoring
def scene_scores(pred: Any, gt: Any, num_classes: int) -> dict[str, float]:
    """One scene's pixel accuracy and mIoU (percent) of a label map against its ground truth (both index the
    scene's ``num_classes`` classes; mIoU over the classes in either map)."""
    import numpy as np

    from .evaluation.metrics import MeanIoU

    meter = MeanIoU(num_classes)
    meter.update(pred, gt)
    return {"pixel_accuracy": float((np.asarray(pred) == np.asarray(gt)).mean() * 100.0),
            "miou": float(meter.compute()["mIoU"])}


@dataclass
class SideResult:
    """One side's (zero-shot or MAGNET) predictions and scores.

    Attributes:
        miou: ``{"n_A", "n_B", "A": [mIoU per block], "A_baseline", "B": [...], "B_baseline"}`` (percent).
        preds: per scene, the protocol-B label map at the expert block (indexes the scene's classes).
        maps: per scene, the class maps (K, h, w) of that block (protocol B's prompt; K = the scene's classes).
        scores: per scene, :func:`scene_scores` of ``preds``.
    """

    miou: dict[str, Any]
    preds: list[Any] = field(default_factory=list)
    maps: list[Any] = field(default_factory=list)
    scores: list[dict[str, float]] = field(default_factory=list)


def segment_side(seg: Any, demo: list[Any], layers: list[int], expert: int, seed: int = 0) -> SideResult:
    """Segment every scene of ``demo`` (:class:`~seg4diff_fast.shapes.demo_data.DemoScene`) with ``seg``
    (``per_layer=True`` over ``layers``) under both protocols, and score every block; keep block
    ``expert``'s protocol-B predictions and class maps. mIoU in percent over
    :data:`~seg4diff_fast.shapes.CLASSES`, dataset-level; A's baseline draws from ``seed`` in scene order."""
    from .shapes.grounding import GroundingScore, in_protocol_a

    score = GroundingScore(list(range(len(layers))), seed=seed)
    a_scenes = [d.scene for d in demo if in_protocol_a(d.scene)]
    if a_scenes:
        names = [list(s.object_classes) for s in a_scenes]
        for s, cls, res in zip(a_scenes, names, seg([s.image for s in a_scenes], classes=names, per_layer=True)):
            score.add(s, "A", cls, {j: res[layer].label_map for j, layer in enumerate(layers)})
    scenes = [d.scene for d in demo]
    names = [list(s.classes) for s in scenes]
    out = SideResult(miou={"n_A": score.counts["A"], "n_B": len(scenes)})
    for s, cls, res in zip(scenes, names, seg([s.image for s in scenes], classes=names, per_layer=True)):
        score.add(s, "B", cls, {j: res[layer].label_map for j, layer in enumerate(layers)})
        out.preds.append(res[expert].label_map)
        out.maps.append(res[expert].scores.float().numpy())
        out.scores.append(scene_scores(res[expert].label_map, s.label_map, len(cls)))
    for p in ("A", "B"):
        out.miou[p] = list(score.miou(p).values())
        out.miou[f"{p}_baseline"] = score.baseline_miou(p)
    return out


# ----------------------------------------------------------------------------------------------
# pictures
def _font(size: int = 13) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def faded_grey(image: Any) -> Any:
    """The image as grey levels pulled ``FADE`` of the way toward white: float (H, W, 3) in [0, 255]."""
    import numpy as np

    grey = np.asarray(image.convert("L"), dtype=np.float64)
    grey = 255.0 - (1.0 - FADE) * (255.0 - grey)
    return np.repeat(grey[..., None], 3, axis=-1)


def blend_labels(image: Any, labels: Any, colours: list[tuple[int, int, int]]) -> Any:
    """``labels`` (H, W; values index ``colours``) painted over the faded grey ``image`` at ``ALPHA``: uint8
    (H, W, 3)."""
    import numpy as np

    lut = np.asarray(colours, dtype=np.float64)
    out = ALPHA * lut[np.asarray(labels)] + (1.0 - ALPHA) * faded_grey(image)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def error_panel(image: Any, gt: Any, pred: Any) -> Any:
    """The faded grey image with every pixel where ``pred`` differs from ``gt`` in ``ERROR_RGB``: uint8 (H, W, 3)."""
    import numpy as np

    out = faded_grey(image)
    out[np.asarray(pred) != np.asarray(gt)] = ERROR_RGB
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def heat_panel(score_map: Any, vmax: float) -> Any:
    """One class's attention map (h, w) on [0, ``vmax``] through :data:`VIRIDIS`: uint8 (h, w, 3)."""
    import numpy as np

    anchors = np.asarray(VIRIDIS, dtype=np.float64)
    x = np.clip(np.asarray(score_map, dtype=np.float64) / max(vmax, 1e-12), 0.0, 1.0) * (len(anchors) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(anchors) - 2)
    w = (x - lo)[..., None]
    return np.rint((1 - w) * anchors[lo] + w * anchors[lo + 1]).astype(np.uint8)


def _outline(labels: Any, size: int) -> Any:
    """Boolean (size, size) mask of the boundaries between regions of ``labels`` upscaled (nearest) to size."""
    import numpy as np

    lab = np.asarray(labels)
    ys = np.arange(size) * lab.shape[0] // size
    xs = np.arange(size) * lab.shape[1] // size
    up = lab[ys][:, xs]
    edge = np.zeros(up.shape, bool)
    edge[:-1] |= up[:-1] != up[1:]
    edge[:, :-1] |= up[:, :-1] != up[:, 1:]
    return edge


@dataclass
class SideView:
    """What one row of a scene's picture shows: the side's title, its prediction (H, W), its scores, and the
    class maps (K, h, w) or None (no heat maps for this scene)."""

    title: str
    pred: Any
    scores: dict[str, float]
    maps: Any = None


def picture_size(height: int, width: int, n_sides: int, n_heat: int, n_classes: int) -> tuple[int, int]:
    """(width, height) of a scene's picture: ``n_sides`` rows, ``n_heat`` heat-map columns (0: none), a legend
    of ``n_classes`` classes + the error colour (below the rows when there is one side)."""
    p = width * SCALE
    cols = 4 + n_heat
    legend_h = 0 if n_sides >= 2 else (n_classes + 1) * LEGEND_ROW + GAP
    return LABEL_W + cols * (p + GAP), HEADER_H + TITLE_H + n_sides * (height * SCALE + CAPTION_H) + legend_h


def scene_picture(scene: Any, title: str, sides: list[SideView], colours: list[tuple[int, int, int]],
                  layer: int) -> Any:
    """A scene's picture (PIL RGB): a header line, then one row per side — row 1 also holds the image and the
    ground truth, row 2 the legend under them (one side: the legend below) — prediction blended over the
    image with its pixel accuracy and mIoU, the error panel, and each class name's attention map when the
    sides carry maps (each on its own scale, 0 → its peak probability; ground-truth outlines in white).
    ``colours[j]`` is ``scene.classes[j]``'s colour."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = scene.label_map.shape
    p, ph = w * SCALE, h * SCALE
    classes = list(scene.classes)
    n_heat = len(classes) if sides[0].maps is not None else 0
    size = picture_size(h, w, len(sides), n_heat, len(classes))
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, bold = _font(13), _font(15)
    ink, muted = (0, 0, 0), (90, 90, 90)

    def up(arr: Any) -> Any:
        return Image.fromarray(np.ascontiguousarray(arr)).resize((p, ph), Image.NEAREST)

    def col_x(c: int) -> int:
        return LABEL_W + c * (p + GAP)

    draw.text((4, 4), title, fill=ink, font=bold)
    titles = ["image", "ground truth", f"prediction (block {layer})", "errors (magenta)"]
    titles += [f'attention: "{c}"' for c in classes[:n_heat]]
    y_title = HEADER_H
    for c, t in enumerate(titles):
        draw.text((col_x(c) + 1, y_title), t, fill=ink, font=font)
    outline = _outline(scene.label_map, p) if n_heat else None
    for r, side in enumerate(sides):
        y = HEADER_H + TITLE_H + r * (ph + CAPTION_H)
        draw.text((4, y + ph // 2 - 8), side.title, fill=ink, font=bold)
        if r == 0:
            canvas.paste(scene.image.convert("RGB").resize((p, ph), Image.NEAREST), (col_x(0), y))
            canvas.paste(up(blend_labels(scene.image, scene.label_map, colours)), (col_x(1), y))
        canvas.paste(up(blend_labels(scene.image, side.pred, colours)), (col_x(2), y))
        canvas.paste(up(error_panel(scene.image, scene.label_map, side.pred)), (col_x(3), y))
        sc = side.scores
        draw.text((col_x(2) + 1, y + ph + 2), f"pixel accuracy {sc['pixel_accuracy']:.1f} %", fill=ink, font=font)
        draw.text((col_x(2) + 1, y + ph + 17), f"mIoU {sc['miou']:.1f} %", fill=ink, font=font)
        wrong = int((np.asarray(side.pred) != scene.label_map).sum())
        draw.text((col_x(3) + 1, y + ph + 2), f"{wrong} of {h * w} pixels wrong", fill=ink, font=font)
        for k in range(n_heat):  # each map on its own scale, 0 → its peak (the peak is written under it)
            peak = float(np.max(side.maps[k]))
            heat = np.asarray(up(heat_panel(side.maps[k], peak)).convert("RGB")).copy()
            heat[outline] = OUTLINE_RGB
            canvas.paste(Image.fromarray(heat), (col_x(4 + k), y))
            draw.text((col_x(4 + k) + 1, y + ph + 2), f"peak probability {peak:.3f}", fill=muted, font=font)
        if n_heat:
            draw.text((col_x(4) + 1, y + ph + 17), "each map: dark = 0, bright = its peak", fill=muted, font=font)
    # legend: under the image and ground truth in row 2, or below the only row
    if len(sides) >= 2:
        lx, ly = col_x(0), HEADER_H + TITLE_H + ph + CAPTION_H + 4
    else:
        lx, ly = col_x(0), HEADER_H + TITLE_H + ph + CAPTION_H + GAP // 2
    for j, (name, colour) in enumerate(zip(classes, colours)):
        yy = ly + j * LEGEND_ROW
        draw.rectangle((lx, yy, lx + 16, yy + 16), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((lx + 22, yy + 1), name, fill=ink, font=font)
    draw.rectangle((lx, ly + len(classes) * LEGEND_ROW, lx + 16, ly + len(classes) * LEGEND_ROW + 16),
                   fill=ERROR_RGB, outline=(0, 0, 0))
    draw.text((lx + 22, ly + len(classes) * LEGEND_ROW + 1), "wrong pixel (error panel)", fill=ink, font=font)
    return canvas


# ----------------------------------------------------------------------------------------------
# reports
def _fmt(x: float) -> str:
    return "—" if x != x else f"{x:.1f}"  # NaN (no scene for a protocol) shows as a dash


def table_rows(layers: list[int], expert: int, miou: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The per-block table as strings: block, then per protocol each side's mIoU; the baselines row last."""
    sides = list(miou)
    rows = []
    for j, layer in enumerate(layers):
        rows.append([f"{layer}{' *' if layer == expert else ''}"]
                    + [_fmt(miou[s][p][j]) for p in ("A", "B") for s in sides])
    first = miou[sides[0]]
    rows.append(["baseline"] + [_fmt(first[f"{p}_baseline"]) if i == 0 else "" for p in ("A", "B")
                                for i in range(len(sides))])
    return rows


def table_head(sides: list[str]) -> list[str]:
    return ["block"] + [f"{p} {SIDE_TITLES[s]}" for p in ("A", "B") for s in sides]


def protocols_line(record: dict[str, Any]) -> str:
    m = record["miou"][record["sides"][0]]
    n = record["scenes_source"]["n"]
    return (f"A: prompt = the object classes, background pixels ignored ({m['n_A']} of the {n} scenes have "
            "≥ 2 objects; baseline: a random present class per pixel). B: prompt = the scene's classes, "
            f"background included (all {n} scenes; baseline: everything background).")


def _lora_text(lora: dict[str, Any] | None) -> str:
    if lora is None:
        return "none (zero-shot only)"
    cfg = lora.get("config") or {}
    bits = [f"`{lora['path']}` ({lora['source']})"]
    if cfg:
        bits.append(f"block {cfg.get('layer')}, rank {cfg.get('rank')}, {cfg.get('max_steps')} steps, "
                    f"lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, protocol {cfg.get('protocol')}")
    return "; ".join(bits)


def markdown_report(record: dict[str, Any]) -> str:
    """``demo.md``: settings, the per-block table, the scenes with their pictures and scores, the core-op check."""
    src = record["scenes_source"]
    sides = record["sides"]
    head = table_head(sides)
    lines = [
        "# seg4diff-fast demo: ShapesWorld segmentation, " + " vs ".join(SIDE_TITLES[s] for s in sides),
        "",
        f"Model: {record['model_label']} ({record['num_layers']} blocks), resolution {record['resolution']}, "
        f"timestep {record['timestep']:.0f}, noise seed {record['seed']}, {record['device']} {record['dtype']}. "
        f"MAGNET LoRA: {_lora_text(record['magnet'])}. Block {record['layer']} (marked *) is the one in the "
        "pictures.",
        "",
        f"## Per-block mIoU (%) on {src['n']} held-out scenes",
        "",
        f"Scenes: {src['world']} for seeds {src['seeds'][0]}–{src['seeds'][1]} (training uses seeds ≥ 10⁶). "
        f"{src['full_table']}",
        "",
        protocols_line(record),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(record["layers"], record["layer"], record["miou"])]
    lines += ["", f"## Scenes (block {record['layer']}, protocol B: pixel accuracy / mIoU, %)", ""]
    for s in record["scenes"]:
        score = "; ".join(f"{SIDE_TITLES[k]} {v['pixel_accuracy']:.1f} / {v['miou']:.1f}"
                          for k, v in s["scores"].items())
        lines += [f"**{s['name']}** (seed {s['seed']}): {s['caption']}; {score}", "",
                  f"![{s['name']}]({s['picture']})", ""]
    c = record["core_op"]
    sh = c["shape"]
    lines += [
        "## Core op check",
        "",
        f"`joint_attention` torch vs reference, B=1 H={sh['H']} N={sh['N_img']}+{sh['N_txt']} D={sh['D']} float32: "
        f"max |Δout| = {c['max_abs_diff']['out']:.2e} (tol {c['tolerance']['out']:g}), max |Δmaps| = "
        f"{c['max_abs_diff']['maps']:.2e} (tol {c['tolerance']['maps']:g}): {'OK' if c['ok'] else 'FAIL'}.",
        "",
    ]
    return "\n".join(lines)


def html_report(record: dict[str, Any]) -> str:
    """``index.html``: static, no external resources, every picture (relative path) with its caption."""
    e = html.escape
    src = record["scenes_source"]
    sides = record["sides"]
    head = table_head(sides)
    rows = table_rows(record["layers"], record["layer"], record["miou"])
    table = "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    figs = []
    for s in record["scenes"]:
        score = "; ".join(f"{SIDE_TITLES[k]}: pixel accuracy {v['pixel_accuracy']:.1f} %, mIoU {v['miou']:.1f} %"
                          for k, v in s["scores"].items())
        figs.append(f'<figure id="{e(s["name"])}"><img src="{e(s["picture"])}" alt="{e(s["name"])}: '
                    f'{e(s["caption"])}" loading="lazy"><figcaption><b>{e(s["name"])}</b> (seed {s["seed"]}): '
                    f'{e(s["caption"])}. {e(score)}.</figcaption></figure>')
    title = "seg4diff-fast demo: ShapesWorld segmentation, " + " vs ".join(SIDE_TITLES[s] for s in sides)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1800px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
        "figure{margin:1.5em 0}img{max-width:100%;height:auto}figcaption{margin-top:4px}</style>",
        "</head><body>", f"<h1>{e(title)}</h1>",
        f"<p>Model: {e(record['model_label'])}; MAGNET LoRA: {e(_lora_text(record['magnet']))}. Block "
        f"{record['layer']} (marked *) is the one in the pictures. Files: <a href=\"demo.md\">demo.md</a>, "
        '<a href="demo.json">demo.json</a>.</p>',
        f"<h2>Per-block mIoU (%) on {src['n']} held-out scenes</h2>",
        f"<p>Scenes: {e(src['world'])} for seeds {src['seeds'][0]}–{src['seeds'][1]} (training uses seeds ≥ 10⁶). "
        f"{e(src['full_table'])}</p>",
        f"<p>{e(protocols_line(record))}</p>", table,
        f"<h2>Scenes (block {record['layer']}, protocol B)</h2>",
        "<p>Per scene: the image, the ground truth, and per side the prediction painted over the faded grey image "
        "(legend on the picture; background is grey), its pixel accuracy and mIoU, the wrong pixels in magenta, "
        f"and for the first {HEAT_SCENES} scenes each class name's attention map (the mean over the name's tokens "
        "of the head-mean image→text probability at that block; viridis, each map from 0 to its own peak, written "
        "under it; white: the true objects' outlines).</p>",
        *figs, "</body></html>", "",
    ])


# ----------------------------------------------------------------------------------------------
def lora_record(path: str, source: str) -> dict[str, Any]:
    """What the demo records about a LoRA: its path, where it came from, its ``magnet_config.json`` and the
    run's ``summary.json`` (without the config they repeat) when the folder has them."""
    rec: dict[str, Any] = {"path": os.path.abspath(path), "source": source, "config": None, "summary": None}
    if os.path.isdir(path):
        for key, name in (("config", "magnet_config.json"), ("summary", "summary.json")):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file, encoding="utf-8") as f:
                    rec[key] = json.load(f)
        if isinstance(rec["summary"], dict):
            rec["summary"] = {k: v for k, v in rec["summary"].items() if k not in ("config", "provenance")}
    return rec


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 1 if the core op disagrees with the reference, 2 on a usage error."""
    return run_command("demo", _run, args)


def _magnet_source(args: argparse.Namespace) -> tuple[str | None, str, str | None]:
    """(LoRA path or None, where it comes from, why there is no MAGNET side or None)."""
    from .shapes.shipped import MAGNET_LORA_DIR

    if args.no_magnet:
        if args.lora:
            raise CLIError("--lora and --no-magnet contradict each other: give one")
        return None, "", "--no-magnet"
    if args.lora:
        if not os.path.exists(args.lora):
            raise CLIError(f"--lora {args.lora}: no such file or folder")
        return args.lora, "--lora", None
    if args.model is not None:
        return None, "", "the shipped LoRA fits only the embedded model; pass --lora for --model"
    if not os.path.isfile(os.path.join(MAGNET_LORA_DIR, "pytorch_lora_weights.safetensors")):
        return None, "", f"no shipped MAGNET LoRA in {MAGNET_LORA_DIR} (reinstall the package, or pass --lora)"
    return MAGNET_LORA_DIR, "shipped", None


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import numpy as np
    import torch

    from .ops.upsample_argmax import has_cpp_extension
    from .reader import PipelineReader
    from .segment import Seg4DiffSegmenter
    from .shapes import CLASSES
    from .shapes.demo_data import CLASS_COLOURS, DEMO_SCENES, DEMO_SIZE, heldout_demo_scenes
    from .utils.files import atomic_write, write_json
    from .utils.provenance import model_record
    from .utils.version import __version__

    # every argument is checked (and both models loaded) before any work: a bad argument fails in seconds
    n_scenes = DEMO_SCENES if args.scenes is None else int(args.scenes)
    if not 1 <= n_scenes <= MAX_SCENES:
        raise CLIError(f"--scenes {args.scenes}: give a number of scenes from 1 to {MAX_SCENES}")
    check_out_folder(args.out)
    lora_path, lora_source, no_magnet_why = _magnet_source(args)
    parallelism(args, uses_workers=False)
    device = args.device or "cpu"
    t0 = time.perf_counter()

    def frozen(pipe: Any) -> Any:
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                comp.eval().requires_grad_(False)
        return pipe

    pipes = {"zero-shot": frozen(load_model(argparse.Namespace(**{**vars(args), "lora": None}), device=device))}
    reader = PipelineReader(pipes["zero-shot"], seed=args.seed)
    num_layers = reader.num_layers
    layers = list(range(num_layers))
    try:
        (expert,) = reader.check_layers(reader.defaults.layer if args.layer is None else int(args.layer), "--layer")
    except ValueError as e:
        raise CLIError(str(e)) from None
    readers = {"zero-shot": reader}
    if lora_path is not None:  # a second copy of the pipeline, the LoRA loaded into it
        pipes["magnet"] = frozen(load_model(argparse.Namespace(**{**vars(args), "lora": lora_path}), device=device))
        readers["magnet"] = PipelineReader(pipes["magnet"], seed=args.seed)
    load_s = time.perf_counter() - t0
    pipe = pipes["zero-shot"]
    provenance = model_record(pipe, args.model)
    provenance["lora"] = os.path.abspath(lora_path) if lora_path else None
    magnet = lora_record(lora_path, lora_source) if lora_path else None
    dtype = str(pipe.transformer.dtype).replace("torch.", "")
    label = "the embedded ShapesWorld pipeline" if args.model is None else f"the model {provenance['model']}"
    sides = list(pipes)
    with_lora = f" with the LoRA {provenance['lora']}" if lora_path else ""
    scenes_word = "scene" if n_scenes == 1 else "scenes"
    print(f"seg4diff-fast {__version__} demo: segmentation of {n_scenes} held-out ShapesWorld {scenes_word}, zero-shot "
          f"and MAGNET, with {label}{with_lora} ({device}, {dtype})" if lora_path else
          f"seg4diff-fast {__version__} demo: zero-shot segmentation of {n_scenes} held-out ShapesWorld {scenes_word} "
          f"with {label} ({device}, {dtype}); no MAGNET side: {no_magnet_why}")

    core = check_core_op(args.seed)
    sh = core["shape"]
    print(f"core op: joint_attention torch vs reference, B=1 H={sh['H']} N={sh['N_img']}+{sh['N_txt']} "
          f"D={sh['D']}: max |Δout| {core['max_abs_diff']['out']:.1e}, max |Δmaps| {core['max_abs_diff']['maps']:.1e} "
          f"{'OK' if core['ok'] else 'FAIL'} ({sum(core['seconds'].values()) * 1e3:.0f} ms)")

    segs = {side: Seg4DiffSegmenter(r, layer=layers, batch_size=BATCH) for side, r in readers.items()}
    seg = segs["zero-shot"]
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    if args.threads is not None:
        threads = args.threads
    else:
        threads = 1 if n_params < TINY_PARAMS else torch.get_num_threads()
    print(f"model: {provenance['model']} ({num_layers} blocks, {n_params / 1e6:.2f} M parameters, expert "
          f"block {reader.defaults.layer}, resolution {seg.resolution}, {seg.t5_length} T5 positions, t = "
          f"{seg.timestep:.0f}), loaded in {load_s:.1f} s; segmenting on {threads} thread(s)")
    if magnet is not None:
        cfg = magnet["config"] or {}
        trained = f" (trained on block {cfg.get('layer')}, rank {cfg.get('rank')}, {cfg.get('max_steps')} steps)" \
            if cfg else ""
        print(f"MAGNET: the {lora_source} LoRA {magnet['path']}{trained}")
        if cfg.get("layer") is not None and int(cfg["layer"]) != expert:
            print(f"note: the LoRA was trained on block {cfg['layer']}; the pictures show block {expert} "
                  f"(--layer {cfg['layer']} shows that one)")

    demo = heldout_demo_scenes(n_scenes, DEMO_SIZE)
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, SideResult] = {}
    seconds: dict[str, float] = {"load": load_s}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for side, s in segs.items():
            t0 = time.perf_counter()
            results[side] = segment_side(s, demo, layers, expert, args.seed)
            seconds[f"segment {side}"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved_threads)

    t0 = time.perf_counter()
    scenes_out = []
    for i, d in enumerate(demo):
        s = d.scene
        colours = [CLASS_COLOURS[c] for c in s.classes]
        heat = i < HEAT_SCENES
        views = [SideView(SIDE_TITLES[side], r.preds[i], r.scores[i], r.maps[i] if heat else None)
                 for side, r in results.items()]
        picture = f"{d.name}.png"
        img = scene_picture(s, f"{d.name} (seed {d.seed}): {s.caption}", views, colours, expert)
        atomic_write(os.path.join(args.out, picture), lambda f, im=img: im.save(f, format="PNG"))
        scenes_out.append({"name": d.name, "seed": d.seed, "caption": s.caption, "classes": list(s.classes),
                           "picture": picture, "heat_maps": heat,
                           "scores": {side: r.scores[i] for side, r in results.items()},
                           "pixels_wrong": {side: int((np.asarray(r.preds[i]) != s.label_map).sum())
                                            for side, r in results.items()}})
    seconds["pictures"] = time.perf_counter() - t0

    miou = {side: r.miou for side, r in results.items()}
    full_table = ("The full table, on 200 held-out scenes (seeds 0–199), is in README.md, section \"ShapesWorld: "
                  "the embedded model\"; `seg4diff-fast demo --scenes 200 --no-magnet` reproduces it exactly"
                  + ("." if n_scenes >= 200 else f"; these are its first {n_scenes} scenes, so the numbers here differ "
                                                  "from it by sampling noise only (a few points at 32 scenes)."))
    record = {
        "version": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": threads,
        "cpp_extension": has_cpp_extension(),
        "model": provenance["model"],
        "model_label": label,
        "model_path": str(pipe.name_or_path),
        "lora": provenance["lora"],
        "magnet": magnet,
        "no_magnet_reason": no_magnet_why,
        "device": device,
        "dtype": dtype,
        "protocol": seg.protocol,
        "package_version": __version__,
        "provenance": provenance,
        "num_layers": num_layers,
        "layers": layers,
        "layer": expert,
        "model_expert_layer": reader.defaults.layer,
        "resolution": seg.resolution,
        "t5_length": seg.t5_length,
        "timestep": seg.timestep,
        "seed": args.seed,
        "scenes_source": {"world": f"ShapesWorld(seed, size={DEMO_SIZE}).sample()", "seeds": [0, n_scenes - 1],
                          "n": n_scenes, "full_table": full_table},
        "sides": sides,
        "classes": list(CLASSES),
        "palette": {c: list(CLASS_COLOURS[c]) for c in CLASSES},
        "miou": miou,
        "scenes": scenes_out,
        "core_op": core,
        "seconds": seconds,
        "ok": core["ok"],
    }

    head, rows = table_head(sides), table_rows(layers, expert, miou)
    print(f"per-block mIoU (%) on {n_scenes} held-out scenes (seeds 0-{n_scenes - 1}); * = block {expert}, the "
          "one in the pictures")
    print("  " + protocols_line(record))
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("  " + "  ".join(c.rjust(wd) for c, wd in zip(r, widths)))
    print(f"  {full_table}")

    md_path, json_path = os.path.join(args.out, "demo.md"), os.path.join(args.out, "demo.json")
    html_path = os.path.join(args.out, "index.html")
    atomic_write(md_path, markdown_report(record).encode())
    atomic_write(html_path, html_report(record).encode())
    record["seconds"]["total"] = time.perf_counter() - t_start
    write_json(json_path, record)
    print(f"wrote {len(scenes_out)} scene pictures, {md_path} and {json_path} to {args.out}/; open "
          f"{os.path.abspath(html_path)} in a browser to see them all")
    if not core["ok"]:
        print("FAIL: the torch backend of joint_attention disagrees with the reference")
        return 1
    seg_s = sum(v for k, v in seconds.items() if k.startswith("segment"))
    print(f"OK: total {record['seconds']['total']:.1f} s (model load {load_s:.1f} s, segmentation {seg_s:.1f} s, "
          f"pictures {seconds['pictures']:.1f} s)")
    return 0
