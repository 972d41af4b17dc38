"""Labeling an image set: ``label_images`` against a plain loop calling the segmenter one image at a time.

Same model, same images, same segmenter object, one run. Model: the width-reduced SD3 of
``bench_segment.py`` (24 joint blocks, ``--heads`` × 64, 16 latent channels, SD3's ×8 VAE, tiny CLIP
encoders, random weights, built offline), run at each ``--resolutions`` (1024 → 64×64 = 4096 image
tokens, SD3's count). Images: ``--images`` synthetic shape pictures (PIL ellipses / rectangles),
``--height`` × ``--width``, JPEG, in two folders.

- ``loop``: for each file: ``Image.open`` → ``seg(image, classes)`` → the label PNG written with PIL;
- ``label``: ``label_images(folder, classes, out, segmenter=seg, batch_size, workers)``: loader workers
  decode and resize, one VAE call and early-exiting transformer calls per batch, text encoded once, PNGs
  written on a thread pool (atomic, fsynced).

Both after a warm-up image; wall time of the whole set; label agreement between the two outputs (they
differ only where float rounding of batched vs single calls flips a near-tie). On CUDA (``--device
cuda``), the share of wall time the GPU is busy during ``label`` (union of kernel intervals from
``torch.profiler``, over the whole call and over the span from the first to the last kernel).

    python benchmarks/bench_label.py                                   # CPU -> out/bench/label_cpu.json
    python benchmarks/bench_label.py --save                            # -> benchmarks/results/ and LABEL.md
    python benchmarks/bench_label.py --device cuda --heads 24 --dtype float16 --resolutions 1024 \\
        --images 256 --json benchmarks/results/label_cuda.json

Threads × workers of the ``label`` command itself (``--threads-sweep``: the embedded ShapesWorld pipeline,
200 scenes, each setting in a fresh process, ``--load N`` busy loops meanwhile; see ``bench_cli_threads.py``):

    python benchmarks/bench_label.py --threads-sweep [--load 2] [--tree /tmp/head] --save
        # -> benchmarks/results/label_cpu_threads.json (without --save: out/bench/)

Without ``--save`` nothing tracked is written: the JSON goes to ``out/bench/`` (git-ignored) and LABEL.md is
left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _report import write_block  # noqa: E402
from bench_segment import bench_pipeline  # noqa: E402

from seg4diff_fast import Seg4DiffSegmenter, label_images  # noqa: E402
from seg4diff_fast.label.outputs import encode_labels  # noqa: E402
from seg4diff_fast.utils.parallel import plan_parallelism  # noqa: E402

CLASSES = "cat,dog,sofa,tree,sky,grass,road,house,car,person,water,table,bird,red,blue,green"
SCRATCH = os.path.join(os.path.dirname(HERE), "out", "bench")  # git-ignored
MARK_START, MARK_END = "<!-- bench_label:start -->", "<!-- bench_label:end -->"


def make_images(folder: str, n: int, height: int, width: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
            box = [x0, y0, int(rng.integers(x0 + 4, width)), int(rng.integers(y0 + 4, height))]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if i % 2 else draw.rectangle)(box, fill=fill)
        path = os.path.join(folder, f"img{i:04d}.jpg")
        im.save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(seg: Seg4DiffSegmenter, paths: list[str], classes: list[str], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for p in paths:
        with Image.open(p) as im:
            res = seg(im.convert("RGB"), classes)
        with open(os.path.join(out, os.path.splitext(os.path.basename(p))[0] + ".png"), "wb") as f:
            f.write(encode_labels(res.label_map, len(classes)))


def gpu_busy(prof) -> tuple[float, float, float]:
    """(busy seconds, first kernel start, last kernel end) in seconds from the profiler's CUDA events."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return 0.0, 0.0, 0.0
    busy, cur_s, cur_e = 0.0, *spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / 1e6, spans[0][0] / 1e6, max(e for _, e in spans) / 1e6


def agreement(a: str, b: str, names: list[str]) -> float:
    eq = tot = 0
    for n in names:
        x = np.array(Image.open(os.path.join(a, n)))
        y = np.array(Image.open(os.path.join(b, n)))
        eq += int((x == y).sum())
        tot += x.size
    return eq / tot


def run_one(args, pipe, resolution: int, tmp: str) -> dict:
    classes = [c.strip() for c in args.classes.split(",")]
    seg = Seg4DiffSegmenter(pipe, layer=args.layer, resolution=resolution, seed=0)
    n = args.images if resolution >= 1024 else args.images_small
    folder = os.path.join(tmp, f"in{resolution}")
    paths = make_images(folder, n, args.height, args.width)
    seg(Image.open(paths[0]).convert("RGB"), classes)  # warm-up
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    out_loop = os.path.join(tmp, f"loop{resolution}")
    sync()
    t0 = time.perf_counter()
    plain_loop(seg, paths, classes, out_loop)
    sync()
    t_loop = time.perf_counter() - t0

    out_label = os.path.join(tmp, f"label{resolution}")
    busy = None
    t0 = time.perf_counter()
    if args.device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            summary = label_images(folder, classes, out_label, segmenter=seg, batch_size=args.batch_size,
                                   workers=args.workers, progress=False)
            sync()
        t_label = time.perf_counter() - t0
        b, first, last = gpu_busy(prof)
        busy = {"busy_s": b, "share_of_wall": b / t_label, "share_first_to_last_kernel": b / max(last - first, 1e-9)}
    else:
        summary = label_images(folder, classes, out_label, segmenter=seg, batch_size=args.batch_size,
                               workers=args.workers, progress=False)
        t_label = time.perf_counter() - t0
    names = [os.path.splitext(os.path.basename(p))[0] + ".png" for p in paths]
    r = {
        "resolution": resolution,
        "image_tokens": (resolution // 16) ** 2,
        "images": n,
        "loop": {"seconds": t_loop, "images_per_s": n / t_loop},
        "label": {"seconds": t_label, "images_per_s": n / t_label, "peak_memory_mib": summary.peak_memory / 2**20,
                  "memory_kind": summary.memory_kind},
        "speedup": t_loop / t_label,
        "label_agreement": agreement(out_loop, out_label, names),
    }
    if busy is not None:
        r["gpu_busy"] = busy
    print(json.dumps(r), flush=True)
    return r


def write_markdown(path: str, result: dict) -> None:
    r = result
    lines = [
        MARK_START,
        f"Width-reduced SD3 ({r['model']['layers']} blocks, {r['model']['heads']} heads × 64, random weights), "
        f"{r['image']} JPEG images, K = {r['classes']}, capture layer {r['layer']}, {r['device']}, {r['dtype']}, "
        f"{r['threads']} threads, batch {r['batch_size']}, {r['workers']} loader workers; `{r['command']}`.",
        "",
        "| resolution (image tokens) | images | loop images/s | label images/s | speedup | labels equal |"
        + (" GPU busy (wall / kernel span) |" if r["device"] == "cuda" else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if r["device"] == "cuda" else ""),
    ]
    for x in r["runs"]:
        row = (f"| {x['resolution']}² ({x['image_tokens']}) | {x['images']} | {x['loop']['images_per_s']:.2f} | "
               f"{x['label']['images_per_s']:.2f} | {x['speedup']:.2f}× | {100 * x['label_agreement']:.3f}% |")
        if "gpu_busy" in x:
            g = x["gpu_busy"]
            row += f" {100 * g['share_of_wall']:.0f}% / {100 * g['share_first_to_last_kernel']:.0f}% |"
        lines.append(row)
    lines.append(MARK_END)
    write_block(path, MARK_START, MARK_END, "\n".join(lines))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--resolutions", default="256,1024", help="comma list of model input sides")
    p.add_argument("--images", type=int, default=16, help="images at resolution >= 1024")
    p.add_argument("--images-small", type=int, default=64, help="images at smaller resolutions")
    p.add_argument("--height", type=int, default=683)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--classes", default=CLASSES)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: plan_parallelism's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: plan_parallelism's)")
    p.add_argument("--model", help="a real SD3 diffusers folder instead of the width-reduced random model")
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/ and LABEL.md (tracked); default: out/bench/ only")
    p.add_argument("--json", help="output JSON (default: label_cpu.json, or label_cpu_threads.json with "
                                  "--threads-sweep, in benchmarks/results/ with --save, else out/bench/)")
    p.add_argument("--markdown", help="markdown file for the table (default: LABEL.md with --save, else none)")
    p.add_argument("--threads-sweep", action="store_true",
                   help="time the `label` command per threads x workers setting instead (bench_cli_threads.py)")
    p.add_argument("--load", type=int, default=0, help="--threads-sweep: busy-loop processes meanwhile")
    p.add_argument("--tree", help="--threads-sweep: the source tree to run (default: this one)")
    p.add_argument("--tree-name", help="--threads-sweep: its name in the JSON (default: its commit)")
    p.add_argument("--repeats", type=int, default=3, help="--threads-sweep: runs per setting")
    args = p.parse_args(argv)
    out_dir = os.path.join(HERE, "results") if args.save else SCRATCH
    if args.threads_sweep:
        import bench_cli_threads

        sweep = ["--commands", "label", "--images", "200", "--repeats", str(args.repeats), "--load", str(args.load),
                 "--json", args.json or os.path.join(out_dir, "label_cpu_threads.json")]
        sweep += ["--tree", args.tree] if args.tree else []
        return bench_cli_threads.main(sweep + (["--tree-name", args.tree_name] if args.tree_name else []))
    args.json = args.json or os.path.join(out_dir, "label_cpu.json")
    args.markdown = args.markdown or (os.path.join(HERE, "LABEL.md") if args.save else None)
    args.dtype = getattr(torch, args.dtype)
    par = plan_parallelism(args.threads, args.workers).apply()
    args.threads, args.workers = par.threads, par.workers
    pipe = bench_pipeline(args)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in (int(x) for x in args.resolutions.split(",")):
            runs.append(run_one(args, pipe, res, tmp))
    result = {
        "device": "cuda" if args.device.startswith("cuda") else args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "dtype": str(args.dtype).replace("torch.", ""),
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": "python benchmarks/bench_label.py" + ("" if argv is None and len(sys.argv) == 1
                                                          else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "model": {"layers": args.num_layers, "heads": args.heads, "path": args.model},
        "image": f"{args.height}x{args.width}",
        "classes": len(args.classes.split(",")),
        "layer": args.layer,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    if args.markdown:
        write_markdown(args.markdown, result)
    print(f"wrote {args.json}" + (f" and {args.markdown}" if args.markdown else ""))
    return result


if __name__ == "__main__":
    main()
