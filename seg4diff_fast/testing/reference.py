"""Reference attention maps for tests: record the stock processors' q and k, materialise the softmax in float64.

:func:`record_stock_attention` records what every attention module hands to torch's SDPA (with
``with_mask=True`` its key mask too); :func:`reference_maps` turns those records into the
:class:`~seg4diff_fast.capture.FastCapture` layout and :func:`reference_mass` into ``block_mass``'s
per-head ``[I2T, T2T]`` text-key mass. Masked keys (Qwen-Image's padded text) get no probability.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["attention_module_name", "record_stock_attention", "reference_maps", "reference_mass"]

#: One recorded SDPA call: (q, k) as (B, H, N, D), and with ``with_mask=True`` its ``attn_mask`` (or None).
Record = tuple[torch.Tensor, ...]


@contextmanager
def record_stock_attention(transformer: torch.nn.Module, with_mask: bool = False) -> Iterator[dict[str, list[Record]]]:
    """Record the (q, k) that every attention module's processor hands to
    ``torch.nn.functional.scaled_dot_product_attention``, keyed by the module's name, in call order;
    with ``with_mask`` the records are (q, k, attn_mask), the mask None when the call passes none.

    Meant for reference captures in tests: run the *stock* processors inside this context, then
    materialise ``softmax(q kᵀ/√d)`` from the recorded tensors. Diffusers' ``JointAttnProcessor2_0`` and
    the native backend of the dispatcher (Flux.1, Flux.2, Qwen-Image) call torch's SDPA with (B, H, N, D)
    tensors.
    """
    import torch.nn.functional as F

    records: dict[str, list[Record]] = {}
    current: list[str | None] = [None]
    handles = []
    for name, module in transformer.named_modules():
        if hasattr(module, "processor") and (hasattr(module, "to_q") or hasattr(module, "to_qkv_mlp_proj")):
            def pre(mod, args, kwargs, _name=name):
                current[0] = _name

            def post(mod, args, kwargs, out):
                current[0] = None

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    original = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kwargs):
        if current[0] is not None:
            record: Record = (query.detach().clone(), key.detach().clone())
            if with_mask:
                mask = args[0] if args else kwargs.get("attn_mask")
                record += (None if mask is None else mask.clone(),)
            records.setdefault(current[0], []).append(record)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = recording_sdpa
    try:
        yield records
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def attention_module_name(transformer: torch.nn.Module, layer: int) -> str:
    """Name of the (joint) attention module of block ``layer`` (Flux: double-stream blocks first)."""
    blocks = transformer.transformer_blocks
    if layer < len(blocks):
        return f"transformer_blocks.{layer}.attn"
    return f"single_transformer_blocks.{layer - len(blocks)}.attn"


def _scores(record: Record) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``q kᵀ/√d`` of one record, masked keys at -inf, and its (B, 1, 1, N) key mask (all true
    without one)."""
    q, k = (t.to(torch.float64) for t in record[:2])
    mask = record[2] if len(record) > 2 else None
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is None:
        return s, torch.ones(s.shape[0], 1, 1, s.shape[-1], dtype=torch.bool)
    keys = mask.to(torch.bool).expand(s.shape[0], 1, 1, s.shape[-1])
    return s.masked_fill(~keys, float("-inf")), keys


def _joint_layout(transformer: torch.nn.Module, n: int, n_img: int, n_txt: int | None) -> tuple[int, int, int]:
    """(first image row, first text column, text length) of a joint sequence of ``n`` tokens: SD3
    ``[image; text]``; Flux.1, Flux.2, Qwen-Image ``[text; image (; conditioning images)]``, the text
    length ``n_txt`` (default N − h·w: no conditioning images)."""
    from diffusers import SD3Transformer2DModel

    if isinstance(transformer, SD3Transformer2DModel):
        return 0, n_img, n - n_img
    n_txt = n - n_img if n_txt is None else n_txt
    return n_txt, 0, n_txt


def reference_maps(
    records: dict[str, list[Record]],
    transformer: torch.nn.Module,
    layers: Sequence[int],
    grid: tuple[int, int],
    positions: Sequence[int],
    cfg: bool = False,
    mode: str = "probs",
    head_reduce: str = "mean",
    calls: list[int] | None = None,
    keep_steps: bool = False,
    n_txt: int | None = None,
) -> torch.Tensor:
    """The materialised reference capture from :func:`record_stock_attention` records, in float64.

    For each layer and recorded call: ``S = q kᵀ/√d`` over the whole joint sequence, then softmax over
    all keys (``"probs"``), the raw scores (``"logits"``) or a softmax over the selected columns only
    (``"sel_probs"``); rows = the image tokens, columns = the text ``positions`` (SD3: ``[image; text]``;
    Flux.1, Flux.2, Qwen-Image: ``[text; image]``, text length ``n_txt``, default N − h·w); heads reduced;
    the second batch half under CFG; then the mean over ``calls`` (all by default). Masked keys (records
    with a mask) get probability 0 and logit 0. Returns the :class:`FastCapture` layout (B, L, T, h, w) (or
    (S, B, L, T, h, w) with ``keep_steps``; a head axis after L for "none").
    """
    n_img = grid[0] * grid[1]
    per_layer = []
    for layer in layers:
        recorded = records[attention_module_name(transformer, layer)]
        chosen = range(len(recorded)) if calls is None else calls
        per_call = []
        for i in chosen:
            s, keys = _scores(recorded[i])
            row0, col0, _ = _joint_layout(transformer, s.shape[-1], n_img, n_txt)
            rows = slice(row0, row0 + n_img)
            cols = torch.tensor([col0 + p for p in positions])
            if mode == "probs":
                m = torch.softmax(s, dim=-1)[:, :, rows][..., cols]
            elif mode == "logits":
                m = torch.where(keys[..., cols], s[:, :, rows][..., cols], 0.0)
            else:  # a row whose selected keys are all masked gets 0
                m = torch.nan_to_num(torch.softmax(s[:, :, rows][..., cols], dim=-1), nan=0.0)
            m = {"mean": lambda x: x.mean(1), "max": lambda x: x.amax(1), "none": lambda x: x}[head_reduce](m)
            if cfg:
                m = m[m.shape[0] // 2:]
            per_call.append(m.transpose(-1, -2).unflatten(-1, grid))
        per_layer.append(torch.stack(per_call) if keep_steps else torch.stack(per_call).mean(0))
    return torch.stack(per_layer, dim=2 if keep_steps else 1)


def reference_mass(
    records: dict[str, list[Record]],
    transformer: torch.nn.Module,
    n_img: int,
    n_txt: int | None = None,
) -> torch.Tensor:
    """(L, H, 2) float64 ``[I2T, T2T]`` per block of the first recorded call, as ``FastCapture.block_mass``:
    each row's softmax mass on the text keys, averaged over the generated image's ``n_img`` rows (I2T) and
    over the valid text rows (T2T; conditioning-image rows are neither), summed over the batch. Layout and
    ``n_txt`` as in :func:`reference_maps`."""
    n_layers = len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    out = []
    for layer in range(n_layers):
        s, keys = _scores(records[attention_module_name(transformer, layer)][0])
        row0, col0, length = _joint_layout(transformer, s.shape[-1], n_img, n_txt)
        text = slice(col0, col0 + length)
        mass = torch.softmax(s, dim=-1)[..., text].sum(-1)  # (B, H, N): each row's mass on the text keys
        i2t = mass[:, :, row0:row0 + n_img].mean(-1)
        valid = keys[:, 0, 0, text].to(torch.float64)  # (B, T)
        t2t = (mass[:, :, text] * valid[:, None]).sum(-1) / valid.sum(-1).clamp(min=1)[:, None]
        out.append(torch.stack([i2t, t2t], -1).sum(0))
    return torch.stack(out)
