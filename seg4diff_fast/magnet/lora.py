"""MAGNET's LoRA through peft: adding it, saving it in the diffusers format, loading ours or the authors'.

- :func:`add_magnet_lora`: peft ``LoraConfig`` (rank, alpha, gaussian init) on ``to_q``, ``to_k``,
  ``to_v``, ``to_out.0`` of every attention layer, via diffusers' ``transformer.add_adapter``;
  everything else frozen.
- :func:`save_magnet_lora`: the pipeline class's ``save_lora_weights`` (``pytorch_lora_weights.safetensors``,
  which a stock ``pipe.load_lora_weights(DIR)`` reads), the conv head as ``magnet_head.safetensors`` and
  the run's config as ``magnet_config.json``, written to a temporary folder and moved in file by file.
- :func:`load_magnet_lora`: a folder or ``.safetensors`` of ours, or the authors' released ``.pth``
  (``['model']`` keys prefixed ``backbone.transformer.`` with peft's ``.default.``; both stripped).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

__all__ = ["HEAD_FILE", "CONFIG_FILE", "LORA_FILE", "add_magnet_lora", "lora_state_dict", "save_magnet_lora",
           "load_magnet_lora", "authors_state_dict"]

LORA_FILE = "pytorch_lora_weights.safetensors"
HEAD_FILE = "magnet_head.safetensors"
CONFIG_FILE = "magnet_config.json"
_AUTHORS_PREFIX = "backbone.transformer."


def add_magnet_lora(transformer: torch.nn.Module, rank: int = 16, alpha: float = 16.0,
                    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                    adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze ``transformer`` and add a trainable LoRA; returns the LoRA parameters.

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_transformer
        >>> tr = tiny_sd3_transformer(num_layers=2)
        >>> params = add_magnet_lora(tr, rank=4)
        >>> len(params) == 2 * 4 * 2  # A and B × 4 projections × 2 blocks
        True
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                     target_modules=list(target_modules))
    transformer.add_adapter(cfg, adapter_name=adapter_name)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no module of the transformer matches target_modules {list(target_modules)}")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's format (keys like ``transformer_blocks.0.attn.to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    model = getattr(transformer, "module", transformer)  # unwrap DDP
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_magnet_lora(out_dir: str, transformer: torch.nn.Module, head: torch.nn.Module | None = None,
                     config: dict[str, Any] | None = None, pipeline_class: Any = None,
                     adapter_name: str = "default") -> str:
    """Write the LoRA (diffusers format), the head and the config into ``out_dir``; returns ``out_dir``."""
    from safetensors.torch import save_file

    if pipeline_class is None:
        from diffusers import StableDiffusion3Pipeline as pipeline_class
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".magnet-", dir=out_dir)
    try:
        model = getattr(transformer, "module", transformer)
        meta = model.peft_config[adapter_name].to_dict()  # rank and alpha travel with the weights
        meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
        pipeline_class.save_lora_weights(tmp, transformer_lora_layers=lora_state_dict(transformer, adapter_name),
                                         safe_serialization=True, transformer_lora_adapter_metadata=meta)
        if head is not None:
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
            save_file(state, os.path.join(tmp, HEAD_FILE))
        if config is not None:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(config, f, indent=1)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def authors_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The peft LoRA state dict inside the authors' ``.pth`` (``['model']``, keys
    ``backbone.transformer.<module>.lora_A.default.weight`` → ``<module>.lora_A.weight``)."""
    model = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict):
        raise ValueError("not a MAGNET checkpoint: expected a dict with a 'model' state dict")
    out = {}
    for key, value in model.items():
        if not key.startswith(_AUTHORS_PREFIX) or "lora_" not in key:
            continue
        out[key[len(_AUTHORS_PREFIX):].replace(".default.", ".")] = value
    if not out:
        raise ValueError(f"no LoRA weights in the checkpoint (no key starts with {_AUTHORS_PREFIX!r} and holds "
                         "'lora_'); is it the authors' MAGNET .pth?")
    return out


def load_magnet_lora(pipe: Any, path: str, adapter_name: str = "magnet") -> Any:
    """Load a MAGNET LoRA into ``pipe`` (a diffusers SD3 pipeline): our output folder or ``.safetensors``,
    or the authors' released ``.pth``. Returns the pipeline. The conv head is not loaded: zero-shot
    segmentation reads the maps without it.

    Example:
        >>> import os, tempfile, torch
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline(t5=False)
        >>> _ = add_magnet_lora(pipe.transformer, rank=4)
        >>> d = save_magnet_lora(tempfile.mkdtemp(), pipe.transformer)
        >>> fresh = load_magnet_lora(tiny_sd3_pipeline(t5=False), d)
        >>> sorted(fresh.transformer.peft_config)
        ['magnet']
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no MAGNET weights at {path}")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        pipe.load_lora_weights(path, adapter_name=adapter_name)
        return pipe
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors vary
        raise ValueError(f"cannot read {path} as a tensor-only checkpoint ({e}); convert it to safetensors "
                         "or check the file") from None
    state = {f"transformer.{k}": v for k, v in authors_state_dict(ckpt).items()}
    pipe.load_lora_weights(state, adapter_name=adapter_name)
    return pipe
