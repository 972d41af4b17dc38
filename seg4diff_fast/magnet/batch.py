"""From data samples to what one MAGNET step needs: model inputs, token plans, predictions and targets.

- :class:`PreparedData` (DataLoader side, may run in workers): image → (3, R, R) in [−1, 1] (bilinear
  stretch, as the segmenter), masks → (K, R, R) uint8 (nearest).
- :func:`plan_tokens` (main process, tokenizer): for direct (COCO-style) samples the prompt is the class
  names and each class's CLIP positions (the segmenter's :func:`~seg4diff_fast.reader.prompts.plan_prompts`);
  for matched (SA-1B-style) samples the caption and its content positions (BOS and EOS excluded).
- :func:`predictions_and_targets`: the expert layer's raw maps → one prediction per target mask: the mean
  of a class's token maps (head mean), or the Hungarian-matched candidate among every caption token of
  every head; all of a batch concatenated, so one fused loss call averages over every mask.
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

__all__ = ["PreparedData", "TokenPlan", "plan_tokens", "predictions_and_targets", "collate_prepared"]


class PreparedData(torch.utils.data.Dataset):
    """Wraps a MAGNET data source: item i → dict(x, masks, prompt, names, key)."""

    def __init__(self, data: Any, resolution: int):
        self.data = data
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
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


@dataclass(frozen=True)
class TokenPlan:
    """One sample's prompt and where its predictions come from.

    Attributes:
        prompt: the text encoded for this sample.
        groups: direct data: one tuple of CLIP positions per target mask (their maps are averaged);
            matched data: None.
        caption: matched data: the content positions of the caption (candidates); direct: ().
        skip: why the sample gives no mask loss ("" when it does).
    """

    prompt: str
    groups: tuple[tuple[int, ...], ...] | None
    caption: tuple[int, ...]
    skip: str = ""


def plan_tokens(prompt: str, names: Sequence[str] | None, tokenizer: Any) -> TokenPlan:
    """Token plan of one sample (see :class:`TokenPlan`); problems become a ``skip`` reason, not a crash.

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> plan_tokens("", ["cat", "red car"], tiny_clip_tokenizer()).groups
        ((1,), (2, 3))
        >>> plan_tokens("a cat", None, tiny_clip_tokenizer()).caption
        (1, 2)
    """
    if names is not None:
        if not names:
            return TokenPlan("", (), (), skip="no masks")
        try:
            chunks = plan_prompts(list(names), tokenizer)
        except ValueError as e:
            return TokenPlan("", (), (), skip=str(e))
        if len(chunks) != 1:
            return TokenPlan("", (), (), skip=f"{len(names)} class names do not fit one prompt")
        return TokenPlan(chunks[0].prompt, chunks[0].positions, ())
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
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Predictions (M, h, w) and their target masks (M, R, R) for a batch, or None if no sample has any.

    Args:
        maps: the expert layer's raw scores, (B, T, h, w) head-mean or (B, H, T, h, w) per head, where
            T covers the CLIP positions.
        masks: per sample (K_b, R, R) in {0, 1}.
        plans: per sample :class:`TokenPlan`.
        head: optional residual conv head applied to every prediction (before matching).
    """
    preds, tgts = [], []
    per_head = maps.dim() == 5
    for b, (plan, m) in enumerate(zip(plans, masks)):
        if plan.skip or m.shape[0] == 0:
            continue
        mb = maps[b]
        if plan.groups is not None:
            mean = mb.mean(0) if per_head else mb
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
                                 alpha=focal_alpha, gamma=focal_gamma)
        preds.append(cand[pi.to(cand.device)])
        tgts.append(m[ti.to(m.device)])
    if not preds:
        return None
    return torch.cat(preds), torch.cat(tgts)
