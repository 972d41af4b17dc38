"""Seg4Diff segmentation of real images: zero-shot open-vocabulary and unsupervised.

- :mod:`.inputs`: PIL / numpy / tensor images → RGB in [0, 1] → the model's square input;
- :mod:`.prompts`: prompts from class names, class-token positions, vocabulary chunking;
- :mod:`.segmenter`: :class:`Seg4DiffSegmenter` (VAE, noise, one early-exiting transformer pass with
  capture, class maps, fused upsample + argmax);
- :mod:`.unsupervised`: the KL-threshold greedy merging of the empty prompt's token maps.
"""

from .prompts import PromptChunk, clean_name, plan_prompts
from .segmenter import CHUNK_MERGES, Seg4DiffSegmenter, SegmentationResult, UnsupervisedResult
from .unsupervised import merge_maps

__all__ = [
    "CHUNK_MERGES",
    "PromptChunk",
    "Seg4DiffSegmenter",
    "SegmentationResult",
    "UnsupervisedResult",
    "clean_name",
    "merge_maps",
    "plan_prompts",
]
