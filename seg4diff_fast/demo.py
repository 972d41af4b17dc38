"""Demonstrate the core op at an SD3-like shape on the CPU (random tensors, no model weights).

One joint-attention call of an SD3 block at 1024²: B=1, 4 heads (SD3-medium has 24), N = 4096 image
tokens + 154 text tokens, head size 64, float32. The maps captured are the paper's: each image row's
softmax probability on the 154 text columns (4096..4249), averaged over heads.

It runs

- ``joint_attention(..., backend="torch")``: the memory-lean path (nothing of size N² is allocated);
- ``joint_attention(..., backend="reference")``: the full softmax, materialised (for checking);
- ``upsample_argmax``: the last step of segmentation, the 154 maps on the 64×64 token grid to labels
  at 1024×1024 without holding 154×1024×1024 floats (the C++ kernel ``seg4diff_fast._C`` when built);

and prints the largest differences between the two attention backends, the time and peak memory of
each step, and writes them to ``OUT/demo.json``. It fails (exit 1) if the backends disagree.

The inputs are random, so the "labels" show the op's speed, not a segmentation. The ShapesWorld
segmentation demo replaces this command once the embedded pipeline lands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

HELP = (
    "run the core op (joint attention + maps, then upsample+argmax) at an SD3-like shape on the CPU and "
    "check it against the reference; the ShapesWorld segmentation demo replaces it once the embedded "
    "pipeline lands"
)

N_IMG, N_TXT, HEADS, HEAD_DIM = 4096, 154, 4, 64
OUT_TOL, MAPS_TOL = 1e-4, 1e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.path.join("out", "demo"), help="output folder (default: out/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random q, k, v (default: 0)")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the labels image (default: 1024)")


def _timed(fn, peak_memory):
    """(result, seconds, peak_bytes): one timed run, then one run under the peak-memory probe."""
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    _, peak = peak_memory(fn, "cpu")
    return result, seconds, int(peak)


def run(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, joint_attention
    from .ops.upsample_argmax import has_cpp_extension, upsample_argmax
    from .utils.memory import peak_memory

    n = N_IMG + N_TXT
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
    cols = torch.arange(N_IMG, n)  # the 154 text positions
    rows = (0, N_IMG)  # image queries

    print(
        f"seg4diff-fast {__version__} demo: joint attention B=1 H={HEADS} N={N_IMG}+{N_TXT} D={HEAD_DIM} float32 "
        f"on CPU ({torch.get_num_threads()} threads), maps = mean over heads of P[image rows, text cols]"
    )

    def attend(backend):
        return lambda: joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, backend=backend)

    # Warm-up at a small shape (first-call set-up is not what we measure).
    small = torch.randn(1, 1, 64, HEAD_DIM)
    for backend in ("torch", "reference"):
        joint_attention(small, small, small, capture_cols=torch.arange(48, 64), backend=backend)

    steps = {}
    (out_t, maps_t), sec_t, peak_t = _timed(attend("torch"), peak_memory)
    steps["joint_attention[torch]"] = {"seconds": sec_t, "peak_bytes": peak_t}
    (out_r, maps_r), sec_r, peak_r = _timed(attend("reference"), peak_memory)
    steps["joint_attention[reference]"] = {"seconds": sec_r, "peak_bytes": peak_r}

    out_diff = float((out_t - out_r).abs().max())
    maps_diff = float((maps_t - maps_r).abs().max())

    # Last step of segmentation: (154, 64, 64) maps -> labels at image size.
    grid = int(N_IMG**0.5)
    class_maps = maps_t[0].T.reshape(N_TXT, grid, grid).contiguous()
    size = (args.image_size, args.image_size)
    (labels, _, _), sec_u, peak_u = _timed(lambda: upsample_argmax(class_maps, size), peak_memory)
    up_name = f"upsample_argmax[{'cpp' if has_cpp_extension() else 'torch'}]"
    steps[up_name] = {"seconds": sec_u, "peak_bytes": peak_u}

    print(f"{'step':<28}{'time':>10}{'peak memory':>16}")
    for name, s in steps.items():
        print(f"{name:<28}{s['seconds'] * 1e3:>8.0f} ms{s['peak_bytes'] / 2**20:>12.1f} MiB")
    full_probs = HEADS * n * n * 4
    print(f"(one (1, {HEADS}, N, N) float32 probability tensor alone is {full_probs / 2**20:.0f} MiB)")
    print(f"max |out_torch - out_reference|   = {out_diff:.3e}  (tolerance {OUT_TOL:g})")
    print(f"max |maps_torch - maps_reference| = {maps_diff:.3e}  (tolerance {MAPS_TOL:g})")
    print(
        f"labels: {tuple(labels.shape)} int64 over {N_TXT} text columns "
        f"({int(labels.unique().numel())} distinct; random inputs, so not a segmentation)"
    )
    ok = out_diff <= OUT_TOL and maps_diff <= MAPS_TOL

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "demo.json")
    record = {
        "version": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "shape": {"B": 1, "H": HEADS, "N": n, "D": HEAD_DIM, "dtype": "float32", "device": "cpu"},
        "capture": {"cols_range": [N_IMG, n], "rows": list(rows), "mode": "probs", "head_reduce": "mean"},
        "seed": args.seed,
        "max_abs_diff": {"out": out_diff, "maps": maps_diff},
        "tolerance": {"out": OUT_TOL, "maps": MAPS_TOL},
        "steps": steps,
        "labels_size": list(size),
        "ok": ok,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    if not ok:
        print("FAIL: the torch backend disagrees with the reference")
        return 1
    print("OK: the memory-lean backend matches the reference")
    return 0
