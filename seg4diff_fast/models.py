"""Loading the diffusion pipeline the segmenter reads from.

``load_pipeline(model)`` loads a local diffusers folder or a hub id (passed through to
``from_pretrained``) as ``StableDiffusion3Pipeline`` without T5, the paper's setting:
``text_encoder_3=None, tokenizer_3=None`` and, because diffusers 0.42 refuses a saved folder that
lacks components, ``image_encoder=None, feature_extractor=None``.

The default model is the embedded ShapesWorld pipeline (:func:`default_model_path`);
:func:`model_defaults` gives the layer, text layout and resolution a pipeline is read with.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["ModelNotAvailableError", "default_model_path", "load_pipeline", "model_defaults", "quiet_loading",
           "resolve_dtype"]


class ModelNotAvailableError(RuntimeError):
    """The default (embedded) model is not available."""


def default_model_path() -> str:
    """Path of the embedded ShapesWorld pipeline, the default model of the CLI.

    Raises:
        ModelNotAvailableError: the package was installed without its weights.

    Example:
        >>> import os
        >>> os.path.isfile(os.path.join(default_model_path(), "model_index.json"))
        True
    """
    import os

    from .shapes.shipped import WEIGHTS_DIR

    if not os.path.isfile(os.path.join(WEIGHTS_DIR, "model_index.json")):
        raise ModelNotAvailableError(
            f"the embedded ShapesWorld pipeline is missing from {WEIGHTS_DIR}; reinstall the package, or pass "
            "--model PATH (a local diffusers folder or hub id)"
        )
    return WEIGHTS_DIR


def model_defaults(pipe: Any) -> dict[str, int]:
    """The settings a pipeline is read with: ``layer`` (expert block), ``t5_length`` (zero T5 positions) and
    ``resolution``. A ShapesWorld pipeline (its folder holds ``shapes_config.json``) gets
    :data:`seg4diff_fast.shapes.EXPERT_LAYER` and its own text layout and size; others SD3-medium's
    (9, 77, 1024).

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> model_defaults(tiny_sd3_pipeline(t5=False))
        {'layer': 9, 't5_length': 77, 'resolution': 1024}
    """
    import json
    import os

    path = str(getattr(pipe, "name_or_path", "") or getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")
    cfg_file = os.path.join(path, "shapes_config.json") if path else ""
    if cfg_file and os.path.isfile(cfg_file):
        from .shapes.shipped import EXPERT_LAYER

        with open(cfg_file) as f:
            cfg = json.load(f)
        return {"layer": int(cfg.get("expert_layer", EXPERT_LAYER)), "t5_length": int(cfg.get("t5_length", 77)),
                "resolution": int(cfg.get("size", 32))}
    return {"layer": 9, "t5_length": 77, "resolution": 1024}


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
