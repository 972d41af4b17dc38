"""Loading a diffusers pipeline to read: the paper's components only, on the right device and dtype.

``load_pipeline(path)`` loads a local diffusers folder or a hub id (passed through to
``from_pretrained``) with the pipeline class its ``model_index.json`` names, if a supported family serves
it (:func:`model_family`; ``family=`` names one), and without what reading does not need: for SD3 the
paper's setting, ``text_encoder_3=None, tokenizer_3=None`` and, because diffusers 0.42 refuses a saved
folder that lacks components, ``image_encoder=None, feature_extractor=None``. (The CLI's default model, the embedded
ShapesWorld pipeline, is :func:`seg4diff_fast.models.default_model_path`.)
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from .families import family_for_class, family_named
from .family import ModelFamily

__all__ = ["ModelNotAvailableError", "load_pipeline", "model_family", "quiet_loading", "resolve_dtype"]


class ModelNotAvailableError(RuntimeError):
    """The requested (or default, embedded) model is not available."""


def resolve_dtype(dtype: str, device: str) -> Any:
    """``"auto"`` → float32 on CPU, float16 on CUDA (the paper); else ``"float32"|"float16"|"bfloat16"``.

    Example:
        >>> resolve_dtype("auto", "cpu"), resolve_dtype("bf16", "cpu")
        (torch.float32, torch.bfloat16)
    """
    import torch

    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16; got {dtype!r}")
    return table[dtype]


def model_family(model: str, family: str | None = None) -> ModelFamily:
    """The family of a model folder (``model_index.json``'s ``_class_name``), or the one named ``family``.

    A hub id (no local folder) needs ``family`` unless its ``model_index.json`` is in the local cache; without
    either, SD3 is assumed (the paper's family).

    Raises:
        ValueError: an unsupported pipeline class (the message lists the supported ones), or an unknown
            ``family`` name.
    """
    if family is not None:
        return family_named(family)
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "model_index.json")
            index = cached if isinstance(cached, str) else ""
        except Exception:  # not a repo id, no cache: the paper's family
            index = ""
    if not index:
        return family_named("sd3")
    with open(index) as f:
        class_name = json.load(f).get("_class_name", "")
    return family_for_class(class_name)


def load_pipeline(model: str, dtype: str = "auto", device: str | None = None, use_t5: bool = False,
                  family: str | None = None) -> Any:
    """A pipeline from a local folder or hub id, its family detected from ``model_index.json`` (or named by
    ``family``), with only the components reading needs.

    What each family keeps: SD3 / SD3.5 the VAE, both CLIP encoders and the scheduler (T5 only with
    ``use_t5``; no image encoder); Flux.1 the VAE, CLIP (pooled vector) and T5 (the text positions); Flux.2
    and Qwen-Image their VAE and their one text encoder.

    Args:
        model: folder or hub id.
        dtype: see :func:`resolve_dtype`.
        device: None: CUDA when available, else CPU.
        use_t5: SD3: keep the T5 encoder (the paper drops it).
        family: ``"sd3"``, ``"flux"``, ``"flux2"`` or ``"qwenimage"``; None: detected.

    Raises:
        ValueError: an unsupported pipeline class or family name (the message lists the supported ones).
    """
    import diffusers
    import torch

    fam = model_family(model, family)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {name: None for name in fam.dropped}
    if fam.name == "sd3" and use_t5:
        kwargs.pop("text_encoder_3", None)
        kwargs.pop("tokenizer_3", None)
    index = os.path.join(model, "model_index.json")
    class_name = fam.pipeline_classes[0]
    if os.path.isfile(index):
        with open(index) as f:
            class_name = json.load(f).get("_class_name", class_name)
    cls = getattr(diffusers, class_name)
    with warnings.catch_warnings():  # diffusers >= 0.36 prefers dtype=; older ones only know torch_dtype=
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = cls.from_pretrained(model, torch_dtype=resolve_dtype(dtype, device), **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_loading() -> None:
    """Turn off diffusers' and transformers' loading progress bars and info logs (for the CLI)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
