"""Loading the diffusion pipeline the segmenter reads from.

``load_pipeline(model)`` loads a local diffusers folder or a hub id (passed through to
``from_pretrained``) as ``StableDiffusion3Pipeline`` without T5, the paper's setting:
``text_encoder_3=None, tokenizer_3=None`` and, because diffusers 0.42 refuses a saved folder that
lacks components, ``image_encoder=None, feature_extractor=None``.

The default model is meant to be the embedded ShapesWorld pipeline, which is not bundled yet:
:func:`default_model_path` says so.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["ModelNotAvailableError", "default_model_path", "load_pipeline", "quiet_loading", "resolve_dtype"]


class ModelNotAvailableError(RuntimeError):
    """The default (embedded) model is not available."""


def default_model_path() -> str:
    """Path of the embedded ShapesWorld pipeline, the default model of the CLI.

    Raises:
        ModelNotAvailableError: always, until the embedded pipeline is bundled.

    Example:
        >>> try:
        ...     default_model_path()
        ... except ModelNotAvailableError as e:
        ...     print(str(e).split(";")[0])
        the embedded ShapesWorld pipeline is not bundled yet
    """
    raise ModelNotAvailableError(
        "the embedded ShapesWorld pipeline is not bundled yet; pass --model PATH (a local diffusers folder or "
        "hub id)"
    )


def resolve_dtype(dtype: str, device: str) -> Any:
    """``"auto"`` → float32 on CPU, float16 on CUDA (the paper); else ``"float32"|"float16"|"bfloat16"``."""
    import torch

    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16; got {dtype!r}")
    return table[dtype]


def load_pipeline(model: str | None = None, dtype: str = "auto", device: str | None = None,
                  use_t5: bool = False) -> Any:
    """A ``StableDiffusion3Pipeline`` from a local folder or hub id, without T5 unless ``use_t5``.

    Args:
        model: folder or hub id; None: :func:`default_model_path`.
        dtype: see :func:`resolve_dtype`.
        device: None: CUDA when available, else CPU.
        use_t5: keep the T5 encoder (the paper drops it).
    """
    import torch
    from diffusers import StableDiffusion3Pipeline

    if model is None:
        model = default_model_path()
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
