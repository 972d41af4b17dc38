"""Train the ShapesWorld pipeline by flow matching, SD3-style; track grounding per block.

Usage::

    python -m seg4diff_fast.shapes.train --out DIR [--steps N] [--resume] [--batch 32] [--lr 5e-4]

Stages (all in one process, resumable at every checkpoint):

1. **VAE** (``--vae-steps``): the one-block ``AutoencoderKL`` learns to reconstruct world images
   (MSE + a tiny KL); then ``shift_factor`` / ``scaling_factor`` are set from the latent mean / std of
   512 images and the VAE is frozen.
2. **Flow matching** as SD3: logit-normal σ = sigmoid(u), u ~ N(0, 1); ``x_t = (1 − σ)·x0 + σ·ε``;
   the transformer predicts ``ε − x0`` at ``timestep = 1000·σ``; MSE. Captions go through the stock
   ``pipe.encode_prompt`` (77 CLIP + ``t5_length`` zero T5 positions, exactly what inference uses);
   with probability ``--caption-dropout`` a caption is replaced by ``""`` (for CFG, and so that the
   caption's words must carry whatever they decide). ``--caption-style`` picks the captions' forms
   (:func:`training_caption`), ``--same-colour`` the share of one-colour scenes, ``--sigma-mean`` /
   ``--sigma-std`` the logit-normal σ. AdamW on the transformer and the CLIP embeddings (and the first
   CLIP layer with ``--text-layers 2``);
   learning rate constant or cosine-decayed (``--lr-schedule``), computed from the step (resume-safe).
3. **Checkpoints** every ``--ckpt-every`` steps: ``DIR/checkpoint.pt`` (models, optimizer, the noise
   generator, step; written to a temporary file then renamed), ``DIR/pipeline/`` (``save_pretrained``;
   ``DIR/best/`` + ``best.json``: the checkpoint whose best block scored the highest (A + B) / 2),
   and a **grounding evaluation** appended to ``DIR/log.jsonl``: mIoU of every block's head-mean I2T maps
   (:func:`.grounding.evaluate_grounding`) on ``--eval-scenes`` held-out scenes (seeds 0…N−1;
   training scenes use seeds from 10⁶ on), protocol A (prompt = the object classes present, background
   ignored, scenes with ≥ 2 object classes; baseline: a uniformly random present class per pixel) and B
   (background included, all scenes; baseline: all background), plus the held-out flow-matching loss with
   the true caption and with the empty caption (how much the caption matters).

Scene ``i`` of step ``s`` is ``ShapesWorld(10**6 + s·batch + i)``: the data stream depends only on the step,
so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..reader import family_of
from ..utils.files import atomic_torch_save, write_json
from .grounding import attention_budget, evaluate_grounding
from .pipeline import ShapesConfig, build_pipeline, save_pipeline, trainable_parameters
from .world import Scene, ShapesWorld

__all__ = ["CAPTION_STYLES", "TRAIN_SEED_OFFSET", "attention_budget", "evaluate_grounding", "heldout_scenes",
           "images_to_tensor", "main", "train", "training_caption"]

TRAIN_SEED_OFFSET = 10**6


def images_to_tensor(scenes: list[Scene]) -> torch.Tensor:
    """(B, 3, H, W) float in [−1, 1]."""
    arr = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def heldout_scenes(n: int, size: int) -> list[Scene]:
    """The fixed held-out set: ``ShapesWorld(i, size).sample()`` for i in 0…n−1."""
    return [ShapesWorld(i, size).sample() for i in range(n)]


def _batch(step: int, batch: int, size: int, same_colour: float = 0.0) -> list[Scene]:
    base = TRAIN_SEED_OFFSET + step * batch
    return [ShapesWorld(base + i, size, same_colour=same_colour).sample() for i in range(batch)]


#: Caption styles of :func:`training_caption`.
CAPTION_STYLES = ("world", "mixed", "varied")


def training_caption(scene: Scene, rng: np.random.Generator, style: str = "world", drop_colour: float = 0.25) -> str:
    """The caption a training scene is shown with.

    ``"world"``: always the world's sentence (``"red circle and blue square on background"``, drawing
    order). ``"mixed"``: that sentence half of the time; otherwise the object names in a random order,
    as a sentence (``"blue square and red circle on background"``) or as a bare name list with
    "background" at a random place or absent (``"blue square background red circle"``) — the form a
    segmentation prompt takes (class names joined by spaces). Every word still names what is in the
    image; only the order and the glue words vary, so each word must carry its own meaning.
    ``"varied"``: as ``"mixed"``, and each object is named by its shape alone (``"circle"``) with
    probability ``drop_colour``: then only a shape word describes it, and an image token can find that
    word only by its shape, not its colour."""
    if style == "world":
        return scene.caption
    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {style!r}; use one of {CAPTION_STYLES}")
    names = list(scene.object_classes)
    if style == "varied":
        names = [n.split()[1] if rng.random() < drop_colour else n for n in names]
    u = rng.random()
    if u < 0.5:  # the world's sentence (drawing order)
        return " and ".join(names) + " on background"
    names = [names[i] for i in rng.permutation(len(names))]
    if u < 0.7:
        return " and ".join(names) + " on background"
    if u < 0.85:
        names.insert(int(rng.integers(0, len(names) + 1)), "background")
    return " ".join(names)


def train_vae(pipe: Any, steps: int, size: int, lr: float = 2e-3, batch: int = 32, log: Any = None,
              stat_images: int = 512) -> dict:
    """Stage 1: train the VAE as an autoencoder, set its shift/scale from the latent statistics of
    ``stat_images`` held-out images, freeze it."""
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1234)
    loss = torch.tensor(0.0)
    for step in range(steps):
        x = images_to_tensor([ShapesWorld(2 * 10**6 + step * batch + i, size).sample() for i in range(batch)])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log({"stage": "vae", "step": step, "loss": round(loss.item(), 5)})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = images_to_tensor(heldout_scenes(stat_images, size))
        lat = vae.encode(x).latent_dist.mean
        rec = vae.decode(lat).sample
        shift, std = float(lat.mean()), float(lat.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    stats = {"stage": "vae_done", "shift_factor": shift, "scaling_factor": 1.0 / std,
             "heldout_rec_mse": float(F.mse_loss(rec, x)), "heldout_rec_max_abs": float((rec - x).abs().max())}
    if log is not None:
        log(stats)
    return stats


def fm_loss(pipe: Any, scenes: list[Scene], captions: list[str], gen: torch.Generator, t5_length: int,
            sigma: torch.Tensor | None = None, sigma_mean: float = 0.0, sigma_std: float = 1.0) -> torch.Tensor:
    """SD3 flow-matching loss of one batch (σ = sigmoid(N(sigma_mean, sigma_std)) unless given)."""
    x0 = family_of(pipe).encode_images(pipe, images_to_tensor(scenes))
    b = x0.shape[0]
    if sigma is None:
        sigma = torch.sigmoid(sigma_mean + sigma_std * torch.randn(b, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(b, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    pe, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=x0.device, do_classifier_free_guidance=False,
                                          max_sequence_length=t5_length)
    pred = pipe.transformer(hidden_states=x_t, timestep=sigma * 1000.0, encoder_hidden_states=pe,
                            pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(pred, noise - x0)


@torch.no_grad()
def heldout_losses(pipe: Any, scenes: list[Scene], t5_length: int) -> dict[str, float]:
    """Held-out flow-matching loss with the true and with the empty caption (same σ, same noise)."""
    out = {}
    for name, caps in (("caption", [s.caption for s in scenes]), ("empty", [""] * len(scenes))):
        gen = torch.Generator().manual_seed(99)
        sigma = torch.sigmoid(torch.randn(len(scenes), generator=torch.Generator().manual_seed(98)))
        out[f"loss_{name}"] = round(float(fm_loss(pipe, scenes, caps, gen, t5_length, sigma)), 5)
    return out


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant", warmup: int = 0,
          min_ratio: float = 0.1) -> float:
    """Learning rate of ``step`` (stateless, so resuming needs nothing): linear warm-up over ``warmup``
    steps, then constant or cosine decay to ``min_ratio · lr`` at ``steps``."""
    import math

    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _state(pipe: Any, opt: Any, gen: torch.Generator, step: int, cfg: ShapesConfig, args: dict) -> dict:
    return {
        "step": step, "shapes_config": cfg.to_dict(), "train_args": args,
        "transformer": pipe.transformer.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
        "text_encoder_2": pipe.text_encoder_2.state_dict(), "vae": pipe.vae.state_dict(),
        "vae_shift": pipe.vae.config.shift_factor, "vae_scale": pipe.vae.config.scaling_factor,
        "optimizer": opt.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
    }


def train(out: str, steps: int = 3000, resume: bool = False, batch: int = 32, lr: float = 5e-4,
          weight_decay: float = 0.01, caption_dropout: float = 0.3, ckpt_every: int = 100, eval_scenes: int = 64,
          vae_steps: int = 300, config: ShapesConfig | None = None, seed: int = 0, evaluate: bool = True,
          progress: bool = True, save_pipeline_every_ckpt: bool = True, vae_stat_images: int = 512,
          vae_batch: int = 32, lr_schedule: str = "constant", warmup: int = 0, stop_after: int | None = None,
          caption_style: str = "world", sigma_mean: float = 0.0, sigma_std: float = 1.0,
          same_colour: float = 0.0) -> Any:
    """Run (or resume) a training of ``steps`` steps; returns the pipeline. See the module docs.

    ``stop_after``: stop (with a checkpoint) after that many steps, as an interrupted run would; the
    learning-rate schedule still spans ``steps``."""
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    log_path = os.path.join(out, "log.jsonl")

    def log(rec: dict) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    state = None
    if resume and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        cfg = ShapesConfig.from_dict(state["shapes_config"])
        targs = dict(state["train_args"])
    else:
        cfg = config or ShapesConfig(seed=seed)
        targs = {"batch": batch, "lr": lr, "weight_decay": weight_decay, "caption_dropout": caption_dropout,
                 "vae_steps": vae_steps, "seed": seed, "lr_schedule": lr_schedule, "warmup": warmup,
                 "caption_style": caption_style, "sigma_mean": sigma_mean, "sigma_std": sigma_std,
                 "same_colour": same_colour}
    pipe = build_pipeline(cfg)
    params = trainable_parameters(pipe)
    opt = torch.optim.AdamW(params, lr=targs["lr"], weight_decay=targs["weight_decay"], betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(targs["seed"] + 17)
    if state is not None:
        pipe.transformer.load_state_dict(state["transformer"])
        pipe.text_encoder.load_state_dict(state["text_encoder"])
        pipe.text_encoder_2.load_state_dict(state["text_encoder_2"])
        pipe.vae.load_state_dict(state["vae"])
        pipe.vae.register_to_config(shift_factor=state["vae_shift"], scaling_factor=state["vae_scale"])
        pipe.vae.eval().requires_grad_(False)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        start = int(state["step"])
        log({"event": "resume", "step": start})
    else:
        torch.manual_seed(targs["seed"])
        np.random.seed(targs["seed"])
        random.seed(targs["seed"])
        write_json(os.path.join(out, "config.json"), {"shapes_config": cfg.to_dict(), "train_args": targs})
        log({"event": "start", "shapes_config": cfg.to_dict(), "train_args": targs,
             "transformer_params": sum(p.numel() for p in pipe.transformer.parameters())})
        train_vae(pipe, targs["vae_steps"], cfg.size, batch=vae_batch, log=log, stat_images=vae_stat_images)
        start = 0
        atomic_torch_save(_state(pipe, opt, gen, 0, cfg, targs), ckpt_path)
    heldout = heldout_scenes(eval_scenes, cfg.size) if evaluate else []

    def checkpoint(step: int) -> None:
        atomic_torch_save(_state(pipe, opt, gen, step, cfg, targs), ckpt_path)
        if save_pipeline_every_ckpt:
            save_pipeline(pipe, os.path.join(out, "pipeline"), cfg)
        if evaluate:
            pipe.transformer.eval()
            t0 = time.time()
            rec = {"stage": "eval", "step": step, **evaluate_grounding(pipe, heldout, cfg.size, cfg.t5_length),
                   **heldout_losses(pipe, heldout[:32], cfg.t5_length)}
            rec["eval_s"] = round(time.time() - t0, 1)
            score = max((a + b) / 2 for a, b in zip(rec.get("A", rec["B"]), rec["B"]))
            best_path = os.path.join(out, "best.json")
            best = json.load(open(best_path)) if os.path.isfile(best_path) else {"score": -1.0}
            if score > best["score"]:  # keep the pipeline whose best block grounds best (A+B)/2
                save_pipeline(pipe, os.path.join(out, "best"), cfg)
                write_json(best_path, {"score": score, "step": step})
                rec["new_best"] = True
            log(rec)
            pipe.transformer.train()
            print(json.dumps(rec), file=sys.stderr, flush=True)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=steps, initial=start, disable=not progress, dynamic_ncols=True) if tqdm else None
    pipe.transformer.train()
    p_drop = float(targs["caption_dropout"])
    end = steps if stop_after is None else min(steps, stop_after)
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, targs["lr"], targs.get("lr_schedule", "constant"), targs.get("warmup", 0))
        scenes = _batch(step, targs["batch"], cfg.size, targs.get("same_colour", 0.0))
        drop = torch.rand(len(scenes), generator=gen) < p_drop
        cap_rng = np.random.default_rng((targs["seed"], step))  # a function of the step: resume-safe
        captions = ["" if d else training_caption(s, cap_rng, targs.get("caption_style", "world"))
                    for s, d in zip(scenes, drop.tolist())]
        loss = fm_loss(pipe, scenes, captions, gen, cfg.t5_length, sigma_mean=targs.get("sigma_mean", 0.0),
                       sigma_std=targs.get("sigma_std", 1.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss = loss.detach()
        done = step + 1
        if done % 10 == 0 or done == steps:
            log({"stage": "train", "step": done, "loss": round(float(loss), 5)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}")
        if done % ckpt_every == 0 or done == end:
            checkpoint(done)
    if bar is not None:
        bar.close()
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval().requires_grad_(False)
    return pipe


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m seg4diff_fast.shapes.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.jsonl, pipeline/)")
    ap.add_argument("--steps", type=int, default=3000, help="total flow-matching steps")
    ap.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (its config wins)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    ap.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    ap.add_argument("--caption-dropout", type=float, default=0.3)
    ap.add_argument("--caption-style", default="world", choices=list(CAPTION_STYLES),
                    help="world: the world's sentence; mixed: also shuffled names and bare name lists")
    ap.add_argument("--same-colour", type=float, default=0.0,
                    help="share of training scenes whose objects all have one colour (shape words decide)")
    ap.add_argument("--sigma-mean", type=float, default=0.0, help="logit-normal σ sampling: mean of the logit")
    ap.add_argument("--sigma-std", type=float, default=1.0, help="logit-normal σ sampling: std of the logit")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-scenes", type=int, default=64)
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--qk-norm", default=None, choices=[None, "rms_norm"])
    ap.add_argument("--text-dim", type=int, default=32)
    ap.add_argument("--text-layers", type=int, default=1, help="CLIP layers (2: causal word mixing, as CLIP)")
    ap.add_argument("--t5-length", type=int, default=77)
    ap.add_argument("--clip-length", type=int, default=77, help="CLIP positions (tokenizer length)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-eval", action="store_true", help="skip the grounding evaluation at checkpoints")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = ShapesConfig(size=a.size, num_layers=a.layers, heads=a.heads, head_dim=a.head_dim, qk_norm=a.qk_norm,
                       text_dim=a.text_dim, text_layers=a.text_layers, t5_length=a.t5_length, clip_length=a.clip_length,
                       seed=a.seed)
    train(a.out, steps=a.steps, resume=a.resume, batch=a.batch, lr=a.lr, weight_decay=a.weight_decay,
          caption_dropout=a.caption_dropout, ckpt_every=a.ckpt_every, eval_scenes=a.eval_scenes,
          vae_steps=a.vae_steps, config=cfg, seed=a.seed, evaluate=not a.no_eval, progress=not a.no_progress,
          lr_schedule=a.lr_schedule, warmup=a.warmup, caption_style=a.caption_style, sigma_mean=a.sigma_mean,
          sigma_std=a.sigma_std, same_colour=a.same_colour)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
