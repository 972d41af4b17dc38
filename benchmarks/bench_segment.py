"""Segmenting one image: ``Seg4DiffSegmenter`` against the paper's way, on the same model, in one run.

Model: a width-reduced SD3 at the real 1024² token count (random weights, built offline): 24 joint
blocks (SD3-medium's depth), ``--heads`` × 64 (2 on CPU), 16 latent channels, a VAE with SD3's ×8
downsampling (4 small blocks), tiny CLIP encoders; a 1024² input → 64×64 = 4096 image tokens + 77 CLIP +
77 zero T5 positions. Image: ``--height`` × ``--width`` (683 × 1024, ADE-like), ``--classes`` names.

- ``paper``: the authors' way: the same preprocessing (VAE, noise, text), then a FULL transformer
  forward (all 24 blocks) with diffusers' stock processors except at the capture layer, where the full
  softmax (B, H, N, N) is materialised and the image-rows × 77-CLIP-columns slice kept; class maps;
  ``F.interpolate`` of the K maps to the image's size (K × H × W) and ``argmax``.
- ``ours``: ``Seg4DiffSegmenter(pipe, layer=9)``: the transformer stops right after layer 9's attention,
  maps from the fused ``joint_attention`` (nothing N²), fused ``upsample_argmax`` (nothing K × H × W).

Time: wall time of one call, after one warm-up call (the memory measurement). Peak memory: torch's
allocator peak during the call over what was held before (``seg4diff_fast.utils.peak_memory``; on CPU
from the profiler's allocation events). The label maps of the two are compared.

Chunked vocabularies: the same ``--classes`` names (they fit one prompt) are also run split into
prompts of at most ``--chunk-tokens`` tokens, merged with ``chunk_merge="none"`` and ``"image-mass"``;
reported: the share of pixels whose label equals the single-prompt label. On random weights this says
how much merging disturbs the labels of an untrained model, not of SD3; pass ``--model PATH`` (a real
SD3 folder) on a GPU for real numbers.

    python benchmarks/bench_segment.py                      # CPU, writes benchmarks/results/segment_cpu.json
    python benchmarks/bench_segment.py --device cuda --heads 24 --json benchmarks/results/segment_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _report import write_block  # noqa: E402
from bench_pipeline import MaterializedJointAttnProcessor  # noqa: E402

from seg4diff_fast import Seg4DiffSegmenter  # noqa: E402
from seg4diff_fast.segment.prompts import plan_prompts  # noqa: E402
from seg4diff_fast.utils import peak_memory  # noqa: E402

CLASSES = ("cat,dog,sofa,tree,sky,grass,road,house,car,person,water,table,bird,red,blue,green,photo,"
           "sunset,a,the")
MARK_START, MARK_END = "<!-- bench_segment:start -->", "<!-- bench_segment:end -->"


def build_pipeline(args):
    """A width-reduced SD3 pipeline with SD3-medium's depth and token count (random weights, offline)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from seg4diff_fast.testing.tiny import _clip_text_encoder, tiny_clip_tokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=args.num_layers, attention_head_dim=64,
        num_attention_heads=args.heads, joint_attention_dim=32, caption_projection_dim=64 * args.heads,
        pooled_projection_dim=32, out_channels=16, pos_embed_max_size=192,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5305,
    )
    tok = tiny_clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip_text_encoder(len(tok), 16, True), tokenizer=tok,
        text_encoder_2=_clip_text_encoder(len(tok), 16, True), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None,
    )
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval().requires_grad_(False)
    return pipe.to(args.device) if args.dtype == torch.float32 else pipe.to(args.device, args.dtype)


def paper_segment(seg: Seg4DiffSegmenter, image: torch.Tensor, classes: list[str]):
    """The authors' way on the same model and inputs: full forward, materialised capture, K×H×W upsample."""
    reader = seg.reader
    tensors, sizes = reader.prepare([image])
    latents = reader.latents(tensors)
    chunk = reader.token_positions(classes)[0]
    text = reader.encode_text([chunk.prompt])
    tr = seg.transformer
    layer = seg.layers[0]
    attn = tr.transformer_blocks[layer].attn
    stock = attn.processor
    store: list = []
    attn.set_processor(MaterializedJointAttnProcessor(store))
    try:
        with torch.no_grad():
            reader.forward(tr, latents, text, reader.timestep.expand(1).to(latents.device))
    finally:
        attn.set_processor(stock)
    h = w = seg.resolution // seg.vae_scale // seg.patch
    maps = store[0][0].transpose(0, 1).reshape(-1, h, w)  # (77, h, w)
    scores = torch.stack([maps[list(p)].mean(0) for p in chunk.positions])
    up = F.interpolate(scores[None], sizes[0], mode="bilinear", align_corners=False)[0]  # (K, H, W)
    labels = up.argmax(0)
    confidence = up.amax(0) / up.sum(0)
    return labels.cpu().numpy(), confidence.cpu().numpy()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device):
    _, peak = peak_memory(fn, device)  # also the warm-up
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0, peak


def write_markdown(path: str, result: dict) -> None:
    r = result
    lines = [
        MARK_START,
        f"Width-reduced SD3 ({r['model']['layers']} blocks, {r['model']['heads']} heads × 64, random weights), "
        f"{r['image']} image, {r['tokens']} tokens, K = {r['classes']}, capture layer {r['layer']}, "
        f"{r['device']}, {r['dtype']}, {r['threads']} threads; `{r['command']}`.",
        "",
        "| method | s / image | images / s | peak memory (MiB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in ("paper", "ours"):
        m = r["methods"][name]
        lines.append(f"| {name} | {m['seconds']:.2f} | {m['images_per_s']:.3f} | {m['peak_mib']:.0f} |")
    lines += [
        "",
        f"ours vs paper: {r['speedup']:.2f}× the images/s, {r['memory_ratio']:.2f}× the peak memory; "
        f"labels equal on {100 * r['label_agreement']:.4f}% of pixels (max |Δconfidence| "
        f"{r['max_confidence_diff']:.1e}).",
        "",
        f"Chunked vocabulary (the {r['classes']} names split into {r['chunks']['prompts']} prompts of ≤ "
        f"{r['chunks']['max_tokens']} tokens) vs one prompt, share of pixels with the same label: "
        + ", ".join(f"`{k}` {100 * v:.1f}%" for k, v in r["chunks"]["agreement"].items())
        + " (random weights: see above).",
        MARK_END,
    ]
    write_block(path, MARK_START, MARK_END, "\n".join(lines))


def bench_pipeline(args: argparse.Namespace):
    """``--model PATH`` (a real SD3 folder) when given, else the width-reduced random-weight SD3."""
    if args.model:
        from seg4diff_fast.models import load_pipeline

        return load_pipeline(args.model, str(args.dtype).replace("torch.", ""), args.device)
    return build_pipeline(args)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--height", type=int, default=683)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--classes", default=CLASSES)
    p.add_argument("--chunk-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="a real SD3 diffusers folder instead of the width-reduced random model")
    p.add_argument("--json", default=os.path.join(HERE, "results", "segment_cpu.json"))
    p.add_argument("--markdown", default=os.path.join(HERE, "SEGMENT.md"))
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)

    pipe = bench_pipeline(args)
    classes = [c.strip() for c in args.classes.split(",")]
    seg = Seg4DiffSegmenter(pipe, layer=args.layer, resolution=1024, seed=0)
    image = torch.rand(3, args.height, args.width, generator=torch.Generator().manual_seed(0))

    (paper_labels, paper_conf), t_paper, m_paper = measure(lambda: paper_segment(seg, image, classes), args.device)
    ours, t_ours, m_ours = measure(lambda: seg(image, classes), args.device)
    agreement = float((ours.label_map == paper_labels).mean())

    chunks = plan_prompts(classes, pipe.tokenizer, max_tokens=args.chunk_tokens)
    chunk_agreement = {}
    for merge in ("none", "image-mass"):
        chunked = Seg4DiffSegmenter(pipe, layer=args.layer, resolution=1024, seed=0, chunk_merge=merge,
                                    max_prompt_tokens=args.chunk_tokens, batch_size=len(chunks))(image, classes)
        chunk_agreement[merge] = float((chunked.label_map == ours.label_map).mean())

    tokens = (1024 // seg.vae_scale // seg.patch) ** 2
    result = {
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "dtype": str(args.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": "python benchmarks/bench_segment.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "model": {"layers": len(seg.transformer.transformer_blocks),
                  "heads": seg.transformer.config.num_attention_heads, "path": args.model},
        "image": f"{args.height}x{args.width}",
        "tokens": f"{tokens} image + 77 CLIP + 77 zero T5",
        "classes": len(classes),
        "layer": args.layer,
        "methods": {
            "paper": {"seconds": t_paper, "images_per_s": 1 / t_paper, "peak_mib": m_paper / 2**20},
            "ours": {"seconds": t_ours, "images_per_s": 1 / t_ours, "peak_mib": m_ours / 2**20},
        },
        "speedup": t_paper / t_ours,
        "memory_ratio": m_ours / m_paper,
        "label_agreement": agreement,
        "max_confidence_diff": float(np.abs(ours.confidence - paper_conf).max()),
        "chunks": {"prompts": len(chunks), "max_tokens": args.chunk_tokens, "agreement": chunk_agreement},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    if args.markdown:
        write_markdown(args.markdown, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
