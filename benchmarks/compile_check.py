"""Compile every Triton kernel for a CUDA target without a GPU (catches type and lowering errors).

Usage: python benchmarks/compile_check.py [--arch 90]
Triton's compiler runs on the CPU and emits PTX/cubin for the given target; no device is needed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import seg4diff_fast.kernels.focal_dice as kf  # noqa: E402
import seg4diff_fast.kernels.joint_attention as kj  # noqa: E402
import seg4diff_fast.kernels.upsample_argmax as ku  # noqa: E402


def _signature(fn, pointer_dtypes: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_dtypes:
            sig[name] = pointer_dtypes[name]
        elif name in ("qk_scale2", "scale", "map_scale", "g_scale", "scale_h", "scale_w", "alpha", "gamma",
                      "focal_norm", "dice_norm"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _jit(kernel):
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def compile_one(kernel, pointers, constexprs, target, num_warps=4, num_stages=3):
    fn = _jit(kernel)
    src = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs)
    triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    # the largest tiles the autotuner keeps for each dtype (kernels.joint_attention.prune_configs)
    failures = 0
    modes = [kj.MODE_PROBS.value, kj.MODE_LOGITS.value, kj.MODE_SEL_PROBS.value]
    reduces = [kj.REDUCE_SUM.value, kj.REDUCE_MAX.value, kj.REDUCE_STORE.value]
    for dt, d, mode, reduce in itertools.product(["bf16", "fp16", "fp32"], [64, 128], modes, reduces):
        prec = "ieee" if dt == "fp32" else "tf32"
        ptr = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DV")}
        ptr |= {n: "*fp32" for n in ("LSE", "MAPS", "DELTA", "G", "LSEL", "HSEL", "DKSEL")}
        ptr |= {"COLS": "*i64", "DK": "*fp32"}
        jobs = [
            (kj._attn_fwd, dict(HEAD_DIM=d, BLOCK_M=64 if dt == "fp32" else 128, BLOCK_N=64, BLOCK_C=64,
                                 CAPTURE=True, MODE=mode,
                                 REDUCE=reduce, PREC=prec)),
        ]
        if reduce == kj.REDUCE_SUM.value:  # the backward kernels do not depend on the forward's head reduction
            jobs += [
                (kj._bwd_preprocess, dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_C=64, CAP_GRAD=True, MODE=mode, PREC=prec)),
                (kj._bwd_dkdv, dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_N=64, PREC=prec)),
                (kj._bwd_dq, dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_N=64, BLOCK_C=64, CAP_GRAD=True, MODE=mode, PREC=prec)),
                (kj._bwd_dk_sel, dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_C=64, MODE=mode, PREC=prec)),
            ]
        for kernel, consts in jobs:
            name = _jit(kernel).__name__
            try:
                compile_one(kernel, ptr, consts, target)
                print(f"ok   {name} {dt} D={d} mode={mode} reduce={reduce}")
            except Exception as exc:  # report every failure, keep going
                failures += 1
                print(f"FAIL {name} {dt} D={d} mode={mode} reduce={reduce}: {type(exc).__name__}: {exc}"[:2000])
    ptr = {"S": "*fp32", "LABELS": "*i64", "TOP": "*fp32", "TOTAL": "*fp32"}
    try:
        compile_one(ku._upsample_argmax_kernel, ptr, dict(BLOCK_P=256, BLOCK_K=16), target)
        print("ok   _upsample_argmax_kernel")
    except Exception as exc:
        failures += 1
        print(f"FAIL _upsample_argmax_kernel: {type(exc).__name__}: {exc}"[:2000])
    # focal/dice: every pred dtype × target dtype × focal form × power, the GPU block size
    powers = [kf.POW_ONE.value, kf.POW_SQUARE.value, kf.POW_GENERIC.value]
    for xdt, tdt, authors, power in itertools.product(["fp32", "fp16", "bf16"], ["u8", "fp32", "fp16", "bf16"],
                                                      [False, True], powers):
        if authors and power != kf.POW_SQUARE.value:
            continue
        consts = dict(AUTHORS=authors, POW=power, BLOCK=1024)
        for kernel, ptr in ((kf._focal_dice_fwd_kernel, {"X": f"*{xdt}", "T": f"*{tdt}", "PARTIAL": "*fp32"}),
                            (kf._focal_dice_bwd_kernel, {"X": f"*{xdt}", "T": f"*{tdt}", "SUMS": "*fp32",
                                                         "GOUT": "*fp32", "DX": "*fp32"})):
            name = _jit(kernel).__name__
            try:
                compile_one(kernel, ptr, consts, target)
                print(f"ok   {name} x={xdt} t={tdt} authors={authors} pow={power}")
            except Exception as exc:
                failures += 1
                print(f"FAIL {name} x={xdt} t={tdt} authors={authors} pow={power}: {type(exc).__name__}: {exc}"[:2000])
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
