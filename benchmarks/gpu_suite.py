"""The GPU suite's driver: kernel timings against SDPA, per-kernel profile, autotune picks, peak memory,
the CUDA tests, the attention / pipeline / segment / MAGNET benchmarks, the roofline, and ONE JSON with a
summary of the four goals. Run it through ``benchmarks/gpu_suite.sh`` (which installs first).

    python benchmarks/gpu_suite.py [--out PATH] [--budget-s 540] [--skip SECTION ...]
    python benchmarks/gpu_suite.py --dry-run      # CPU, small shapes, TRITON_INTERPRET=1 (< 3 min)

Goals (benchmarks/README.md), at SD3 (B=2, H=24, N=4096+154, D=64) and Flux (B=1, H=24, N=4096+512, D=128),
bf16, capture = 4096 image rows × 154 text columns, head mean:
  1. forward without capture: time ≤ 1/0.9 × the faster of SDPA's flash and cuDNN backends
  2. capture overhead: forward with capture (probs) ≤ 1.03 × forward without
  3. backward: ours forward+backward (map gradient, logits) ≤ 1/0.8 × SDPA's (flash / cuDNN, out only)
  4. peak memory (forward): ≤ 1.05 × SDPA's peak + the map's own bytes; deterministic=True may add its
     per-head buffer B·H·R·n_sel·4 bytes on top (stated separately)

Sections run in priority order under a time budget (a device machine's command may run 600 s); each one
records its status, seconds and result, and the JSON is rewritten after every section, so a run cut
short still leaves what it measured. Timing: CUDA ``triton.testing.do_bench`` (median, CUDA events);
dry run: the median of time.perf_counter over a few calls.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

DRY = "--dry-run" in sys.argv
if DRY:  # before triton decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the CPU profiler's start/stop lines

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import seg4diff_fast  # noqa: E402
from seg4diff_fast import joint_attention  # noqa: E402
from seg4diff_fast.utils import peak_memory  # noqa: E402

N_IMG, N_SEL = 4096, 154
SHAPES = {  # name: B, H, n_txt, D, text first (Flux) or image first (SD3)
    "sd3": dict(B=2, H=24, n_txt=154, D=64, text_first=False),
    "flux": dict(B=1, H=24, n_txt=512, D=128, text_first=True),
}
DRY_SHAPES = {"sd3": dict(B=1, H=2, n_txt=24, D=64, text_first=False),
              "flux": dict(B=1, H=2, n_txt=32, D=128, text_first=True)}
DRY_N_IMG, DRY_N_SEL = 64, 16
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
GOAL_FWD_THROUGHPUT = 0.9
GOAL_CAPTURE_OVERHEAD = 1.03
GOAL_FWD_BWD_THROUGHPUT = 0.8
GOAL_PEAK_FACTOR = 1.05
SECTIONS = ("env", "install", "kernels", "kernel_profile", "autotune", "memory", "tests", "bench_attention",
            "bench_pipeline", "bench_segment", "bench_magnet", "roofline", "goals")


# --------------------------------------------------------------------------------------------------
# shapes, inputs, timing


def shape_of(name: str, dry: bool) -> dict[str, Any]:
    s = dict((DRY_SHAPES if dry else SHAPES)[name])
    n_img, n_sel = (DRY_N_IMG, DRY_N_SEL) if dry else (N_IMG, N_SEL)
    s.update(N=n_img + s["n_txt"], n_img=n_img, n_sel=n_sel)
    text0 = 0 if s["text_first"] else n_img
    s["rows"] = (s["n_txt"], s["N"]) if s["text_first"] else (0, n_img)
    s["cols"] = list(range(text0, text0 + n_sel))
    return s


def make_inputs(s: dict, device: str, dtype: torch.dtype, grad: bool, seed: int) -> list[torch.Tensor]:
    """q, k, v as diffusers hands them over: (B, N, H, D) projections viewed as (B, H, N, D)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(3):
        t = torch.randn(s["B"], s["N"], s["H"], s["D"], device=device, dtype=dtype, generator=gen).transpose(1, 2)
        out.append(t.requires_grad_(grad))
    return out


def bench_ms(fn: Callable[[], Any], device: str, dry: bool) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    if not dry:
        fn()  # warm-up
    times = []
    for _ in range(1 if dry else 3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_ctx(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend])


def _grad_fn(outs: list[torch.Tensor], inputs: list[torch.Tensor], grads: list[torch.Tensor]):
    return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        return flash_attn_func
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return None


# --------------------------------------------------------------------------------------------------
# sections


def section_env(ctx: dict) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "seg4diff_fast": seg4diff_fast.__version__, "device": ctx["device"], "dry_run": ctx["dry"],
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "cpu_count": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["flash_attn"] = getattr(sys.modules.get("flash_attn"), "__version__", None) if _flash_attn_func() else None
    if ctx["device"] == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device_name=p.name, sm_count=p.multi_processor_count, total_memory=p.total_memory,
                   capability=list(torch.cuda.get_device_capability()),
                   cudnn=torch.backends.cudnn.version())
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["nvidia_smi"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def section_install(ctx: dict) -> dict:
    """What gpu_suite.sh's install steps did (JSON lines it wrote), or that none ran."""
    path = ctx["install_log"]
    if not path or not os.path.exists(path):
        return {"ran": False, "note": "no install log (gpu_suite.sh --no-install, --dry-run, or run directly)"}
    steps = []
    with open(path) as f:
        for line in f:
            if line.strip():
                steps.append(json.loads(line))
    if not steps:
        return {"ran": False, "note": "gpu_suite.sh installed nothing (--no-install or --dry-run)"}
    failed = [st["step"] for st in steps if st["status"] not in ("ok", "present")]
    return {"ran": True, "steps": steps, "failed": failed}


def _kernels_for_shape(name: str, ctx: dict) -> dict:
    device, dry, dtype = ctx["device"], ctx["dry"], ctx["dtype"]
    s = shape_of(name, dry)
    cols = torch.tensor(s["cols"], device=device)
    cap = dict(capture_cols=cols, capture_rows=s["rows"], head_reduce="mean")
    res: dict[str, Any] = {"shape": {k: v for k, v in s.items() if k != "cols"}, "sdpa": {}}
    q, k, v = make_inputs(s, device, dtype, False, seed=1)
    qg, kg, vg = make_inputs(s, device, dtype, True, seed=2)
    g_out = torch.randn(qg.shape, device=device, dtype=dtype)
    # SDPA per backend: forward, and backward (out only) on a graph kept for repeated backward calls
    for be in SDPA_BACKENDS:
        try:
            with sdpa_ctx(be):
                fwd = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, dry)
                out = F.scaled_dot_product_attention(qg, kg, vg)
                bwd = bench_ms(_grad_fn([out], [qg, kg, vg], [g_out]), device, dry)
            res["sdpa"][be] = {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": fwd + bwd}
            del out
        except RuntimeError as err:  # this backend does not take these inputs on this device
            res["sdpa"][be] = {"unavailable": str(err).splitlines()[0][:200]}
    fa = _flash_attn_func()
    if fa is not None and device == "cuda":
        qb, kb, vb = (t.transpose(1, 2) for t in (qg, kg, vg))  # flash_attn takes (B, N, H, D)
        res["flash_attn"] = {"fwd_ms": bench_ms(lambda: fa(qb.detach(), kb.detach(), vb.detach()), device, dry)}
        out = fa(qb, kb, vb)
        res["flash_attn"]["bwd_ms"] = bench_ms(_grad_fn([out], [qg, kg, vg], [g_out.transpose(1, 2)]), device, dry)
    # ours: triton, without and with capture
    ours: dict[str, Any] = {}
    ours["fwd_nocap_ms"] = bench_ms(lambda: joint_attention(q, k, v, backend="triton"), device, dry)
    ours["fwd_cap_ms"] = bench_ms(lambda: joint_attention(q, k, v, backend="triton", **cap), device, dry)
    ours["fwd_cap_logits_ms"] = bench_ms(lambda: joint_attention(q, k, v, backend="triton", mode="logits", **cap),
                                         device, dry)
    out, _ = joint_attention(qg, kg, vg, backend="triton")
    ours["bwd_out_ms"] = bench_ms(_grad_fn([out], [qg, kg, vg], [g_out]), device, dry)
    out, maps = joint_attention(qg, kg, vg, backend="triton", mode="logits", **cap)
    g_maps = torch.randn(maps.shape, device=device, dtype=torch.float32) * 1e-2
    ours["bwd_map_ms"] = bench_ms(_grad_fn([out, maps], [qg, kg, vg], [g_out, g_maps]), device, dry)
    ours["fwd_bwd_map_ms"] = ours["fwd_cap_logits_ms"] + ours["bwd_map_ms"]
    ours["fwd_bwd_out_ms"] = ours["fwd_nocap_ms"] + ours["bwd_out_ms"]
    res["ours"] = ours
    # accuracy at this shape: out and maps against SDPA (fp32 math) and a float64 recompute of the columns
    with torch.no_grad():
        out_c, maps_c = joint_attention(q, k, v, backend="triton", **cap)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        res["check"] = {"out_max_abs_vs_sdpa_fp32": float((out_c.float() - ref).abs().max())}
        r0, r1 = s["rows"]
        qd = q[:, :, r0:r1].double()
        s_all_max = None
        for h in range(s["H"]):  # lse per head in float64 (no N² kept across heads)
            sc = qd[:, h] @ k[:, h].double().transpose(-1, -2) * s["D"] ** -0.5
            p_sel = torch.exp(sc[..., cols] - torch.logsumexp(sc, -1, keepdim=True))
            s_all_max = p_sel if s_all_max is None else s_all_max + p_sel
        maps_ref = s_all_max / s["H"]
        res["check"]["maps_rel_err_vs_fp64"] = float((maps_c.double() - maps_ref).abs().max() / maps_ref.abs().max())
    fastest = [e["fwd_ms"] for be, e in res["sdpa"].items() if be in ("flash", "cudnn") and "fwd_ms" in e]
    fastest_fb = [e["fwd_bwd_ms"] for be, e in res["sdpa"].items() if be in ("flash", "cudnn") and "fwd_ms" in e]
    res["ratios"] = {
        "fwd_nocap_over_best_sdpa": ours["fwd_nocap_ms"] / min(fastest) if fastest else None,
        "capture_overhead": ours["fwd_cap_ms"] / ours["fwd_nocap_ms"],
        "fwd_bwd_map_over_best_sdpa": ours["fwd_bwd_map_ms"] / min(fastest_fb) if fastest_fb else None,
        "fwd_bwd_out_over_best_sdpa": ours["fwd_bwd_out_ms"] / min(fastest_fb) if fastest_fb else None,
    }
    return res


def section_kernels(ctx: dict) -> dict:
    return {name: _kernels_for_shape(name, ctx) for name in ctx["shapes"]}


def _profile(fn: Callable[[], Any], device: str, iters: int) -> dict[str, float]:
    """Mean time per call of each kernel (CUDA: device time, µs) or op (CPU: self CPU time, µs)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        fn()  # compiled and autotuned before the profiled calls
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) if device == "cuda" else ev.self_cpu_time_total
        if device == "cuda" and t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t and t > 0:
            out[ev.key[:80]] = round(t / iters, 3)
    top = sorted(out.items(), key=lambda kv: -kv[1])[:12]
    return dict(top)


def _profile_shape(name: str, ctx: dict) -> dict:
    device, dry, dtype = ctx["device"], ctx["dry"], ctx["dtype"]
    iters = 1 if dry else 10
    s = shape_of(name, dry)
    cap = dict(capture_cols=torch.tensor(s["cols"], device=device), capture_rows=s["rows"])
    q, k, v = make_inputs(s, device, dtype, True, seed=3)
    g_out = torch.randn(q.shape, device=device, dtype=dtype)
    entry: dict[str, Any] = {"device": device, "unit": "us per call"}
    with torch.no_grad():
        entry["fwd_nocap"] = _profile(lambda: joint_attention(q, k, v, backend="triton"), device, iters)
        entry["fwd_cap"] = _profile(lambda: joint_attention(q, k, v, backend="triton", **cap), device, iters)
    out, _ = joint_attention(q, k, v, backend="triton")
    entry["bwd_out"] = _profile(_grad_fn([out], [q, k, v], [g_out]), device, iters)
    out, _ = joint_attention(q, k, v, backend="triton", deterministic=True)
    entry["bwd_out_det"] = _profile(_grad_fn([out], [q, k, v], [g_out]), device, iters)
    out, maps = joint_attention(q, k, v, backend="triton", mode="logits", **cap)
    g_maps = torch.randn(maps.shape, device=device) * 1e-2
    entry["bwd_map"] = _profile(_grad_fn([out, maps], [q, k, v], [g_out, g_maps]), device, iters)
    return entry


def section_kernel_profile(ctx: dict) -> dict:
    """Per-kernel device times (torch.profiler) of the forward and backward launches, for the roofline."""
    return {name: _profile_shape(name, ctx) for name in ctx["shapes"]}


def section_autotune(ctx: dict) -> dict:
    """Which config the autotuner chose for each key it saw in this process (kernels and benchmarks above)."""
    from triton.runtime.autotuner import Autotuner

    import seg4diff_fast.kernels.joint_attention as kj

    out = {}
    for name, obj in vars(kj).items():
        if not isinstance(obj, Autotuner):
            continue
        picks = [{"key": [str(x) for x in key], "config": str(cfg)} for key, cfg in obj.cache.items()]
        out[name] = {"n_configs": len(obj.configs), "keys": obj.keys, "picks": picks,
                     "only_config": str(obj.configs[0]) if len(obj.configs) == 1 else None}
    return out


def _memory_shape(name: str, ctx: dict) -> dict:
    device, dry, dtype = ctx["device"], ctx["dry"], ctx["dtype"]
    s = shape_of(name, dry)
    cap = dict(capture_cols=torch.tensor(s["cols"], device=device), capture_rows=s["rows"], backend="triton")
    q, k, v = make_inputs(s, device, dtype, False, seed=4)
    r = s["rows"][1] - s["rows"][0]
    map_bytes = s["B"] * r * s["n_sel"] * 4
    per_head = s["B"] * s["H"] * r * s["n_sel"] * 4  # deterministic=True's (B, H, R, n_sel) buffer
    _, sdpa = peak_memory(lambda: F.scaled_dot_product_attention(q, k, v), device)
    _, nocap = peak_memory(lambda: joint_attention(q, k, v, backend="triton"), device)
    _, ours = peak_memory(lambda: joint_attention(q, k, v, **cap), device)
    _, det = peak_memory(lambda: joint_attention(q, k, v, deterministic=True, **cap), device)
    bound = GOAL_PEAK_FACTOR * sdpa + map_bytes
    return {"sdpa_fwd_peak": sdpa, "ours_nocap_fwd_peak": nocap, "ours_cap_fwd_peak": ours,
            "ours_cap_deterministic_fwd_peak": det, "map_bytes": map_bytes, "deterministic_per_head_bytes": per_head,
            "bound": bound, "bound_deterministic": bound + per_head, "ours_over_bound": ours / bound,
            "deterministic_over_bound": det / (bound + per_head)}


def section_memory(ctx: dict) -> dict:
    """Forward peaks (torch-allocated bytes above the inputs) against the restated goal."""
    res = {}
    for name in ctx["shapes"]:
        res[name] = _memory_shape(name, ctx)
        if ctx["device"] == "cuda":
            torch.cuda.empty_cache()
    return res


def _start(cmd: list[str]) -> dict:
    """Start a command in the repository root, its output in a temporary file."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    return {"cmd": cmd, "proc": proc, "log": log, "t0": time.perf_counter()}


def _wait(job: dict, timeout: float) -> dict:
    proc = job["proc"]
    try:
        rc: int | str = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    job["log"].seek(0)
    out = job["log"].read()
    job["log"].close()
    return {"cmd": " ".join(job["cmd"]), "rc": rc, "seconds": round(time.perf_counter() - job["t0"], 1),
            "tail": out[-3000:]}


def _run(cmd: list[str], timeout: float) -> dict:
    return _wait(_start(cmd), timeout)


def section_tests(ctx: dict) -> dict:
    if ctx["dry"]:  # the CUDA tests skip on the CPU: run the routing table and the CPU dispatch instead
        sel = ["tests/test_torch_backward_routing.py", "-k", "table or order or follows"]
    else:
        sel = ["tests/test_joint_attention.py", "tests/test_memory.py", "tests/test_torch_backward_routing.py",
               "-k", "cuda"]
    r = _run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *sel],
             ctx["remaining"]() - 5)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", r["tail"])}
    r["counts"] = counts
    r["ok"] = r["rc"] == 0
    return r


def bench_commands(ctx: dict) -> dict[str, tuple[list[str], str]]:
    """section → (command, the JSON it writes) for the four benchmark scripts."""
    w, dry = ctx["work"], ctx["dry"]
    if dry:  # small shapes on the CPU
        att = ["--device", "cpu", "--quick", "--heads", "1", "--reps", "1", "--warmup", "1", "--threads", "1",
               "--n-img", "64"]
        pipe = ["--device", "cpu", "--size", "128", "--num-layers", "2", "--heads", "1", "--layer", "1", "--reps",
                "1", "--threads", "1", "--variants", "stock,authors@1,ours@1,ours@all"]
        seg = ["--device", "cpu", "--heads", "1", "--num-layers", "2", "--layer", "1", "--height", "96",
               "--width", "128", "--threads", "1"]
        mag = ["--device", "cpu", "--size", "128", "--num-layers", "2", "--heads", "1", "--layer", "1",
               "--classes", "2", "--reps", "1", "--threads", "1"]
    else:  # SD3-medium width (24 heads of 64), 1024², bf16 / fp16 as each script defaults on CUDA
        att = ["--device", "cuda", "--quick"]
        pipe = ["--device", "cuda", "--reps", "3", "--variants", "stock,authors@1,authors@all,ours@1,ours@all"]
        seg = ["--device", "cuda", "--heads", "24", "--dtype", "bfloat16"]
        mag = ["--device", "cuda", "--reps", "2"]
    py = sys.executable
    return {
        "bench_attention": ([py, "benchmarks/bench_attention.py", *att, "--no-readme", "--out",
                             os.path.join(w, "attention.json")], "attention.json"),
        "bench_pipeline": ([py, "benchmarks/bench_pipeline.py", *pipe, "--json", os.path.join(w, "pipeline.json")],
                           "pipeline.json"),
        "bench_segment": ([py, "benchmarks/bench_segment.py", *seg, "--json", os.path.join(w, "segment.json"),
                           "--markdown", os.path.join(w, "segment.md")], "segment.json"),
        "bench_magnet": ([py, "benchmarks/bench_magnet.py", *mag, "--json", os.path.join(w, "magnet.json")],
                         "magnet.json"),
    }


def _bench_section(section: str) -> Callable[[dict], dict]:
    def run(ctx: dict) -> dict:
        cmds = bench_commands(ctx)
        jobs = ctx.setdefault("jobs", {})
        if ctx["dry"] and not jobs:  # the rehearsal starts all four at once (timings there mean nothing)
            for name, (cmd, _) in cmds.items():
                if name not in ctx["skip"]:
                    jobs[name] = _start(cmd)
        job = jobs.pop(section, None) or _start(cmds[section][0])  # on a GPU: one at a time
        r = _wait(job, ctx["remaining"]() - 5)
        r["ok"] = r["rc"] == 0
        path = os.path.join(ctx["work"], cmds[section][1])
        if os.path.exists(path):
            with open(path) as f:
                r["result"] = json.load(f)
        return r

    run.__name__ = f"section_{section}"
    return run


def section_roofline(ctx: dict) -> dict:
    import roofline

    res = roofline.roofline(ctx["report"])
    return {"rows": res["rows"], "ceilings": res["ceilings"], "measured_on": res["measured_on"]}


def section_goals(ctx: dict) -> dict:
    """The four goals, per shape, from the sections above (None where a section did not run)."""
    sec = ctx["report"]["sections"]
    kern = sec.get("kernels", {}).get("result") or {}
    mem = sec.get("memory", {}).get("result") or {}
    goals: dict[str, Any] = {}
    for name in ctx["shapes"]:
        r = (kern.get(name) or {}).get("ratios") or {}
        m = mem.get(name) or {}
        fwd, over, fb = (r.get("fwd_nocap_over_best_sdpa"), r.get("capture_overhead"),
                         r.get("fwd_bwd_map_over_best_sdpa"))
        goals[name] = {
            "1_fwd_nocap_vs_best_sdpa": {"value": fwd, "goal": f"<= {1 / GOAL_FWD_THROUGHPUT:.3f}",
                                         "met": None if fwd is None else fwd <= 1 / GOAL_FWD_THROUGHPUT},
            "2_capture_overhead_154_cols": {"value": over, "goal": f"<= {GOAL_CAPTURE_OVERHEAD}",
                                            "met": None if over is None else over <= GOAL_CAPTURE_OVERHEAD},
            "3_fwd_bwd_vs_best_sdpa": {"value": fb, "goal": f"<= {1 / GOAL_FWD_BWD_THROUGHPUT:.3f}",
                                       "met": None if fb is None else fb <= 1 / GOAL_FWD_BWD_THROUGHPUT,
                                       "bwd_out_only_fwd_bwd_ratio": r.get("fwd_bwd_out_over_best_sdpa")},
            "4_peak_memory": {"value": m.get("ours_over_bound"),
                              "goal": "peak <= 1.05 x SDPA peak + map bytes (ratio to that bound <= 1)",
                              "met": None if "ours_over_bound" not in m else m["ours_over_bound"] <= 1.0,
                              "deterministic_over_bound_with_per_head_buffer": m.get("deterministic_over_bound")},
        }
    if ctx["dry"]:
        goals["note"] = "dry run: CPU, tiny shapes, interpreter; the values exercise the flow, not the goals"
    return goals


SECTION_FNS: dict[str, Callable[[dict], Any]] = {
    "env": section_env, "install": section_install, "kernels": section_kernels,
    "kernel_profile": section_kernel_profile, "autotune": section_autotune, "memory": section_memory,
    "tests": section_tests, **{b: _bench_section(b) for b in ("bench_attention", "bench_pipeline", "bench_segment",
                                                              "bench_magnet")},
    "roofline": section_roofline,
    "goals": section_goals,
}
# seconds a section needs at least to be worth starting (CUDA; the dry run scales them down)
MIN_SECONDS = {"kernels": 120, "kernel_profile": 20, "memory": 15, "tests": 60, "bench_attention": 60,
               "bench_pipeline": 45, "bench_segment": 30, "bench_magnet": 45}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def print_summary(report: dict) -> None:
    goals = report["sections"].get("goals", {}).get("result") or {}
    print("\n== gpu_suite summary:", report["meta"]["device_name"], "(dry run)" if report["meta"]["dry_run"] else "")
    for name, sec in report["sections"].items():
        print(f"  {name:<16}{sec['status']:<9}{sec['seconds']:7.1f} s  {sec.get('error', '')[:100]}")
    for shape, g in goals.items():
        if not isinstance(g, dict):
            print(f"  {g}")
            continue
        for key, e in g.items():
            v = e["value"]
            val = "—" if v is None else f"{v:.3f}"
            met = {True: "met", False: "NOT met", None: "n/a"}[e["met"]]
            print(f"  {shape:<5} {key:<28} {val:>8}  goal {e['goal']:<58} {met}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, small shapes, TRITON_INTERPRET=1")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/gpu_suite_<gpu>.json)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting sections after this (default 540)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    ap.add_argument("--install-log", default=os.environ.get("GPU_SUITE_INSTALL_LOG"))
    ap.add_argument("--shapes", default="sd3,flux")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run for the CPU rehearsal")
    device = "cpu" if dry else "cuda"
    t_start = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else (170 if dry else 540)
    name = ("cpu_dry_run" if dry else slug(torch.cuda.get_device_name()))
    out_path = args.out or os.path.join(HERE, "results", f"gpu_suite_{name}.json")
    work = tempfile.mkdtemp(prefix="gpu_suite_")
    report: dict[str, Any] = {
        "meta": {"suite": "benchmarks/gpu_suite.py", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "device_name": name, "dry_run": dry, "budget_s": budget,
            "command": " ".join([sys.executable, *sys.argv]), "work_dir": work,
            "goals": {"1": "forward without capture <= 1/0.9 x the faster of SDPA flash / cuDNN",
                      "2": "capture (probs, mean, 154 columns) / no capture <= 1.03",
                      "3": "forward+backward with the map's gradient (logits) <= 1/0.8 x SDPA flash / cuDNN (out only)",
                      "4": "forward peak <= 1.05 x SDPA's peak + map bytes; deterministic adds B*H*R*n_sel*4"}},
        "sections": {},
    }
    ctx = {"dry": dry, "device": device, "dtype": torch.float32 if dry else torch.bfloat16,
           "shapes": [s for s in args.shapes.split(",") if s], "work": work, "install_log": args.install_log,
           "report": report, "remaining": lambda: budget - (time.perf_counter() - t_start), "skip": set(args.skip)}
    scale = 0.1 if dry else 1.0
    for sec in SECTIONS:
        if sec in args.skip:
            report["sections"][sec] = {"status": "skipped", "seconds": 0.0, "error": "--skip"}
            continue
        if ctx["remaining"]() < MIN_SECONDS.get(sec, 0) * scale and sec not in ctx.get("jobs", {}):
            report["sections"][sec] = {"status": "skipped", "seconds": 0.0,
                                       "error": f"budget: {ctx['remaining']():.0f} s left of {budget:.0f}"}
            continue
        t0 = time.perf_counter()
        print(f"[gpu_suite] {sec} ...", flush=True)
        try:
            result = SECTION_FNS[sec](ctx)
            entry = {"status": "ok", "result": result}
            if isinstance(result, dict) and result.get("ok") is False:
                entry["status"] = "failed"
                entry["error"] = f"rc={result.get('rc')}"
        except Exception as err:  # noqa: BLE001 - one section's failure must not lose the others
            entry = {"status": "error", "error": f"{type(err).__name__}: {err}"[:500],
                     "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][sec] = entry
        if sec == "env" and entry["status"] == "ok":
            report["meta"]["device_name"] = entry["result"].get("device_name", name)
        report["meta"]["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    for job in ctx.get("jobs", {}).values():  # started but never collected (a section skipped by the budget)
        job["proc"].kill()
    print_summary(report)
    print(f"wrote {out_path} ({report['meta']['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
