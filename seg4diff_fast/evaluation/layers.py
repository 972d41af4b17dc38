"""Layer analysis (Seg4Diff's first phase): where each block's joint attention puts its mass, and the report.

- :func:`attention_block_mass`: for every block and head, the share of attention mass in the four blocks
  of the joint attention matrix, I2I / I2T (image rows → image / text keys) and T2I / T2T (text rows →
  image / text keys), at the noised latent the segmenter reads maps from. Measured by the reader's
  :meth:`~seg4diff_fast.reader.PipelineReader.block_mass` (``enable_fast_capture(measure_mass=True)``: the
  fused op captures every row's probabilities on the text columns, never an N×N matrix).
- :func:`transformer_progress`: a progress bar over images advanced by a pipeline's transformer calls (for
  loops that do not report their own progress, such as the grounding sweep);
- :func:`write_layer_report`: ``layers.json``, ``layers.md`` and the figure ``layers.png`` (matplotlib:
  ``pip install seg4diff-fast[analysis]``), from the mass and from a grounding sweep
  (:func:`seg4diff_fast.shapes.grounding.layer_sweep`: protocol A / B mIoU per block and head).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..utils.files import atomic_write, write_json

__all__ = ["SHARES", "attention_block_mass", "format_layer_table", "transformer_progress", "write_layer_report"]

#: The four blocks of the joint attention matrix, in the order of the last axis of ``mass``.
SHARES: tuple[str, ...] = ("I2I", "I2T", "T2I", "T2T")


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
    progress: bool = False,
) -> dict[str, Any]:
    """Share of attention mass in the I2I / I2T / T2I / T2T blocks of every block's and head's joint
    attention matrix, at the noised latent the segmenter uses.

    For each query row, its softmax probability mass is summed over a key block (image keys or text
    keys); the shares are averaged over the block's rows (image rows for I2I / I2T, text rows for
    T2I / T2T: all ``77 + t5_length`` text positions, padding included) and over the images. So
    I2I + I2T = 1 and T2I + T2T = 1 for every block and head. Inputs are prepared by the reader exactly as
    the segmenter's (same noise, timestep ``timesteps[-noise_step]``, zero T5 positions). The forward runs
    on the fused op and stops after the last block's attention. SD3.5's image-only ``attn2`` has no text
    rows or keys and is not measured. The last block is ``context_pre_only``: its text rows are computed
    but feed nothing; they are reported anyway.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` whose attention modules have diffusers' stock processors.
        images: images (PIL, numpy, tensor in [0, 1]), stretched to ``resolution``².
        prompts: one prompt per image, or one for all.
        resolution, t5_length: None: the model's (:class:`~seg4diff_fast.reader.ModelDefaults`).
        seed, noise_step, num_inference_steps: the noise, as the segmenter's.
        batch_size: images per transformer call.
        backend: ``joint_attention`` backend (None: best available).
        progress: a tqdm bar over the images on stderr.

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
    from ..reader import PipelineReader

    images = list(images)
    if not images:
        raise ValueError("attention_block_mass: give at least one image")
    prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompt_list) != len(images):
        raise ValueError(f"attention_block_mass: {len(prompt_list)} prompts for {len(images)} images")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reader = PipelineReader(pipe, resolution=resolution, num_inference_steps=num_inference_steps,
                            noise_step=noise_step, seed=seed, text_length=t5_length, backend=backend)
    from tqdm import tqdm

    sink: dict[int, torch.Tensor] = {}
    n_img_tokens = n_txt_tokens = 0
    bar = tqdm(total=len(images), desc="attention mass", unit="image", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for s in range(0, len(images), batch_size):
        tensors, _ = reader.prepare(images[s:s + batch_size])
        latents = reader.latents(tensors)
        text = reader.encode_text(prompt_list[s:s + batch_size])
        n_img_tokens = (latents.shape[-2] // reader.patch) * (latents.shape[-1] // reader.patch)
        n_txt_tokens = text.length
        for layer, part in reader.block_mass(latents, text).items():
            sink[layer] = part if layer not in sink else sink[layer] + part
        bar.update(len(tensors))
    bar.close()
    text_share = torch.stack([sink[i] for i in range(reader.num_layers)]).numpy() / len(images)  # (L, H, 2)
    i2t, t2t = text_share[..., 0], text_share[..., 1]
    mass = np.stack([1.0 - i2t, i2t, 1.0 - t2t, t2t], axis=-1)
    out: dict[str, Any] = {"shares": list(SHARES), "mass": mass}
    out.update({name: mass[..., j] for j, name in enumerate(SHARES)})
    out.update({"n_images": len(images), "n_image_tokens": int(n_img_tokens), "n_text_tokens": int(n_txt_tokens),
                "timestep": float(reader.timestep), "sigma": reader.sigma, "resolution": reader.resolution,
                "t5_length": reader.text_length})
    return out


@contextlib.contextmanager
def transformer_progress(pipe: Any, rows_per_item: Sequence[int], desc: str, unit: str = "image",
                         enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar (stderr) over items whose rows go through ``pipe.transformer``: each call's batch (its
    ``hidden_states`` rows) advances it when the next call starts (or the block ends); item ``k`` is done once
    the first ``rows_per_item[0..k]`` rows are.
    For loops that read through the transformer without a progress hook of their own (the grounding sweep:
    one row per protocol a scene is scored with).

    Example:
        >>> import torch
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline(t5=False)
        >>> with transformer_progress(pipe, [1, 2], "demo", enabled=False) as bar:
        ...     _ = attention_block_mass(pipe, [torch.rand(3, 32, 32)] * 3, "cat", resolution=32, batch_size=2)
        ...     bar.n  # the first call (2 rows: item 0 and half of item 1) is done
        1
        >>> bar.n
        2
    """
    from tqdm import tqdm

    cum = np.cumsum(np.asarray(list(rows_per_item), dtype=np.int64))
    bar = tqdm(total=len(cum), desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    rows = {"done": 0, "running": 0}

    def advance(done_rows: int) -> None:
        done = int(np.searchsorted(cum, done_rows, side="right"))
        if bar.disable:
            bar.n = done
        elif done != bar.n:
            bar.update(done - bar.n)

    def hook(module, args, kwargs):  # a call starts: the one before it has finished
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None:
            rows["done"] += rows["running"]
            rows["running"] = int(hidden.shape[0])
            advance(rows["done"])

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield bar
        advance(rows["done"] + rows["running"])
    finally:
        handle.remove()
        bar.close()


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
        lora = f" with the LoRA `{result['lora']}`" if result.get("lora") else ""
        version = f" (seg4diff-fast {result['package_version']})" if result.get("package_version") else ""
        parts.append(f"Model: `{result['model']}`{lora}{version}.")
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
