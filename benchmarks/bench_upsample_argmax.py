"""Time and peak memory of the last segmentation step: (K, 64, 64) class maps -> labels at image size.

Compares, on the CPU:
- ``cpp``:   seg4diff_fast._C.upsample_argmax (fused, never holds K x H x W), when built;
- ``torch``: the row-banded torch fallback of seg4diff_fast.ops.upsample_argmax;
- ``naive``: F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0].argmax(0).

Peak bytes are torch-allocator bytes above the level before the call (seg4diff_fast.utils.memory.peak_memory,
profiler-based on the CPU). The C++ kernel's own scratch (std::vector, outside torch's allocator) is not
seen by the profiler; it is reported separately as ``cpp_scratch_bytes`` (per thread: two horizontally
interpolated source rows for all K classes plus a float64 row accumulator).

Usage:
    python benchmarks/bench_upsample_argmax.py [--classes 150] [--reps 5] [--out PATH]
    (default PATH: benchmarks/results/upsample_argmax_cpu.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from seg4diff_fast.ops.upsample_argmax import has_cpp_extension, upsample_argmax
from seg4diff_fast.utils.memory import peak_memory

SIZES = [(1024, 1024), (512, 683)]


def naive(scores, size):
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def time_it(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--grid", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch intra-op thread counts (default: 1 and the default)"
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "upsample_argmax_cpu.json"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    scores = torch.randn(args.classes, args.grid, args.grid)
    default_threads = torch.get_num_threads()
    thread_counts = args.threads or sorted({1, default_threads})
    load_before = os.getloadavg()
    impls = {"naive": lambda s: naive(scores, s), "torch": lambda s: upsample_argmax(scores, s, backend="torch")}
    if has_cpp_extension():
        impls["cpp"] = lambda s: upsample_argmax(scores, s, backend="cpp")
    else:
        print("seg4diff_fast._C not built: skipping the C++ path", file=sys.stderr)

    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for size in SIZES:
            ref = naive(scores, size)
            for name, fn in impls.items():
                out, peak = peak_memory(lambda fn=fn, size=size: fn(size), "cpu")
                labels = out if name == "naive" else out[0]
                row = {
                    "impl": name,
                    "threads": threads,
                    "classes": args.classes,
                    "in": [args.grid, args.grid],
                    "out": list(size),
                    "seconds_median": round(time_it(lambda fn=fn, size=size: fn(size), args.reps), 5),
                    "peak_bytes": int(peak),
                    "labels_equal_naive": bool(torch.equal(labels, ref)),
                }
                if name == "cpp":
                    row["cpp_scratch_bytes"] = threads * (2 * args.classes * size[1] * 4 + size[1] * 8)
                rows.append(row)
                print(
                    f"{name:>5} {threads} thr  K={args.classes} {args.grid}x{args.grid} -> {size[0]}x{size[1]}: "
                    f"{row['seconds_median'] * 1e3:8.1f} ms  peak {peak / 2**20:8.1f} MiB"
                    + (f" (+{row['cpp_scratch_bytes'] / 2**20:.1f} MiB C++ scratch)" if name == "cpp" else "")
                    + f"  labels == naive: {row['labels_equal_naive']}"
                )
    torch.set_num_threads(default_threads)

    result = {
        "benchmark": "upsample_argmax_cpu",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "reps": args.reps,
        "note": "peak_bytes = torch CPU allocator high-water mark above the start (profiler); "
        "naive = F.interpolate + argmax only (no top/total)",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
