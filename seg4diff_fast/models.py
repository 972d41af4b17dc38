"""The models the command line reads: the embedded ShapesWorld pipeline by default, or a diffusers folder.

This module sits above the reader and ShapesWorld (the CLI's layer): :func:`load_pipeline` with no model
loads the embedded pipeline (:func:`default_model_path`). Loading itself is
:func:`seg4diff_fast.reader.load_pipeline`; a model's reading defaults are
:class:`seg4diff_fast.reader.ModelDefaults` (:func:`model_defaults` gives them as a dict).
"""

from __future__ import annotations

from typing import Any

from .reader.loading import ModelNotAvailableError, quiet_loading, resolve_dtype
from .reader.loading import load_pipeline as _load_folder
from .shapes.shipped import default_model_path, resolve_model

__all__ = ["ModelNotAvailableError", "default_model_path", "load_pipeline", "model_defaults", "quiet_loading",
           "resolve_dtype"]


def model_defaults(pipe: Any) -> dict[str, int]:
    """The settings a pipeline is read with: ``layer`` (expert block), ``t5_length`` (zero T5 positions) and
    ``resolution`` (:func:`seg4diff_fast.reader.resolve_defaults`).

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> model_defaults(tiny_sd3_pipeline(t5=False))
        {'layer': 9, 't5_length': 77, 'resolution': 1024}
    """
    from .reader import resolve_defaults

    d = resolve_defaults(pipe)
    return {"layer": d.layer, "t5_length": d.text_length, "resolution": d.resolution}


def load_pipeline(model: str | None = None, dtype: str = "auto", device: str | None = None,
                  use_t5: bool = False) -> Any:
    """:func:`seg4diff_fast.reader.load_pipeline` of ``model``; None: the embedded ShapesWorld pipeline."""
    return _load_folder(resolve_model(model), dtype=dtype, device=device, use_t5=use_t5)
