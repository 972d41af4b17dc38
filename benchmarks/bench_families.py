"""Every MM-DiT family the package reads, at the real 1024² token counts: what capture and early exit cost.

For SD3 (``SD3Transformer2DModel``), Flux.1 (``FluxTransformer2DModel``), Flux.2 (``Flux2Transformer2DModel``)
and Qwen-Image (``QwenImageTransformer2DModel``) a width-reduced transformer (``--heads`` heads of the family's
head_dim: 64 for SD3, 128 for the others; the real latent channels; fewer blocks than the real model, the
count recorded) reads 64×64 = 4096 image tokens and the family's real text length: SD3 77 CLIP + 77 zero T5
= 154, Flux.1 512 T5, Flux.2 512 (chat template padded to ``max_sequence_length``), Qwen-Image the prompt's
own (a 35-token prompt + 5 template tokens = 40). One run, per family, interleaved repetitions (median):

1. one transformer forward (``PipelineReader.forward``: the family's packing / ids / ``img_shapes``) with

   - ``stock``: diffusers' stock attention processors, nothing captured (the baseline);
   - ``capture@L``: ``enable_fast_capture(transformer, layers=[L])``, the maps fetched;
   - ``capture@all``: ``enable_fast_capture(transformer, layers=range(n))``;

   CPU time (``time.process_time``, as ``bench_pipeline.py``: other jobs on a shared machine barely move it)
   and peak memory (``seg4diff_fast.utils.peak_memory``: torch's CPU allocations above what was held
   before, from the profiler's records), both as ratios to ``stock``;
2. the segmentation read, ``PipelineReader.read(latents, text, layers=[L])`` on the family's tiny pipeline
   (``seg4diff_fast.testing``) with its transformer replaced by the one above: with early exit (the default:
   the forward stops right after block L's attention) and without (``PipelineReader(pipe, early_exit=False)``,
   the whole forward with capture at L): reads per CPU second and the ratio.

Checked in the same run: the maps at L of ``capture@L`` equal those of ``capture@all`` at L, and the
early-exit read's maps equal the full read's and ``capture@L``'s.

L is the block at the family's expert depth in the reduced stack: SD3 9/24 (the paper), Flux.1 12/57 (the
paper's layer 12, a double-stream block), Flux.2 and Qwen-Image 9/24 (the reader's estimate for families
without paper numbers); ``--layer fam=L`` overrides it.

    python benchmarks/bench_families.py --json benchmarks/results/families_cpu.json   # ~6 CPU-minutes
    python benchmarks/bench_families.py --families sd3 --blocks sd3=24 --reps 3       # SD3-medium's depth
    # options: --heads H  --reps R  --threads T  --blocks sd3=8,flux=2+2,flux2=1+2,qwenimage=3  --no-memory
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time

# OpenMP workers sleep at barriers instead of spinning: on 2 shared cores a spinning thread that waits for a
# descheduled peer bills its wait as CPU time (twice the quiet figure, and noisy, under load). Set before
# torch loads its OpenMP runtime; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

GRID = 64  # 64×64 = 4096 image tokens: a 1024² image at 16 pixels per token
# the real models, for reference (recorded in the JSON next to the reduced configs)
REAL = {
    "sd3": {"model": "SD3-medium", "blocks": 24, "heads": 24, "head_dim": 64, "layer": 9},
    "flux": {"model": "Flux.1-dev", "blocks": "19+38", "heads": 24, "head_dim": 128, "layer": 12},
    "flux2": {"model": "Flux.2-dev", "blocks": "8+48", "heads": 48, "head_dim": 128, "layer": 21},
    "qwenimage": {"model": "Qwen-Image", "blocks": 60, "heads": 24, "head_dim": 128, "layer": 22},
}
LABEL = {"sd3": "SD3", "flux": "Flux.1", "flux2": "Flux.2", "qwenimage": "Qwen-Image"}
# relative depth of the read layer (the paper's layer, or the reader's 9/24 estimate)
DEPTH = {"sd3": 9 / 24, "flux": 12 / 57, "flux2": 9 / 24, "qwenimage": 9 / 24}
DEFAULT_BLOCKS = {"sd3": "8", "flux": "2+2", "flux2": "1+2", "qwenimage": "3"}
QWEN_TEXT = 40
# a 35-token prompt of words the tiny Qwen tokenizer knows whole: 35 + 5 template tokens = 40 text positions
QWEN_PROMPT = ("a photo of a red cat and a blue dog on the green grass with a tree and a house at the road in "
               "the sky with a bird and water on a blue table")

VARIANTS = ("stock", "capture@L", "capture@all", "read early-exit", "read full")


# ------------------------------------------------------------------------------------------------
# models
def _blocks(spec: str) -> tuple[int, int]:
    """"8" → (8, 0); "2+2" → (2 double-stream, 2 single-stream)."""
    a, _, b = spec.partition("+")
    return int(a), int(b or 0)


def build(name: str, spec: str, heads: int):
    """(pipeline with the width-reduced transformer, clean latents (1, C, h, w), reader kwargs, config dict)."""
    from diffusers import (
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
    )

    from seg4diff_fast import testing

    double, single = _blocks(spec)
    n = double + single
    torch.manual_seed(0)
    if name == "sd3":
        pipe = testing.tiny_sd3_pipeline(t5=False)
        tiny = pipe.transformer.config
        head_dim, channels, grid = 64, 16, 2 * GRID
        tr = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=channels, num_layers=n, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=tiny.joint_attention_dim,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=tiny.pooled_projection_dim,
            out_channels=channels, pos_embed_max_size=192,
        )
        reader_kw = {"text_length": 77}  # 77 zero T5 positions after the 77 CLIP ones
        prompt = "a photo of a cat on a red sofa"
    elif name == "flux":
        pipe = testing.tiny_flux_pipeline()
        tiny = pipe.transformer.config
        head_dim, channels, grid = 128, 16, 2 * GRID  # 16 latent channels, packed 2×2 into 64
        tr = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * channels, num_layers=double, num_single_layers=single,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=tiny.joint_attention_dim,
            pooled_projection_dim=tiny.pooled_projection_dim, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )
        reader_kw = {"text_length": 512}
        prompt = "a photo of a cat on a red sofa"
    elif name == "flux2":
        pipe = testing.tiny_flux2_pipeline(is_distilled=True)
        tiny = pipe.transformer.config
        head_dim, channels, grid = 128, 128, GRID  # the 2×2-patchified 128-channel grid, one token per cell
        tr = Flux2Transformer2DModel(
            patch_size=1, in_channels=channels, num_layers=double, num_single_layers=single,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=tiny.joint_attention_dim,
            timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
            guidance_embeds=False,
        )
        reader_kw = {"text_length": 512}
        prompt = "a photo of a cat on a red sofa"
    elif name == "qwenimage":
        pipe = testing.tiny_qwenimage_pipeline()
        tiny = pipe.transformer.config
        head_dim, channels, grid = 128, 16, 2 * GRID  # 16 latent channels, packed 2×2 into 64
        tr = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * channels, out_channels=channels, num_layers=n, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=tiny.joint_attention_dim, guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        )
        reader_kw = {}  # the text length is the prompt's own (max_sequence_length 512)
        prompt = QWEN_PROMPT
    else:
        raise ValueError(f"unknown family {name!r}")
    pipe.transformer = tr.eval().requires_grad_(False)
    layer = min(int(round(DEPTH[name] * n)), n - 1)
    if name == "flux":
        layer = min(layer, double - 1)  # the paper's layer 12 is a double-stream block
    latents = torch.randn(1, channels, grid, grid, generator=torch.Generator().manual_seed(1))
    # resolution only sets the scheduler's dynamic shift here: the one of a 64×64-token image
    reader_kw["resolution"] = 256
    config = {"blocks": n, "double_blocks": double if single else None, "single_blocks": single or None,
              "heads": heads, "head_dim": head_dim, "latent": list(latents.shape[1:]), "layer": layer,
              "prompt": prompt, "real": REAL[name]}
    return pipe, latents, reader_kw, config


# ------------------------------------------------------------------------------------------------
# the variants: each a callable returning the maps (or None)
def variants(reader_full, reader_early, latents, text, layer: int, n: int) -> dict:
    from seg4diff_fast import disable_fast_capture, enable_fast_capture

    tr = reader_full.transformer
    ts = reader_full.timestep.expand(latents.shape[0])

    def forward():
        with torch.no_grad():
            reader_full.forward(tr, latents, text, ts)

    def capture(layers):
        def run():
            cap = enable_fast_capture(tr, layers=list(layers))
            try:
                forward()
                return cap.maps
            finally:
                disable_fast_capture(tr)
        return run

    return {
        "stock": lambda: forward(),
        "capture@L": capture([layer]),
        "capture@all": capture(range(n)),
        "read early-exit": lambda: reader_early.read(latents, text, layers=[layer]),
        "read full": lambda: reader_full.read(latents, text, layers=[layer]),
    }


def processor_names(tr) -> list[str]:
    return sorted({type(m.processor).__name__ for m in tr.modules() if hasattr(m, "processor")})


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"shape_a": list(a.shape), "shape_b": list(b.shape),
            "max_abs": float((a - b).abs().max()) if a.shape == b.shape else None,
            "ref_max": float(b.abs().max()),
            "allclose": bool(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-7))}


def bench_family(name: str, spec: str, args) -> dict:
    from seg4diff_fast.reader import PipelineReader
    from seg4diff_fast.utils import peak_memory

    t_build = time.perf_counter()
    pipe, clean, reader_kw, config = build(name, spec, args.heads)
    if name in args.layer:
        config["layer"] = args.layer[name]
    layer = config["layer"]
    reader_full = PipelineReader(pipe, early_exit=False, **reader_kw)
    reader_early = PipelineReader(pipe, **reader_kw)
    n = reader_full.num_layers
    latents = reader_full.noise(clean)
    text = reader_full.encode_text([config["prompt"]])
    config.update(n_img=GRID * GRID, n_txt=text.length, timestep=float(reader_full.timestep),
                  stock_processors=processor_names(reader_full.transformer))
    if name == "qwenimage" and text.length != QWEN_TEXT:
        print(f"  note: the Qwen-Image prompt gives {text.length} text positions, not {QWEN_TEXT}", flush=True)
    if config["blocks"] != n:
        raise RuntimeError(f"{name}: {n} blocks counted, {config['blocks']} built")
    print(f"\n{LABEL[name]}: {n} blocks ({spec}), {args.heads} heads × {config['head_dim']}, "
          f"{config['n_img']} image + {config['n_txt']} text tokens, layer {layer}", flush=True)
    runs = variants(reader_full, reader_early, latents, text, layer, n)

    # warm-up round, which is also the correctness check
    maps = {k: fn() for k, fn in runs.items()}
    after = processor_names(reader_full.transformer)
    all_at_l = maps["capture@all"][:, layer:layer + 1]
    check = {
        "capture@L vs capture@all at L": _diff(maps["capture@L"], all_at_l),
        "read early-exit vs read full": _diff(maps["read early-exit"], maps["read full"]),
        "read full vs capture@L": _diff(maps["read full"], maps["capture@L"]),
        "maps_shape": list(maps["capture@L"].shape),
        "stock processors restored": after == config["stock_processors"],
    }
    check["ok"] = all(v["allclose"] for v in check.values() if isinstance(v, dict)) and \
        check["stock processors restored"]
    print(f"  check: {'ok' if check['ok'] else 'FAILED'} "
          + ", ".join(f"{k}: {v['max_abs']:.1e}" for k, v in check.items() if isinstance(v, dict)), flush=True)
    del maps, all_at_l

    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.reps):
        for k, fn in runs.items():
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            c1, w1 = time.process_time(), time.perf_counter()
            del out
            cpu[k].append(c1 - c0)
            wall[k].append(w1 - w0)
        print(f"  round {rep + 1}: " + ", ".join(f"{k} {cpu[k][-1]:.2f}s" for k in runs), flush=True)

    peak: dict[str, int | None] = {k: None for k in runs}
    if not args.no_memory:
        for k, fn in runs.items():
            gc.collect()
            _, peak[k] = peak_memory(fn, "cpu")

    med = {k: statistics.median(v) for k, v in cpu.items()}
    rows = {}
    for k in runs:
        rows[k] = {
            "cpu_ms": 1e3 * med[k], "cpu_ms_all": [1e3 * t for t in cpu[k]],
            "wall_ms": 1e3 * statistics.median(wall[k]), "wall_ms_all": [1e3 * t for t in wall[k]],
            "peak_mib": None if peak[k] is None else peak[k] / 2**20,
        }
        if k in ("stock", "capture@L", "capture@all"):
            rows[k]["cpu_x_stock"] = med[k] / med["stock"]
            # the same ratio taken within each round, then the median: robust to load drifting between rounds
            rows[k]["cpu_x_stock_paired"] = statistics.median(a / b for a, b in zip(cpu[k], cpu["stock"]))
            rows[k]["peak_x_stock"] = (peak[k] / peak["stock"]) if peak[k] is not None and peak["stock"] else None
    reads = {
        "early_exit_reads_per_cpu_s": 1.0 / med["read early-exit"],
        "full_reads_per_cpu_s": 1.0 / med["read full"],
        "speedup": med["read full"] / med["read early-exit"],
        "speedup_paired": statistics.median(a / b for a, b in zip(cpu["read full"], cpu["read early-exit"])),
        "early_exit_peak_x_full": (peak["read early-exit"] / peak["read full"])
        if peak["read full"] else None,
        "blocks_run_early_exit": f"{layer} blocks + block {layer}'s attention of {n}",
    }
    result = {"config": config, "variants": rows, "reads": reads, "check": check,
              "seconds": time.perf_counter() - t_build, "loadavg_after": list(os.getloadavg())}
    del runs, reader_full, reader_early, pipe, latents, text, clean
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------
# output
def table(results: dict) -> str:
    lines = [
        "| family | blocks | heads × d | tokens img + txt | L | variant | CPU ms | × stock | × stock paired "
        "| peak MiB | × stock |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        c = r["config"]
        blocks = f"{c['double_blocks']}+{c['single_blocks']}" if c["single_blocks"] else str(c["blocks"])
        for k in ("stock", "capture@L", "capture@all"):
            v = r["variants"][k]
            mib = "-" if v["peak_mib"] is None else f"{v['peak_mib']:.1f}"
            px = "-" if v["peak_x_stock"] is None else f"{v['peak_x_stock']:.2f}"
            lines.append(f"| {LABEL[name]} | {blocks} | {c['heads']} × {c['head_dim']} | {c['n_img']} + {c['n_txt']} "
                         f"| {c['layer']} | {k} | {v['cpu_ms']:.0f} | {v['cpu_x_stock']:.3f} "
                         f"| {v['cpu_x_stock_paired']:.3f} | {mib} | {px} |")
    lines += [
        "",
        "| family | L of n | read early-exit: CPU ms | reads/CPU s | read full: CPU ms | reads/CPU s | speedup "
        "| paired | peak MiB early / full | maps check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in results.items():
        c, v, rd = r["config"], r["variants"], r["reads"]
        pe, pf = v["read early-exit"]["peak_mib"], v["read full"]["peak_mib"]
        mem = "-" if pe is None else f"{pe:.1f} / {pf:.1f}"
        ck = r["check"]
        err = max(d["max_abs"] for d in ck.values() if isinstance(d, dict) and d["max_abs"] is not None)
        lines.append(f"| {LABEL[name]} | {c['layer']} of {c['blocks']} | {v['read early-exit']['cpu_ms']:.0f} "
                     f"| {rd['early_exit_reads_per_cpu_s']:.2f} | {v['read full']['cpu_ms']:.0f} "
                     f"| {rd['full_reads_per_cpu_s']:.2f} | {rd['speedup']:.2f}× | {rd['speedup_paired']:.2f}× | {mem} "
                     f"| {'ok' if ck['ok'] else 'FAILED'} (max abs {err:.1e}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="sd3,flux,flux2,qwenimage")
    p.add_argument("--blocks", default="", help="per family: sd3=8,flux=2+2 (double+single),flux2=1+2,qwenimage=3")
    p.add_argument("--layer", default="", help="per family read layer, e.g. sd3=3 (default: the expert depth)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed rounds after the warm-up / check round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = dict(DEFAULT_BLOCKS)
    blocks.update(dict(kv.split("=") for kv in args.blocks.split(",") if kv))
    args.layer = {k: int(v) for k, v in (kv.split("=") for kv in args.layer.split(",") if kv)}
    families = [f.strip() for f in args.families.split(",") if f.strip()]

    load0 = list(os.getloadavg())
    t0 = time.perf_counter()
    results = {name: bench_family(name, blocks[name], args) for name in families}
    total = time.perf_counter() - t0
    text = table(results)
    print("\n" + text)
    import diffusers

    out = {
        "benchmark": "bench_families",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_families.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_start": load0, "loadavg_end": list(os.getloadavg())},
        "timer": "cpu (time.process_time) for the medians; wall times recorded alongside; *_paired: median of "
                 "the per-round ratios",
        "reps": args.reps,
        "dtype": "float32",
        "batch": 1,
        "note": "width-reduced transformers (heads × head_dim below), fewer blocks than the real models "
                "(config.blocks; config.real gives the real model's); real 1024² token counts",
        "total_seconds": total,
        "families": results,
        "all_checks_ok": all(r["check"]["ok"] for r in results.values()),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"\ntotal {total:.0f} s; checks {'ok' if out['all_checks_ok'] else 'FAILED'}")
    return out


if __name__ == "__main__":
    main()
