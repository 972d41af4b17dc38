"""Layer analysis (Seg4Diff's first phase): where each block's joint attention puts its mass, and which
blocks and heads ground words in the image.

- :func:`attention_block_mass`: for every block and head, the share of attention mass in the four blocks
  of the joint attention matrix, I2I / I2T (image rows → image / text keys) and T2I / T2T (text rows →
  image / text keys), at the noised latent the segmenter reads maps from. Computed with the fused
  :func:`~seg4diff_fast.joint_attention` op (never an N×N matrix): one call per block captures every row's
  probabilities on the text columns, summed over the columns.
- :func:`layer_sweep`: the protocol A / B mIoU (ShapesWorld scenes) of every block's image→text maps,
  head mean and each head alone, from one transformer pass per batch of scenes that captures all blocks.
- :func:`write_layer_report`: ``layers.json``, ``layers.md`` and the figure ``layers.png`` (matplotlib:
  ``pip install seg4diff-fast[analysis]``).

Protocols (as :func:`seg4diff_fast.shapes.train.evaluate_grounding`): **A** prompt = the object classes
present, background pixels ignored, scenes with ≥ 2 object classes; baseline: a uniformly random present
class per pixel (``numpy.random.default_rng(0)``, drawn in scene order). **B** background included as a
class, every scene; baseline: all background. mIoU is over the world's 13 classes, dataset-level.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..utils.files import atomic_write, write_json
from .metrics import MeanIoU

__all__ = ["SHARES", "attention_block_mass", "layer_sweep", "write_layer_report", "format_layer_table"]

#: The four blocks of the joint attention matrix, in the order of the last axis of ``mass``.
SHARES: tuple[str, ...] = ("I2I", "I2T", "T2I", "T2T")


# ----------------------------------------------------------------------------------------------------
# attention mass
class _BlockMassProcessor:
    """``JointAttnProcessor2_0`` on the fused op that also records, per head, the text-key mass of every
    query row (image rows → I2T, text rows → T2T), averaged over the rows, summed over the batch."""

    def __init__(self, layer: int, sink: dict[int, torch.Tensor], backend: str | None = None):
        self.layer = layer
        self.sink = sink
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None):  # mask ignored, as by JointAttnProcessor2_0
        from ..capture.sd3 import joint_output, joint_qkv
        from ..ops.joint_attention import MAX_SELECTED, joint_attention

        batch, n_img = hidden_states.shape[:2]
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        if encoder_hidden_states is None:  # SD3.5's attn2 never comes here (only block.attn is patched)
            out, _ = joint_attention(q, k, v, backend=self.backend)
        else:
            heads = q.shape[1]
            n = q.shape[2]
            text_mass = torch.zeros(batch, heads, n, dtype=torch.float64, device=q.device)
            out = None
            for c0 in range(n_img, n, MAX_SELECTED):  # SD3: [image; text], text keys are n_img … n−1
                cols = torch.arange(c0, min(c0 + MAX_SELECTED, n), device=q.device)
                o, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=(0, n), mode="probs",
                                          head_reduce="none", backend=self.backend)
                out = o if out is None else out
                text_mass += maps.to(torch.float64).sum(-1)  # (B, H, N): each row's mass on these text keys
            i2t = text_mass[:, :, :n_img].mean(-1)
            t2t = text_mass[:, :, n_img:].mean(-1)
            part = torch.stack([i2t, t2t], dim=-1).sum(0).cpu()  # (H, 2), summed over the batch
            self.sink[self.layer] = part if self.layer not in self.sink else self.sink[self.layer] + part
        return joint_output(attn, out, n_img, encoder_hidden_states is not None, q.dtype)


def _segmenter(pipe: Any, resolution: int | None, t5_length: int | None, seed: int, noise_step: int,
               num_inference_steps: int, batch_size: int, backend: str | None):
    from ..segment import Seg4DiffSegmenter

    return Seg4DiffSegmenter(pipe, layer=0, num_inference_steps=num_inference_steps, noise_step=noise_step,
                             resolution=resolution, seed=seed, t5_length=t5_length, batch_size=batch_size,
                             backend=backend)


@torch.no_grad()
def attention_block_mass(
    pipe: Any,
    images: Sequence[Any],
    prompts: str | Sequence[str],
    resolution: int | None = None,
    t5_length: int | None = None,
    seed: int = 0,
    noise_step: int = 8,
    num_inference_steps: int = 28,
    *,
    batch_size: int = 4,
    backend: str | None = None,
) -> dict[str, Any]:
    """Share of attention mass in the I2I / I2T / T2I / T2T blocks of every block's and head's joint
    attention matrix, at the noised latent the segmenter uses.

    For each query row, its softmax probability mass is summed over a key block (image keys or text
    keys); the shares are averaged over the block's rows (image rows for I2I / I2T, text rows for
    T2I / T2T: all ``77 + t5_length`` text positions, padding included) and over the images. So
    I2I + I2T = 1 and T2I + T2T = 1 for every block and head. Inputs are prepared exactly as
    :class:`~seg4diff_fast.segment.Seg4DiffSegmenter` prepares them (``latents``, ``encode_text``: same
    noise, timestep ``timesteps[-noise_step]``, zero T5 positions). Each block's attention runs on the
    fused op with ``capture_rows`` = all rows and ``capture_cols`` = the text columns (SD3's joint
    sequence is ``[image; text]``), so no N×N matrix is ever made; the forward continues on the op's own
    output and stops after the last block's attention. q/k/v are those of diffusers'
    ``JointAttnProcessor2_0`` (qk-norms included); SD3.5's image-only ``attn2`` is left alone. The last
    block is ``context_pre_only``: its text rows are computed but feed nothing; they are reported anyway.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` whose attention modules have diffusers' stock processors.
        images: images (PIL, numpy, tensor in [0, 1]), stretched to ``resolution``².
        prompts: one prompt per image, or one for all.
        resolution, t5_length: None: the model's (:func:`~seg4diff_fast.models.model_defaults`).
        seed, noise_step, num_inference_steps: the noise, as the segmenter's.
        batch_size: images per transformer call.
        backend: ``joint_attention`` backend (None: best available).

    Returns:
        ``{"shares": SHARES, "mass": (L, H, 4) float64 [I2I, I2T, T2I, T2T], "I2I" … "T2T": (L, H) each,
        "n_images", "n_image_tokens", "n_text_tokens", "timestep", "sigma", "resolution", "t5_length"}``.

    Example:
        >>> import torch
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline(t5=False)
        >>> r = attention_block_mass(pipe, [torch.rand(3, 32, 32)] * 2, "a cat on a red sofa", resolution=32)
        >>> r["mass"].shape, r["n_image_tokens"], r["n_text_tokens"]
        ((3, 4, 4), 64, 154)
        >>> bool(abs(r["I2I"] + r["I2T"] - 1).max() < 1e-9), bool(abs(r["T2I"] + r["T2T"] - 1).max() < 1e-9)
        (True, True)
    """
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

    from ..segment.segmenter import _EarlyExit, _raise_early_exit

    images = list(images)
    if not images:
        raise ValueError("attention_block_mass: give at least one image")
    prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompt_list) != len(images):
        raise ValueError(f"attention_block_mass: {len(prompt_list)} prompts for {len(images)} images")
    seg = _segmenter(pipe, resolution, t5_length, seed, noise_step, num_inference_steps, batch_size, backend)
    tr = seg.transformer
    blocks = tr.transformer_blocks
    for i, block in enumerate(blocks):
        if not isinstance(block.attn.processor, (JointAttnProcessor2_0, FusedJointAttnProcessor2_0)):
            raise TypeError(f"attention_block_mass needs diffusers' stock attention processors; block {i} has "
                            f"{type(block.attn.processor).__name__} (disable fast capture / remove it first)")
    sink: dict[int, torch.Tensor] = {}
    saved = [block.attn.processor for block in blocks]
    for i, block in enumerate(blocks):
        block.attn.set_processor(_BlockMassProcessor(i, sink, backend))
    handle = blocks[-1].attn.register_forward_hook(_raise_early_exit)
    n_img_tokens = n_txt_tokens = 0
    try:
        for s in range(0, len(images), seg.batch_size):
            tensors, _ = seg._prepare(images[s:s + seg.batch_size])
            latents = seg.latents(tensors)
            embeds, pooled = seg.encode_text(prompt_list[s:s + seg.batch_size])
            n_img_tokens = (latents.shape[-2] // seg.patch) * (latents.shape[-1] // seg.patch)
            n_txt_tokens = embeds.shape[1]
            try:
                tr(hidden_states=latents, timestep=seg._timestep.expand(latents.shape[0]).to(latents.device),
                   encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)
            except _EarlyExit:
                pass
    finally:
        handle.remove()
        for block, proc in zip(blocks, saved):
            block.attn.set_processor(proc)
    text = torch.stack([sink[i] for i in range(len(blocks))]).numpy() / len(images)  # (L, H, 2): I2T, T2T
    i2t, t2t = text[..., 0], text[..., 1]
    mass = np.stack([1.0 - i2t, i2t, 1.0 - t2t, t2t], axis=-1)
    out: dict[str, Any] = {"shares": list(SHARES), "mass": mass}
    out.update({name: mass[..., j] for j, name in enumerate(SHARES)})
    out.update({"n_images": len(images), "n_image_tokens": int(n_img_tokens), "n_text_tokens": int(n_txt_tokens),
                "timestep": seg.timestep, "sigma": seg.sigma, "resolution": seg.resolution,
                "t5_length": seg.t5_length})
    return out


# ----------------------------------------------------------------------------------------------------
# layer sweep
def _head_mean(maps: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over heads summed in head order, then divided: the fused op's own ``head_reduce="mean"``
    arithmetic, so the head-mean maps are those the segmenter reads (bit for bit on the torch backend)."""
    acc = maps.select(dim, 0).clone()
    for i in range(1, maps.shape[dim]):
        acc.add_(maps.select(dim, i))
    return acc.div_(maps.shape[dim])


def _per_head_maps(seg: Any, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                   layers: tuple[int, ...], head_reduce: str) -> torch.Tensor:
    """One transformer call capturing every layer of ``layers``: (B, L, H, T, h, w) (or (B, L, T, h, w))."""
    saved = seg.head_reduce
    seg.head_reduce = head_reduce  # the segmenter's own capture call, with the head axis kept when "none"
    try:
        return seg.transformer_maps(latents, embeds, pooled, layers)
    finally:
        seg.head_reduce = saved


@torch.no_grad()
def layer_sweep(
    pipe: Any,
    scenes: Sequence[Any],
    per_head: bool = True,
    *,
    layers: Sequence[int] | None = None,
    resolution: int | None = None,
    t5_length: int | None = None,
    seed: int = 0,
    noise_step: int = 8,
    num_inference_steps: int = 28,
    batch_size: int = 16,
    backend: str | None = None,
) -> dict[str, Any]:
    """Protocol A and B mIoU of every block's image→text maps (head mean, and each head when
    ``per_head``) on ShapesWorld scenes, with both baselines.

    A block's class map is the mean of the class's CLIP token maps (positions from
    :func:`~seg4diff_fast.segment.prompts.plan_prompts`), upsampled bilinearly to the scene's size by
    :func:`~seg4diff_fast.ops.upsample_argmax.upsample_argmax`, argmax over classes: the segmenter's
    path, with a head's own probability maps in place of the head mean for the per-head scores. One
    transformer pass per batch of ``batch_size`` scenes (their A and B prompts as rows) captures every
    block at once (``enable_fast_capture(head_reduce="none")``) and stops after the last one.

    Args:
        pipe: a ``StableDiffusion3Pipeline``.
        scenes: :class:`~seg4diff_fast.shapes.Scene` s (``image``, ``classes``, ``label_map``,
            ``global_label_map()``); class names must come from :data:`~seg4diff_fast.shapes.CLASSES`.
        per_head: also score each head alone.
        layers: blocks to sweep (default all).
        resolution, t5_length, seed, noise_step, num_inference_steps, backend: as the segmenter's.
        batch_size: scenes per transformer pass.

    Returns:
        ``{"layers", "num_heads", "n_A", "n_B", "A", "B": [per block] mIoU %, "A_heads", "B_heads":
        [per block][per head] (when ``per_head``), "A_baseline", "B_baseline"}``.

    Example:
        >>> from seg4diff_fast.shapes import ShapesWorld, load_pipeline
        >>> scenes = [ShapesWorld(i).sample() for i in range(4)]
        >>> r = layer_sweep(load_pipeline(device="cpu"), scenes)
        >>> len(r["A"]), len(r["B_heads"][0]), r["n_B"]
        (6, 4, 4)
    """
    from ..segment.prompts import plan_prompts
    from ..shapes.world import CLASSES

    scenes = list(scenes)
    if not scenes:
        raise ValueError("layer_sweep: give at least one scene")
    seg = _segmenter(pipe, resolution, t5_length, seed, noise_step, num_inference_steps, batch_size, backend)
    layers_t = tuple(range(seg.num_layers)) if layers is None else seg._check_layers(list(layers))
    num_heads = int(seg.transformer.config.num_attention_heads)
    k = len(CLASSES)
    a_set = {i for i, s in enumerate(scenes) if len(s.classes) >= 3}
    protos = ("A", "B")
    meters = {p: [MeanIoU(k) for _ in layers_t] for p in protos}
    head_meters = {p: [[MeanIoU(k) for _ in range(num_heads)] for _ in layers_t] for p in protos}
    base = {p: MeanIoU(k) for p in protos}
    rng = np.random.default_rng(0)
    from ..ops.upsample_argmax import upsample_argmax

    def plan(names: list[str]):
        chunks = plan_prompts(names, pipe.tokenizer, None, seg.split_dash)
        if len(chunks) != 1:
            raise ValueError(f"layer_sweep: the classes {names} do not fit one prompt")
        return chunks[0]

    for s0 in range(0, len(scenes), seg.batch_size):
        idx = list(range(s0, min(s0 + seg.batch_size, len(scenes))))
        tensors, _ = seg._prepare([scenes[i].image for i in idx])
        latents = seg.latents(tensors)
        rows = []  # (scene index, its position in the batch, protocol, class names)
        for j, i in enumerate(idx):
            if i in a_set:
                rows.append((i, j, "A", list(scenes[i].object_classes)))
            rows.append((i, j, "B", list(scenes[i].classes)))
        plans = [plan(r[3]) for r in rows]
        prompts = list(dict.fromkeys(p.prompt for p in plans))
        embeds, pooled = seg.encode_text(prompts)
        which = {p: n for n, p in enumerate(prompts)}
        img = torch.tensor([r[1] for r in rows], device=latents.device)
        txt = torch.tensor([which[p.prompt] for p in plans], device=embeds.device)
        maps = _per_head_maps(seg, latents.index_select(0, img), embeds.index_select(0, txt),
                              pooled.index_select(0, txt), layers_t, "none" if per_head else "mean")
        for (i, _, proto, names), chunk, m in zip(rows, plans, maps.unbind(0)):
            s = scenes[i]
            gt = s.global_label_map()
            lut = np.array([CLASSES.index(c) for c in names])
            if proto == "A":
                gt = np.where(s.label_map == 0, 255, gt)
                base[proto].update(lut[rng.integers(0, len(names), size=gt.shape)], gt)
            else:
                base[proto].update(np.zeros_like(gt), gt)
            size = gt.shape
            mean_maps = _head_mean(m, 1) if per_head else m  # (L, T, h, w)
            scores = torch.stack([mean_maps[:, list(pos)].mean(1) for pos in chunk.positions], dim=1)
            for li in range(len(layers_t)):
                labels, _, _ = upsample_argmax(scores[li], size)
                meters[proto][li].update(lut[labels.cpu().numpy()], gt)
            if per_head:
                head_scores = torch.stack([m[:, :, list(pos)].mean(2) for pos in chunk.positions], dim=2)
                for li in range(len(layers_t)):
                    for h in range(num_heads):
                        labels, _, _ = upsample_argmax(head_scores[li, h], size)
                        head_meters[proto][li][h].update(lut[labels.cpu().numpy()], gt)

    def miou(m: MeanIoU) -> float:
        return round(float(m.compute()["mIoU"]), 2)

    n_a = len(a_set)
    out: dict[str, Any] = {"layers": list(layers_t), "num_heads": num_heads, "n_A": n_a, "n_B": len(scenes)}
    for p in protos:
        empty = p == "A" and n_a == 0
        out[p] = [math.nan if empty else miou(m) for m in meters[p]]
        if per_head:
            out[f"{p}_heads"] = [[math.nan if empty else miou(m) for m in row] for row in head_meters[p]]
        out[f"{p}_baseline"] = math.nan if empty else miou(base[p])
    return out


# ----------------------------------------------------------------------------------------------------
# report
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if not math.isfinite(v) else round(v, 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _num_layers(result: dict[str, Any]) -> int:
    mass, sweep = result.get("mass"), result.get("sweep")
    if mass is not None:
        return int(np.asarray(mass["mass"]).shape[0])
    if sweep is not None:
        return len(sweep["layers"])
    raise ValueError("the result holds neither 'mass' nor 'sweep'")


def format_layer_table(result: dict[str, Any]) -> str:
    """The per-block markdown table: I2I / I2T / T2I / T2T mass (head mean, %) and A / B mIoU.

    Args:
        result: ``{"mass": attention_block_mass(...), "sweep": layer_sweep(...)}``; either may be absent.

    Example:
        >>> import numpy as np
        >>> m = np.tile([0.9, 0.1, 0.3, 0.7], (2, 4, 1))
        >>> print(format_layer_table({"mass": {"mass": m}}))
        | block | I2I % | I2T % | T2I % | T2T % |
        |---|---|---|---|---|
        | 0 | 90.0 | 10.0 | 30.0 | 70.0 |
        | 1 | 90.0 | 10.0 | 30.0 | 70.0 |
    """
    mass, sweep = result.get("mass"), result.get("sweep")
    cols = ["block"]
    if mass is not None:
        cols += [f"{s} %" for s in SHARES]
        head_mean = np.asarray(mass["mass"], dtype=np.float64).mean(1)  # (L, 4)
    if sweep is not None:
        cols += ["A mIoU", "B mIoU"]
        layer_of = {layer: j for j, layer in enumerate(sweep["layers"])}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for b in range(_num_layers(result)):
        cells = [str(b)]
        if mass is not None:
            cells += [_fmt(100.0 * v) for v in head_mean[b]]
        if sweep is not None:
            j = layer_of.get(b)
            cells += [_fmt(sweep["A"][j]) if j is not None else "–", _fmt(sweep["B"][j]) if j is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _head_table(result: dict[str, Any]) -> str:
    mass, sweep = result.get("mass"), result.get("sweep")
    per_head_sweep = sweep is not None and "A_heads" in sweep
    cols = ["block", "head"]
    if mass is not None:
        cols += [f"{s} %" for s in SHARES]
        m = np.asarray(mass["mass"], dtype=np.float64)
        heads = m.shape[1]
    if per_head_sweep:
        cols += ["A mIoU", "B mIoU"]
        layer_of = {layer: j for j, layer in enumerate(sweep["layers"])}
        heads = int(sweep["num_heads"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for b in range(_num_layers(result)):
        for h in range(heads):
            cells = [str(b), str(h)]
            if mass is not None:
                cells += [_fmt(100.0 * v) for v in m[b, h]]
            if per_head_sweep:
                j = layer_of.get(b)
                cells += ["–", "–"] if j is None else [_fmt(sweep["A_heads"][j][h]), _fmt(sweep["B_heads"][j][h])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(result: dict[str, Any]) -> str:
    mass, sweep = result.get("mass"), result.get("sweep")
    parts = ["# Layer analysis", ""]
    if result.get("model"):
        parts.append(f"Model: `{result['model']}`.")
    if mass is not None:
        parts.append(
            f"Attention mass: {mass.get('n_images', '?')} images"
            + (f" ({mass['images']})" if mass.get("images") else "")
            + f", {mass.get('n_image_tokens', '?')} image + {mass.get('n_text_tokens', '?')} text tokens, "
            f"timestep {_fmt(mass.get('timestep'), 1)}; each row's probability mass on image (I2I, T2I) or text "
            "(I2T, T2T) keys, mean over rows, images and heads.")
    if result.get("note"):
        parts.append(f"Note: {result['note']}")
    if sweep is not None:
        parts.append(
            f"Grounding: mIoU % of each block's head-mean image→text maps on {sweep['n_A']} scenes (protocol A: "
            f"object classes, background ignored; baseline {_fmt(sweep['A_baseline'])}) and {sweep['n_B']} scenes "
            f"(protocol B: background included; baseline {_fmt(sweep['B_baseline'])}).")
    parts += ["", "## Per block", "", format_layer_table(result), ""]
    if sweep is not None:
        for p in ("A", "B"):
            vals = [(v, layer) for v, layer in zip(sweep[p], sweep["layers"]) if v is not None and math.isfinite(v)]
            if vals:
                v, layer = max(vals)
                parts.append(f"Best block, protocol {p}: {layer} ({_fmt(v)} mIoU; baseline "
                             f"{_fmt(sweep[f'{p}_baseline'])}).")
        parts.append("")
    if mass is not None or (sweep is not None and "A_heads" in sweep):
        parts += ["## Per head", "", _head_table(result), ""]
    return "\n".join(parts)


def _figure_png(result: dict[str, Any]) -> bytes:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the layer figure needs matplotlib: pip install seg4diff-fast[analysis] "
                          "(or skip the figure: plot=False / --no-plot)") from e
    mass, sweep = result.get("mass"), result.get("sweep")
    heat = sweep is not None and "A_heads" in sweep
    panels = (mass is not None) + (2 if heat else (sweep is not None))
    fig = Figure(figsize=(5.0 * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    a = 0
    n_layers = _num_layers(result)
    if mass is not None:
        ax = axes[a]
        a += 1
        m = 100.0 * np.asarray(mass["mass"], dtype=np.float64).mean(1)  # (L, 4)
        x = np.arange(n_layers)
        w = 0.38
        ax.bar(x - w / 2, m[:, 0], w, label="I2I", color="#4C72B0")
        ax.bar(x - w / 2, m[:, 1], w, bottom=m[:, 0], label="I2T", color="#DD8452")
        ax.bar(x + w / 2, m[:, 2], w, label="T2I", color="#55A868")
        ax.bar(x + w / 2, m[:, 3], w, bottom=m[:, 2], label="T2T", color="#C44E52")
        ax.set_xticks(x)
        ax.set_xlabel("block (left bar: image rows, right bar: text rows)")
        ax.set_ylabel("attention mass % (head mean)")
        ax.set_ylim(0, 100)
        ax.set_title("(a) joint attention mass per block")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    if sweep is not None:
        layers = sweep["layers"]
        for p in ("A", "B"):
            if heat:
                ax = axes[a]
                a += 1
                grid = np.array([[np.nan if v is None else v for v in row] + [np.nan if mv is None else mv]
                                 for row, mv in zip(sweep[f"{p}_heads"], sweep[p])], dtype=np.float64)
                top = max(1.0, float(np.nanmax(grid))) if np.isfinite(grid).any() else 1.0
                im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=top)
                for (r, c), v in np.ndenumerate(grid):
                    if np.isfinite(v):
                        ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                                color="k" if v > 0.65 * top else "w")
                ax.set_xticks(range(grid.shape[1]), [f"h{h}" for h in range(grid.shape[1] - 1)] + ["mean"])
                ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
                ax.set_xlabel("head")
                ax.set_ylabel("block")
                panel = "b" if p == "A" else "c"
                ax.set_title(f"({panel}) mIoU protocol {p} (baseline {_fmt(sweep[f'{p}_baseline'])})")
                fig.colorbar(im, ax=ax, shrink=0.8)
        if not heat:
            ax = axes[a]
            for p in ("A", "B"):
                ax.plot(layers, sweep[p], marker="o", label=f"{p} (baseline {_fmt(sweep[f'{p}_baseline'])})")
            ax.set_xlabel("block")
            ax.set_ylabel("mIoU %")
            ax.set_title("(b) grounding per block (head mean)")
            ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_layer_report(result: dict[str, Any], out_dir: str, plot: bool = True) -> dict[str, str]:
    """Write ``layers.json``, ``layers.md`` and (``plot``) ``layers.png`` into ``out_dir``, atomically.

    Args:
        result: ``{"mass": attention_block_mass(...), "sweep": layer_sweep(...), "model": str, "note": str}``;
            any key may be absent but one of ``mass`` / ``sweep`` is needed.
        out_dir: folder (created).
        plot: draw the figure (needs matplotlib: ``pip install seg4diff-fast[analysis]``): (a) per-block
            stacked bars of the four mass shares, (b, c) per-block × per-head mIoU heatmaps, A and B.

    Returns:
        ``{"json": path, "md": path[, "png": path]}``.

    Example:
        >>> import numpy as np, tempfile
        >>> m = np.tile([0.9, 0.1, 0.3, 0.7], (2, 4, 1))
        >>> paths = write_layer_report({"mass": {"mass": m}}, tempfile.mkdtemp(), plot=False)
        >>> sorted(paths), open(paths["md"]).read().splitlines().count("| 1 | 90.0 | 10.0 | 30.0 | 70.0 |")
        (['json', 'md'], 1)
    """
    if result.get("mass") is None and result.get("sweep") is None:
        raise ValueError("write_layer_report: the result holds neither 'mass' nor 'sweep'")
    png = _figure_png(result) if plot else None  # before writing anything: a missing matplotlib fails early
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "layers.json"), "md": os.path.join(out_dir, "layers.md")}
    write_json(paths["json"], _jsonable(result))
    atomic_write(paths["md"], _markdown(result).encode())
    if png is not None:
        paths["png"] = os.path.join(out_dir, "layers.png")
        atomic_write(paths["png"], png)
    return paths
