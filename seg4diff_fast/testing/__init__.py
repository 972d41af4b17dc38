"""Tiny, randomly initialised MM-DiT pipelines built entirely offline, and float64 reference maps for tests.

- :mod:`.tiny`: SD3, SD3.5 and Flux.1 pipelines (the real diffusers classes with tiny configs, CLIP and T5
  tokenizers written to a temporary folder, a tiny VAE);
- :mod:`.families`: Flux.2 (klein) and Qwen-Image pipelines (tiny Qwen3 / Qwen2.5-VL encoders and an offline
  byte-level BPE tokenizer), and where a prompt's tokens sit in their text sequences;
- :mod:`.reference`: the stock processors' q and k recorded, the attention maps materialised in float64.

The images they make are noise; only the shapes and the code paths are real.

Example:
    >>> import torch
    >>> from seg4diff_fast.testing import tiny_sd3_pipeline
    >>> pipe = tiny_sd3_pipeline()
    >>> image = pipe("a cat on a red sofa", num_inference_steps=2, height=32, width=32,
    ...              max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images[0]
    >>> image.size
    (32, 32)
"""

from .families import (
    EXTRA_WORDS,
    prompt_token_span,
    text_sequence_length,
    tiny_flux2_pipeline,
    tiny_flux2_transformer,
    tiny_qwen_tokenizer,
    tiny_qwenimage_pipeline,
    tiny_qwenimage_transformer,
)
from .reference import attention_module_name, record_stock_attention, reference_maps, reference_mass
from .tiny import (
    SPLIT_WORDS,
    WORDS,
    tiny_clip_tokenizer,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_sd35_pipeline,
    tiny_t5_tokenizer,
    tokenizer_folder,
)

__all__ = [
    "EXTRA_WORDS",
    "SPLIT_WORDS",
    "WORDS",
    "attention_module_name",
    "prompt_token_span",
    "record_stock_attention",
    "reference_maps",
    "reference_mass",
    "text_sequence_length",
    "tiny_clip_tokenizer",
    "tiny_flux2_pipeline",
    "tiny_flux2_transformer",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_qwen_tokenizer",
    "tiny_qwenimage_pipeline",
    "tiny_qwenimage_transformer",
    "tiny_sd35_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd3_transformer",
    "tiny_t5_tokenizer",
    "tokenizer_folder",
]
