"""A model's own MAGNET recipe: the training settings that work for it, shipped in its folder.

The authors' settings (:class:`~seg4diff_fast.magnet.MagnetConfig`'s defaults: lr 1e-4, 500 warm-up steps of
3000, batch 8, the conv head) are made for SD3 at 1024² on COCO. A model that ships its own facts
(``shapes_config.json``, :func:`seg4diff_fast.reader.model_config`) may add a ``"magnet"`` block with the
settings that suit it, e.g. the embedded ShapesWorld model (0.9 M parameters, 32² scenes)::

    "magnet": {"protocol": "corrected", "lr": 0.003, "warmup_steps": 50, "max_steps": 2000, "batch_size": 16,
               "conv_head": true, "include_background": true, "same_colour": 0.3,
               "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", ...]}

``seg4diff-fast magnet`` fills every setting the user did not give from this block, then from the defaults, as
it does the expert layer. ``include_background`` and ``same_colour`` belong to ShapesWorld data (the world's
background class; the share of scenes whose objects share one colour).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..reader import model_config
from .config import MagnetConfig

__all__ = ["RECIPE_KEY", "DATA_KEYS", "model_recipe"]

#: The block of a model's ``shapes_config.json`` holding its MAGNET recipe.
RECIPE_KEY = "magnet"
#: Recipe keys that set the data source rather than :class:`MagnetConfig`.
DATA_KEYS = ("include_background", "same_colour")


def model_recipe(model_path: str) -> dict[str, Any]:
    """The MAGNET settings the model folder ships (``{}`` when none), checked against :class:`MagnetConfig`.

    Raises:
        ValueError: the block names a setting that does not exist.

    Example:
        >>> from seg4diff_fast.shapes.shipped import WEIGHTS_DIR
        >>> r = model_recipe(WEIGHTS_DIR)
        >>> r["protocol"], r["include_background"], model_recipe("/nonexistent")
        ('corrected', True, {})
    """
    recipe = dict(model_config(model_path).get(RECIPE_KEY) or {})
    known = {f.name for f in dataclasses.fields(MagnetConfig)} | set(DATA_KEYS)
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"{model_path}: the MAGNET recipe names unknown settings {unknown}; known: {sorted(known)}")
    return recipe
