"""Facts about the shipped ShapesWorld pipeline (``weights/``), measured on it (see NOTES.md).

Kept free of torch/diffusers imports so the CLI and :func:`seg4diff_fast.models.model_defaults` read them
cheaply.
"""

from __future__ import annotations

import os

__all__ = ["EXPERT_LAYER", "T5_LENGTH", "WEIGHTS_DIR", "SIZE"]

#: Folder of the shipped pipeline (package data, diffusers format, safetensors).
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
#: The block whose head-mean image→text maps segment best (per-block sweep on held-out scenes).
EXPERT_LAYER = 1
#: Zero T5 positions after the CLIP ones, as in training (the model never saw T5 positions).
T5_LENGTH = 0
#: World resolution (pixels), the segmenter's ``resolution`` for this model.
SIZE = 32
