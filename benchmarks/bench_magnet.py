"""One MAGNET training step (forward + backward, LoRA rank 16) of a width-reduced SD3 at the real 1024²
token count: peak memory and time of ours against the materialized-capture way, in one run.

Variants (same model, same LoRA, same inputs, same loss weights 1.0 / 0.1 / 0.2):

- ``authors``  the authors' way: stock SDPA attention everywhere, and at the expert layer the raw
               scores computed a second time by materializing q·kᵀ (B, H, N, N) and slicing image rows ×
               77 CLIP columns; the mask loss upsamples the K predictions to the mask resolution with
               ``F.interpolate`` and evaluates focal/dice on the materialized (K, H, W) logits;
- ``ours``     ``enable_fast_capture(mode="logits")`` (every layer on ``joint_attention``, the maps from
               the same pass, their gradient through the op's backward) and the fused
               ``focal_dice_loss`` (Triton on CUDA, the chunked torch path on CPU).

Time: median of ``--reps`` interleaved steps (CPU: process CPU time; CUDA: synchronised wall time).
Peak memory: the step's peak over what was held before it (CUDA ``max_memory_allocated``; CPU the
allocator's events from the profiler, as bench_pipeline.py). The LoRA gradients of the two variants are
checked against each other.

    python benchmarks/bench_magnet.py --json benchmarks/results/bench_magnet_cpu.json
    python benchmarks/bench_magnet.py --device cuda --json benchmarks/results/bench_magnet_cuda.json
    python benchmarks/bench_magnet.py --gradient-checkpointing --json benchmarks/results/bench_magnet_cpu_gc.json

Goal: ours' peak memory ≤ 0.5× the authors' way at the same batch, step time no worse.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_pipeline import CLIP_TOKENS, _cpu_peak_bytes, build_transformer, make_inputs  # noqa: E402

from seg4diff_fast import disable_fast_capture, enable_fast_capture  # noqa: E402
from seg4diff_fast.magnet import add_magnet_lora, focal_dice_loss  # noqa: E402


class TwiceAtCaptureProcessor:
    """The stock joint attention (SDPA) plus, for the map, the raw scores again from a materialized
    q·kᵀ (the authors' capture in training); keeps the (B, n_img, 77) head-mean scores with their graph."""

    def __init__(self, stock, store: list):
        self.stock, self.store = stock, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads
        q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
        d = k.shape[-1] // heads
        q, k = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        ck = attn.add_k_proj(encoder_hidden_states).view(b, -1, heads, d).transpose(1, 2)
        cq = attn.add_q_proj(encoder_hidden_states).view(b, -1, heads, d).transpose(1, 2)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        qq, kk = torch.cat([q, cq], 2), torch.cat([k, ck], 2)
        scores = torch.matmul(qq, kk.transpose(-1, -2)) * d**-0.5  # (B, H, N, N)
        self.store.append(scores[:, :, :n_img, n_img:n_img + CLIP_TOKENS].float().mean(1))
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def materialized_focal_dice(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Focal/dice the plain way: (K, H, W) upsampled logits and every intermediate kept for backward."""
    x = F.interpolate(pred[None], size=target.shape[-2:], mode="bilinear", align_corners=False)[0]
    t = target.float()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma
    focal = focal.flatten(1).mean(1).mean()
    dice = 1 - (2 * (p * t).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    return focal, dice.mean()


def _class_preds(maps: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """(B, 77, h, w) → (B·K, h, w): each class = mean of its tokens' maps."""
    return torch.cat([torch.stack([m[g].mean(0) for g in groups]) for m in maps])


def variant(name: str, model, args):
    """setup() -> state; maps(state) -> (B, 77, h, w); loss_fn; teardown(state)."""
    hw = args.size // 16
    if name == "authors":
        def setup():
            store: list = []
            attn = model.transformer_blocks[args.layer].attn
            saved = attn.processor
            attn.set_processor(TwiceAtCaptureProcessor(saved, store))
            return store, saved

        def maps(state):
            m = state[0].pop()
            return m.transpose(1, 2).unflatten(-1, (hw, hw))

        def teardown(state):
            model.transformer_blocks[args.layer].attn.set_processor(state[1])

        return setup, maps, materialized_focal_dice, teardown

    if name == "ours":
        def setup():
            return enable_fast_capture(model, layers=[args.layer], tokens=range(CLIP_TOKENS), mode="logits",
                                       cfg=False, backend=args.backend)

        def maps(cap):
            m = cap.maps[:, 0]
            cap.reset()
            return m

        def teardown(cap):
            disable_fast_capture(model)

        return setup, maps, (lambda p, t: focal_dice_loss(p, t)), teardown
    raise ValueError(name)


def train_step(model, inputs, target, masks, groups, name, args):
    setup, get_maps, loss_fn, teardown = variant(name, model, args)
    state = setup()
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=args.amp, enabled=args.amp is not None):
            out = model(**inputs, return_dict=False)[0]
            fm = F.mse_loss(out.float(), target)
            preds = _class_preds(get_maps(state), groups)
            focal, dice = loss_fn(preds.float(), masks)
            loss = fm + 0.1 * focal + 0.2 * dice
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())
    finally:
        teardown(state)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", type=int, default=1024, help="image side (1024 → 4096 image tokens)")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=None, help="heads of 64 (default: 2 on CPU, 24 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--classes", type=int, default=8, help="target masks per image")
    p.add_argument("--mask-size", type=int, default=None, help="target mask side (default: --size)")
    p.add_argument("--text-tokens", type=int, default=154)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--backend", default=None)
    p.add_argument("--amp", default=None, choices=[None, "fp16", "bf16"], help="autocast (default: fp16 on CUDA)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in backward (MagnetConfig.gradient_checkpointing), both variants")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.heads = args.heads or (24 if cuda else 2)
    args.batch = args.batch or (4 if cuda else 1)
    args.amp = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.amp or ("fp16" if cuda else None)]
    args.dtype = torch.float32  # LoRA training: float32 weights (autocast for mixed precision)
    torch.set_num_threads(args.threads)
    model = build_transformer(args)
    add_magnet_lora(model, rank=16, alpha=16)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    inputs = make_inputs(args)
    g = torch.Generator().manual_seed(2)
    hw = args.size // 16
    target = torch.randn(args.batch, 16, hw * 2, hw * 2, generator=g).to(args.device)
    ms = args.mask_size or args.size
    masks = (torch.rand(args.batch * args.classes, ms, ms, generator=g) > 0.5).to(args.device)
    groups = [[1 + 2 * j, 2 + 2 * j] for j in range(args.classes)]
    clock = time.perf_counter if cuda else time.process_time
    print(f"SD3 width-reduced + LoRA r16{' + gradient checkpointing' if args.gradient_checkpointing else ''}: "
          f"{args.num_layers} blocks, {args.heads} heads × 64, batch {args.batch}, "
          f"{hw * hw} image + {args.text_tokens} text tokens, {args.classes} masks of {ms}² per image, "
          f"{args.device}, {args.threads} threads", flush=True)

    names = ["authors", "ours"]
    grads = {}
    for name in names:  # warm-up + gradient check
        train_step(model, inputs, target, masks, groups, name, args)
        grads[name] = torch.cat([p.grad.flatten().float() for n, p in model.named_parameters() if "lora_" in n])
    grad_err = float((grads["ours"] - grads["authors"]).norm() / grads["authors"].norm())
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            t0 = clock()
            train_step(model, inputs, target, masks, groups, name, args)
            times[name].append(clock() - t0)
        print(f"  round {rep + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    memory = {}
    if not args.no_memory:
        for name in names:
            if cuda:
                torch.cuda.synchronize()
                model.zero_grad(set_to_none=True)
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                train_step(model, inputs, target, masks, groups, name, args)
                memory[name] = torch.cuda.max_memory_allocated() - before
            else:
                model.zero_grad(set_to_none=True)
                memory[name] = _cpu_peak_bytes(lambda n=name: train_step(model, inputs, target, masks, groups, n,
                                                                          args))
    med = {n: statistics.median(v) for n, v in times.items()}
    rows = [{"variant": n, "time_s": med[n], "time_x_authors": med[n] / med["authors"], "times_s": times[n],
             "peak_mem_bytes": memory.get(n),
             "peak_mem_x_authors": memory[n] / memory["authors"] if memory.get("authors") else None} for n in names]
    print(f"\n{'variant':10s} {'time':>9s} {'× authors':>10s} {'peak mem':>11s} {'× authors':>10s}")
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / 2**20:9.1f}MB" if r["peak_mem_bytes"] is not None else "        -  "
        memx = f"{r['peak_mem_x_authors']:10.3f}" if r["peak_mem_x_authors"] is not None else "         -"
        print(f"{r['variant']:10s} {r['time_s']:8.3f}s {r['time_x_authors']:10.3f} {mem} {memx}")
    print(f"LoRA gradient, ours vs authors: relative error {grad_err:.2e}")
    result = {
        "benchmark": "bench_magnet",
        "device": torch.cuda.get_device_name() if cuda else args.device,
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "timer": "wall" if cuda else "cpu", "torch": torch.__version__,
        "config": {"num_layers": args.num_layers, "heads": args.heads, "head_dim": 64, "batch": args.batch,
                   "image_tokens": hw * hw, "text_tokens": args.text_tokens, "masks_per_image": args.classes,
                   "mask_size": ms, "capture_layer": args.layer, "lora_rank": 16, "reps": args.reps,
                   "amp": str(args.amp), "gradient_checkpointing": args.gradient_checkpointing},
        "rows": rows, "lora_grad_rel_err": grad_err,
        "goal": {"peak_mem_x_authors": 0.5, "time_x_authors": 1.0},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

