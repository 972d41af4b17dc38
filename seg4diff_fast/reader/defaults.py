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

__all__ = ["MODEL_CONFIG_FILE", "SD3_RELATIVE_DEPTH", "ModelDefaults", "estimated_layer", "model_config",
           "read_model_config"]

#: A model folder's own reading facts (written by the ShapesWorld trainer next to ``model_index.json``).
MODEL_CONFIG_FILE = "shapes_config.json"

#: SD3-medium's expert layer at its relative depth (9 of 24 blocks), the estimate for families without one.
SD3_RELATIVE_DEPTH = 9 / 24


def estimated_layer(num_layers: int) -> int:
    """The block at SD3's expert depth in a stack of ``num_layers`` (an estimate, not a measurement).

    Example:
        >>> estimated_layer(24), estimated_layer(56)
        (9, 21)
    """
    return min(int(round(SD3_RELATIVE_DEPTH * num_layers)), max(int(num_layers) - 1, 0))


@dataclass(frozen=True)
class ModelDefaults:
    """How a model is read when the caller does not say otherwise.

    Attributes:
        layer: the semantic-grounding expert block (0-based).
        resolution: side of the square the image is stretched to.
        text_length: SD3: the number of T5 positions after the 77 CLIP ones (zeros, as in the authors' fork);
            Flux.1 / Flux.2: the text encoder's padded length; Qwen-Image: the longest prompt allowed.
        num_inference_steps, noise_step: the noise level is ``timesteps[-noise_step]`` of that many steps.
        source: where these values come from (for reports); ``layer_source`` where the layer comes from
            (the paper, or an estimate for a family without published numbers).
        signed_input: the VAE reads images in [−1, 1]; False: left in [0, 1] (the authors' Flux path).
        shift_tokens: the sequence length a dynamic timestep shift is computed for; None: the image's own
            token count (the authors' Flux path passes the latent channel count, 16).
        guidance: the guidance-embedding value for guidance-distilled transformers (Flux.1-dev: 3.5), or None.
    """

    layer: int
    resolution: int
    text_length: int
    num_inference_steps: int = 28
    noise_step: int = 8
    source: str = ""
    layer_source: str = "the paper"
    signed_input: bool = True
    shift_tokens: int | None = None
    guidance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, **changes: Any) -> ModelDefaults:
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def model_path(pipe: Any) -> str:
    """The folder a pipeline was loaded from ("" when unknown)."""
    return str(getattr(pipe, "name_or_path", "") or getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")


def model_config(path: str) -> dict[str, Any]:
    """The model folder's own facts (:data:`MODEL_CONFIG_FILE` as a dict), or ``{}`` when it has none.

    Example:
        >>> from seg4diff_fast.shapes.shipped import WEIGHTS_DIR
        >>> model_config(WEIGHTS_DIR)["expert_layer"], model_config("/nonexistent")
        (1, {})
    """
    cfg_file = os.path.join(path, MODEL_CONFIG_FILE) if path else ""
    if not (cfg_file and os.path.isfile(cfg_file)):
        return {}
    with open(cfg_file) as f:
        return json.load(f)


def read_model_config(pipe: Any, base: ModelDefaults) -> ModelDefaults:
    """``base`` updated from the model folder's :data:`MODEL_CONFIG_FILE`, if it has one.

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> read_model_config(tiny_sd3_pipeline(t5=False), ModelDefaults(9, 1024, 77)).layer
        9
    """
    path = model_path(pipe)
    cfg = model_config(path)
    if not cfg:
        return base
    cfg_file = os.path.join(path, MODEL_CONFIG_FILE)
    return replace(base, layer=int(cfg.get("expert_layer", base.layer)),
                   text_length=int(cfg.get("t5_length", 77)), resolution=int(cfg.get("size", 32)),
                   source=cfg_file, layer_source=cfg_file)
