"""Labeling image sets: ``seg4diff-fast label`` and :func:`label_images`, batched and streamed,
resumable, deterministic, sharded over processes.

Outputs under OUT, for an input at relative path ``a/b.jpg``:

- ``OUT/a/b.png``: class indices at the image's own size (palette PNG up to 256 classes, uint16 above);
- ``OUT/a/b.conf.png`` (``confidence``): uint8 ``round(255 · confidence)``;
- ``OUT/coco.json`` (``coco``): RLE masks per class per image, read back from the label PNGs;
- ``OUT/yolo/`` (``yolo``): the Ultralytics segmentation export, polygons per piece of each class
  (``labels/a/b.txt``, ``images/`` links, ``data.yaml``, ``classes.txt``; :mod:`.yolo`, needs OpenCV);
- ``OUT/labels.json``: classes, prompts, model (and ``provenance``), LoRA, layer, protocol, timestep, seed,
  dtype, package version, versions;
- ``OUT/errors.jsonl``: one line per input that could not be read, with the reason.

Modules: :mod:`.inputs` (discovery, class lists, the loader's dataset), :mod:`.outputs` (paths, PNG
encoding, atomic writes, completeness), :mod:`.distributed` (ranks, the split, barriers), :mod:`.coco`,
:mod:`.yolo`, :mod:`.runner` (the loop). ``python -m seg4diff_fast.label`` takes the CLI's arguments (for torchrun).

Example:
    >>> import os, tempfile
    >>> from PIL import Image
    >>> from seg4diff_fast import Seg4DiffSegmenter, label_images
    >>> from seg4diff_fast.testing import tiny_sd3_pipeline
    >>> d = tempfile.mkdtemp(); Image.new("RGB", (20, 20)).save(os.path.join(d, "x.png"))
    >>> seg = Seg4DiffSegmenter(tiny_sd3_pipeline(t5=False), layer=1, resolution=32)
    >>> label_images([os.path.join(d, "x.png")], ["cat", "dog"], os.path.join(d, "out"), segmenter=seg,
    ...              workers=0, progress=False).labeled
    1
"""

from .coco import build_coco, rle_encode, rle_string
from .distributed import DistContext, shard_batches
from .inputs import ImageItem, LabelDataset, discover_images, load_classes
from .outputs import confidence_path, label_path, outputs_complete, png_complete
from .runner import LabelSummary, label_images
from .yolo import encode_yolo, mask_polygons, write_yolo_dataset

__all__ = [
    "DistContext",
    "ImageItem",
    "LabelDataset",
    "LabelSummary",
    "build_coco",
    "confidence_path",
    "discover_images",
    "encode_yolo",
    "label_images",
    "label_path",
    "load_classes",
    "mask_polygons",
    "outputs_complete",
    "png_complete",
    "rle_encode",
    "rle_string",
    "shard_batches",
    "write_yolo_dataset",
]
