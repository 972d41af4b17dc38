"""One generation step of a width-reduced SD3 (real depth, real 1024² token count), with and without
attention-map capture: time and peak memory as ratios to the stock processors, in one run.

Variants (capture at one block = ``--layer``, and at every block):

- ``stock``        diffusers' ``JointAttnProcessor2_0`` on every layer, nothing captured;
- ``authors@…``    the authors' way: the captured layers materialise softmax(QKᵀ/√d) (B, H, N, N), take
                   ``P @ V`` from it and slice image rows × 77 CLIP columns, head mean;
- ``amd@…``        the peer package attention-map-diffusers 1.0 (``AttentionCapture``, its default "fast"
                   mode: keep q/k during the step, then ``compute()`` the image→text maps), restricted
                   to the 77 CLIP keys; install with ``pip install --no-deps attention-map-diffusers==1.0.0``;
- ``ours@…``       ``enable_fast_capture`` (every layer on ``joint_attention``).

Time = the transformer call plus whatever the method needs to hand over the maps (median of
``--reps`` interleaved repetitions, so machine noise hits every variant alike); on CPU the process's
CPU time by default (``--timer cpu``), which other programs on a shared machine barely disturb, on
CUDA the synchronised wall time. Peak memory = the
step's peak over the memory held before it: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
peak of torch's CPU allocator from the profiler's allocation events (after a warm-up). The maps of
every method are checked against ours at the one-block setting.

    python benchmarks/bench_pipeline.py                    # CPU: 2 heads × 64, batch 1
    python benchmarks/bench_pipeline.py --device cuda      # CUDA: SD3-medium width (24 heads), batch 2 (CFG)
    python benchmarks/bench_pipeline.py --json benchmarks/results/bench_pipeline_cpu.json

Goal on CPU: ours ≤ 1.03× stock time at one block, ≤ 1.10× at every block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types

import torch

SIZE_DEFAULT = 1024
CLIP_TOKENS = 77


# ------------------------------------------------------------------------------------------------
# model and inputs
def build_transformer(args) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=args.num_layers,  # SD3-medium: 24, the last one context_pre_only
        attention_head_dim=64,
        num_attention_heads=args.heads,
        joint_attention_dim=256,  # the text encoders' width only enters the context embedder
        caption_projection_dim=64 * args.heads,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=192,
    )
    model = model.eval().requires_grad_(False).to(args.device)
    return model if args.dtype == torch.float32 else model.to(args.dtype)


def make_inputs(args) -> dict:
    g = torch.Generator().manual_seed(1)
    lat = args.size // 8
    b = args.batch
    x = dict(
        hidden_states=torch.randn(b, 16, lat, lat, generator=g),
        encoder_hidden_states=torch.randn(b, args.text_tokens, 256, generator=g),
        pooled_projections=torch.randn(b, 64, generator=g),
        timestep=torch.full((b,), 515.0),
    )
    return {k: v.to(args.device, args.dtype if v.is_floating_point() and k != "timestep" else None)
            for k, v in x.items()}


# ------------------------------------------------------------------------------------------------
# the authors' materialising processor
class MaterializedJointAttnProcessor:
    """JointAttnProcessor2_0 with the attention computed by materialising the full softmax, as the
    paper's code does at the captured layer; keeps the (B, n_img, 77) head-mean map."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        d = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                      attn.add_v_proj(encoder_hidden_states))
        cq, ck, cv = (t.view(b, -1, heads, d).transpose(1, 2) for t in (cq, ck, cv))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, dim=-1)  # (B, H, N, N)
        self.store.append(probs[:, :, :n_img, n_img:n_img + CLIP_TOKENS].float().mean(1))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)
        out, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, context


# ------------------------------------------------------------------------------------------------
# variants: setup(model) -> state; finish(state) -> maps (B, L, n_img, 77) float32; teardown(model, state)
def _layers(args, which: str) -> list[int]:
    return [args.layer] if which == "1" else list(range(args.num_layers))


def variant(name: str, args):
    kind, _, which = name.partition("@")
    layers = _layers(args, which) if which else []

    if kind == "stock":
        return (lambda m: None), (lambda s: None), (lambda m, s: None)

    if kind == "authors":
        def setup(m):
            store: list = []
            saved = {}
            for i in layers:
                saved[i] = m.transformer_blocks[i].attn.processor
                m.transformer_blocks[i].attn.set_processor(MaterializedJointAttnProcessor(store))
            return store, saved

        def finish(state):
            store, _ = state
            maps = torch.stack(store, 1)
            store.clear()
            return maps

        def teardown(m, state):
            for i, proc in state[1].items():
                m.transformer_blocks[i].attn.set_processor(proc)

        return setup, finish, teardown

    if kind == "amd":
        from attention_map_diffusers import AttentionCapture

        def setup(m):
            patterns = [f"transformer_blocks.{i}.attn" for i in layers]
            cap = AttentionCapture(
                types.SimpleNamespace(transformer=m), relations="image->text", layers=patterns, timesteps="all",
                heads="mean", offload=None, relation_key_indices={"image->text": list(range(CLIP_TOKENS))},
                max_capture_bytes=None, allow_large_maps=True,
            )
            cap.install()
            return cap

        def finish(cap):
            cap.compute()
            by_layer = {r.layer_id: r.data for r in cap.records}
            maps = torch.stack([by_layer[f"transformer.transformer_blocks.{i}.attn"][:, 0] for i in layers], 1)
            cap.clear()
            return maps.float()

        def teardown(m, cap):
            cap.restore()

        return setup, finish, teardown

    if kind == "ours":
        from seg4diff_fast import disable_fast_capture, enable_fast_capture

        def setup(m):
            return enable_fast_capture(m, layers=layers, backend=args.backend)

        def finish(cap):
            maps = cap.maps  # (B, L, 77, h, w)
            cap.reset()
            return maps.flatten(-2).transpose(-1, -2)

        def teardown(m, cap):
            disable_fast_capture(m)

        return setup, finish, teardown

    raise ValueError(f"unknown variant {name!r}")


def _sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def run_step(model, inputs, finish, state, args):
    with torch.no_grad():
        model(**inputs)
        maps = finish(state)
    _sync(args)
    return maps


# ------------------------------------------------------------------------------------------------
# measurements
def _cpu_peak_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator holds while ``fn`` runs, over what it held before: the
    allocation events recorded by the profiler, summed in time order (the CPU analogue of
    ``torch.cuda.max_memory_allocated``; the CPU allocator caches nothing, so these are real)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def measure_memory(name: str, model, inputs, args) -> int:
    """Peak memory of one (already warmed-up) step of ``name`` over what was held before it."""
    setup, finish, teardown = variant(name, args)
    state = setup(model)
    try:
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run_step(model, inputs, finish, state, args)
            return torch.cuda.max_memory_allocated() - before
        return _cpu_peak_bytes(lambda: run_step(model, inputs, finish, state, args))
    finally:
        teardown(model, state)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--size", type=int, default=SIZE_DEFAULT, help="image side in pixels (1024 → 4096 image tokens)")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=None, help="attention heads of 64 (default: 2 on CPU, 24 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 2 (CFG) on CUDA")
    p.add_argument("--text-tokens", type=int, default=154, help="77 CLIP + 77 zero T5 positions (the paper)")
    p.add_argument("--layer", type=int, default=9, help="the one-block capture layer")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--timer", default=None, choices=["cpu", "wall"],
                   help="cpu: the process's CPU time (default on CPU: robust to other load on a shared machine); "
                        "wall: elapsed time (default on CUDA, with synchronisation)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--backend", default=None, help="joint_attention backend for ours (default: best available)")
    p.add_argument("--variants", default="stock,authors@1,authors@all,amd@1,amd@all,ours@1,ours@all")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    args.heads = args.heads or (24 if cuda else 2)
    args.batch = args.batch or (2 if cuda else 1)
    args.timer = args.timer or ("wall" if cuda else "cpu")
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "stock" not in names:
        names.insert(0, "stock")
    try:
        import attention_map_diffusers  # noqa: F401
    except ImportError:
        print("attention-map-diffusers is not installed (pip install --no-deps attention-map-diffusers==1.0.0); "
              "skipping its variants", file=sys.stderr)
        names = [n for n in names if not n.startswith("amd")]

    model = build_transformer(args)
    inputs = make_inputs(args)
    n_img = (args.size // 16) ** 2
    print(f"SD3 width-reduced: {args.num_layers} blocks, {args.heads} heads × 64, batch {args.batch}, "
          f"{n_img} image + {args.text_tokens} text tokens, {args.dtype}, {args.device}, "
          f"{args.threads} threads, {args.timer} time", flush=True)

    # correctness at one block: every method's maps against ours
    def maps_of(name):
        setup, finish, teardown = variant(name, args)
        state = setup(model)
        maps = run_step(model, inputs, finish, state, args)
        teardown(model, state)
        return maps.float()

    check = {}
    one_block = [n for n in names if n.endswith("@1")]
    if "ours@1" in one_block:
        ref = maps_of("ours@1")
        for name in one_block:
            check[name] = float((maps_of(name) - ref).abs().max() / ref.abs().max())

    # time: interleaved repetitions (one warm-up round first)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps + 1):
        for name in names:
            setup, finish, teardown = variant(name, args)
            state = setup(model)
            _sync(args)
            t0 = clock()
            run_step(model, inputs, finish, state, args)
            dt = clock() - t0
            teardown(model, state)
            if rep > 0:
                times[name].append(dt)
        if rep > 0:
            print(f"  round {rep}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    median = {n: statistics.median(v) for n, v in times.items()}

    memory = {}
    if not args.no_memory:
        for name in names:
            memory[name] = measure_memory(name, model, inputs, args)

    rows = []
    for name in names:
        rows.append({
            "variant": name,
            "time_s": median[name],
            "time_x_stock": median[name] / median["stock"],
            "times_s": times[name],
            "peak_mem_bytes": memory.get(name),
            "peak_mem_x_stock": (memory[name] / memory["stock"]) if memory.get("stock") else None,
            "maps_rel_err_vs_ours": check.get(name),
        })
    print(f"\n{'variant':14s} {'time':>9s} {'× stock':>8s} {'peak mem':>10s} {'× stock':>8s}  maps vs ours")
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / 2**20:8.1f}MB" if r["peak_mem_bytes"] is not None else "       -  "
        memx = f"{r['peak_mem_x_stock']:8.2f}" if r["peak_mem_x_stock"] is not None else "       -"
        err = f"{r['maps_rel_err_vs_ours']:.1e}" if r["maps_rel_err_vs_ours"] is not None else "-"
        print(f"{r['variant']:14s} {r['time_s']:8.3f}s {r['time_x_stock']:8.3f} {mem} {memx}  {err}")
    result = {
        "benchmark": "bench_pipeline",
        "device": args.device if not cuda else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "timer": args.timer,
        "torch": torch.__version__,
        "config": {"num_layers": args.num_layers, "heads": args.heads, "head_dim": 64, "batch": args.batch,
                   "image_tokens": n_img, "text_tokens": args.text_tokens, "dtype": str(args.dtype),
                   "capture_layer": args.layer, "reps": args.reps},
        "rows": rows,
        "goal_cpu": {"ours@1": 1.03, "ours@all": 1.10},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
