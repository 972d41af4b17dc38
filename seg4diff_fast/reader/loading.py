"""Loading a diffusers pipeline to read: the paper's components only, on the right device and dtype.

``load_pipeline(path)`` loads a local diffusers folder or a hub id (passed through to
``from_pretrained``) as ``StableDiffusion3Pipeline`` without T5, the paper's setting:
``text_encoder_3=None, tokenizer_3=None`` and, because diffusers 0.42 refuses a saved folder that
lacks components, ``image_encoder=None, feature_extractor=None``. (The CLI's default model, the embedded
ShapesWorld pipeline, is :func:`seg4diff_fast.models.default_model_path`.)
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["ModelNotAvailableError", "load_pipeline", "quiet_loading", "resolve_dtype"]


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


def load_pipeline(model: str, dtype: str = "auto", device: str | None = None, use_t5: bool = False) -> Any:
    """A ``StableDiffusion3Pipeline`` from a local folder or hub id, without T5 unless ``use_t5``.

    Args:
        model: folder or hub id.
        dtype: see :func:`resolve_dtype`.
        device: None: CUDA when available, else CPU.
        use_t5: keep the T5 encoder (the paper drops it).
    """
    import torch
    from diffusers import StableDiffusion3Pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"image_encoder": None, "feature_extractor": None}
    if not use_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    with warnings.catch_warnings():  # diffusers >= 0.36 prefers dtype=; older ones only know torch_dtype=
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=resolve_dtype(dtype, device), **kwargs)
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
