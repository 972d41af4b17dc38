"""Evaluation: mIoU (dataset-level confusion matrix), the unsupervised Hungarian protocol, benchmark
loaders in the authors' prepared layouts, the evaluation loop behind ``seg4diff-fast eval`` (the paper's
scoring or the corrected one: :mod:`.paper_protocol`), and one preset per table of the paper (:mod:`.presets`)."""

from .datasets import DATASETS, DatasetNotFoundError, DatasetSpec, SegDataset, dataset_classes, load_classnames
from .metrics import MeanIoU, match_segments_to_classes, overlap_histogram
from .paper_protocol import PROTOCOL_VARIANTS, PaperHungarian, paper_unsupervised_labels
from .presets import PRESETS, PaperEntry, Preset, format_report, run_preset
from .runner import PROTOCOLS, evaluate

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSpec",
    "MeanIoU",
    "PRESETS",
    "PROTOCOLS",
    "PROTOCOL_VARIANTS",
    "PaperEntry",
    "PaperHungarian",
    "Preset",
    "SegDataset",
    "dataset_classes",
    "evaluate",
    "format_report",
    "match_segments_to_classes",
    "load_classnames",
    "overlap_histogram",
    "paper_unsupervised_labels",
    "run_preset",
]


def __getattr__(name: str):  # the 0.1.0 name, kept importable
    if name == "hungarian_match":
        from . import metrics as _m

        return getattr(_m, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
