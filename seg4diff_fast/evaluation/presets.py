"""One preset per table of the paper: its datasets, settings and published numbers, as data.

``seg4diff-fast eval --preset NAME --root DATASETS --model PATH`` runs every dataset of a table with the
paper's settings (:func:`run_preset`) and prints the result beside the paper's number
(:func:`format_report`). The numbers are the paper's (arXiv 2509.18096; ``SEG4DIFF.md``, "The paper's
numbers"); the settings are those of the authors' ``eval_ovss.sh`` / ``eval_unsup.sh`` and configs
(cvlab-kaist/Seg4Diff bb500ca): layer 9, 28 scheduler steps, ``t = timesteps[-8]``, short side 640 (long
side at most 2560), the GT-only prompt (open-vocabulary), the empty prompt with KL threshold 0.1 (the value
their code hard-codes; the config's 0.035 is never read) and power 1.0 (unsupervised). The unsupervised
settings are the same for all six datasets; only the class list and the split change.

Example:
    >>> p = PRESETS["ovss-sd3"]
    >>> p.task, p.layers, [(e.dataset, e.paper) for e in p.entries][:2]
    ('open-vocab', (9,), [('voc20', 89.2), ('coco-object', 62.0)])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "PaperEntry", "Preset", "format_report", "preset_unavailable", "run_preset"]


@dataclass(frozen=True)
class PaperEntry:
    """One column of a paper table: the dataset (a :data:`~.datasets.DATASETS` key), the column's name in
    the paper and its mIoU there."""

    dataset: str
    column: str
    paper: float


@dataclass(frozen=True)
class Preset:
    """A paper table.

    Attributes:
        name: the ``--preset`` name.
        title: the table, in words.
        task: ``"open-vocab"`` or ``"unsupervised"`` (:func:`~.runner.evaluate`'s ``protocol``).
        model: the model the paper used (what ``--model`` should point at).
        family: the reader family the model needs (``"sd3"`` covers SD3 and SD3.5, ``"flux"``).
        layers: the capture layer(s) (several: maps averaged).
        entries: the columns, in the paper's order.
        lora: the MAGNET weights the row used (``--lora``), or None.
        gt_only, threshold, power, pre_resize, resolution, steps, noise_step: the evaluation settings.
        note: shown with the report.
    """

    name: str
    title: str
    task: str
    model: str
    family: str
    layers: tuple[int, ...]
    entries: tuple[PaperEntry, ...]
    lora: str | None = None
    gt_only: bool = True
    threshold: float = 0.1
    power: float = 1.0
    pre_resize: int = 640
    resolution: int = 1024
    steps: int = 28
    noise_step: int = 8
    note: str = ""


def _ovss(values: tuple[float, ...]) -> tuple[PaperEntry, ...]:
    names = (("voc20", "VOC20"), ("coco-object", "COCO-Object"), ("context59", "PC59"), ("ade150", "ADE150"),
             ("cityscapes", "Cityscapes"))
    return tuple(PaperEntry(d, c, v) for (d, c), v in zip(names, values, strict=True))


def _unsup(values: tuple[float, ...]) -> tuple[PaperEntry, ...]:
    names = (("voc21", "VOC21"), ("context59-bg", "PC59"), ("coco-object", "COCO-Object"),
             ("coco-stuff27", "COCO-Stuff-27"), ("cityscapes", "Cityscapes"), ("ade150", "ADE"))
    return tuple(PaperEntry(d, c, v) for (d, c), v in zip(names, values, strict=True))


_SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"
_OV = "open-vocabulary segmentation, GT-only prompt, background excluded"
_UN = "unsupervised segmentation, empty prompt, KL merging (threshold 0.1), Hungarian matching per image"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("ovss-sd3", f"SD3, {_OV}", "open-vocab", _SD3, "sd3", (9,), _ovss((89.2, 62.0, 49.0, 34.2, 26.5))),
    Preset("ovss-sd35", f"SD3.5, {_OV}", "open-vocab", "stabilityai/stable-diffusion-3.5-medium", "sd3", (9,),
           _ovss((86.1, 57.8, 43.4, 30.7, 23.8))),
    Preset("ovss-flux", f"Flux.1-dev, {_OV}", "open-vocab", "black-forest-labs/FLUX.1-dev", "flux", (12, 17),
           _ovss((83.1, 50.6, 38.2, 23.9, 17.1)), steps=50,
           note="layers 12 and 17 as SEG4DIFF.md lists them for Flux.1-dev (the authors' script leaves the layer "
                "to an argument); the reader follows their Flux path: 50 steps, guidance 3.5, 77 T5 positions "
                "from 0, the image left in [0, 1] for the VAE, the timestep shift computed for 16 tokens"),
    Preset("ovss-magnet-coco", f"SD3 + MAGNET (COCO), {_OV}", "open-vocab", _SD3, "sd3", (9,),
           _ovss((89.8, 62.9, 51.2, 35.2, 26.0)), lora="chyun/seg4diff-coco-lora lora_weights.pth"),
    Preset("ovss-magnet-sa1b", f"SD3 + MAGNET (SA-1B), {_OV}", "open-vocab", _SD3, "sd3", (9,),
           _ovss((89.1, 62.0, 49.1, 34.7, 25.4)), lora="chyun/seg4diff-sa1b-lora lora_weights.pth"),
    Preset("unsup-sd3", f"SD3, {_UN}", "unsupervised", _SD3, "sd3", (9,),
           _unsup((54.9, 52.6, 38.5, 49.7, 24.2, 44.9))),
    Preset("unsup-magnet-coco", f"SD3 + MAGNET (COCO), {_UN}", "unsupervised", _SD3, "sd3", (9,),
           _unsup((56.1, 53.5, 38.8, 53.5, 24.4, 45.4)), lora="chyun/seg4diff-coco-lora lora_weights.pth"),
)}


def preset_unavailable(preset: Preset) -> str | None:
    """Why ``preset`` cannot run in this installation (its model family is not readable), or None.

    Example:
        >>> preset_unavailable(PRESETS["ovss-sd3"]) is None
        True
    """
    from ..reader import FAMILIES

    if any(getattr(f, "name", None) == preset.family for f in FAMILIES):
        return None
    have = ", ".join(sorted({str(getattr(f, "name", "?")) for f in FAMILIES}))
    return (f"preset {preset.name}: the {preset.family!r} model family ({preset.model}) is not registered in "
            f"seg4diff_fast.reader (readable families: {have}). No dataset was run.")


def run_preset(
    preset: Preset,
    segmenter: Any,
    root: str,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    threshold: float | None = None,
    power: float | None = None,
    evaluate_fn: Callable[..., dict] | None = None,
) -> dict:
    """Every dataset of ``preset`` under ``root`` with ``segmenter`` (built with the preset's layers and
    pre-resize by the caller). A dataset whose folders are missing, or whose run fails, is reported and the
    others still run.

    Returns:
        ``{"preset", "title", "task", "segmenter_protocol", "rows": [...], "ok", "missing", "failed"}``; each
        row ``{"dataset", "column", "paper", "mIoU", "delta", "status" ("ok"/"missing"/"failed"), "error"?,
        "tried"?, "result"?}``.
    """
    from .datasets import DatasetNotFoundError, SegDataset
    from .paper_protocol import protocol_variant
    from .runner import evaluate

    evaluate_fn = evaluate_fn or evaluate
    rows = []
    entries = preset.entries
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), desc=preset.name, unit="dataset")
    for entry in entries:
        row: dict[str, Any] = {"dataset": entry.dataset, "column": entry.column, "paper": entry.paper,
                               "mIoU": None, "delta": None}
        try:
            dataset = SegDataset.standard(entry.dataset, root)
        except DatasetNotFoundError as e:
            row.update(status="missing", error=str(e), tried=e.tried)
        except (FileNotFoundError, ValueError, OSError) as e:
            row.update(status="missing", error=str(e))
        else:
            try:
                result = evaluate_fn(segmenter, dataset, protocol=preset.task, gt_only=preset.gt_only,
                                     limit=limit, batch_size=batch_size, progress=progress,
                                     threshold=preset.threshold if threshold is None else threshold,
                                     power=preset.power if power is None else power)
            except (ValueError, TypeError, OSError, RuntimeError) as e:
                row.update(status="failed", error=f"{entry.dataset}: {type(e).__name__}: {e}")
            else:
                miou = result.get("mIoU")
                row.update(status="ok", mIoU=miou, result=result,
                           delta=None if miou is None else round(miou - entry.paper, 4))
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "preset": preset.name,
        "title": preset.title,
        "task": preset.task,
        "segmenter_protocol": protocol_variant(segmenter),
        "rows": rows,
        "ok": [r["dataset"] for r in rows if r["status"] == "ok"],
        "missing": [r["dataset"] for r in rows if r["status"] == "missing"],
        "failed": [r["dataset"] for r in rows if r["status"] == "failed"],
    }


def _num(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def format_report(report: dict) -> str:
    """The table printed after a preset: one line per dataset (ours, the paper's, the difference, images,
    status), then the problems, then a summary line.

    Example:
        >>> rep = {"preset": "p", "title": "t", "segmenter_protocol": "paper", "ok": ["voc20"], "missing": [],
        ...        "failed": [], "rows": [{"dataset": "voc20", "column": "VOC20", "paper": 89.2, "mIoU": 88.0,
        ...        "delta": -1.2, "status": "ok", "result": {"images": 3}}]}
        >>> print(format_report(rep).splitlines()[-1])
        p: 1/1 datasets ran (protocol: paper), mean mIoU 88.0 vs the paper's 89.2
    """
    head = f"{'dataset':<14} {'ours':>7} {'paper':>7} {'diff':>7} {'images':>7}  status"
    lines = [f"{report['preset']}: {report['title']} (protocol: {report['segmenter_protocol']})", head,
             "-" * len(head)]
    for r in report["rows"]:
        images = r.get("result", {}).get("images") if r["status"] == "ok" else None
        lines.append(f"{r['column']:<14} {_num(r['mIoU']):>7} {_num(r['paper']):>7} {_num(r['delta'], True):>7} "
                     f"{'-' if images is None else images:>7}  {r['status']}")
    lines.append("-" * len(head))
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['status']}: {r['error']}")
    done = [r for r in report["rows"] if r["status"] == "ok" and r["mIoU"] is not None]
    summary = f"{report['preset']}: {len(report['ok'])}/{len(report['rows'])} datasets ran " \
              f"(protocol: {report['segmenter_protocol']})"
    if done:
        ours = sum(r["mIoU"] for r in done) / len(done)
        paper = sum(r["paper"] for r in done) / len(done)
        summary += f", mean mIoU {ours:.1f} vs the paper's {paper:.1f}"
    if report["missing"]:
        summary += f"; missing: {', '.join(report['missing'])}"
    if report["failed"]:
        summary += f"; failed: {', '.join(report['failed'])}"
    lines.append(summary)
    return "\n".join(lines)
