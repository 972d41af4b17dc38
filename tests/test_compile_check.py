"""Every config the autotuner can pick compiles for Hopper (sm_90a) without spilling and on wgmma.

``benchmarks/compile_check.py`` compiles the joint-attention kernels on the CPU exactly as a real call
specialises them (diffusers' (B, N, H, D) layout at SD3 / Flux shapes, recorded from the public op's
triton backend): here the configs ``prune_configs`` keeps, fp16 and bf16, head sizes 64 and 128, the
forward without and with capture (probs, head mean) and the backward (out only, and the map's gradient
in logits mode, MAGNET's). Each must: compile, spill 0 bytes (ptxas -v), fit Hopper's 227 KiB of shared
memory per block, and run its matrix products on wgmma (no mma.sync fallback). No GPU is needed, only the
ptxas that triton ships.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "compile_check.py")
NO_GEMM_KERNELS = ("_bwd_preprocess",)  # a row-wise dot (D = rowsum dO·O); matrix products only with capture
# Stated exceptions (kernels/joint_attention.py, above _TILES): the dk/dv kernel with the map's gradient at
# D = 128 spills at every tile that fits (≈ 90 B at 64×64, 8 warps). Bounded here so that it cannot grow.
KNOWN_SPILLS = {("_bwd_dkdv", 128, "CAP_GRAD=True"): 128}


def _ptxas() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception:  # noqa: BLE001 - triton or its NVIDIA backend missing: no ptxas
        return None
    return path if path and os.path.exists(path) else None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if _ptxas() is None:
        pytest.skip("triton's ptxas for sm_90a is not installed (triton/backends/nvidia/bin)")
    out = tmp_path_factory.mktemp("compile") / "sm90a.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, SCRIPT, "--ptx", "--pruned-only", "--dtypes", "fp16,bf16", "--head-dims", "64,128",
           "--scenarios", "core", "--no-others", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_targets_hopper_with_the_bundled_ptxas(report):
    assert report["target"] == "sm_90a"
    assert os.path.exists(report["ptxas"]["path"])


def test_every_kept_config_compiles_without_spills_on_wgmma(report):
    kept = [r for r in report["results"] if r["kept"]]
    assert kept
    problems = []
    for r in kept:
        name = f"{r['kernel']} {r['dtype']} D={r['head_dim']} [{r['variant']}] {r['config']}"
        if not r["ok"]:
            problems.append(f"{name}: {r['error'][:200]}")
            continue
        s = r["stats"]
        allowed = max([v for (k, d, flag), v in KNOWN_SPILLS.items()
                       if k == r["kernel"] and d == r["head_dim"] and flag in r["variant"]], default=0)
        if max(s["spill_stores"], s["spill_loads"]) > allowed:
            problems.append(f"{name}: spills {s['spill_stores']}/{s['spill_loads']} bytes ({s['registers']} regs)")
        if not s["smem_ok"]:
            problems.append(f"{name}: {s['shared']} bytes of shared memory")
        if s["counts"]["mma_sync"]:
            problems.append(f"{name}: {s['counts']['mma_sync']} mma.sync (not wgmma)")
        if r["kernel"] not in NO_GEMM_KERNELS and not s["counts"]["wgmma"]:
            problems.append(f"{name}: no wgmma")
    assert not problems, "\n".join(problems)


def test_covers_forward_with_and_without_capture_and_the_backward(report):
    seen = {(r["kernel"], r["dtype"], r["head_dim"]) for r in report["results"] if r["kept"]}
    scenarios = {s for r in report["results"] for s in r["scenarios"]}
    assert scenarios >= {"fwd", "bwd", "fwd+cap:probs/mean", "bwd+cap:logits/mean"}
    for dt in ("fp16", "bf16"):
        for d in (64, 128):
            kernels = {k for k, t, h in seen if t == dt and h == d}
            assert len(kernels) >= 3, (dt, d, kernels)  # the forward and at least two backward kernels
    fwd = [r for r in report["results"] if r["kept"] and "fwd" in r["scenarios"]]
    cap = [r for r in report["results"] if r["kept"] and "fwd+cap:probs/mean" in r["scenarios"]]
    assert fwd and cap and {r["variant"] for r in fwd}.isdisjoint({r["variant"] for r in cap})


def test_specialised_like_a_real_call(report):
    """The unit strides of diffusers' layout become constexpr 1 and the 16-divisible ones carry the hint."""
    fwd = next(r for r in report["results"] if r["kept"] and "fwd" in r["scenarios"] and r["head_dim"] == 64)
    assert {"stride_qd", "stride_kd", "stride_vd"} <= set(fwd["const_one"])
    assert {"stride_qn", "stride_kn", "Q", "K", "V"} <= set(fwd["divisible"])


def test_prune_keeps_listed_tensor_core_tiles(monkeypatch):
    """prune_configs (no compile): per kernel, dtype and head size, a non-empty subset of the candidates; for
    fp16 / bf16 only tiles whose GEMMs have at least 64 rows (wgmma), fewer than 4 stages at D = 256."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import seg4diff_fast.kernels.joint_attention as kj

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU candidate lists
    args = {"fwd": {"MAPS": None}, "dkdv": {"DK": None, "DV": None}, "dq": {"DQ": None}}
    for kernel, named in args.items():
        configs = kj._configs("fwd" if kernel == "fwd" else "bwd")
        assert len({str(c) for c in configs}) == len(configs)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (16, 32, 64, 128, 256):
                for cap in (False, True):
                    q = torch.empty(0, dtype=dtype)
                    extra = {"CAP_GRAD": cap} if kernel != "fwd" else {"CAPTURE": cap}
                    kept = kj.prune_configs(configs, {"Q": q, **named}, HEAD_DIM=d, **extra)
                    assert kept and all(c in configs for c in kept), (kernel, dtype, d)
                    assert len(kept) < len(configs), (kernel, dtype, d)
                    if dtype == torch.float32:
                        continue
                    for c in kept:
                        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                        # the query tile is every GEMM's M in fwd / dq; dk/dv also has key-tile-row GEMMs
                        assert bm >= 64 and (kernel != "dkdv" or bn >= 64), (kernel, d, str(c))
                        assert d < 256 or c.num_stages <= 2, (kernel, d, str(c))
