"""The reader: the one layer above :mod:`seg4diff_fast.capture` that knows how a diffusers pipeline turns
images and words into attention maps.

- :class:`PipelineReader` (:mod:`.reader`): images → latents (VAE, noise), prompts → text inputs and class
  token positions, one early-exiting transformer pass → maps; the batch loop over (image, prompt) rows;
  attention mass per block; the training path (capture with gradients) MAGNET uses.
- :class:`ModelFamily` (:mod:`.family`): one adapter per MM-DiT family (SD3 / SD3.5 today).
- :class:`ModelDefaults` (:mod:`.defaults`): a model's reading defaults as data.
- :mod:`.images`, :mod:`.prompts`: image conversion and the prompt / token-position plan.
- :func:`load_pipeline` (:mod:`.loading`): a pipeline with only the components reading needs.

Segmentation, labeling, evaluation, the layer analysis, ShapesWorld's grounding checks and MAGNET all read
through it.
"""

from .defaults import MODEL_CONFIG_FILE, ModelDefaults
from .family import FAMILIES, ModelFamily, SD3Family, TextState, family_of, register_family
from .images import ImageLike, as_float, resize_short_side, short_side_size, to_model_input, to_rgb
from .loading import ModelNotAvailableError, load_pipeline, quiet_loading, resolve_dtype
from .prompts import PromptChunk, clean_name, content_limit, plan_prompts
from .reader import PipelineReader, resolve_defaults

__all__ = [
    "FAMILIES",
    "MODEL_CONFIG_FILE",
    "ImageLike",
    "ModelDefaults",
    "ModelFamily",
    "ModelNotAvailableError",
    "PipelineReader",
    "PromptChunk",
    "SD3Family",
    "TextState",
    "as_float",
    "clean_name",
    "content_limit",
    "family_of",
    "load_pipeline",
    "plan_prompts",
    "quiet_loading",
    "register_family",
    "resize_short_side",
    "resolve_defaults",
    "resolve_dtype",
    "short_side_size",
    "to_model_input",
    "to_rgb",
]
