"""The reader: the one layer above :mod:`seg4diff_fast.capture` that knows how a diffusers pipeline turns
images and words into attention maps.

- :class:`PipelineReader` (:mod:`.reader`): images → latents (VAE, noise), prompts → text inputs and class
  token positions, one early-exiting transformer pass → maps; the batch loop over (image, prompt) rows;
  attention mass per block; the training path (capture with gradients) MAGNET uses.
- :class:`ModelFamily` (:mod:`.family`): one adapter per MM-DiT family — :mod:`.sd3` (SD3 / SD3.5),
  :mod:`.flux` (Flux.1), :mod:`.flux2` (Flux.2), :mod:`.qwenimage` (Qwen-Image) — and the registry
  (:mod:`.families`: by pipeline object or by ``model_index.json`` class name).
- :class:`ModelDefaults` (:mod:`.defaults`): a model's reading defaults as data.
- :mod:`.images`, :mod:`.prompts`: image conversion and the prompt / token-position plan.
- :func:`load_pipeline` (:mod:`.loading`): a pipeline with only the components reading needs.

Segmentation, labeling, evaluation, the layer analysis, ShapesWorld's grounding checks and MAGNET all read
through it.
"""

from .defaults import MODEL_CONFIG_FILE, ModelDefaults, estimated_layer, model_config
from .families import FAMILIES, family_for_class, family_named, family_of, register_family, supported_pipelines
from .family import ModelFamily, TextState, pack_2x2, unpack_2x2
from .flux import FluxFamily
from .flux2 import Flux2Family
from .images import ImageLike, as_float, resize_short_side, short_side_size, to_model_input, to_rgb
from .loading import ModelNotAvailableError, load_pipeline, model_family, quiet_loading, resolve_dtype
from .prompts import PromptChunk, clean_name, content_limit, plan_prompts, tokenizer_spans
from .qwenimage import QwenImageFamily
from .reader import PipelineReader, resolve_defaults
from .sd3 import SD3Family

__all__ = [
    "FAMILIES",
    "Flux2Family",
    "FluxFamily",
    "QwenImageFamily",
    "MODEL_CONFIG_FILE",
    "model_config",
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
    "estimated_layer",
    "family_for_class",
    "family_named",
    "family_of",
    "load_pipeline",
    "model_family",
    "plan_prompts",
    "quiet_loading",
    "register_family",
    "resize_short_side",
    "resolve_defaults",
    "resolve_dtype",
    "short_side_size",
    "to_model_input",
    "supported_pipelines",
    "to_rgb",
    "tokenizer_spans",
    "pack_2x2",
    "unpack_2x2",
]
