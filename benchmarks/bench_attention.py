"""Joint attention with and without Seg4Diff's capture: time, TFLOP/s and peak memory, side by side.

Cases, all at one shape and in one run (ratios are against (a) from the same run):
  (a) sdpa         F.scaled_dot_product_attention, no capture (torch's best backend for the device)
  (b) materialized (a) plus the capture done the authors' way: attention computed again at the capture
                   layer with the (B, H, N, N) softmax materialized (joint_attention backend
                   "reference"), its maps kept, its output dropped
  (c) sdpa+lse     SDPA with its logsumexp plus the selected columns recomputed (backend "torch")
  (d) ours         joint_attention with capture, auto backend ("triton" on CUDA; on the CPU the auto
                   backend is "torch", so (d) is (c) there: the JSON's "backend" field says which ran)
  (e) ours/nocap   joint_attention without capture, auto backend
Capture: columns = the text tokens (the n_sel last positions), rows = the 4096 image tokens, head mean.
Forward runs use mode "probs" (the paper's maps); forward+backward runs use mode "logits" (as MAGNET
trains through them) with a loss on out and on the maps (random cotangents); (a) and (e) on out only.
On the CPU the cases are timed interleaved (one call of each per round) so that load from other
processes falls on all of them alike, and the process's CPU time is recorded beside the wall time.

TFLOP/s counts attention only: 4·B·H·N²·D for the forward, ×3.5 for forward+backward. Times are the
median of --reps runs after warm-up (CUDA: CUDA events). Peak memory is torch-allocated bytes above
the start (seg4diff_fast.utils.peak_memory), from a separate run; the inputs are not counted.

Usage:
    python benchmarks/bench_attention.py --device cpu [--quick]    # fp32, B=1, few heads
    python benchmarks/bench_attention.py --device cuda [--quick]   # bf16, SD3 B=1,2,4 and Flux, H=24
Options: --heads H (all shapes), --batch B [B ...], --dtype fp32|fp16|bf16, --reps, --warmup,
--out PATH (default benchmarks/results/attention_<device>.json), --no-readme.
The markdown table is printed and written into benchmarks/README.md between this device's markers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _report import write_block

import seg4diff_fast
from seg4diff_fast import joint_attention
from seg4diff_fast.ops.joint_attention import resolve_backend
from seg4diff_fast.utils import peak_memory

HERE = os.path.dirname(os.path.abspath(__file__))
N_IMG = 4096  # 1024² image at patch 2 after the 8× VAE
CASES = ("a", "b", "c", "d", "e")
CASE_NAMES = {
    "a": "sdpa",
    "b": "sdpa + materialized capture",
    "c": "sdpa+lse + recomputed cols",
    "d": "ours (capture)",
    "e": "ours (no capture)",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FWD_BWD_FLOP_FACTOR = 3.5
# Peak memory goal: (d) returns one thing (a) does not, the float32 map (B, R, n_sel) — 4.8 MiB at SD3 B=2,
# n_sel=154 against (a)'s 25.7 MiB of out + lse — so a bare factor on (a)'s peak cannot hold; the goal is
# (a)'s peak × factor + the map's own bytes. deterministic=True (not timed here) may add its per-head buffer,
# B·H·R·n_sel·4 bytes (H× the map), on top of that.
PEAK_FACTOR = {"cuda": 1.05, "cpu": 1.10}
GOALS = {
    "cuda": "(d) fwd throughput >= 0.9x (a); (d)/(e) fwd time <= 1.03; (d) fwd peak <= 1.05x (a) + map bytes; "
    "(d) fwd+bwd throughput >= 0.8x (a); deterministic=True: + B*H*R*n_sel*4 bytes (per-head buffer) on top",
    "cpu": "(d) fwd time <= 1.15x (a); (d) fwd peak <= 1.1x (a) + map bytes",
}


# --------------------------------------------------------------------------------------------------
# shapes


def shapes(device: str, quick: bool, heads: int | None, batches: list[int] | None, n_img: int = N_IMG) -> list[dict]:
    """The benchmarked shapes: SD3-medium and Flux at 1024² (reduced on the CPU); ``n_img`` image tokens."""
    out = []
    if device == "cuda":
        sd3_b = batches or ([1] if quick else [1, 2, 4])
        for b in sd3_b:
            for n_txt in (154, 333):
                out.append(dict(model="sd3", B=b, H=heads or 24, n_txt=n_txt, D=64))
        for b in batches or [1]:
            out.append(dict(model="flux", B=b, H=heads or 24, n_txt=512, D=128))
    else:
        for b in batches or [1]:
            for n_txt in (154,) if quick else (154, 333):
                out.append(dict(model="sd3", B=b, H=heads or 4, n_txt=n_txt, D=64))
            out.append(dict(model="flux", B=b, H=heads or 2, n_txt=512, D=128))
    for s in out:
        s["n_img"] = n_img
        s["N"] = n_img + s["n_txt"]
    return out


# --------------------------------------------------------------------------------------------------
# timing and memory


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def times_ms(fn: Callable[[], object], device: str, warmup: int, reps: int) -> list[float]:
    """Milliseconds of ``reps`` calls after ``warmup`` calls (CUDA: events around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(err, MemoryError) or (oom_type is not None and isinstance(err, oom_type)):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


# --------------------------------------------------------------------------------------------------
# the cases


def make_case(case: str, q, k, v, cols, n_img: int, mode: str):
    """A function of (q, k, v) returning (out, maps or None) for one case."""
    kw = dict(capture_cols=cols, capture_rows=(0, n_img), mode=mode)
    if case == "a":
        return lambda q, k, v: (F.scaled_dot_product_attention(q, k, v), None)
    if case == "b":

        def materialized(q, k, v):
            out = F.scaled_dot_product_attention(q, k, v)
            _, maps = joint_attention(q, k, v, backend="reference", **kw)  # the N² softmax, again
            return out, maps

        return materialized
    if case == "c":
        return lambda q, k, v: joint_attention(q, k, v, backend="torch", **kw)
    if case == "d":
        return lambda q, k, v: joint_attention(q, k, v, **kw)
    if case == "e":
        return lambda q, k, v: joint_attention(q, k, v)
    raise ValueError(case)


def fwd_bwd_fn(f, q, k, v, g_out, g_maps):
    def run():
        out, maps = f(q, k, v)
        outs, grads = [out], [g_out]
        if maps is not None:
            outs.append(maps)
            grads.append(g_maps)
        return torch.autograd.grad(outs, (q, k, v), grads)

    return run


def bench_shape(shape: dict, device: str, dtype: torch.dtype, warmup: int, reps: int) -> dict:
    b, h, n, d, n_txt = shape["B"], shape["H"], shape["N"], shape["D"], shape["n_txt"]
    n_img = shape.get("n_img", N_IMG)
    dev = torch.device(device)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    g_out = torch.randn(b, h, n, d, device=dev, dtype=dtype)
    g_maps = torch.randn(b, n_img, n_txt, device=dev, dtype=torch.float32) * 1e-2
    cols = torch.arange(n_img, n, device=dev)
    flop_fwd = 4.0 * b * h * n * n * d
    n2_bytes = b * h * n * n * 4  # one float32 (B, H, N, N) tensor
    result = dict(shape, dtype=str(dtype).replace("torch.", ""), cases={})
    result["map_bytes"] = b * n_img * n_txt * 4  # the float32 head-mean map (d) returns
    result["deterministic_extra_bytes"] = b * h * n_img * n_txt * 4  # deterministic=True's per-head buffer

    # the materializing case peaks at ~3 float32 N² tensors (measured on the CPU: 2.9); skip it up front when
    # even 4 (fwd) / 6 (fwd+bwd) cannot fit: on the CPU an attempt could bring the OOM killer, not an exception
    need_b = {"fwd": 4 * n2_bytes, "fwd_bwd": 6 * n2_bytes}

    for case in CASES:
        backend = {"a": "sdpa", "b": "sdpa + reference", "c": "torch"}.get(case) or resolve_backend(None, dev)
        result["cases"][case] = {"name": CASE_NAMES[case], "backend": backend}

    for run in ("fwd", "fwd_bwd"):
        mode = "probs" if run == "fwd" else "logits"
        flop = flop_fwd * (1.0 if run == "fwd" else FWD_BWD_FLOP_FACTOR)
        to_time = {}
        for case in CASES:
            entry = result["cases"][case]
            f = make_case(case, q, k, v, cols, n_img, mode)
            fn = (lambda f=f: f(q, k, v)) if run == "fwd" else fwd_bwd_fn(f, qg, kg, vg, g_out, g_maps)
            free_memory(device)
            if case == "b" and need_b[run] > 0.9 * available_bytes(device):
                entry[run] = {"skipped": f"needs ~{need_b[run] / 2**30:.1f} GiB (N² tensors), not available"}
                print(f"  ({case}) {run}: skipped, ~{need_b[run] / 2**30:.1f} GiB needed", file=sys.stderr)
                continue
            try:
                if device == "cuda":  # back to back: warm-up (compiles, autotunes), timed reps, then memory
                    ms = times_ms(fn, device, warmup, reps)
                    free_memory(device)
                    res, peak = peak_memory(fn, device)
                else:  # the memory run is the first warm-up; timing comes below, interleaved
                    res, peak = peak_memory(fn, device)
                    for _ in range(warmup - 1):
                        fn()
                    ms = None
                returned = sum(t.numel() * t.element_size() for t in res if t is not None)
                del res
            except Exception as err:  # noqa: BLE001 - a benchmark reports and goes on
                free_memory(device)
                why = "out of memory" if is_oom(err) else f"error: {type(err).__name__}: {err}"
                entry[run] = {"skipped": why[:300]}
                print(f"  ({case}) {run}: skipped ({why[:200]})", file=sys.stderr)
                continue
            entry[run] = {"peak_bytes": int(peak), "returned_bytes": int(returned)}
            if ms is None:
                to_time[case] = fn
            else:
                entry[run].update(ms=round(statistics.median(ms), 4), ms_all=[round(t, 3) for t in ms])
        # CPU: one call of each case per round, so that load from other processes falls on all of them alike
        # also the process's CPU time, which preemption by other processes does not inflate
        times = {case: ([], []) for case in to_time}
        for _ in range(reps):
            for case, fn in to_time.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                c1, t1 = time.process_time(), time.perf_counter()
                times[case][0].append((t1 - t0) * 1e3)
                times[case][1].append((c1 - c0) * 1e3)
        for case, (wall, cpu) in times.items():
            result["cases"][case][run].update(
                ms=round(statistics.median(wall), 4),
                ms_all=[round(t, 3) for t in wall],
                cpu_ms=round(statistics.median(cpu), 4),
                cpu_ms_all=[round(t, 3) for t in cpu],
            )
        for case in CASES:
            r = result["cases"][case].get(run, {})
            if "ms" in r:
                r["tflops"] = round(flop / (r["ms"] * 1e-3) / 1e12, 4)
                print(f"  ({case}) {run}: {r['ms']:9.2f} ms  peak {r['peak_bytes'] / 2**20:9.1f} MiB", file=sys.stderr)

    # accuracy of (d) against (a)'s out and (b)'s materialized maps, once per shape
    try:
        with torch.no_grad():
            out_a = F.scaled_dot_product_attention(q, k, v)
            out_d, maps_d = make_case("d", q, k, v, cols, n_img, "probs")(q, k, v)
            result["check"] = {"max_abs_out_d_vs_a": float((out_d.float() - out_a.float()).abs().max())}
            del out_a, out_d
            if "ms" in result["cases"]["b"].get("fwd", {}):
                _, maps_b = make_case("b", q, k, v, cols, n_img, "probs")(q, k, v)
                result["check"]["max_abs_maps_d_vs_b"] = float((maps_d - maps_b).abs().max())
                del maps_b
            del maps_d
    except Exception as err:  # noqa: BLE001
        result["check"] = {"skipped": f"{type(err).__name__}: {str(err)[:200]}"}
    free_memory(device)

    add_ratios(result)
    return result


def add_ratios(result: dict) -> None:
    """Ratios against (a) (time, throughput, peak) and (d)/(e) time, from this run's numbers."""
    cases = result["cases"]
    for run in ("fwd", "fwd_bwd"):
        base = cases["a"].get(run, {})
        if "ms" not in base:
            continue
        for entry in cases.values():
            r = entry.get(run, {})
            if "ms" in r:
                r["time_vs_a"] = round(r["ms"] / base["ms"], 4)
                r["peak_vs_a"] = round(r["peak_bytes"] / max(base["peak_bytes"], 1), 4)
                if "cpu_ms" in r and "cpu_ms" in base:
                    r["cpu_time_vs_a"] = round(r["cpu_ms"] / base["cpu_ms"], 4)
    d, e = cases["d"].get("fwd", {}), cases["e"].get("fwd", {})
    if "ms" in d and "ms" in e:
        result["d_over_e_fwd_time"] = round(d["ms"] / e["ms"], 4)


def check_goals(result: dict, device: str) -> dict:
    d, a = result["cases"]["d"], result["cases"]["a"]
    df, db = d.get("fwd", {}), d.get("fwd_bwd", {})
    if "ms" not in df or "ms" not in a.get("fwd", {}):
        return {}
    peak_ok = df["peak_bytes"] <= PEAK_FACTOR[device] * a["fwd"]["peak_bytes"] + result.get("map_bytes", 0)
    if device == "cuda":
        goals = {
            "d_fwd_throughput_ge_0.9x_a": 1 / df["time_vs_a"] >= 0.9,
            "d_over_e_le_1.03": result.get("d_over_e_fwd_time", float("inf")) <= 1.03,
            "d_fwd_peak_le_1.05x_a_plus_map": peak_ok,
        }
        if "ms" in db:
            goals["d_fwd_bwd_throughput_ge_0.8x_a"] = 1 / db["time_vs_a"] >= 0.8
        return goals
    goals = {"d_fwd_time_le_1.15x_a": df["time_vs_a"] <= 1.15, "d_fwd_peak_le_1.1x_a_plus_map": peak_ok}
    if "cpu_time_vs_a" in df:
        goals["(d_fwd_cpu_time_le_1.15x_a)"] = df["cpu_time_vs_a"] <= 1.15
    return goals


# --------------------------------------------------------------------------------------------------
# reporting


def markdown(results: list[dict], header: dict) -> str:
    lines = [
        f"{header['device_name']} ({header['device']}), {header['dtype']}, torch {header['torch']}, "
        f"triton {header['triton']}, {header['date']}: `{header['command']}`",
        "",
        "| shape | case | backend | fwd ms | fwd TFLOP/s | fwd ×(a) time | fwd peak MiB | ×(a) peak "
        "| f+b ms | f+b TFLOP/s | f+b ×(a) time | f+b peak MiB | ×(a) peak |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for res in results:
        label = f"{res['model']} B={res['B']} H={res['H']} N={res['N']} D={res['D']} n_sel={res['n_txt']}"
        for case, entry in res["cases"].items():
            cells = []
            for run in ("fwd", "fwd_bwd"):
                r = entry.get(run, {})
                if "ms" in r:
                    cells += [
                        f"{r['ms']:.2f}",
                        f"{r['tflops']:.3f}",
                        f"{r.get('time_vs_a', float('nan')):.2f}",
                        f"{r['peak_bytes'] / 2**20:.1f}",
                        f"{r.get('peak_vs_a', float('nan')):.2f}",
                    ]
                else:
                    cells += [r.get("skipped", "—").split(":")[0]] + [""] * 4
            backend = entry.get("backend", "")
            lines.append(f"| {label} | ({case}) {entry['name']} | {backend} | " + " | ".join(cells) + " |")
        extra = []
        if "d_over_e_fwd_time" in res:
            extra.append(f"(d)/(e) fwd time {res['d_over_e_fwd_time']:.3f}")
        for run in ("fwd", "fwd_bwd"):
            cpu = [
                f"({c}) {e[run]['cpu_time_vs_a']:.2f}"
                for c, e in res["cases"].items()
                if "cpu_time_vs_a" in e.get(run, {})
            ]
            if cpu:
                extra.append(f"{'fwd' if run == 'fwd' else 'f+b'} CPU time ×(a): " + ", ".join(cpu[1:]))
        if res.get("goals"):
            extra.append("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in res["goals"].items()))
        if res.get("check"):
            extra.append(
                "check: "
                + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in res["check"].items())
            )
        if extra:
            notes.append(f"- {label}: " + "; ".join(extra))
    lines += [
        "",
        *notes,
        "",
        "fwd: mode probs; f+b (forward+backward): mode logits, loss on out and maps ((a), (e): out only); "
        f"TFLOP/s = 4·B·H·N²·D (×{FWD_BWD_FLOP_FACTOR} for f+b) / time; peak = torch-allocated bytes above "
        "the inputs."
        + (
            " CPU time = the process's CPU seconds (time.process_time), which preemption by other jobs does not "
            "inflate."
            if header["device"] == "cpu"
            else ""
        ),
    ]
    return "\n".join(lines)


def write_readme(table: str, device: str) -> str:
    path = os.path.join(HERE, "README.md")
    start, end = f"<!-- results:{device} start -->", f"<!-- results:{device} end -->"
    write_block(path, start, end, table, heading=f"### Results: {device}")
    return path


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--heads", type=int, default=None, help="heads for every shape (default: 24; CPU: 4 SD3, 2 Flux)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: CUDA 1 2 4, CPU 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads); on a shared machine 1 avoids OpenMP barrier stalls",
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--n-img", type=int, default=N_IMG,
                   help="image tokens (default 4096 = 1024²; smaller for rehearsals)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_<device>.json)")
    p.add_argument("--no-readme", action="store_true", help="do not write the table into benchmarks/README.md")
    args = p.parse_args(argv)

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    if device == "cuda":
        reps, warmup = (args.reps or (10 if args.quick else 30)), (args.warmup or (3 if args.quick else 10))
    else:
        reps, warmup = (args.reps or (2 if args.quick else 3)), (args.warmup or 1)
    out_path = args.out or os.path.join(HERE, "results", f"attention_{device}.json")

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    header = {
        "benchmark": "attention",
        "command": " ".join(["python", os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "seg4diff_fast": seg4diff_fast.__version__,
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "reps": reps,
        "warmup": warmup,
        "auto_backend": resolve_backend(None, torch.device(device)),
        "timing": "median of reps after warm-up; "
        + (
            "CUDA events, each case back to back"
            if device == "cuda"
            else "time.perf_counter (ms) and time.process_time (cpu_ms), cases interleaved (one call of each per "
            "round); the peak-memory run is the first warm-up"
        ),
        "flops": f"4*B*H*N^2*D forward, x{FWD_BWD_FLOP_FACTOR} forward+backward (attention only)",
        "modes": "fwd: probs; fwd_bwd: logits (MAGNET-style), loss on out and maps; (a), (e) on out only",
        "peak": "torch-allocated bytes above the start (seg4diff_fast.utils.peak_memory); inputs not counted",
        "cases": {
            "a": "F.scaled_dot_product_attention, no capture",
            "b": "(a) + attention recomputed with the materialized (B,H,N,N) softmax for the maps (backend "
            "'reference'); its out is discarded",
            "c": "joint_attention backend 'torch': SDPA with logsumexp + recomputed selected columns",
            "d": "joint_attention with capture, auto backend (see 'backend'; on the CPU this is 'torch', i.e. (c))",
            "e": "joint_attention without capture, auto backend",
        },
        "goals": GOALS[device],
        "capture": "cols = the n_sel text positions (last), rows = (0, 4096), head_reduce mean",
    }
    print(json.dumps({k: header[k] for k in ("device_name", "torch", "triton", "dtype", "auto_backend")}))

    results = []
    for shape in shapes(device, args.quick, args.heads, args.batch, args.n_img):
        print(f"{shape}", file=sys.stderr)
        try:
            res = bench_shape(shape, device, dtype, warmup, reps)
        except Exception as err:  # noqa: BLE001 - e.g. the inputs themselves do not fit
            free_memory(device)
            why = "out of memory" if is_oom(err) else f"{type(err).__name__}: {err}"
            print(f"  shape skipped: {why[:200]}", file=sys.stderr)
            results.append(dict(shape, skipped=why[:300], cases={}))
            continue
        res["goals"] = check_goals(res, device)
        results.append(res)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({**header, "results": results}, f, indent=1)
        f.write("\n")
    table = markdown([r for r in results if r["cases"]], header)
    print(table)
    print(f"wrote {out_path}", file=sys.stderr)
    if not args.no_readme:
        print(f"wrote {write_readme(table, device)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
