"""Seg4Diff segmentation of real images: zero-shot open-vocabulary and unsupervised.

- :mod:`.segmenter`: :class:`Seg4DiffSegmenter` (class lists → prompt rows → the reader's early-exiting
  pass → class maps → fused upsample + argmax), :func:`class_scores`, :func:`confidence_of`;
- :mod:`.unsupervised`: the KL-threshold greedy merging of the empty prompt's token maps.

Images, prompts and token positions are the reader's (:mod:`seg4diff_fast.reader`); ``segment.inputs`` and
``segment.prompts`` still re-export them.
"""

from ..reader.prompts import PromptChunk, clean_name, plan_prompts
from .segmenter import (
    CHUNK_MERGES,
    Seg4DiffSegmenter,
    SegmentationResult,
    UnsupervisedResult,
    class_scores,
    confidence_of,
)
from .unsupervised import merge_maps

__all__ = [
    "CHUNK_MERGES",
    "PromptChunk",
    "Seg4DiffSegmenter",
    "SegmentationResult",
    "UnsupervisedResult",
    "class_scores",
    "clean_name",
    "confidence_of",
    "merge_maps",
    "plan_prompts",
]
