"""What every output records about the model it came from: :func:`model_record`.

One helper for every command that writes results (``eval``, ``magnet``, ``segment``, ``label``), so the
records agree: the model (a local folder's absolute path, the embedded pipeline's resolved path, or a hub
id), its family, the diffusers version and a hash of its ``model_index.json``, the hub revision when it
came from the hub cache, and this package's version.

Kept free of the reader (this is the bottom layer): the family is read from the transformer's class name.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .version import __version__

__all__ = ["model_record"]

#: transformer class → family name (the reader's names: :func:`seg4diff_fast.reader.family_of`).
_FAMILIES = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "Flux2Transformer2DModel": "flux2",
    "QwenImageTransformer2DModel": "qwenimage",
}


def _family(pipe: Any) -> str | None:
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    model = getattr(transformer, "module", transformer)  # DDP-wrapped
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    return None


def _loaded_from(pipe: Any) -> str | None:
    """The folder or id diffusers loaded ``pipe`` from (``config._name_or_path``), None if built in memory."""
    config = getattr(pipe, "config", None)
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    return str(name) if name else None


def _hub_index(model: str) -> tuple[str | None, str | None]:
    """(cached ``model_index.json``, snapshot revision) of a hub id in the local cache, else (None, None)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # noqa: BLE001 — not a repo id, no huggingface_hub, no cache: nothing to record
        return None, None
    if not isinstance(cached, str) or not os.path.isfile(cached):
        return None, None
    snapshot = os.path.basename(os.path.dirname(cached))  # .../snapshots/<commit>/model_index.json
    return cached, snapshot or None


def model_record(pipe: Any, model_arg: str | None) -> dict[str, Any]:
    """The model's record for an output's JSON.

    Args:
        pipe: the loaded pipeline (its transformer gives the family; ``config._name_or_path`` the folder a
            default model resolved to). May be None when only the argument is known.
        model_arg: what the user gave (``--model``); None: the default (embedded) model, recorded by the
            path ``pipe`` was loaded from.

    Returns:
        ``{"model", "family", "diffusers_version", "model_index_sha256", "revision", "package_version"}``:
        ``model`` a local folder's absolute path or a hub id; ``diffusers_version`` from ``model_index.json``;
        ``model_index_sha256`` the first 12 hex digits of its sha256 (a local folder, or a hub id's cached
        snapshot); ``revision`` the hub snapshot's commit (None for a local folder). Unknown fields are None.

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> r = model_record(tiny_sd3_pipeline(t5=False), None)
        >>> r["model"], r["family"], r["model_index_sha256"]
        (None, 'sd3', None)
    """
    model = model_arg if model_arg is not None else (_loaded_from(pipe) if pipe is not None else None)
    index: str | None = None
    revision: str | None = None
    if model is not None:
        model = str(model)
        if os.path.isdir(model):
            model = os.path.abspath(model)
            index = os.path.join(model, "model_index.json")
        else:
            index, revision = _hub_index(model)
    diffusers_version = digest = None
    if index is not None and os.path.isfile(index):
        with open(index, "rb") as f:
            raw = f.read()
        digest = hashlib.sha256(raw).hexdigest()[:12]
        try:
            diffusers_version = json.loads(raw).get("_diffusers_version")
        except (ValueError, AttributeError):
            diffusers_version = None
    return {"model": model, "family": _family(pipe) if pipe is not None else None,
            "diffusers_version": diffusers_version, "model_index_sha256": digest, "revision": revision,
            "package_version": __version__}
