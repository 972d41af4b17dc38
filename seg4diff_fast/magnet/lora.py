"""MAGNET's LoRA through peft: adding it, saving it in the diffusers format, loading ours or the authors'.

- :func:`add_magnet_lora`: peft ``LoraConfig`` (rank, alpha, gaussian init) on ``to_q``, ``to_k``,
  ``to_v``, ``to_out.0`` of every attention layer, via diffusers' ``transformer.add_adapter``;
  everything else frozen.
- :func:`save_magnet_lora`: the pipeline class's ``save_lora_weights`` (``pytorch_lora_weights.safetensors``,
  which a stock ``pipe.load_lora_weights(DIR)`` reads), the conv head as ``magnet_head.safetensors`` and
  the run's config as ``magnet_config.json``, written to a temporary folder and moved in file by file, each
  with the permissions a plain write would give it (``0o666 & ~umask``; safetensors alone leaves ``0o600``).
- :func:`load_magnet_lora`: a folder or ``.safetensors`` of ours, or the authors' released ``.pth``
  (``['model']`` keys prefixed ``backbone.transformer.`` with peft's ``.default.``; both stripped). Weights
  that do not fit the pipeline's transformer (a block or projection it lacks, another width, A and B of
  different ranks: a file made for another model) are refused with one error naming them
  (:func:`check_lora_fits`), under either protocol; diffusers alone would only warn and load the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

from ..utils.files import set_plain_mode

__all__ = ["HEAD_FILE", "CONFIG_FILE", "LORA_FILE", "add_magnet_lora", "lora_state_dict", "save_magnet_lora",
           "load_magnet_lora", "load_magnet_head", "authors_state_dict", "check_lora_fits"]

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
            # safetensors creates its files 0o600: give each the mode a plain write of its final name would
            set_plain_mode(os.path.join(tmp, name), os.path.join(out_dir, name))
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


def _linear_sizes(module: Any) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer (peft-wrapped or not), else None."""
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return fin, fout
    return None


def check_lora_fits(transformer: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "the LoRA") -> None:
    """Refuse LoRA weights that do not fit ``transformer``, with one error naming them and the fix.

    ``state`` holds peft keys ``<module>.lora_A.weight`` (rank × in) and ``<module>.lora_B.weight``
    (out × rank), an optional leading ``transformer.``. A key fits when ``<module>`` is a linear layer of the
    transformer with those sizes and its A and B agree on the rank.

    Raises:
        ValueError: listing the keys that do not fit (the first 8, and how many in all).

    Example:
        >>> import torch
        >>> from seg4diff_fast.testing import tiny_sd3_transformer
        >>> tr = tiny_sd3_transformer(num_layers=2)
        >>> try:
        ...     check_lora_fits(tr, {"transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(4, 8)})
        ... except ValueError as e:
        ...     print(str(e).split(": ")[2].split(".", 4)[:4])
        ['transformer_blocks', '5', 'attn', 'to_q']
    """
    model = getattr(transformer, "module", transformer)
    modules = dict(model.named_modules())
    bad: list[str] = []
    ranks: dict[str, dict[str, int]] = {}
    for key, value in state.items():
        k = key[len("transformer."):] if key.startswith("transformer.") else key
        name, sep, rest = k.partition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            continue  # not a LoRA A/B weight (e.g. a DoRA magnitude): left to the loader
        sizes = _linear_sizes(modules.get(name))
        if sizes is None:
            bad.append(f"{key} (no such layer)")
            continue
        shape = tuple(value.shape)
        fin, fout = sizes
        if len(shape) != 2 or (rest[0] == "A" and shape[1] != fin) or (rest[0] == "B" and shape[0] != fout):
            want = f"(rank, {fin})" if rest[0] == "A" else f"({fout}, rank)"
            bad.append(f"{key} (shape {shape}, the layer needs {want})")
            continue
        ranks.setdefault(name, {})[rest[0]] = shape[0] if rest[0] == "A" else shape[1]
    for name, r in ranks.items():
        if len(r) == 2 and r["A"] != r["B"]:
            bad.append(f"{name} (lora_A rank {r['A']} but lora_B rank {r['B']})")
    if bad:
        blocks = len(getattr(model, "transformer_blocks", ()))
        shown = "; ".join(bad[:8]) + (f"; ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
        raise ValueError(
            f"{source}: {len(bad)} of {len(state)} LoRA weights do not fit this transformer ({blocks} blocks): "
            f"{shown}. The file was made for another model (the authors' MAGNET .pth files are for SD3-medium: "
            "24 blocks, width 1536); load it into the pipeline it was trained for")


def load_magnet_lora(pipe: Any, path: str, adapter_name: str = "magnet") -> Any:
    """Load a MAGNET LoRA into ``pipe`` (a diffusers SD3 pipeline): our output folder or ``.safetensors``,
    or the authors' released ``.pth``. Returns the pipeline. The conv head is not loaded: segmentation reads
    the maps without it unless given one (:func:`load_magnet_head`).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: an unreadable ``.pth``, one without LoRA weights, or weights that do not fit the
            pipeline's transformer (:func:`check_lora_fits`: every mismatching key named, and the fix).

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
        weights = os.path.join(path, LORA_FILE) if os.path.isdir(path) else path
        if os.path.isfile(weights):
            from safetensors.torch import load_file

            check_lora_fits(pipe.transformer, load_file(weights), weights)
        pipe.load_lora_weights(path, adapter_name=adapter_name)
        return pipe
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors vary
        raise ValueError(f"cannot read {path} as a tensor-only checkpoint ({e}); convert it to safetensors "
                         "or check the file") from None
    own = authors_state_dict(ckpt)
    check_lora_fits(pipe.transformer, own, path)
    state = {f"transformer.{k}": v for k, v in own.items()}
    pipe.load_lora_weights(state, adapter_name=adapter_name)
    return pipe


def load_magnet_head(path: str) -> Any:
    """The conv head a MAGNET run saved in its output folder (``magnet_head.safetensors``), or None when the
    run trained none (the authors' released ``.pth`` files hold the LoRA only). Pass
    ``head.reader(protocol)`` as ``Seg4DiffSegmenter(map_head=...)`` to segment with it."""
    from safetensors.torch import load_file

    from .head import MapHead

    file = os.path.join(path, HEAD_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        return None
    state = load_file(file)
    width = int(state["net.0.weight"].shape[0])
    head = MapHead(width=width)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)
