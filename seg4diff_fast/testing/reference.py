"""Reference attention maps for tests: record the stock processors' q and k, materialise the softmax in float64.

:func:`record_stock_attention` records what every attention module hands to torch's SDPA;
:func:`reference_maps` turns those records into the :class:`~seg4diff_fast.capture.FastCapture` layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["attention_module_name", "record_stock_attention", "reference_maps"]


@contextmanager
def record_stock_attention(
    transformer: torch.nn.Module,
) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Record the (q, k) that every attention module's processor hands to
    ``torch.nn.functional.scaled_dot_product_attention``, keyed by the module's name, in call order.

    Meant for reference captures in tests: run the *stock* processors inside this context, then
    materialise ``softmax(q kᵀ/√d)`` from the recorded tensors. Diffusers' ``JointAttnProcessor2_0`` and
    the native backend of the dispatcher (Flux.1, Flux.2, Qwen-Image) call torch's SDPA with (B, H, N, D)
    tensors.
    """
    import torch.nn.functional as F

    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
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
            records.setdefault(current[0], []).append((query.detach().clone(), key.detach().clone()))
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


def reference_maps(
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    transformer: torch.nn.Module,
    layers: list[int] | tuple[int, ...],
    grid: tuple[int, int],
    positions: list[int] | tuple[int, ...],
    cfg: bool = False,
    mode: str = "probs",
    head_reduce: str = "mean",
    calls: list[int] | None = None,
    keep_steps: bool = False,
) -> torch.Tensor:
    """The materialised reference capture from :func:`record_stock_attention` records, in float64.

    For each layer and recorded call: ``S = q kᵀ/√d`` over the whole joint sequence, then softmax over
    all keys (``"probs"``), the raw scores (``"logits"``) or a softmax over the selected columns only
    (``"sel_probs"``); rows = the image tokens, columns = the text ``positions`` (SD3: ``[image; text]``;
    Flux.1, Flux.2, Qwen-Image: ``[text; image]``, text length = N − h·w); heads reduced; the second batch
    half under CFG; then the mean over ``calls`` (all by default). Returns the :class:`FastCapture` layout
    (B, L, T, h, w) (or (S, B, L, T, h, w) with ``keep_steps``; a head axis after L for "none").
    """
    from diffusers import SD3Transformer2DModel

    flux = not isinstance(transformer, SD3Transformer2DModel)  # Flux.1, Flux.2, Qwen-Image: [text; image]
    n_img = grid[0] * grid[1]
    per_layer = []
    for layer in layers:
        recorded = records[attention_module_name(transformer, layer)]
        chosen = range(len(recorded)) if calls is None else calls
        per_call = []
        for i in chosen:
            q, k = (t.to(torch.float64) for t in recorded[i])
            n = q.shape[2]
            n_txt = n - n_img
            rows = slice(n_txt, n) if flux else slice(0, n_img)
            cols = torch.tensor([p if flux else n_img + p for p in positions])
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if mode == "probs":
                m = torch.softmax(s, dim=-1)[:, :, rows][..., cols]
            elif mode == "logits":
                m = s[:, :, rows][..., cols]
            else:
                m = torch.softmax(s[:, :, rows][..., cols], dim=-1)
            m = {"mean": lambda x: x.mean(1), "max": lambda x: x.amax(1), "none": lambda x: x}[head_reduce](m)
            if cfg:
                m = m[m.shape[0] // 2:]
            per_call.append(m.transpose(-1, -2).unflatten(-1, grid))
        per_layer.append(torch.stack(per_call) if keep_steps else torch.stack(per_call).mean(0))
    return torch.stack(per_layer, dim=2 if keep_steps else 1)
