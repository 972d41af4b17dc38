"""The GPU suite's CPU rehearsal (``benchmarks/gpu_suite.py --dry-run``) and the roofline's FLOP counts.

The dry run drives the whole suite (kernels through Triton's interpreter, the four benchmark scripts at
small sizes, the tests, the roofline, the goals) and must leave one JSON holding every section; on a GPU
the same code runs at SD3 / Flux sizes. The roofline's forward FLOPs are checked against a count done
here from the definition of attention, independently of roofline.py's formula.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHON": sys.executable}
    # through the shell entry point, as on a GPU machine; a generous budget: the rehearsal takes about
    # 3 minutes on one idle core, more on a loaded machine
    cmd = ["bash", os.path.join(BENCH, "gpu_suite.sh"), "--dry-run", "--budget-s", "900", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    suite = _load("gpu_suite")
    assert report["meta"]["dry_run"] is True
    assert list(report["sections"]) == list(suite.SECTIONS)
    bad = {k: (v["status"], v.get("error"), (v.get("result") or {}).get("tail", "")[-500:] if isinstance(
        v.get("result"), dict) else "") for k, v in report["sections"].items() if v["status"] != "ok"}
    assert not bad, bad
    sec = {k: v["result"] for k, v in report["sections"].items()}
    for shape in ("sd3", "flux"):
        k = sec["kernels"][shape]
        assert set(k["ours"]) >= {"fwd_nocap_ms", "fwd_cap_ms", "bwd_out_ms", "bwd_map_ms"}
        assert all(v > 0 for v in k["ours"].values())
        assert "flash" in k["sdpa"] and "efficient" in k["sdpa"]  # timed, or "unavailable" with the reason
        assert k["check"]["maps_rel_err_vs_fp64"] < 1e-4  # fp32 through the interpreter
        assert k["check"]["out_max_abs_vs_sdpa_fp32"] < 1e-4
        prof = sec["kernel_profile"][shape]
        assert all(prof[run] for run in ("fwd_nocap", "fwd_cap", "bwd_out", "bwd_map"))
        m = sec["memory"][shape]
        assert m["sdpa_fwd_peak"] > 0 and m["ours_cap_fwd_peak"] > 0 and m["map_bytes"] > 0
        assert m["bound"] == pytest.approx(1.05 * m["sdpa_fwd_peak"] + m["map_bytes"])
        g = sec["goals"][shape]
        assert set(g) == {"1_fwd_nocap_vs_best_sdpa", "2_capture_overhead_154_cols", "3_fwd_bwd_vs_best_sdpa",
                          "4_peak_memory"}
        assert all(e["value"] is not None for e in g.values())
    assert sec["autotune"], "no autotuned kernel found"
    assert sec["tests"]["counts"].get("passed", 0) > 0 and not sec["tests"]["counts"].get("failed")
    for bench in ("bench_attention", "bench_pipeline", "bench_segment", "bench_magnet"):
        assert sec[bench]["rc"] == 0 and sec[bench]["result"], bench
    assert any(r["shape"] == "sd3" for r in sec["roofline"]["rows"])


def _attention_flops_by_definition(b: int, h: int, n: int, d: int, r: int, c: int, passes: int) -> int:
    """Multiply-adds of softmax(q kᵀ) v counted term by term, ×2 FLOPs each, plus the capture's q·k_sel."""
    qk = n * n * d  # every (query, key) pair: a d-long dot product
    pv = n * d * n  # every (query, feature): a sum over n keys
    capture = passes * r * c * d  # every (captured row, selected column): a d-long dot product, per pass
    return 2 * b * h * (qk + pv + capture)


@pytest.mark.parametrize("shape", ["sd3", "flux"])
@pytest.mark.parametrize("mode,passes", [(None, 0), ("probs", 1), ("logits", 1), ("sel_probs", 2)])
def test_roofline_forward_flops(shape, mode, passes):
    roofline = _load("roofline")
    s = roofline.SHAPES[shape]
    got = roofline.fwd_flops(s["B"], s["H"], s["N"], s["D"], s["R"], s["C"], mode)
    assert got == _attention_flops_by_definition(s["B"], s["H"], s["N"], s["D"], s["R"], s["C"], passes)
    assert got == 4 * s["B"] * s["H"] * s["N"] ** 2 * s["D"] + passes * 2 * s["B"] * s["H"] * s["R"] * s["C"] * s["D"]
    rows = {c.kernel: c for c in roofline.forward_costs(**s)}
    assert rows["fwd (no capture)"].flops == _attention_flops_by_definition(s["B"], s["H"], s["N"], s["D"], 0, 0, 0)


def test_roofline_backward_gemm_counts():
    """7-GEMM (S recomputed twice) against 5-GEMM: 14 vs 10 · B·H·N²·D, i.e. 3.5× and 2.5× the forward."""
    roofline = _load("roofline")
    s = roofline.SHAPES["sd3"]
    rows = {c.kernel: c for c in roofline.backward_costs(**s)}
    fwd = 4 * s["B"] * s["H"] * s["N"] ** 2 * s["D"]
    extra = 2 * s["B"] * s["H"] * s["N"] * s["D"]  # D_i = rowsum(dO·O)
    assert rows["backward 7-GEMM total (out only)"].flops == pytest.approx(3.5 * fwd + extra)
    assert rows["backward 5-GEMM total (out only)"].flops == pytest.approx(2.5 * fwd + extra)
    parts = ("_bwd_preprocess (D = rowsum dO·O)", "_bwd_dkdv 4-GEMM (S, dV, dP, dK)", "_bwd_dq 3-GEMM (S, dP, dQ)")
    assert sum(rows[p].flops for p in parts) == pytest.approx(rows["backward 7-GEMM total (out only)"].flops)
    parts = ("_bwd_preprocess (D = rowsum dO·O)", "_bwd_dkdv 5-GEMM (S, dV, dP, dK, dQ atomics)")
    assert sum(rows[p].flops for p in parts) == pytest.approx(rows["backward 5-GEMM total (out only)"].flops)
