"""``train_magnet``: MAGNET LoRA fine-tuning with accelerate (one device or several, ``accelerate launch``).

One transformer forward per micro-step gives both losses: flow matching on the output, and the mask
loss on the expert layer's raw image→text scores captured by the fused op (``mode="logits"``, their
backward runs through the op's backward). Everything random derives from ``(seed, step, micro-step,
rank)`` and the data order from ``(seed, epoch)``, so a run resumed from a checkpoint ends with the same
LoRA as an uninterrupted one. Checkpoints (LoRA, head, optimizer, scheduler, step) are written
atomically; the final LoRA goes out through the pipeline class's ``save_lora_weights``.

``MagnetConfig.protocol`` picks the authors' training (``"paper"``: their data chains, token rules, cost and
head) or this package's (``"corrected"``); docs/PAPER_PROTOCOL_MAGNET.md lists every difference. Under paper the
sampler yields ``(index, position)`` so each sample's crop and flip come from ``(seed, position)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..reader import PipelineReader, TextState
from ..utils.files import atomic_torch_save, write_json
from ..utils.parallel import default_workers  # workers when MagnetConfig.num_workers is None (re-exported)
from .batch import PaperCollate, PreparedData, collate_prepared, plan_tokens, predictions_and_targets
from .config import MagnetConfig
from .head import MapHead, inverted_head_message
from .lora import add_magnet_lora, lora_state_dict, save_magnet_lora
from .losses import focal_dice_loss

__all__ = ["train_magnet", "check_precision", "default_workers", "CHECKPOINT_FILE", "LOG_FILE"]

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


class _Order(torch.utils.data.Sampler):
    """This rank's sample indices from global position ``start`` on: epochs are seeded permutations of
    the dataset, each global batch of ``batch · world`` indices is split by rank. ``positions``: yield
    ``(index, global position)`` pairs (the paper protocol seeds each sample's transforms from the position)."""

    def __init__(self, n: int, seed: int, start: int, batch: int, rank: int, world: int, total: int,
                 positions: bool = False):
        self.n, self.seed, self.start = n, seed, start
        self.batch, self.rank, self.world, self.total = batch, rank, world, total
        self.positions = positions

    def _global(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(perm[i])

    def __iter__(self) -> Iterator[int]:
        per_global = self.batch * self.world
        for g in range(self.start, self.total):  # g: global micro-batch number
            base = g * per_global + self.rank * self.batch
            for j in range(self.batch):
                yield (self._global(base + j), base + j) if self.positions else self._global(base + j)

    def __len__(self) -> int:
        return (self.total - self.start) * self.batch


def _sigmas(scheduler: Any, n: int, cfg: MagnetConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-normal u → training-schedule index → (timesteps, σ), as diffusers' SD3 LoRA script."""
    u = torch.sigmoid(torch.randn(n, generator=gen) * cfg.logit_std + cfg.logit_mean)
    idx = (u * scheduler.config.num_train_timesteps).long().clamp_(0, len(scheduler.timesteps) - 1)
    return scheduler.timesteps[idx].float(), scheduler.sigmas[idx].float()


def check_precision(mixed_precision: str, on_cpu: bool) -> None:
    """Refuse fp16 autocast on a CPU (torch has no fp16 CPU autocast for training)."""
    if mixed_precision == "fp16" and on_cpu:
        raise ValueError("mixed_precision='fp16' needs CUDA; use 'bf16' or 'no' on a CPU")


def train_magnet(
    pipe_or_path: Any,
    dataset: Any,
    config: MagnetConfig | None = None,
    output_dir: str = "runs/magnet",
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA on the transformer with flow matching + the focal/dice mask loss (MAGNET).

    Args:
        pipe_or_path: a diffusers ``StableDiffusion3Pipeline`` or a model path / id for
            :func:`~seg4diff_fast.models.load_pipeline` (None: the embedded ShapesWorld pipeline).
        dataset: a MAGNET data source (:func:`~seg4diff_fast.magnet.data.open_magnet_data`: ShapesWorld,
            COCO-Stuff, COCO instances (corrected only), SA-1B) or a spec string for it.
        config: :class:`MagnetConfig` (defaults: the authors' COCO settings, ``protocol="paper"``).
        output_dir: checkpoints, ``log.jsonl`` and the final LoRA (``pytorch_lora_weights.safetensors``,
            ``magnet_head.safetensors``, ``magnet_config.json``).
        resume: continue from ``output_dir/checkpoint.pt`` (exactly: same final LoRA as without a stop).
        progress: show a tqdm bar (main process only).
        on_step: called as ``on_step(step, losses)`` after each optimizer step (main process).
        device: ``"cpu"`` trains on the CPU even where CUDA is available; None (or ``"cuda"``): CUDA when
            available (one device per process under ``accelerate launch``).

    Nothing is written (``output_dir`` is not even created) until every argument has been checked: the
    model's family and layer, the protocol, the data, the precision.

    Returns:
        A summary: steps run, final losses, mask losses skipped (with reasons counted), time, paths, the model,
        layer, protocol and package version, the run's config and ``provenance``
        (:func:`seg4diff_fast.utils.provenance.model_record`); ``summary.json`` holds it and
        ``magnet_config.json`` the config with the provenance.

    Example:
        >>> import tempfile
        >>> from seg4diff_fast.magnet import MagnetConfig, train_magnet, ShapesMagnetData
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> cfg = MagnetConfig(layer=1, rank=2, max_steps=2, batch_size=1, warmup_steps=0, resolution=32)
        >>> out = train_magnet(tiny_sd3_pipeline(t5=False), ShapesMagnetData(4), cfg, tempfile.mkdtemp(),
        ...                    progress=False)
        >>> out["steps"]
        2
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from .data import open_magnet_data

    cfg = config or MagnetConfig()
    if isinstance(dataset, str):
        dataset = open_magnet_data(dataset, protocol=cfg.protocol)
    source = dataset
    if cfg.paper:  # the paper protocol reads the source through PaperView (which refuses one it cannot train on)
        from .data import PaperView

        dataset = dataset if isinstance(dataset, PaperView) else PaperView(dataset)
        source = dataset.source
    if len(dataset) == 0:
        raise ValueError("the MAGNET dataset is empty")
    ckpt_path = os.path.join(output_dir, CHECKPOINT_FILE)
    if os.path.exists(ckpt_path) and not resume:
        raise FileExistsError(f"{output_dir} already holds a MAGNET checkpoint; pass resume=True (CLI: --resume) to "
                              "continue it, or choose another output folder")

    on_cpu = (device is not None and str(device).split(":", 1)[0] == "cpu") or not torch.cuda.is_available()
    check_precision(cfg.mixed_precision, on_cpu)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=on_cpu)
    dev = acc.device
    pipe = pipe_or_path
    if pipe is None or isinstance(pipe, str):
        from ..reader import load_pipeline
        from ..shapes.shipped import resolve_model

        pipe = load_pipeline(resolve_model(pipe), dtype="float32", device=str(dev))
    from ..reader import resolve_defaults
    from ..utils.provenance import model_record

    record = model_record(pipe, pipe_or_path if isinstance(pipe_or_path, str) else None)
    if hasattr(source, "describe"):
        record["data"] = source.describe()  # what was trained on (ShapesWorld: with or without its background class)

    defaults = resolve_defaults(pipe)
    reader = PipelineReader(pipe, defaults=defaults, text_length=cfg.t5_length, backend=cfg.backend,
                            resolution=cfg.resolution or int(getattr(source, "size", None) or defaults.resolution))
    tr = reader.transformer
    family = reader.family
    if cfg.paper and not family.authors_magnet:
        raise ValueError(f"MAGNET's paper protocol is the authors' SD3 training (CLIP positions); a {family.name} "
                         "pipeline trains with protocol='corrected' (CLI: --corrected)")
    (layer,) = reader.check_layers(defaults.layer if cfg.layer is None else cfg.layer, "MAGNET")
    t5_length = reader.text_length
    resolution = reader.resolution
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers()
    targets = tuple(cfg.target_modules or family.lora_targets)
    run_cfg = {**cfg.to_dict(), "layer": layer, "t5_length": t5_length, "resolution": resolution,
               "num_workers": workers, "target_modules": list(targets)}
    os.makedirs(output_dir, exist_ok=True)  # every argument checked: nothing is written before this

    torch.manual_seed(cfg.seed)  # LoRA (gaussian) and head init
    for name in ("vae", *family.text_encoders):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dev).eval().requires_grad_(False)
    tr.to(device=dev)
    if cfg.mixed_precision == "no" and tr.dtype != torch.float32:
        tr.to(dtype=torch.float32)  # without autocast every weight must be float32
    lora_params = add_magnet_lora(tr, cfg.rank, cfg.alpha, targets)
    for p in lora_params:  # trained weights stay float32 under mixed precision
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    head = MapHead(zero_init=not cfg.paper).to(dev) if cfg.conv_head else None
    params = lora_params + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)

    start = 0
    if resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        was = (state.get("config") or {}).get("protocol", "corrected")
        if was != cfg.protocol:
            raise ValueError(f"{ckpt_path} was trained with protocol={was!r} but this run uses {cfg.protocol!r}; "
                             f"resume with protocol={was!r} (CLI: --{was}) or start in another output folder")
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(tr, state["lora"])
        if head is not None:
            head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
    model, opt = acc.prepare(tr, opt)
    head_model = acc.prepare(head) if head is not None else None
    capturing = contextlib.ExitStack()  # closed in the loop's finally
    cap = capturing.enter_context(reader.capturing(
        [layer], tokens=reader.capture_tokens(), mode="logits",
        head_reduce="none" if cfg.head_reduce == "none" else "mean"))
    noise_sched = type(pipe.scheduler).from_config(pipe.scheduler.config)

    data = PreparedData(dataset, resolution, protocol=cfg.protocol, seed=cfg.seed)
    total_micro = cfg.max_steps * cfg.grad_accum
    sampler = _Order(len(data), cfg.seed, start * cfg.grad_accum, cfg.batch_size, acc.process_index,
                     acc.num_processes, total_micro, positions=cfg.paper)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=PaperCollate(resolution) if cfg.paper else collate_prepared)
    batches = iter(loader)

    limit = family.content_limit(pipe, reader.text_length)
    def locate(prompt: str) -> list[tuple[int, int, int]]:
        return family.prompt_tokens(pipe, prompt, reader.text_length)

    main = acc.is_main_process
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="magnet", unit="step", dynamic_ncols=True)
    skipped: dict[str, int] = {}
    totals = {"samples": 0, "masks": 0}
    last: dict[str, float] = {}
    t0, step = time.perf_counter(), start
    log_path = os.path.join(output_dir, LOG_FILE)

    def checkpoint(s: int) -> None:
        if main:
            atomic_torch_save({"lora": lora_state_dict(tr), "head": head.state_dict() if head is not None else None,
                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": s,
                                "config": run_cfg}, ckpt_path)
        acc.wait_for_everyone()

    try:
        for step in range(start, cfg.max_steps):
            sums = {"loss": 0.0, "fm": 0.0, "focal": 0.0, "dice": 0.0, "masks": 0}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                gen = torch.Generator().manual_seed(
                    int(np.random.default_rng([cfg.seed, step, micro, acc.process_index]).integers(2**62)))
                totals["samples"] += len(batch["prompt"])
                plans = [plan_tokens(p, n, reader.tokenizer, protocol=cfg.protocol, locate=locate, limit=limit)
                         for p, n in zip(batch["prompt"], batch["names"])]
                for pl in plans:
                    if pl.skip:
                        skipped[pl.skip] = skipped.get(pl.skip, 0) + 1
                        if skipped[pl.skip] == 1:
                            log.warning("MAGNET: no mask loss for a sample: %s (counted in the summary)", pl.skip)
                prompts = [pl.prompt for pl in plans]
                text: TextState = reader.encode_text(prompts)
                x0 = reader.encode_images(batch["x"]).float()
                noise = torch.randn(x0.shape, generator=gen).to(dev)
                timesteps, sig = _sigmas(noise_sched, x0.shape[0], cfg, gen)
                s = sig.view(-1, 1, 1, 1).to(dev)
                x_t = (1.0 - s) * x0 + s * noise
                sync = micro == cfg.grad_accum - 1
                ctx = acc.no_sync(model) if not sync else nullcontext()
                with ctx, acc.autocast():
                    cap.reset()
                    pred = reader.forward(model, x_t, text, timesteps.to(dev))[0]
                    fm = F.mse_loss(pred.float(), (noise - x0).float())
                    maps = cap.maps[:, 0]
                    masks = [m.to(dev) for m in batch["masks"]]
                    pt = predictions_and_targets(maps, masks, plans, head=head_model,
                                                 match_focal_weight=cfg.match_focal_weight,
                                                 match_dice_weight=cfg.match_dice_weight,
                                                 focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
                                                 protocol=cfg.protocol, match_focal_form=cfg.cost_focal_form)
                    if pt is not None:
                        focal, dice = focal_dice_loss(pt[0].float(), pt[1], alpha=cfg.focal_alpha,
                                                      gamma=cfg.focal_gamma, focal_form=cfg.loss_focal_form)
                        sums["masks"] += int(pt[0].shape[0])
                        totals["masks"] += int(pt[0].shape[0])
                    else:  # keep the graph identical across ranks: zero-weight the maps
                        focal = dice = maps.sum() * 0.0
                    loss = cfg.lambda_fm * fm + cfg.lambda_focal * focal + cfg.lambda_dice * dice
                acc.backward(loss / cfg.grad_accum)
                for k, v in (("loss", loss), ("fm", fm), ("focal", focal), ("dice", dice)):
                    sums[k] += float(v.detach()) / cfg.grad_accum
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            last = {**{k: round(v, 6) for k, v in sums.items() if k != "masks"}, "masks": sums["masks"]}
            done = step + 1
            if main:
                rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(fm=f"{last['fm']:.4f}", focal=f"{last['focal']:.4f}", dice=f"{last['dice']:.3f}",
                                    it_s=f"{rate:.2f}")
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    rec = {"step": done, **last, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                           "steps_per_s": round(rate, 4), "time": round(time.time(), 1)}
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            if done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                checkpoint(done)
            if main and on_step is not None:
                on_step(done, last)
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    finally:
        capturing.close()
        tr.eval()
    if bar is not None:
        bar.close()
    acc.wait_for_everyone()
    elapsed = time.perf_counter() - t0
    summary = {"steps": cfg.max_steps, "resumed_from": start, "final": last, "totals": totals, "skipped": skipped,
               "seconds": round(elapsed, 2), "output_dir": output_dir, "model": record["model"],
               "layer": layer, "protocol": cfg.protocol, "package_version": record["package_version"],
               "config": run_cfg, "provenance": record}
    if head is not None:  # a head that inverts its input trained the raw maps to the opposite sign (MapHead.polarity)
        summary["head_polarity"] = head.polarity()
        if summary["head_polarity"] < 0:
            log.warning("MAGNET: %s", inverted_head_message(summary["head_polarity"]))
    if main:
        save_magnet_lora(output_dir, tr, head, config={**run_cfg, "provenance": record}, pipeline_class=type(pipe)
                         if hasattr(type(pipe), "save_lora_weights") else None)
        checkpoint(cfg.max_steps)
        write_json(os.path.join(output_dir, "summary.json"), summary)
        log.info("MAGNET: %d steps in %.1f s; final %s; skipped %s", cfg.max_steps - start, elapsed, last, skipped)
    return summary

