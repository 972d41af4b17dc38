"""Evaluation: mIoU (dataset-level confusion matrix), the unsupervised Hungarian protocol, benchmark
loaders in their standard prepared layouts, and the evaluation loop behind ``seg4diff-fast eval``."""

from .datasets import DATASETS, SegDataset, load_classnames
from .metrics import MeanIoU, match_segments_to_classes, overlap_histogram
from .runner import PROTOCOLS, evaluate

__all__ = [
    "DATASETS",
    "MeanIoU",
    "PROTOCOLS",
    "SegDataset",
    "evaluate",
    "match_segments_to_classes",
    "load_classnames",
    "overlap_histogram",
]


def __getattr__(name: str):  # the 0.1.0 name, kept importable
    if name == "hungarian_match":
        from . import metrics as _m

        return getattr(_m, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
