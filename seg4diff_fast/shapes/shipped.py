"""Facts about the shipped ShapesWorld pipeline (``weights/``), measured on it (see NOTES.md).

Kept free of torch/diffusers imports so the CLI reads them cheaply. The reader reads the same facts from the
folder's ``shapes_config.json`` (:mod:`seg4diff_fast.reader.defaults`).
"""

from __future__ import annotations

import os

__all__ = ["EXPERT_LAYER", "T5_LENGTH", "WEIGHTS_DIR", "SIZE", "default_model_path", "resolve_model"]

#: Folder of the shipped pipeline (package data, diffusers format, safetensors).
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
#: The block whose head-mean image→text maps segment best (per-block sweep on held-out scenes).
EXPERT_LAYER = 1
#: Zero T5 positions after the CLIP ones, as in training (the model never saw T5 positions).
T5_LENGTH = 0
#: World resolution (pixels), the segmenter's ``resolution`` for this model.
SIZE = 32
#: Folder of the shipped MAGNET LoRA on the expert block (diffusers LoRA format; ``seg4diff-fast demo``'s MAGNET side).
MAGNET_LORA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "magnet_lora")


def default_model_path() -> str:
    """Path of the shipped pipeline, the default model of every command.

    Raises:
        ModelNotAvailableError: the package was installed without its weights.

    Example:
        >>> os.path.isfile(os.path.join(default_model_path(), "model_index.json"))
        True
    """
    from ..reader.loading import ModelNotAvailableError

    if not os.path.isfile(os.path.join(WEIGHTS_DIR, "model_index.json")):
        raise ModelNotAvailableError(
            f"the embedded ShapesWorld pipeline is missing from {WEIGHTS_DIR}; reinstall the package, or pass "
            "--model PATH (a local diffusers folder or hub id)"
        )
    return WEIGHTS_DIR


def resolve_model(model: str | None) -> str:
    """``model`` itself, or the shipped pipeline's path when it is None (:func:`default_model_path`)."""
    return default_model_path() if model is None else model
