"""Zero-shot segmentation of the bundled ShapesWorld scenes with the embedded SD3 pipeline, on the CPU.

The package ships a tiny real diffusers ``StableDiffusion3Pipeline`` trained on ShapesWorld (coloured
circles, squares and triangles on a plain background, :mod:`seg4diff_fast.shapes`) and 8 held-out scenes
(``seg4diff_fast/data/demo/``: image, label map and caption each; never seen in training). The demo

1. loads the pipeline (``--device``, default the CPU; ``--dtype`` auto: float32 there; ``--model`` for any
   other SD3 folder, ``--lora`` for a MAGNET LoRA) and checks every argument before any work (a bad
   ``--layer`` is refused in seconds, with exit 2);
2. checks the core op: ``joint_attention(..., backend="torch")`` (memory-lean, nothing N² allocated)
   against ``backend="reference"`` (the full softmax) at B=1, 2 heads, N = 1024 image + 77 text tokens,
   D=64, on the captured maps (each image row's softmax probability on the text columns, head mean) and
   the attention output, on the CPU; it fails (exit 1) if they disagree;
3. segments every bundled scene the Seg4Diff way (:class:`~seg4diff_fast.Seg4DiffSegmenter`: noise the latent to t, one
   transformer pass, the head-mean image→text attention maps of a block, argmax over the class names),
   reading every block in the same pass (a transformer under 50 M parameters, like the embedded one,
   runs on one thread unless ``--threads`` says otherwise: its ops are too small for intra-op threads to pay);
4. writes ``OUT/scene_XX_overlay.png`` per scene: image | ground truth | prediction at the expert block
   (``--layer``; default the model's), upscaled ×8, colours from the label palette, with a legend;
5. scores every block (mIoU in %, dataset-level over the scenes, :class:`~seg4diff_fast.evaluation.metrics.MeanIoU`
   over the world's 13 classes), each beside its trivial baseline, as the training evaluation does:

   - protocol A: prompt = the object classes present, background pixels ignored, scenes with ≥ 2 objects;
     baseline: a uniformly random present class per pixel;
   - protocol B: prompt = the scene's classes, background included; baseline: everything background;

   prints the table (the expert block marked ``*``) and writes ``OUT/demo.md`` and ``OUT/demo.json`` (with the
   model's record: ``model``, the resolved path of the embedded one too, ``lora``, ``layer``, ``protocol``,
   ``package_version``, ``provenance``).

It runs in about 10 s on two CPU cores, most of it loading torch and the pipeline.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

from .cli_common import CLIError, add_model_arguments, add_parallel_arguments, load_model, parallelism

HELP = (
    "segment the bundled ShapesWorld scenes with the embedded SD3 pipeline on the CPU: overlay PNGs, a "
    "per-block mIoU table (OUT/demo.md, OUT/demo.json) and a check of the core op against the reference"
)

#: Core-op check shape: image tokens, text tokens, heads, head size (B = 1, float32, CPU).
N_IMG, N_TXT, HEADS, HEAD_DIM = 1024, 77, 2, 64
OUT_TOL, MAPS_TOL = 1e-4, 1e-5
#: Overlay layout: upscale factor, gap between panels, title and legend row heights (pixels).
SCALE, GAP, TITLE_H, LEGEND_H = 8, 8, 16, 20
#: Transformers smaller than this (parameters) segment on one thread: their ops are too small for intra-op
#: threads to pay, and the threads' spin-waits collapse when other processes share the cores (10-100x slower).
TINY_PARAMS = 50_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument("--out", default=os.path.join("out", "demo"), help="output folder (default: out/demo)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the diffusion noise, the random baseline and the core-op inputs (default: 0)")
    add_model_arguments(parser)
    parser.set_defaults(device="cpu")
    parser._option_string_actions["--device"].help = "cpu or cuda (default: cpu)"
    parser.add_argument("--layer", type=int,
                        help="block shown in the overlays and marked in the table (default: the model's expert block)")
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
# overlays
def strip_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of the overlay strip of an ``height × width`` scene."""
    return 3 * width * SCALE + 2 * GAP, TITLE_H + height * SCALE + LEGEND_H


def overlay_strip(image: Any, gt: Any, pred: Any, classes: list[str], colours: list[tuple[int, int, int]],
                  titles: tuple[str, str, str]) -> Any:
    """The strip image | ground truth | prediction (each upscaled ×SCALE, nearest), titles above, a legend
    of ``classes`` (swatch + name) below. ``gt`` and ``pred`` are int (H, W) arrays indexing ``classes``;
    ``colours[j]`` is class j's colour."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    h, w = gt.shape
    lut = np.array(colours, dtype=np.uint8)
    panels = [image.convert("RGB"), Image.fromarray(lut[gt]), Image.fromarray(lut[pred])]
    canvas = Image.new("RGB", strip_size(h, w), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    pw = w * SCALE
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (pw + GAP)
        canvas.paste(panel.resize((pw, h * SCALE), Image.NEAREST), (x, TITLE_H))
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
    x, y = 2, TITLE_H + h * SCALE + 4
    for name, colour in zip(classes, colours):
        draw.rectangle((x, y, x + 11, y + 11), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + 15, y), name, fill=(0, 0, 0), font=font)
        x += 15 + int(draw.textlength(name, font=font)) + 14
    return canvas


# ----------------------------------------------------------------------------------------------
# reports
def _fmt(x: float) -> str:
    return "—" if x != x else f"{x:.1f}"  # NaN (no scene for a protocol) shows as a dash


def table_rows(layers: list[int], expert: int, miou: dict[str, Any]) -> list[list[str]]:
    """The per-block table as strings: block, A, A − baseline, B, B − baseline; then the baselines row."""
    rows = []
    for j, layer in enumerate(layers):
        a, b = miou["A"][j], miou["B"][j]
        rows.append([f"{layer}{' *' if layer == expert else ''}", _fmt(a), f"{a - miou['A_baseline']:+.1f}",
                     _fmt(b), f"{b - miou['B_baseline']:+.1f}"])
    rows.append(["baseline", _fmt(miou["A_baseline"]), "", _fmt(miou["B_baseline"]), ""])
    return rows


TABLE_HEAD = ["block", "A mIoU", "A − base", "B mIoU", "B − base"]


def markdown_report(record: dict[str, Any]) -> str:
    """``demo.md``: settings, the per-block table, the scenes with their overlays, the core-op check."""
    m = record["miou"]
    lines = [
        "# seg4diff-fast demo: ShapesWorld zero-shot segmentation",
        "",
        f"Model: {record.get('model_label', record['model'])} "
        f"({record['num_layers']} blocks), resolution {record['resolution']}, "
        f"timestep {record['timestep']:.0f}, noise seed {record['seed']}, {record.get('device', 'cpu')} "
        f"{record.get('dtype', 'float32')}. Expert block "
        f"{record['layer']} (marked *) is the one in the overlays.",
        "",
        f"## Per-block mIoU (%) on {m['n_B']} bundled held-out scenes",
        "",
        f"A: prompt = the object classes, background pixels ignored ({m['n_A']} scenes with ≥ 2 objects; "
        "baseline: a random present class per pixel). B: prompt = the scene's classes, background included "
        f"({m['n_B']} scenes; baseline: all background).",
        "",
        "| " + " | ".join(TABLE_HEAD) + " |",
        "|" + "---|" * len(TABLE_HEAD),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(record["layers"], record["layer"], m)]
    lines += ["", f"## Scenes (block {record['layer']}, protocol B)", ""]
    for s in record["scenes"]:
        lines += [f"**{s['name']}** (seed {s['seed']}): {s['caption']}; pixel accuracy {s['pixel_accuracy']:.1f} %",
                  "", f"![{s['name']}]({s['overlay']})", ""]
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


# ----------------------------------------------------------------------------------------------
def segment_scenes(seg: Any, demo: list[Any], layers: list[int], expert: int, out: str,
                   seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Segment every scene of ``demo`` (:class:`~seg4diff_fast.shapes.demo_data.DemoScene`) with ``seg``
    (reading ``layers``, ``per_layer=True``), score both protocols per block and write one overlay per scene
    (block ``expert``, protocol B) to ``out``.

    Returns:
        (per-scene records, ``{"n_A", "n_B", "A": [mIoU per layer], "A_baseline", "B": [...], "B_baseline"}``;
        mIoU in percent over :data:`~seg4diff_fast.shapes.CLASSES`, dataset-level).
    """
    from tqdm import tqdm

    from .shapes import CLASSES
    from .shapes.grounding import GroundingScore, protocol_rows
    from .utils.files import atomic_write, palette

    colours_all = palette(len(CLASSES))
    score = GroundingScore(list(range(len(layers))), seed=seed)
    scenes_out = []
    for d in tqdm(demo, desc="segment", unit="image", delay=2.0, file=sys.stderr):
        s = d.scene
        for proto, names in protocol_rows(s):
            res = seg([s.image], classes=[list(names)], per_layer=True)[0]
            score.add(s, proto, names, {j: res[layer].label_map for j, layer in enumerate(layers)})
            if proto == "B":
                pred = res[expert].label_map
        overlay = os.path.join(out, f"{d.name}_overlay.png")
        colours = [colours_all[CLASSES.index(c)] for c in s.classes]
        strip = overlay_strip(s.image, s.label_map, pred, s.classes, colours,
                              ("image", "ground truth", f"prediction (block {expert})"))
        atomic_write(overlay, lambda f, im=strip: im.save(f, format="PNG"))
        scenes_out.append({"name": d.name, "seed": d.seed, "caption": s.caption, "classes": list(s.classes),
                           "pixel_accuracy": float((pred == s.label_map).mean() * 100.0),
                           "overlay": os.path.basename(overlay)})
    miou: dict[str, Any] = {"n_A": score.counts["A"], "n_B": len(demo)}
    for p in ("A", "B"):
        miou[p] = list(score.miou(p).values())
        miou[f"{p}_baseline"] = score.baseline_miou(p)
    return scenes_out, miou


def _fail(msg: str) -> int:
    print(f"seg4diff-fast demo: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 1 if the core op disagrees with the reference, 2 on a usage error."""
    try:
        return _run(args)
    except CLIError as e:
        return _fail(str(e))


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import torch

    from .ops.upsample_argmax import has_cpp_extension
    from .reader import PipelineReader
    from .segment import Seg4DiffSegmenter
    from .shapes.demo_data import DEMO_DIR, load_demo_scenes
    from .utils.files import atomic_write, write_json
    from .utils.provenance import model_record
    from .utils.version import __version__

    # every argument is checked (and the model loaded) before any work: a bad --layer fails in seconds
    try:
        demo = load_demo_scenes(DEMO_DIR)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out}: a file is in the way; give a folder")
    parallelism(args, uses_workers=False)
    device = args.device or "cpu"
    t0 = time.perf_counter()
    pipe = load_model(args, device=device)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    reader = PipelineReader(pipe, seed=args.seed)
    num_layers = reader.num_layers
    layers = list(range(num_layers))
    try:
        (expert,) = reader.check_layers(reader.defaults.layer if args.layer is None else int(args.layer), "--layer")
    except ValueError as e:
        raise CLIError(str(e)) from None
    provenance = model_record(pipe, args.model)
    provenance["lora"] = os.path.abspath(args.lora) if args.lora else None
    dtype = str(pipe.transformer.dtype).replace("torch.", "")
    label = "the embedded ShapesWorld pipeline" if args.model is None else f"the model {provenance['model']}"
    if args.lora:
        label += f" with the LoRA {provenance['lora']}"
    print(f"seg4diff-fast {__version__} demo: zero-shot segmentation of {len(demo)} bundled ShapesWorld scenes "
          f"with {label} ({device}, {dtype})")

    core = check_core_op(args.seed)
    sh = core["shape"]
    print(f"core op: joint_attention torch vs reference, B=1 H={sh['H']} N={sh['N_img']}+{sh['N_txt']} "
          f"D={sh['D']}: max |Δout| {core['max_abs_diff']['out']:.1e}, max |Δmaps| {core['max_abs_diff']['maps']:.1e} "
          f"{'OK' if core['ok'] else 'FAIL'} ({sum(core['seconds'].values()) * 1e3:.0f} ms)")

    seg = Seg4DiffSegmenter(reader, layer=layers)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    if args.threads is not None:
        threads = args.threads
    else:
        threads = 1 if n_params < TINY_PARAMS else torch.get_num_threads()
    print(f"model: {provenance['model']} ({num_layers} blocks, {n_params / 1e6:.2f} M parameters, expert "
          f"block {reader.defaults.layer}, resolution {seg.resolution}, {seg.t5_length} T5 positions, t = "
          f"{seg.timestep:.0f}), loaded in {load_s:.1f} s; segmenting on {threads} thread(s)")

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scenes_out, miou = segment_scenes(seg, demo, layers, expert, args.out, args.seed)
    finally:
        torch.set_num_threads(saved_threads)
    segment_s = time.perf_counter() - t0
    n_a = miou["n_A"]

    rows = table_rows(layers, expert, miou)
    print(f"per-block mIoU (%): A = objects only, background ignored ({n_a} scenes with >= 2 objects); "
          f"B = background included ({len(demo)} scenes); * = block {expert}")
    widths = [max(len(r[i]) for r in [TABLE_HEAD] + rows) for i in range(len(TABLE_HEAD))]
    for r in [TABLE_HEAD] + rows:
        print("  " + "  ".join(c.rjust(wd) for c, wd in zip(r, widths)))

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
        "scenes_dir": DEMO_DIR,
        "scenes": scenes_out,
        "miou": miou,
        "core_op": core,
        "seconds": {"load": load_s, "segment": segment_s},
        "ok": core["ok"],
    }
    md_path, json_path = os.path.join(args.out, "demo.md"), os.path.join(args.out, "demo.json")
    atomic_write(md_path, markdown_report(record).encode())
    record["seconds"]["total"] = time.perf_counter() - t_start
    write_json(json_path, record)
    print(f"wrote {len(scenes_out)} overlays (image | ground truth | prediction) to {args.out}/, "
          f"{md_path} and {json_path}")
    if not core["ok"]:
        print("FAIL: the torch backend of joint_attention disagrees with the reference")
        return 1
    print(f"OK: total {record['seconds']['total']:.1f} s (model load {load_s:.1f} s, segmentation {segment_s:.1f} s)")
    return 0
