"""A model's reading defaults as data: expert layer, resolution, text layout, noise level.

Resolved once, when a :class:`~seg4diff_fast.reader.PipelineReader` is built (by the CLI or the user),
in this order: the model folder's ``shapes_config.json`` (a model that ships its own facts: keys
``expert_layer``, ``t5_length``, ``size``), else the family's paper defaults
(:meth:`~seg4diff_fast.reader.family.ModelFamily.defaults`). Nothing above the reader looks them up.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["MODEL_CONFIG_FILE", "ModelDefaults", "read_model_config"]

#: A model folder's own reading facts (written by the ShapesWorld trainer next to ``model_index.json``).
MODEL_CONFIG_FILE = "shapes_config.json"


@dataclass(frozen=True)
class ModelDefaults:
    """How a model is read when the caller does not say otherwise.

    Attributes:
        layer: the semantic-grounding expert block (0-based).
        resolution: side of the square the image is stretched to.
        text_length: SD3: the number of T5 positions after the 77 CLIP ones (zeros, as in the authors' fork).
        num_inference_steps, noise_step: the noise level is ``timesteps[-noise_step]`` of that many steps.
        source: where these values come from (for reports).
    """

    layer: int
    resolution: int
    text_length: int
    num_inference_steps: int = 28
    noise_step: int = 8
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, **changes: Any) -> ModelDefaults:
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def model_path(pipe: Any) -> str:
    """The folder a pipeline was loaded from ("" when unknown)."""
    return str(getattr(pipe, "name_or_path", "") or getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")


def read_model_config(pipe: Any, base: ModelDefaults) -> ModelDefaults:
    """``base`` updated from the model folder's :data:`MODEL_CONFIG_FILE`, if it has one.

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> read_model_config(tiny_sd3_pipeline(t5=False), ModelDefaults(9, 1024, 77)).layer
        9
    """
    path = model_path(pipe)
    cfg_file = os.path.join(path, MODEL_CONFIG_FILE) if path else ""
    if not (cfg_file and os.path.isfile(cfg_file)):
        return base
    with open(cfg_file) as f:
        cfg = json.load(f)
    return replace(base, layer=int(cfg.get("expert_layer", base.layer)),
                   text_length=int(cfg.get("t5_length", 77)), resolution=int(cfg.get("size", 32)),
                   source=cfg_file)
