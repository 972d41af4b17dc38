"""Evaluation: mIoU (dataset-level confusion matrix), the unsupervised Hungarian protocol, benchmark
loaders in their standard prepared layouts, and the evaluation loop behind ``seg4diff-fast eval``."""

from .datasets import DATASETS, SegDataset, load_classnames
from .metrics import MeanIoU, hungarian_match, overlap_histogram
from .runner import PROTOCOLS, evaluate

__all__ = [
    "DATASETS",
    "MeanIoU",
    "PROTOCOLS",
    "SegDataset",
    "evaluate",
    "hungarian_match",
    "load_classnames",
    "overlap_histogram",
]
