"""Roofline of the joint-attention kernels: FLOPs, bytes and exponentials of each kernel at SD3 and Flux
shapes, and the time floor they imply on an H100 SXM and an H200; measured times beside them when a
gpu_suite JSON is given (or found in benchmarks/results/).

Usage:
  python benchmarks/roofline.py [--suite benchmarks/results/gpu_suite_<gpu>.json] [--json PATH]

Counts are per call, exact math (the work the result needs, not the padded tiles a kernel issues):
  forward          4·B·H·N²·D (QKᵀ and PV) + capture: 2·B·H·R·C·D per pass over the C selected columns
                   (probs / logits one pass, sel_probs two); exponentials B·H·N² (+ B·H·R·C per probs pass)
  backward, 7-GEMM (deterministic=True, and this repository before the dq-atomic rewrite: _bwd_dkdv
                   recomputes S and does dV, dP, dK = 4 GEMMs; _bwd_dq recomputes S and does dP, dQ = 3
                   GEMMs): 14·B·H·N²·D, exponentials 2·B·H·N²
  backward, 5-GEMM (the default; FlashAttention-2/3: one kernel per key block, dQ by float32 atomic adds):
                   10·B·H·N²·D, exponentials B·H·N²; SDPA's flash / cuDNN backward does the same work
  map gradient     T·k_sel into dQ and Tᵀ·q into dK at the selected columns: 2 GEMMs over R × C (counted
                   once each; the probs / sel_probs recompute of the selected scores adds one more)
Bytes are the fewest that must cross HBM: each input read once, each output written once (bf16
operands; lse, delta, maps, the map gradient and fp32 accumulators as float32).

Ceilings (datasheet leads; METHOD.md: measured ceilings beat them):
  H100 SXM5: 989.4 TFLOP/s dense bf16 tensor core, 3.35 TB/s HBM3 (NVIDIA H100 datasheet, 2023)
  H200 SXM:  989.4 TFLOP/s dense bf16 (the H100's), 4.8 TB/s HBM3e (NVIDIA H200 datasheet, 2024)
  both:      3.9 T exponentials/s on the multi-function units (FlashAttention-3, Shah et al. 2024,
             arXiv:2407.08608 §3.1: "the H100 SXM5 GPU has 989 TFLOPS of FP16 matmul but only 3.9
             TFLOPS of special functions"); exp2 is one MUFU op per element
  measured here (.library/device/KINDS.md): H100 798 TFLOP/s bf16 8192³ GEMM, 3.0 TB/s copy;
             H200 769–798 TFLOP/s, 4.3 TB/s
The floor of a kernel is the largest of FLOPs/rate, bytes/bandwidth and exponentials/MUFU rate.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import asdict, dataclass

from seg4diff_fast.utils.files import write_json

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, B, H, N, D, R captured rows, C selected columns): the suite's shapes
SHAPES = {
    "sd3": dict(B=2, H=24, N=4096 + 154, D=64, R=4096, C=154),
    "flux": dict(B=1, H=24, N=4096 + 512, D=128, R=4096, C=154),
}
BF16 = 2
F32 = 4
I64 = 8

CEILINGS = {
    "h100_sxm": {"flops": 989.4e12, "bytes": 3.35e12, "exp": 3.9e12,
                 "source": "NVIDIA H100 datasheet (dense bf16, HBM3); MUFU: FlashAttention-3 §3.1"},
    "h200": {"flops": 989.4e12, "bytes": 4.8e12, "exp": 3.9e12,
             "source": "NVIDIA H200 datasheet (dense bf16 = H100's, HBM3e); MUFU: FlashAttention-3 §3.1"},
    "h100_measured_here": {"flops": 798e12, "bytes": 3.0e12, "exp": 3.9e12,
                           "source": ".library/device/KINDS.md, 2026-11-13 (8192³ bf16 GEMM, D2D copy)"},
    "h200_measured_here": {"flops": 798e12, "bytes": 4.3e12, "exp": 3.9e12,
                           "source": ".library/device/KINDS.md, 2026-11-04 (8192³ bf16 GEMM, D2D copy)"},
}


@dataclass
class Cost:
    kernel: str
    flops: float
    bytes: float
    exps: float
    note: str = ""


def fwd_flops(B: int, H: int, N: int, D: int, R: int = 0, C: int = 0, mode: str | None = None) -> float:
    """FLOPs of the forward: 4·B·H·N²·D, plus 2·B·H·R·C·D per pass over the selected columns."""
    passes = {None: 0, "probs": 1, "logits": 1, "sel_probs": 2}[mode]
    return 4.0 * B * H * N * N * D + passes * 2.0 * B * H * R * C * D


def forward_costs(B: int, H: int, N: int, D: int, R: int, C: int, e: int = BF16) -> list[Cost]:
    qkv_o = 4.0 * B * H * N * D * e  # read q, k, v; write out
    lse = F32 * B * H * N
    cap_bytes = B * R * C * F32 + B * C * I64  # the head-mean map written once, the column ids read
    return [
        Cost("fwd (no capture)", fwd_flops(B, H, N, D), qkv_o + lse, B * H * N * N),
        Cost("fwd + capture probs/mean", fwd_flops(B, H, N, D, R, C, "probs"), qkv_o + lse + cap_bytes,
             B * H * N * N + B * H * R * C),
        Cost("fwd + capture logits/mean", fwd_flops(B, H, N, D, R, C, "logits"), qkv_o + lse + cap_bytes,
             B * H * N * N),
        Cost("fwd + capture sel_probs/mean", fwd_flops(B, H, N, D, R, C, "sel_probs"), qkv_o + lse + cap_bytes,
             B * H * N * N + 2 * B * H * R * C),
        Cost("fwd + capture probs/none (per-head maps)", fwd_flops(B, H, N, D, R, C, "probs"),
             qkv_o + lse + H * B * R * C * F32 + B * C * I64, B * H * N * N + B * H * R * C,
             "also deterministic mean: the per-head buffer, then a sum"),
    ]


def backward_costs(B: int, H: int, N: int, D: int, R: int, C: int, e: int = BF16) -> list[Cost]:
    """Per kernel of both backward designs, and the totals. 5-GEMM (the default here since the dq-atomic
    rewrite; FlashAttention-2/3): one _bwd_dkdv program per key block recomputes S and P and does dV, dP,
    dK and dQ (float32 atomic adds). 7-GEMM (deterministic=True here; this repository before): _bwd_dkdv
    with S, dV, dP, dK and a separate _bwd_dq with S, dP, dQ."""
    bh = B * H
    t = bh * N * D * e  # one (B, H, N, D) operand
    t32 = bh * N * D * F32  # the float32 dQ accumulator
    rows = F32 * bh * N  # one per-row float32 vector (lse, delta)
    g = B * R * C * F32  # the head-mean map's gradient
    sel = 2.0 * bh * R * C * D  # one GEMM over the captured rows × selected columns
    pre = 2.0 * bh * N * D
    dkdv4 = 8.0 * bh * N * N * D
    dkdv5 = 10.0 * bh * N * N * D
    dq3 = 6.0 * bh * N * N * D
    io_dkdv = 4 * t + 2 * rows + 2 * t  # read q, k, v, dO, lse, delta; write dk, dv
    return [
        Cost("_bwd_preprocess (D = rowsum dO·O)", pre, 2 * t + rows, 0),
        Cost("_bwd_preprocess + map grad (probs)", pre + sel, 2 * t + rows + g + rows, bh * R * C),
        Cost("_bwd_dkdv 5-GEMM (S, dV, dP, dK, dQ atomics)", dkdv5, io_dkdv + t32, bh * N * N,
             "dQ: float32 atomics, written once at least; the cast to bf16 is a separate pass"),
        Cost("_bwd_dkdv 5-GEMM + map grad logits (T folded)", dkdv5 + 2 * sel, io_dkdv + t32 + g, bh * N * N),
        Cost("_bwd_dkdv 4-GEMM (S, dV, dP, dK)", dkdv4, io_dkdv, bh * N * N, "deterministic"),
        Cost("_bwd_dq 3-GEMM (S, dP, dQ)", dq3, 4 * t + 2 * rows + t, bh * N * N, "deterministic"),
        Cost("backward 7-GEMM total (out only)", dkdv4 + dq3 + pre, io_dkdv + 5 * t + 2 * rows + 2 * t + rows,
             2 * bh * N * N, "preprocess + dkdv + dq (deterministic)"),
        Cost("backward 5-GEMM total (out only)", dkdv5 + pre, io_dkdv + t32 + 2 * t + rows, bh * N * N,
             "preprocess + dkdv with dQ atomics; SDPA flash / cuDNN do the same work"),
        Cost("backward 7-GEMM + map grad logits", dkdv4 + dq3 + pre + 2 * sel,
             io_dkdv + 5 * t + 2 * rows + 2 * t + rows + 2 * g, 2 * bh * N * N),
        Cost("backward 5-GEMM + map grad logits", dkdv5 + pre + 2 * sel, io_dkdv + t32 + 2 * t + rows + g,
             bh * N * N),
    ]


def floors(c: Cost, ceiling: dict) -> dict[str, float]:
    t_flop, t_mem, t_exp = c.flops / ceiling["flops"], c.bytes / ceiling["bytes"], c.exps / ceiling["exp"]
    floor = max(t_flop, t_mem, t_exp)
    bound = "flops" if floor == t_flop else ("bytes" if floor == t_mem else "exp")
    return {"t_flop_ms": t_flop * 1e3, "t_mem_ms": t_mem * 1e3, "t_exp_ms": t_exp * 1e3, "floor_ms": floor * 1e3,
            "bound": bound}


# measured times from a gpu_suite JSON: roofline row → (shape entry key path, kernel name in the profile)
MEASURED = {
    "fwd (no capture)": ("fwd_nocap", "_attn_fwd"),
    "fwd + capture probs/mean": ("fwd_cap", "_attn_fwd"),
    "_bwd_preprocess (D = rowsum dO·O)": ("bwd_out", "_bwd_preprocess"),
    "_bwd_dkdv 5-GEMM (S, dV, dP, dK, dQ atomics)": ("bwd_out", "_bwd_dkdv"),
    "_bwd_dkdv 5-GEMM + map grad logits (T folded)": ("bwd_map", "_bwd_dkdv"),
    "_bwd_dkdv 4-GEMM (S, dV, dP, dK)": ("bwd_out_det", "_bwd_dkdv"),
    "_bwd_dq 3-GEMM (S, dP, dQ)": ("bwd_out_det", "_bwd_dq"),
}


def measured_ms(suite: dict | None, shape: str, row: str) -> float | None:
    """A kernel's mean device time from the suite's profiler section, when it ran on a GPU."""
    if not suite or row not in MEASURED:
        return None
    prof = (suite.get("sections", {}).get("kernel_profile", {}).get("result") or {}).get(shape) or {}
    run, kernel = MEASURED[row]
    if prof.get("device") != "cuda":
        return None
    times = prof.get(run, {})
    vals = [t for name, t in times.items() if name == kernel or name.startswith(kernel + "_") or
            name.startswith(kernel + "(")]  # profiler names may carry a suffix
    return float(sum(vals)) / 1e3 if vals else None  # microseconds → ms


def find_suite() -> str | None:
    paths = [p for p in glob.glob(os.path.join(HERE, "results", "gpu_suite_*.json")) if "dry" not in p]
    return max(paths, key=os.path.getmtime) if paths else None


def roofline(suite: dict | None = None) -> dict:
    out = {"ceilings": CEILINGS, "shapes": SHAPES, "rows": []}
    gpu = (suite or {}).get("meta", {}).get("device_name")
    out["measured_on"] = gpu
    for shape, s in SHAPES.items():
        costs = forward_costs(**s) + backward_costs(**s)
        for c in costs:
            row = {"shape": shape, **asdict(c), "gflop": c.flops / 1e9, "mbytes": c.bytes / 1e6,
                   "h100": floors(c, CEILINGS["h100_sxm"]), "h200": floors(c, CEILINGS["h200"])}
            m = measured_ms(suite, shape, c.kernel)
            if m is not None:
                row["measured_ms"] = m
                row["measured_tflops"] = c.flops / (m * 1e-3) / 1e12
                key = "h200" if gpu and "H200" in gpu.upper() else "h100"
                row["measured_over_floor"] = m / row[key]["floor_ms"]
            out["rows"].append(row)
    return out


def print_table(res: dict) -> None:
    print(f"{'shape':<5} {'kernel':<46}{'GFLOP':>8}{'MB':>8}{'Gexp':>7}{'H100 ms':>9}{'H200 ms':>9} {'bound':<6}"
          f"{'measured':>9}{'×floor':>7}")
    for r in res["rows"]:
        m = f"{r['measured_ms']:9.3f}{r['measured_over_floor']:7.2f}" if "measured_ms" in r else ""
        print(f"{r['shape']:<5} {r['kernel'][:45]:<46}{r['gflop']:8.1f}{r['mbytes']:8.1f}{r['exps'] / 1e9:7.2f}"
              f"{r['h100']['floor_ms']:9.3f}{r['h200']['floor_ms']:9.3f} {r['h100']['bound']:<6}{m}")
    if res.get("measured_on"):
        print(f"measured on {res['measured_on']} (gpu_suite kernel_profile, mean device time per call)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", help="a gpu_suite JSON (default: the newest benchmarks/results/gpu_suite_*.json)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "roofline.json"))
    args = ap.parse_args(argv)
    path = args.suite or find_suite()
    suite = None
    if path:
        with open(path) as f:
            suite = json.load(f)
    res = roofline(suite)
    res["suite"] = path
    print_table(res)
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
