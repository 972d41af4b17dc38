"""The run loop of ``label``: image set + class list → label PNGs (and confidence PNGs, COCO JSON, YOLO
polygons).

Stages, overlapped:

1. DataLoader worker processes decode each image and make its model input (:class:`.inputs.LabelDataset`),
   pinned when the device is CUDA; batches are the fixed cuts of the sorted list (:mod:`.distributed`);
2. the main process: one VAE call per batch (:meth:`PipelineReader.noised_latents`, per-image noise
   from the seed), transformer calls that stop after the capture layer, with the prompt embeddings of the
   vocabulary's chunked prompt set encoded once for the whole run and reused by every batch; class maps
   (the segmenter's chunk merge), fused ``upsample_argmax`` on the device, the uint8/uint16 label map and
   the uint8 confidence made there too and copied back without a host sync (CUDA events);
3. a thread pool encodes the PNGs (and the YOLO ``.txt``, :mod:`.yolo`) and writes them atomically
   (:mod:`.outputs`); the label PNG last, so a complete one means the image is done.

Errors of single inputs (unreadable, truncated, empty) go to ``OUT/errors.jsonl`` (sorted by image, written
whole at the end by rank 0 from every rank's list), never stopping the run. ``OUT/labels.json`` is written
first (rank 0); with ``resume`` it must describe the same labeling (classes, model, layer, timestep, seed,
dtype, …) or the run refuses to mix outputs. ``resume`` skips the batches whose images all have complete
outputs; a batch with any incomplete image is recomputed whole (the same images together, so the same
numbers) and only its incomplete images are written.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..ops.upsample_argmax import upsample_argmax
from ..segment import Seg4DiffSegmenter, confidence_of
from ..utils.parallel import available_cores, default_workers
from ..utils.provenance import model_record
from .coco import build_coco
from .distributed import DistContext, setup, shard_batches
from .inputs import ImageItem, LabelDataset, collate, discover_images, load_classes
from .outputs import (
    atomic_write,
    confidence_path,
    encode_confidence,
    encode_labels,
    label_path,
    outputs_complete,
    remove_temporaries,
    write_json,
)
from .yolo import DEFAULT_TOLERANCE, encode_yolo, require_cv2, write_yolo_dataset, yolo_label_path

__all__ = ["LabelSummary", "label_images", "check_out_dir", "RUN_KEYS"]

# labels.json keys that must agree for --resume to add to existing outputs
RUN_KEYS = ("classes", "prompts", "model", "lora", "protocol", "layer", "resolution", "num_inference_steps",
            "noise_step", "timestep", "seed", "dtype", "chunk_merge", "split_dash", "short_side", "label_format")


@dataclass
class LabelSummary:
    """What a run did, over all processes.

    Attributes:
        images: inputs in the set; labeled: labeled by this run; skipped: complete before (``resume``);
        errors: inputs that could not be read; seconds: wall time of the labeling (after loading);
        images_per_s: ``labeled / seconds``; peak_memory: bytes (CUDA: peak allocated; CPU: peak RSS);
        out_dir: the output folder.
    """

    images: int
    labeled: int
    skipped: int
    errors: int
    seconds: float
    images_per_s: float
    peak_memory: int
    memory_kind: str
    out_dir: str

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (f"{self.images} images: {self.labeled} labeled, {self.skipped} already done, {self.errors} errors; "
                f"{self.seconds:.1f} s, {self.images_per_s:.2f} images/s, peak memory "
                f"{self.peak_memory / 2**20:.0f} MiB ({self.memory_kind}); outputs in {self.out_dir}")


def check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` and make sure files can be created in it.

    Raises:
        ValueError: it cannot be created or written.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output folder {out_dir} is not writable: {e.strerror or e}") from None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    from ..utils.version import __version__

    out = {"seg4diff_fast": __version__, "python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "numpy", "pillow", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process RSS"


def _run_info(seg: Seg4DiffSegmenter, classes: list[str], prompts: list[str], record: dict[str, Any]
              ) -> dict[str, Any]:
    return {
        "classes": classes,
        "prompts": prompts,
        "model": record["model"],
        "lora": record.get("lora"),
        "protocol": seg.protocol,
        "layer": seg.layers[0] if len(seg.layers) == 1 else list(seg.layers),
        "resolution": seg.resolution,
        "num_inference_steps": seg.num_inference_steps,
        "noise_step": seg.noise_step,
        "timestep": seg.timestep,
        "seed": seg.seed,
        "dtype": str(seg.transformer.dtype).replace("torch.", ""),
        "chunk_merge": seg.chunk_merge,
        "split_dash": seg.split_dash,
        "short_side": seg.short_side,
        "label_format": "palette" if len(classes) <= 256 else "uint16",
        "package_version": record.get("package_version"),
        "provenance": record,
        "versions": _versions(),
    }


def _check_resume(out_dir: str, info: dict[str, Any]) -> None:
    import json

    path = os.path.join(out_dir, "labels.json")
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: cannot read {path}: {e}") from None
    differ = [k for k in RUN_KEYS if old.get(k) != info.get(k)]
    if differ:
        k = differ[0]
        raise ValueError(f"--resume: {path} was written by a different labeling ({k}: {old.get(k)!r} there, "
                         f"{info.get(k)!r} now); use another --out or drop --resume to overwrite")
    tols = (old.get("yolo_tolerance"), info.get("yolo_tolerance"))
    if None not in tols and tols[0] != tols[1]:
        raise ValueError(f"--resume: {path} has YOLO polygons at tolerance {tols[0]}, not {tols[1]}; use another "
                         "--out, the same --yolo-tolerance, or drop --resume to overwrite")
    if old.get("versions") != info.get("versions"):
        print(f"seg4diff-fast label: warning: {path} was written with other library versions; resuming anyway",
              file=sys.stderr)


class _Writer:
    """PNG encoding and atomic writes on a thread pool, at most ``limit`` images in flight."""

    def __init__(self, threads: int, limit: int):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="label-writer")
        self.pending: deque[Future] = deque()
        self.limit = max(1, limit)

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.limit or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()  # re-raises a write error

    def finish(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def _write_image(out_dir: str, rel: str, num_classes: int, labels: torch.Tensor, conf: torch.Tensor | None,
                 event: Any, yolo_tolerance: float | None = None) -> None:
    if event is not None:
        event.synchronize()
    lab = labels.numpy()
    if num_classes > 256:
        lab = lab.astype(np.uint16)
    if conf is not None:
        atomic_write(confidence_path(out_dir, rel), encode_confidence(conf.numpy()))
    if yolo_tolerance is not None:
        atomic_write(yolo_label_path(out_dir, rel), encode_yolo(lab, num_classes, yolo_tolerance))
    # the label PNG last: a complete one means the image's other outputs are written too
    atomic_write(label_path(out_dir, rel), encode_labels(lab, num_classes))


def label_images(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    classes: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    segmenter: Seg4DiffSegmenter | None = None,
    model: str | None = None,
    layer: int | None = None,
    resolution: int | None = None,
    seed: int = 0,
    dtype: str = "auto",
    device: str | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    confidence: bool = False,
    coco: bool = False,
    resume: bool = False,
    progress: bool = True,
    writer_threads: int | None = None,
    split_dash: bool = True,
    lora: str | None = None,
    yolo: bool = False,
    yolo_tolerance: float = DEFAULT_TOLERANCE,
) -> LabelSummary:
    """Label a set of images with a class list; outputs under ``out_dir`` (see :mod:`seg4diff_fast.label`).

    Run it alone, or in each of several processes started by ``torchrun`` / ``accelerate launch`` (each
    labels its share; rank 0 writes the shared files).

    Args:
        images: a folder (searched recursively), a text file of paths, or a list of paths.
        classes: a list of names, a file with one name a line, or a comma list.
        out_dir: output folder (created).
        segmenter: the segmenter to use; None: one from ``load_pipeline(model, dtype, device)`` with
            ``layer``, ``resolution``, ``seed`` and ``split_dash``.
        model: folder or hub id to load (recorded in labels.json; with ``segmenter``, only recorded).
        batch_size: images per VAE/transformer call (rows per transformer call with chunked vocabularies).
        workers: DataLoader worker processes decoding images (0: in the main process; None: the planned
            default of :func:`~seg4diff_fast.utils.parallel.default_workers`, 0 on <= 2 cores, else
            ``min(4, cores // 4)``). More workers than cores print one warning (not torch's, twice).
        confidence: also write ``a/b.conf.png``; coco: also write ``coco.json``; resume: skip complete images.
        lora: a MAGNET LoRA loaded into the pipeline this call loads (with ``segmenter``: only recorded).
        yolo: also write the YOLO segmentation export (``OUT/yolo/``, :mod:`.yolo`; needs OpenCV) with polygons
            simplified to ``yolo_tolerance`` pixels.
        progress: tqdm progress bar (rank 0).
        writer_threads: PNG writer threads (default min(4, cores)).

    Returns:
        A :class:`LabelSummary` (over all processes).

    Raises:
        ValueError: no images, an empty or unusable class list (or one naming a class twice), an unwritable
            ``out_dir``, a ``resume`` into outputs of a different labeling, a negative ``yolo_tolerance``.
        ImportError: ``yolo`` without OpenCV.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from PIL import Image
        >>> from seg4diff_fast import Seg4DiffSegmenter, label_images
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> d = tempfile.mkdtemp(); os.makedirs(os.path.join(d, "in", "sub"))
        >>> Image.new("RGB", (40, 30), "red").save(os.path.join(d, "in", "sub", "a.jpg"))
        >>> seg = Seg4DiffSegmenter(tiny_sd3_pipeline(t5=False), layer=1, resolution=32)
        >>> s = label_images(os.path.join(d, "in"), "cat,sky", os.path.join(d, "out"), segmenter=seg,
        ...                  workers=0, progress=False)
        >>> s.labeled, np.array(Image.open(os.path.join(d, "out", "sub", "a.png"))).shape
        (1, (30, 40))
    """
    out_dir = os.fspath(out_dir)
    class_list = load_classes(classes)
    items = discover_images(images, out_dir)
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if workers is None:
        workers = default_workers()
    elif int(workers) < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if yolo:
        require_cv2()
        if not float(yolo_tolerance) >= 0:
            raise ValueError(f"the YOLO polygon tolerance must be >= 0 pixels, got {yolo_tolerance}")
    check_out_dir(out_dir)

    if segmenter is not None:
        dev = segmenter.transformer.device
    else:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = setup(dev.type)
    try:
        if segmenter is None:
            from ..reader import load_pipeline
            from ..shapes.shipped import resolve_model

            if dev.type == "cuda" and ctx.world_size > 1 and dev.index is None:
                dev = torch.device("cuda", ctx.local_rank)
            pipe = load_pipeline(resolve_model(model), dtype, str(dev))
            if lora:
                from ..magnet.lora import load_magnet_lora

                pipe = load_magnet_lora(pipe, lora)
            segmenter = Seg4DiffSegmenter(pipe, layer=layer, resolution=resolution, seed=seed, split_dash=split_dash)
        seg = segmenter
        record = model_record(seg.pipe, model)
        record["lora"] = os.path.abspath(lora) if lora else None
        return _label(seg, items, class_list, out_dir, ctx, record, int(batch_size), int(workers), confidence, coco,
                      resume, progress, writer_threads, float(yolo_tolerance) if yolo else None)
    finally:
        ctx.close()


def _label(seg: Seg4DiffSegmenter, items: list[ImageItem], classes: list[str], out_dir: str, ctx: DistContext,
           record: dict[str, Any], batch_size: int, workers: int, confidence: bool, coco: bool, resume: bool,
           progress: bool, writer_threads: int | None, yolo_tolerance: float | None = None) -> LabelSummary:
    from tqdm import tqdm

    plans = seg.plan(classes)
    info = _run_info(seg, classes, [c.prompt for c in plans], record)
    info["formats"] = ["png"] + (["coco"] if coco else []) + (["yolo-seg"] if yolo_tolerance is not None else [])
    if yolo_tolerance is not None:
        info["yolo_tolerance"] = yolo_tolerance
    if resume:
        _check_resume(out_dir, info)
    ctx.barrier()  # every rank has read the old labels.json before rank 0 replaces it
    if ctx.is_main:
        write_json(os.path.join(out_dir, "labels.json"), info)
    device = seg.transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # the whole vocabulary's prompts, encoded once
    text = seg.reader.encode_text([c.prompt for c in plans])
    num_classes = len(classes)

    batches = shard_batches(len(items), batch_size, ctx.rank, ctx.world_size)
    mine = sum(len(b) for b in batches)
    complete: set[int] = set()
    if resume:
        complete = {i for b in batches for i in b if outputs_complete(out_dir, items[i].rel, confidence,
                                                                      yolo_tolerance is not None)}
        batches = [b for b in batches if not all(i in complete for i in b)]
    todo = sum(len(b) for b in batches)
    skipped = mine - todo + sum(1 for b in batches for i in b if i in complete)

    errors: list[dict[str, str]] = []
    labeled = 0
    writer = _Writer(writer_threads or min(4, available_cores()), limit=4 * batch_size)
    bar = tqdm(total=todo, unit="img", desc="label", disable=not progress or not ctx.is_main, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if batches:
            dataset = LabelDataset(items, seg.resolution, seg.short_side, seg.reader.family,
                                   signed=seg.reader.defaults.signed_input)
            loader = _loader(dataset, batches, workers, device, ctx.is_main)
            for batch in loader:
                valid = [k for k, e in enumerate(batch["error"]) if e is None]
                for k, e in enumerate(batch["error"]):
                    if e is not None:
                        it = items[batch["index"][k]]
                        errors.append({"image": it.rel, "path": it.path, "reason": e})
                if valid:
                    outs = _segment_batch(seg, batch["x"], [batch["size"][k] for k in valid], plans, text,
                                          batch_size, num_classes, confidence)
                    for k, (lab, conf, event) in zip(valid, outs):
                        i = batch["index"][k]
                        if i in complete:
                            continue
                        writer.submit(_write_image, out_dir, items[i].rel, num_classes, lab, conf, event,
                                      yolo_tolerance)
                        labeled += 1
                bar.update(len(batch["index"]))
    finally:
        bar.close()
        writer.finish()
    seconds = time.perf_counter() - t0

    # shared files: every rank's error list, then rank 0 merges
    import json

    err_file = os.path.join(out_dir, f".errors.rank{ctx.rank}.json")
    write_json(err_file, errors)
    peak, kind = _peak_memory(device)
    total_images = len(items)
    s_labeled, s_skipped, s_errors = (int(v) for v in ctx.sum([labeled, skipped, len(errors)]))
    s_seconds, s_peak = ctx.max([seconds, peak])
    ctx.barrier()
    if ctx.is_main:
        merged: dict[str, dict] = {}
        for r in range(ctx.world_size):
            with open(os.path.join(out_dir, f".errors.rank{r}.json"), encoding="utf-8") as f:
                for rec in json.load(f):
                    merged[rec["image"]] = rec
        lines = "".join(json.dumps(merged[k], ensure_ascii=False) + "\n" for k in sorted(merged))
        atomic_write(os.path.join(out_dir, "errors.jsonl"), lines.encode())
        for name in os.listdir(out_dir):
            if name.startswith(".errors.rank") and name.endswith(".json"):
                os.remove(os.path.join(out_dir, name))
        if coco:
            build_coco(out_dir, items, classes)
        if yolo_tolerance is not None:
            write_yolo_dataset(out_dir, items, classes)
        remove_temporaries(out_dir)
    ctx.barrier()
    return LabelSummary(
        images=total_images, labeled=s_labeled, skipped=s_skipped, errors=s_errors, seconds=s_seconds,
        images_per_s=s_labeled / s_seconds if s_seconds > 0 else 0.0, peak_memory=int(s_peak), memory_kind=kind,
        out_dir=out_dir,
    )


def _loader(dataset, batches: list[list[int]], workers: int, device: torch.device, warn: bool):
    """The batches' iterator; torch's worker-count warning (issued twice, by the DataLoader and its
    iterator) is replaced by one line of ours."""
    import warnings

    cores = available_cores()
    if warn and workers > cores:
        print(f"seg4diff-fast label: warning: {workers} loader workers on {cores} cores: they compete with the "
              "model for the CPU; fewer (--workers, default from the cores) is faster", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        )
        return iter(loader)


def _segment_batch(seg: Seg4DiffSegmenter, x: torch.Tensor, sizes: list[tuple[int, int]], plans, text,
                   rows_per_call: int, num_classes: int, confidence: bool):
    """Label maps (and confidences) of one batch, left on their way to the host: [(labels, conf, event)]."""
    latents = seg.reader.noised_latents(x.to(seg.pipe.vae.device, non_blocking=True))
    all_scores = seg.score_latents(latents, [plans] * latents.shape[0], text=text, batch_size=rows_per_call)
    cuda = latents.device.type == "cuda"
    results = []
    label_dtype = torch.uint8 if num_classes <= 256 else torch.int32
    for k, size in enumerate(sizes):
        scores = all_scores[k].mean(0)  # (K, h, w), as the segmenter
        labels, top, total = upsample_argmax(scores, size)
        labels = labels.to(label_dtype)
        conf = None
        if confidence:
            conf = confidence_of(top, total).mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        if cuda:
            labels = labels.to("cpu", non_blocking=True)
            conf = conf.to("cpu", non_blocking=True) if conf is not None else None
            event = torch.cuda.Event()
            event.record()
            results.append((labels, conf, event))
        else:
            results.append((labels, conf, None))
    return results
