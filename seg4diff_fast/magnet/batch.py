"""From data samples to what one MAGNET step needs: model inputs, token plans, predictions and targets.

- :class:`PreparedData` (DataLoader side, may run in workers): image → (3, R, R) in [−1, 1] (bilinear
  stretch, as the segmenter), masks → (K, R, R) uint8 (nearest).
- :func:`plan_tokens` (main process, tokenizer): for direct (COCO-style) samples the prompt is the class
  names and each class's CLIP positions (the segmenter's :func:`~seg4diff_fast.reader.prompts.plan_prompts`);
  for matched (SA-1B-style) samples the caption and its content positions (BOS and EOS excluded).
- :func:`predictions_and_targets`: the expert layer's raw maps → one prediction per target mask: the mean
  of a class's token maps (head mean), or the Hungarian-matched candidate among every caption token of
  every head; all of a batch concatenated, so one fused loss call averages over every mask.

``protocol="paper"`` (docs/PAPER_PROTOCOL_MAGNET.md): :class:`PreparedData` reads the source through
:class:`~seg4diff_fast.magnet.data.PaperView` (the authors' transform chains, an RNG seeded from ``(seed,
position)``) and :class:`PaperCollate` does the model side of their pipeline (pad the batch to a multiple of
32, the bilinear stretch, SA-1B's area filter and cap on the padded size; masks stay at the padded size);
:func:`plan_tokens` locates full class names with ``isin`` and makes all 77 positions SA-1B candidates;
:func:`predictions_and_targets` runs the conv head on every token map before the class mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..reader.images import as_float, to_model_input, to_rgb
from ..reader.prompts import plan_prompts
from .matching import match_masks

__all__ = ["PreparedData", "PaperCollate", "TokenPlan", "plan_tokens", "predictions_and_targets",
           "collate_prepared", "paper_rng"]


def paper_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the sample at ``position`` in the data stream (global over ranks and epochs) under
    ``protocol="paper"``: ``numpy.random.default_rng([seed, position])``, so a run (and its resume) sees the
    same crops and flips, and an image gets fresh ones in every epoch."""
    return np.random.default_rng([int(seed), int(position)])


class PreparedData(torch.utils.data.Dataset):
    """Wraps a MAGNET data source: item i → dict(x, masks, prompt, names, key).

    ``protocol="paper"``: the source is read through :class:`~seg4diff_fast.magnet.data.PaperView`; an item
    is ``(i, position)`` (the trainer's sampler yields those; a plain ``i`` is its own position) and gives
    dict(image, masks, prompt, names, key, pad, filter) for :class:`PaperCollate`, the sample drawn with
    :func:`paper_rng` ``(seed, position)``.
    """

    def __init__(self, data: Any, resolution: int, protocol: str = "corrected", seed: int = 0):
        self.resolution = int(resolution)
        self.protocol, self.seed = protocol, int(seed)
        if protocol == "paper":
            from .data import PaperView

            self.view = data if isinstance(data, PaperView) else PaperView(data)
            self.data = self.view.source
        elif protocol == "corrected":
            self.data, self.view = data, None
        else:
            raise ValueError(f"protocol must be 'paper' or 'corrected', got {protocol!r}")

    def __len__(self) -> int:
        return len(self.view) if self.view is not None else len(self.data)

    def _paper_item(self, key: Any) -> dict[str, Any]:
        i, pos = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), int(key))
        s = self.view.sample(i, paper_rng(self.seed, pos))
        masks = np.asarray(s.masks)
        rgb = as_float(to_rgb(s.image))
        if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(rgb.shape[-2:]):
            raise ValueError(f"sample {s.key}: masks of shape {tuple(masks.shape)} do not match the image "
                             f"({rgb.shape[-2]}×{rgb.shape[-1]}); masks must be (K, H, W) at the image's size")
        return {"image": rgb, "masks": torch.from_numpy(masks.astype(np.uint8)), "prompt": s.prompt,
                "names": s.names, "key": s.key, "pad": self.view.pad_multiple, "filter": self.view.mask_filter}

    def __getitem__(self, i: Any) -> dict[str, Any]:
        if self.view is not None:
            return self._paper_item(i)
        s = self.data[int(i)]
        rgb = as_float(to_rgb(s.image))
        masks = np.asarray(s.masks)
        if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(rgb.shape[-2:]):
            raise ValueError(f"sample {s.key}: masks of shape {tuple(masks.shape)} do not match the image "
                             f"({rgb.shape[-2]}×{rgb.shape[-1]}); masks must be (K, H, W) at the image's size")
        r = self.resolution
        x = to_model_input([rgb], r)[0]
        m = torch.from_numpy(masks.astype(np.uint8))
        if tuple(m.shape[1:]) != (r, r) and m.shape[0]:
            m = F.interpolate(m[None].float(), (r, r), mode="nearest")[0].to(torch.uint8)
        return {"x": x, "masks": m, "prompt": s.prompt, "names": s.names, "key": s.key}


def collate_prepared(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the images; keep masks, prompts and names as lists (K differs per image)."""
    return {"x": torch.stack([it["x"] for it in items]), "masks": [it["masks"] for it in items],
            "prompt": [it["prompt"] for it in items], "names": [it["names"] for it in items],
            "key": [it["key"] for it in items]}


class PaperCollate:
    """The model side of the authors' batch (``protocol="paper"``), as a DataLoader ``collate_fn``.

    1. Images and masks are zero-padded at the bottom/right to the batch's largest height and width, rounded
       up to the items' ``pad`` (detectron2's ``ImageList.from_tensors(images, 32)`` in their model; the
       masks as their ``prepare_targets`` pads them).
    2. Images are stretched to R×R (``F.interpolate`` bilinear, ``align_corners=False``) and mapped to [−1, 1].
    3. Items with a ``filter`` (SA-1B: ``(min_area, max_masks)``) keep the masks whose area over the padded
       size is above ``min_area`` (float32, as their ``valid_ratio``), largest first (stable), at most
       ``max_masks``.

    Masks stay at the padded size: the loss upsamples predictions to it, the matching cost resizes them
    (nearest) to the token grid.

    Example:
        >>> import torch
        >>> items = [{"image": torch.rand(3, 40, 50), "masks": torch.ones(1, 40, 50, dtype=torch.uint8),
        ...           "prompt": "a", "names": ["a"], "key": "k", "pad": 32, "filter": None}]
        >>> b = PaperCollate(16)(items)
        >>> tuple(b["x"].shape), tuple(b["masks"][0].shape)
        ((1, 3, 16, 16), (1, 64, 64))
    """

    def __init__(self, resolution: int):
        self.resolution = int(resolution)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        h = max(int(it["image"].shape[-2]) for it in items)
        w = max(int(it["image"].shape[-1]) for it in items)
        mult = max((int(it["pad"]) for it in items if it.get("pad")), default=1)
        h, w = -(-h // mult) * mult, -(-w // mult) * mult
        images, masks = [], []
        for it in items:
            img, m = it["image"], it["masks"]
            ph, pw = h - img.shape[-2], w - img.shape[-1]
            if ph or pw:
                img = F.pad(img, (0, pw, 0, ph))
                m = F.pad(m, (0, pw, 0, ph))
            if it.get("filter") is not None and m.shape[0]:
                min_area, max_masks = it["filter"]
                areas = m.sum((1, 2), dtype=torch.int64)
                keep = torch.nonzero(areas / (h * w) > min_area).flatten()
                order = keep[torch.argsort(areas[keep], descending=True, stable=True)][: int(max_masks)]
                m = m[order]
            images.append(img)
            masks.append(m)
        return {"x": to_model_input(images, self.resolution), "masks": masks,
                "prompt": [it["prompt"] for it in items], "names": [it["names"] for it in items],
                "key": [it["key"] for it in items]}


@dataclass(frozen=True)
class TokenPlan:
    """One sample's prompt and where its predictions come from.

    Attributes:
        prompt: the text encoded for this sample.
        groups: direct data: one tuple of CLIP positions per target mask (their maps are averaged);
            matched data: None.
        caption: matched data: the candidate positions (corrected: the caption's content positions; paper:
            all of them, 0..76); direct: ().
        skip: why the sample gives no mask loss ("" when it does).
        keep: direct data under paper: the masks that have a group (a class whose name's tokens are nowhere
            in the prompt is dropped with its mask, as the authors do); None: every mask.
    """

    prompt: str
    groups: tuple[tuple[int, ...], ...] | None
    caption: tuple[int, ...]
    skip: str = ""
    keep: tuple[int, ...] | None = None


def _paper_plan(prompt: str, names: Sequence[str] | None, tokenizer: Any) -> TokenPlan:
    """The authors' token plan (``seg4diff_model_train.py``). Direct: the prompt is the full names joined by
    spaces; a name's tokens are its own tokenization without BOS/EOS; its positions are every position of
    the lowercased prompt's ids (cut to 77) holding one of those tokens (``torch.isin``: ``dog`` also takes the
    ``dog`` of ``hot dog``). Matched: every one of the 77 positions is a candidate (BOS, EOS, padding)."""
    max_len = int(tokenizer.model_max_length)
    if names is not None:
        names = list(names)
        if not names:
            return TokenPlan("", (), (), skip="no masks")
        prompt = " ".join(names)
        ids = tokenizer(prompt.lower())["input_ids"][:max_len]
        groups, keep = [], []
        for j, name in enumerate(names):
            own = set(tokenizer(name)["input_ids"][1:-1])
            pos = tuple(k for k, t in enumerate(ids) if t in own)
            if pos:
                groups.append(pos)
                keep.append(j)
        if not groups:
            return TokenPlan(prompt, (), (), skip="no class name's tokens are in its prompt")
        return TokenPlan(prompt, tuple(groups), (), keep=tuple(keep))
    ids = tokenizer(prompt, truncation=True, max_length=max_len)["input_ids"]
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    if not any(t not in specials for t in ids):  # the authors' code fails on such a caption
        return TokenPlan(prompt, None, (), skip=f"caption {prompt!r} tokenizes to nothing")
    return TokenPlan(prompt, None, tuple(range(max_len)))


def plan_tokens(prompt: str, names: Sequence[str] | None, tokenizer: Any, protocol: str = "corrected", *,
                locate: Callable[[str], list[tuple[int, int, int]]] | None = None,
                limit: int | None = None) -> TokenPlan:
    """Token plan of one sample (see :class:`TokenPlan`); problems become a ``skip`` reason, not a crash.

    ``protocol="corrected"``: direct samples get the segmenter's prompt and consecutive positions
    (:func:`~seg4diff_fast.reader.prompts.plan_prompts`), matched ones the caption's content positions.
    ``protocol="paper"``: the authors' rules (full names, ``isin`` positions; all 77 positions as candidates).
    ``locate`` / ``limit``: the model family's token locator and prompt capacity
    (:meth:`~seg4diff_fast.reader.PipelineReader.token_positions` passes them; default: the tokenizer's own
    positions, CLIP's 75).

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> plan_tokens("", ["cat", "red car"], tiny_clip_tokenizer()).groups
        ((1,), (2, 3))
        >>> plan_tokens("a cat", None, tiny_clip_tokenizer()).caption
        (1, 2)
        >>> plan_tokens("", ["cat", "red cat"], tiny_clip_tokenizer(), protocol="paper").groups
        ((1, 3), (1, 2, 3))
    """
    if protocol == "paper":
        return _paper_plan(prompt, names, tokenizer)
    if names is not None:
        if not names:
            return TokenPlan("", (), (), skip="no masks")
        try:
            chunks = plan_prompts(list(names), tokenizer, locate=locate, limit=limit)
        except ValueError as e:
            return TokenPlan("", (), (), skip=str(e))
        if len(chunks) != 1:
            return TokenPlan("", (), (), skip=f"{len(names)} class names do not fit one prompt")
        return TokenPlan(chunks[0].prompt, chunks[0].positions, ())
    if locate is not None:  # the family's positions, cut to what one prompt holds
        content = tuple(p for p, _, _ in locate(prompt)[:limit])
    else:
        ids = tokenizer(prompt, truncation=True, max_length=int(tokenizer.model_max_length))["input_ids"]
        specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        content = tuple(i for i, t in enumerate(ids) if t not in specials)
    if not content:
        return TokenPlan(prompt, None, (), skip=f"caption {prompt!r} tokenizes to nothing")
    return TokenPlan(prompt, None, content)


def predictions_and_targets(
    maps: torch.Tensor,
    masks: Sequence[torch.Tensor],
    plans: Sequence[TokenPlan],
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    match_focal_weight: float = 0.02,
    match_dice_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    protocol: str = "corrected",
    match_focal_form: str = "standard",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Predictions (M, h, w) and their target masks (M, R, R) for a batch, or None if no sample has any.

    Args:
        maps: the expert layer's raw scores, (B, T, h, w) head-mean or (B, H, T, h, w) per head, where
            T covers the CLIP positions.
        masks: per sample (K_b, R, R) in {0, 1} (paper: at the padded batch size).
        plans: per sample :class:`TokenPlan`.
        head: optional residual conv head applied to every prediction before matching (corrected), or to
            every token map before the class mean / to every candidate (paper).
        match_focal_weight, match_dice_weight, focal_alpha, focal_gamma, match_focal_form: the matching cost
            (:func:`~seg4diff_fast.magnet.matching.match_costs`).
        protocol: ``"corrected"`` or ``"paper"`` (where the head sits; the plans carry the rest).
    """
    preds, tgts = [], []
    per_head = maps.dim() == 5
    paper = protocol == "paper"
    for b, (plan, m) in enumerate(zip(plans, masks)):
        if plan.skip or m.shape[0] == 0:
            continue
        mb = maps[b]
        if plan.groups is not None:
            mean = mb.mean(0) if per_head else mb
            if plan.keep is not None:
                m = m[list(plan.keep)]
            if paper and head is not None:  # the head on each token map, then the class means
                used = sorted({k for g in plan.groups for k in g})
                row = {k: r for r, k in enumerate(used)}
                tok = head(mean[used])
                p = torch.stack([tok[[row[k] for k in g]].mean(0) for g in plan.groups])
            else:
                p = torch.stack([mean[list(g)].mean(0) for g in plan.groups])
                if head is not None:
                    p = head(p)
            preds.append(p)
            tgts.append(m)
            continue
        cand = mb[..., list(plan.caption), :, :]
        cand = cand.flatten(0, 1) if per_head else cand  # every head's every caption token
        if head is not None:
            cand = head(cand)
        pi, ti = match_masks(cand.detach(), m, focal_weight=match_focal_weight, dice_weight=match_dice_weight,
                             alpha=focal_alpha, gamma=focal_gamma, focal_form=match_focal_form)
        preds.append(cand[pi.to(cand.device)])
        tgts.append(m[ti.to(m.device)])
    if not preds:
        return None
    return torch.cat(preds), torch.cat(tgts)
