"""Compile every Triton kernel for a CUDA target without a GPU; with --ptx, what ptxas made of each one.

Usage:
  python benchmarks/compile_check.py                      # compile smoke test (sm_90a), all kernels
  python benchmarks/compile_check.py --ptx --json benchmarks/results/compile_sm90a.json
  python benchmarks/compile_check.py --ptx --pruned-only --dtypes fp16,bf16 --head-dims 64,128 --scenarios core
  python benchmarks/compile_check.py --compare benchmarks/results/compile_sm90a_before.json NEW.json

Triton's compiler runs on the CPU and emits PTX/cubin for the given target; no device is needed.
Hopper is ``GPUTarget("cuda", 90, 32)``: triton names it ``sm_90a`` (``sm_arch_from_capability``), which is
what enables wgmma and TMA. For arch >= 90 triton runs its bundled ``ptxas-blackwell`` (CUDA 13.x), not the
12.x ``ptxas`` next to it; the JSON records which one and its version.

The joint-attention kernels are specialised exactly like a real call: the public op's triton backend runs
on ``meta`` tensors in diffusers' (B, N, H, D) layout at SD3 / Flux shapes, every kernel launch is recorded
instead of run, and each recorded call goes through the JIT's own binder (``create_function_from_signature``
→ ``native_specialize_impl``): integers == 1 become constexpr 1, integers and pointers divisible by 16 get
``tt.divisibility = 16`` ("D"). Every autotune config is compiled; ``kept`` says whether
``prune_configs`` lets the autotuner pick it for that call.

Per compiled variant (--ptx): registers, spill stores/loads and stack frame (ptxas -v, same flags as
triton), shared memory (triton's metadata and ptxas), and static counts of selected PTX instructions
(wgmma vs mma.sync, TMA = cp.async.bulk.tensor, cp.async, ld/st.global, red/atom.global, ex2, mul/fma.f32,
bar.sync).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # the kernel modules pick their GPU autotune configs at import

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import seg4diff_fast.kernels.focal_dice as kf  # noqa: E402
import seg4diff_fast.kernels.joint_attention as kj  # noqa: E402
import seg4diff_fast.kernels.upsample_argmax as ku  # noqa: E402
from seg4diff_fast.ops.joint_attention import BACKEND_REGISTRY, make_capture_spec  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (name, B, H, N, n_text, text_first): SD3 puts the image tokens first, Flux the text tokens first
SHAPES = {
    64: ("sd3", 2, 24, 4096 + 154, 154, False),
    128: ("flux", 1, 24, 4096 + 512, 512, True),
    256: ("d256", 1, 24, 4096 + 154, 154, False),
}
N_SEL = 154  # captured columns (the brief's capture-overhead goal is stated at 154)

# PTX opcode → counter name (static instruction counts, not executed counts)
PTX_COUNTERS: dict[str, Callable[[str], bool]] = {
    "wgmma": lambda op: op.startswith("wgmma.mma_async"),
    "mma_sync": lambda op: op.startswith("mma.sync"),
    "tma": lambda op: op.startswith("cp.async.bulk.tensor"),
    "cp_async": lambda op: op.startswith("cp.async.") and not op.startswith("cp.async.bulk")
    and ("ca." in op or "cg." in op),
    "ld_global": lambda op: op.startswith("ld.") and ".global" in op,
    "st_global": lambda op: op.startswith("st.") and ".global" in op,
    "red_global": lambda op: op.startswith("red.") and ".global" in op,
    "atom_global": lambda op: op.startswith("atom.") and ".global" in op,
    "ex2": lambda op: op.startswith("ex2."),
    "mul_f32": lambda op: bool(re.fullmatch(r"mul(\.\w+)*\.f32", op)),
    "fma_rn_f32": lambda op: bool(re.fullmatch(r"fma\.rn(\.\w+)*\.f32", op)),
    "bar_sync": lambda op: op.startswith(("bar.sync", "barrier.sync")),
}
_OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


# ----------------------------------------------------------------------------------------------
# ptxas / PTX statistics
# ----------------------------------------------------------------------------------------------


def ptxas_info(arch: int) -> dict[str, str]:
    """The ptxas triton runs for this arch: its path and the version line."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    tool = get_ptxas(arch)
    out = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    release = [line for line in out if "release" in line]
    return {"path": tool.path, "version": (release or out or ["?"])[-1].strip(),
            "gpu_name": sm_arch_from_capability(arch)}


def ptx_counts(ptx: str) -> dict[str, int]:
    counts = dict.fromkeys(PTX_COUNTERS, 0)
    for line in ptx.splitlines():
        m = _OPCODE.match(line)
        if not m:
            continue
        op = m.group(1)
        for name, pred in PTX_COUNTERS.items():
            if pred(op):
                counts[name] += 1
    return counts


def parse_ptxas_log(log: str) -> dict[str, int] | None:
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if not used or not spill:
        return None
    smem = _PTXAS_SMEM.search(log)
    return {"registers": int(used.group(1)), "stack_frame": int(spill.group(1)),
            "spill_stores": int(spill.group(2)), "spill_loads": int(spill.group(3)),
            "smem_ptxas": int(smem.group(1)) if smem else 0}


def run_ptxas(ptx: str, arch: int) -> dict[str, int]:
    """ptxas -v with triton's flags (used when the compile came from triton's cache and printed no log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True)
    info = parse_ptxas_log(res.stderr + res.stdout)
    if info is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{res.stderr}")
    return info


# the most shared memory one block may use (opt-in), by compute capability: H100/H200 227 KiB, A100 163 KiB
SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


def kernel_stats(compiled: Any, ptxas_log: str, arch: int) -> dict[str, Any]:
    """ptxas' resources and the PTX counts; ``smem_ok``: the launch would not fail for shared memory (triton
    only checks that when it loads the kernel on a device, so a CPU compile must check it here)."""
    ptx = compiled.asm["ptx"]
    info = parse_ptxas_log(ptxas_log) or run_ptxas(ptx, arch)
    shared = int(compiled.metadata.shared)
    return {**info, "shared": shared, "smem_ok": shared <= SMEM_LIMIT.get(arch, 232448), "counts": ptx_counts(ptx)}


def _compile(src: ASTSource, target: GPUTarget, options: dict[str, Any]) -> tuple[Any, str]:
    """triton.compile with ptxas' -v log captured (triton prints it when dump_ptxas_log is set)."""
    buf = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=target, options=options)
    return compiled, buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Recording the launches a real call makes
# ----------------------------------------------------------------------------------------------


@dataclass
class Launch:
    name: str
    kernel: Any  # the module attribute: an Autotuner or a JITFunction
    args: tuple
    kwargs: dict[str, Any]


def _kernel_objects(module) -> dict[str, Any]:
    return {n: o for n, o in vars(module).items() if isinstance(o, (Autotuner, JITFunction))}


@contextlib.contextmanager
def recording(module) -> Iterable[list[Launch]]:
    """Replace every kernel's ``run`` so that ``kernel[grid](...)`` records its arguments instead of running."""
    launches: list[Launch] = []
    objs = _kernel_objects(module)

    def recorder(name, obj):
        def run(*args, grid=None, warmup=False, **kwargs):
            launches.append(Launch(name, obj, args, kwargs))
        return run

    for name, obj in objs.items():
        obj.run = recorder(name, obj)
    try:
        yield launches
    finally:
        for obj in objs.values():
            vars(obj).pop("run", None)


def _qkv(dtype: torch.dtype, head_dim: int, grad: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v as diffusers hands them over: (B, N, H, D) projections viewed as (B, H, N, D)."""
    _, b, h, n, _, _ = SHAPES[head_dim]
    out = []
    for _ in range(3):
        t = torch.empty(b, n, h, head_dim, dtype=dtype, device="meta").transpose(1, 2)
        out.append(t.requires_grad_(grad))
    return tuple(out)


def _capture(head_dim: int) -> tuple[torch.Tensor, tuple[int, int]]:
    _, _, _, n, n_text, text_first = SHAPES[head_dim]
    text0 = 0 if text_first else n - n_text
    cols = torch.arange(text0, text0 + N_SEL)
    rows = (n_text, n) if text_first else (0, n - n_text)
    return cols, rows


def scenarios(which: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, call) pairs: forward without / with capture (mode, head_reduce, deterministic) and the backward
    with the output's gradient only, the map's gradient as well, or the map's alone (MAGNET reading maps only);
    deterministic=True also takes the backward without dq atomics (a separate dq kernel)."""
    out: list[tuple[str, dict[str, Any]]] = [("fwd", dict(capture=False, grad=None)),
                                             ("bwd", dict(capture=False, grad="out")),
                                             ("bwd/deterministic", dict(capture=False, grad="out", deterministic=True))]
    if which == "core":  # what the pipeline (probs/mean) and MAGNET (logits/mean with the map's gradient) use
        out += [("fwd+cap:probs/mean", dict(capture=True, mode="probs", reduce="mean", grad=None)),
                ("bwd+cap:logits/mean", dict(capture=True, mode="logits", reduce="mean", grad="both"))]
        return out
    # "all": every mode with the head mean, every head reduction with probs; "full": every combination
    for mode, reduce in itertools.product(("probs", "logits", "sel_probs"), ("mean", "max", "none")):
        if which == "full" or reduce == "mean" or mode == "probs":
            out.append((f"fwd+cap:{mode}/{reduce}", dict(capture=True, mode=mode, reduce=reduce, grad=None)))
    out.append(("fwd+cap:probs/mean/deterministic",
                dict(capture=True, mode="probs", reduce="mean", grad=None, deterministic=True)))
    for mode, reduce in itertools.product(("probs", "logits", "sel_probs"), ("mean", "none")):
        if which == "full" or reduce == "mean" or mode == "probs":
            out.append((f"bwd+cap:{mode}/{reduce}", dict(capture=True, mode=mode, reduce=reduce, grad="both")))
    out.append(("bwd+cap:logits/mean/deterministic",
                dict(capture=True, mode="logits", reduce="mean", grad="both", deterministic=True)))
    out.append(("bwd+map-only:logits/mean", dict(capture=True, mode="logits", reduce="mean", grad="maps")))
    return out


def record_call(dtype: torch.dtype, head_dim: int, capture: bool, grad: str | None, mode: str = "probs",
                reduce: str = "mean", deterministic: bool = False) -> list[Launch]:
    """Run the public op's triton backend on meta tensors; return the kernel launches it made."""
    q, k, v = _qkv(dtype, head_dim, grad is not None)
    spec = None
    if capture:
        cols, rows = _capture(head_dim)
        spec = make_capture_spec(cols, rows, mode, reduce, q.shape[0], q.shape[2], q.device)
    with recording(kj) as launches:
        out, maps = BACKEND_REGISTRY["triton"](q, k, v, spec, head_dim**-0.5, deterministic=deterministic)
        n_fwd = len(launches)
        if grad is not None:
            outs, grads = ([], []) if grad == "maps" else ([out], [torch.empty_like(out)])
            if grad in ("both", "maps") and maps is not None:
                outs.append(maps)
                grads.append(torch.empty_like(maps))
            torch.autograd.backward(outs, grads)
    for i, launch in enumerate(launches):
        launch.kwargs.setdefault("_phase", "fwd" if i < n_fwd else "bwd")
    return launches


# ----------------------------------------------------------------------------------------------
# Compiling a recorded launch like JITFunction.run would
# ----------------------------------------------------------------------------------------------


def _jit_of(kernel: Any) -> JITFunction:
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _specialize(fn: JITFunction, backend: Any, args: tuple, kwargs: dict[str, Any]):
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return options, signature, constexprs, attrs, specialization


def _config_name(kw: dict[str, Any], num_warps: int, num_stages: int) -> str:
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_C") if k in kw)
    return f"{blocks}/w{num_warps}/s{num_stages}"


@dataclass
class Variant:
    """One compiled kernel: what it was specialised on and what came out."""

    kernel: str
    dtype: str
    head_dim: int
    shape: str
    variant: str  # the non-tile constexprs, e.g. CAPTURE=True,MODE=0,REDUCE=0,PREC=tf32
    config: str
    kept: bool
    scenarios: list[str] = field(default_factory=list)
    divisible: list[str] = field(default_factory=list)  # arguments specialised as divisible by 16
    const_one: list[str] = field(default_factory=list)  # integer arguments specialised to constexpr 1
    ok: bool = True
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    compile_s: float = 0.0


def expand(launch: Launch, pruned_only: bool) -> list[tuple[dict[str, Any], bool]]:
    """(kwargs with the config's values, kept by prune_configs) for every config of an autotuned kernel."""
    kwargs = {k: v for k, v in launch.kwargs.items() if not k.startswith("_")}
    if not isinstance(launch.kernel, Autotuner):
        return [(kwargs, True)]
    tuner = launch.kernel
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    try:
        kept = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
    finally:
        tuner.nargs = None
    kept_keys = {str(c) for c in kept}
    out = []
    for c in tuner.configs:
        if pruned_only and str(c) not in kept_keys:
            continue
        out.append(({**kwargs, **c.all_kwargs()}, str(c) in kept_keys))
    return out


def compile_launches(launches: Iterable[tuple[str, str, int, Launch]], target: GPUTarget, ptx: bool,
                     pruned_only: bool, log: Callable[[str], None] = print) -> list[Variant]:
    backend = make_backend(target)
    seen: dict[tuple, Variant] = {}
    for label, dtype, head_dim, launch in launches:
        fn = _jit_of(launch.kernel)
        for kwargs, kept in expand(launch, pruned_only):
            options, signature, constexprs, attrs, spec = _specialize(fn, backend, launch.args, kwargs)
            key = (launch.name, dtype, head_dim, repr(spec), repr(sorted(options.__dict__.items())))
            if key in seen:
                if label not in seen[key].scenarios:
                    seen[key].scenarios.append(label)
                continue
            names = [p.name for p in fn.params]
            declared = {p.name for p in fn.params if p.is_constexpr}
            consts = {names[p[0]]: v for p, v in constexprs.items()}
            tiles = {k: v for k, v in consts.items() if k.startswith("BLOCK_")}
            others = {k: v for k, v in consts.items()
                      if not k.startswith("BLOCK_") and k != "HEAD_DIM" and k in declared}
            var = Variant(
                kernel=launch.name, dtype=dtype, head_dim=head_dim, shape=SHAPES[head_dim][0],
                variant=",".join(f"{k}={v}" for k, v in others.items()),
                config=_config_name(tiles, options.num_warps, options.num_stages), kept=kept, scenarios=[label],
                divisible=[names[p[0]] for p, a in attrs.items() if a],
                const_one=[k for k, v in consts.items() if k not in declared and v == 1],
            )
            seen[key] = var
            t0 = time.perf_counter()
            try:
                compiled, plog = _compile(ASTSource(fn, signature, constexprs, attrs), target, options.__dict__)
                if ptx:
                    var.stats = kernel_stats(compiled, plog, target.arch)
            except Exception as exc:  # report every failure, keep going
                var.ok, var.error = False, f"{type(exc).__name__}: {exc}"[:1500]
            var.compile_s = round(time.perf_counter() - t0, 2)
            log(_line(var))
    return list(seen.values())


def _line(v: Variant) -> str:
    head = f"{'ok  ' if v.ok else 'FAIL'} {v.kernel} {v.dtype} D={v.head_dim} [{v.variant}] {v.config}"
    head += "" if v.kept else " (pruned)"
    if not v.ok:
        return f"{head}: {v.error}"
    s = v.stats
    if not s:
        return head
    c = s["counts"]
    smem = f"{s['shared']}" + ("" if s.get("smem_ok", True) else "(>limit)")
    return (f"{head}: regs={s['registers']} spill={s['spill_stores']}/{s['spill_loads']} smem={smem} "
            f"wgmma={c['wgmma']} mma.sync={c['mma_sync']} tma={c['tma']} ({v.compile_s}s)")


def joint_attention_variants(dtypes: list[str], head_dims: list[int], which: str, target: GPUTarget, ptx: bool,
                             pruned_only: bool, log: Callable[[str], None] = print) -> list[Variant]:
    jobs = []
    for dt, d in itertools.product(dtypes, head_dims):
        for label, call in scenarios(which):
            for launch in record_call(DTYPES[dt], d, **call):
                jobs.append((label, dt, d, launch))
    return compile_launches(jobs, target, ptx, pruned_only, log)


# ----------------------------------------------------------------------------------------------
# The other kernels (hand-written signatures: their launchers need real data)
# ----------------------------------------------------------------------------------------------


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


def other_variants(target: GPUTarget, ptx: bool, log: Callable[[str], None] = print) -> list[Variant]:
    jobs: list[tuple[Any, dict, dict, str]] = [
        (ku._upsample_argmax_kernel, {"S": "*fp32", "LABELS": "*i64", "TOP": "*fp32", "TOTAL": "*fp32"},
         dict(BLOCK_P=256, BLOCK_K=16), "fp32")]
    powers = [kf.POW_ONE.value, kf.POW_SQUARE.value, kf.POW_GENERIC.value]
    for xdt, tdt, authors, power in itertools.product(["fp32", "fp16", "bf16"], ["u8", "fp32", "fp16", "bf16"],
                                                      [False, True], powers):
        if authors and power != kf.POW_SQUARE.value:
            continue
        consts = dict(AUTHORS=authors, POW=power, BLOCK=1024)
        jobs.append((kf._focal_dice_fwd_kernel, {"X": f"*{xdt}", "T": f"*{tdt}", "PARTIAL": "*fp32"}, consts,
                     f"{xdt}/{tdt}"))
        jobs.append((kf._focal_dice_bwd_kernel, {"X": f"*{xdt}", "T": f"*{tdt}", "SUMS": "*fp32", "GOUT": "*fp32",
                                                 "DX": "*fp32"}, consts, f"{xdt}/{tdt}"))
    out = []
    for kernel, ptrs, consts, dt in jobs:
        fn = _jit_of(kernel)
        var = Variant(kernel=fn.__name__, dtype=dt, head_dim=0, shape="-",
                      variant=",".join(f"{k}={v}" for k, v in consts.items()), config="w4/s3", kept=True)
        t0 = time.perf_counter()
        try:
            compiled, plog = _compile(ASTSource(fn, _signature(fn, ptrs, consts), consts), target,
                                      {"num_warps": 4, "num_stages": 3})
            if ptx:
                var.stats = kernel_stats(compiled, plog, target.arch)
        except Exception as exc:
            var.ok, var.error = False, f"{type(exc).__name__}: {exc}"[:1500]
        var.compile_s = round(time.perf_counter() - t0, 2)
        log(_line(var))
        out.append(var)
    return out


# ----------------------------------------------------------------------------------------------
# Report, compare, main
# ----------------------------------------------------------------------------------------------


def variant_key(r: dict[str, Any]) -> str:
    return f"{r['kernel']} {r['dtype']} D={r['head_dim']} [{r['variant']}] {r['config']}"


def _smem_ok(stats: dict[str, Any]) -> bool:
    return stats.get("smem_ok", stats["shared"] <= SMEM_LIMIT[90])  # JSON written before the field existed


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel × dtype × head dim, over the configs the autotuner may pick: max registers, max spill,
    how many use wgmma / mma.sync."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        if r["kept"] and r["ok"] and r["stats"]:
            groups.setdefault((r["kernel"], r["dtype"], r["head_dim"]), []).append(r)
    rows = []
    for (kernel, dt, d), rs in sorted(groups.items()):
        rows.append({"kernel": kernel, "dtype": dt, "head_dim": d, "variants": len(rs),
                     "max_registers": max(r["stats"]["registers"] for r in rs),
                     "max_spill_stores": max(r["stats"]["spill_stores"] for r in rs),
                     "spilling": sum(r["stats"]["spill_stores"] > 0 for r in rs),
                     "smem_over": sum(not _smem_ok(r["stats"]) for r in rs),
                     "wgmma": sum(r["stats"]["counts"]["wgmma"] > 0 for r in rs),
                     "mma_sync": sum(r["stats"]["counts"]["mma_sync"] > 0 for r in rs)})
    return rows


def print_summary(results: list[dict[str, Any]]) -> None:
    print(f"{'kernel':<24}{'dtype':<6}{'D':>5}{'n':>5}{'regs':>6}{'spill':>7}{'#spill':>7}{'#smem>':>7}"
          f"{'wgmma':>7}{'mma':>5}")
    for r in summary_rows(results):
        print(f"{r['kernel']:<24}{r['dtype']:<6}{r['head_dim']:>5}{r['variants']:>5}{r['max_registers']:>6}"
              f"{r['max_spill_stores']:>7}{r['spilling']:>7}{r['smem_over']:>7}{r['wgmma']:>7}{r['mma_sync']:>5}")


def compare(old_path: str, new_path: str | None, new: dict[str, Any] | None = None) -> None:
    """Per kernel × dtype × head size over the configs the autotuner may pick (old → new): variants, max
    registers, max spill, how many spill / overflow shared memory / use wgmma / mma.sync; then per-variant
    deltas for the variants both files hold under the same name."""
    with open(old_path) as f:
        old = json.load(f)
    if new is None:
        with open(new_path) as f:
            new = json.load(f)
    print(f"compare {old_path} ({old.get('label') or old.get('git', '?')}) -> {new_path or 'this run'} "
          f"({new.get('label') or new.get('git', '?')})")
    sa = {(r["kernel"], r["dtype"], r["head_dim"]): r for r in summary_rows(old["results"])}
    sb = {(r["kernel"], r["dtype"], r["head_dim"]): r for r in summary_rows(new["results"])}
    cols = ("variants", "max_registers", "max_spill_stores", "spilling", "smem_over", "wgmma", "mma_sync")
    print(f"{'kernel':<24}{'dtype':<6}{'D':>5}  " + "".join(f"{c:>18}" for c in cols))
    for key in sorted(set(sa) | set(sb), key=lambda k: (k[2], k[1], k[0])):
        ra, rb = sa.get(key), sb.get(key)
        cells = [f"{'—' if ra is None else ra[c]} -> {'—' if rb is None else rb[c]}" for c in cols]
        print(f"{key[0]:<24}{key[1]:<6}{key[2]:>5}  " + "".join(f"{c:>18}" for c in cells))
    a = {variant_key(r): r for r in old["results"]}
    b = {variant_key(r): r for r in new["results"]}
    common = sorted(k for k in set(a) & set(b) if a[k].get("stats") and b[k].get("stats"))
    print(f"\n{len(common)} variants in both ({len(a)} old, {len(b)} new):")
    for key in common:
        sa_, sb_ = a[key]["stats"], b[key]["stats"]
        parts = [f"{n} {sa_[n]}->{sb_[n]}" for n in ("registers", "spill_stores", "shared") if sa_[n] != sb_[n]]
        if sa_["counts"]["wgmma"] != sb_["counts"]["wgmma"]:
            parts.append(f"wgmma {sa_['counts']['wgmma']}->{sb_['counts']['wgmma']}")
        if a[key]["kept"] != b[key]["kept"]:
            parts.append(f"kept {a[key]['kept']}->{b[key]['kept']}")
        if parts:
            print(f"  {key}: " + ", ".join(parts))


def _git_rev() -> str:
    here = os.path.dirname(os.path.abspath(kj.__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "?"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--ptx", action="store_true", help="collect registers, spills, smem and PTX counts")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compare", nargs="+", metavar="JSON",
                    help="OLD.json [NEW.json]: print per-variant deltas (with one file, against this run)")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--scenarios", choices=["core", "all", "full"], default="all",
                    help="core: no capture, probs/mean capture, logits/mean with the map's gradient; all: every "
                    "mode with the head mean and every head reduction with probs; full: every combination")
    ap.add_argument("--pruned-only", action="store_true", help="only the configs prune_configs keeps")
    ap.add_argument("--append", action="store_true",
                    help="add to the --json file's results (a variant compiled again replaces the old entry)")
    ap.add_argument("--label", default="", help="a note stored in the JSON (e.g. which commit's kernels)")
    ap.add_argument("--no-others", action="store_true", help="skip the upsample/focal-dice kernels")
    args = ap.parse_args(argv)
    if args.compare and len(args.compare) == 2:
        compare(*args.compare)
        return 0
    target = GPUTarget("cuda", args.arch, 32)
    info = ptxas_info(args.arch)
    print(f"target {info['gpu_name']}; ptxas {info['path']} ({info['version']}); kernels {kj.__file__}")
    t0 = time.perf_counter()
    dtypes = [s for s in args.dtypes.split(",") if s]
    head_dims = [int(s) for s in args.head_dims.split(",") if s]
    variants = joint_attention_variants(dtypes, head_dims, args.scenarios, target, args.ptx, args.pruned_only)
    if not args.no_others:
        variants += other_variants(target, args.ptx)
    results = [vars(v) for v in variants]
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        fresh = {variant_key(r) for r in results}
        results = [r for r in old["results"] if variant_key(r) not in fresh] + results
        dtypes = sorted(set(old.get("dtypes", [])) | set(dtypes))
        head_dims = sorted(set(old.get("head_dims", [])) | set(head_dims))
        args.scenarios = f"{old.get('scenarios')}+{args.scenarios}"
    failures = [r for r in results if not r["ok"]]
    report = {"target": info["gpu_name"], "ptxas": info, "triton": triton.__version__, "git": _git_rev(),
              "label": args.label, "kernels_file": kj.__file__, "dtypes": dtypes, "head_dims": head_dims,
              "scenarios": args.scenarios,
              "shapes": {str(d): dict(zip(("name", "B", "H", "N", "n_text", "text_first"), s))
                         for d, s in SHAPES.items()}, "n_sel": N_SEL,
              "elapsed_s": round(time.perf_counter() - t0, 1), "summary": summary_rows(results), "results": results}
    if args.ptx:
        print_summary(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:  # one variant per line: ~700 of them in a full run
            f.write(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1)[:-2])
            f.write(',\n "results": [\n' + ",\n".join(json.dumps(r) for r in report["results"]) + "\n ]\n}\n")
        print(f"wrote {args.json}")
    if args.compare:
        compare(args.compare[0], None, report)
    print(f"{len(failures)} failures, {len(results)} variants, {report['elapsed_s']} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
