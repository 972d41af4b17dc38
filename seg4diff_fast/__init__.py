"""seg4diff-fast: Seg4Diff's attention maps from MM-DiT diffusion transformers, fast and memory-lean.

The public API:

- :func:`joint_attention`: attention over the joint [image; text] sequence that also returns the
  image→text maps, in one pass, never allocating anything of size N² (Triton on CUDA, torch anywhere).
- :func:`enable_fast_capture` / :func:`disable_fast_capture` / :class:`FastCapture`: put every
  attention layer of a diffusers SD3, SD3.5, Flux.1, Flux.2 or Qwen-Image pipeline on
  :func:`joint_attention` and capture maps during generation.
- :func:`upsample_argmax`: token-grid class maps → full-resolution labels without holding K×H×W.
- :class:`Seg4DiffSegmenter`: images + class names → full-resolution label maps (zero-shot, and
  ``.unsupervised``), the paper's recipe with an early-exiting transformer pass.
- :class:`MeanIoU`: dataset-level mIoU (the evaluation behind ``seg4diff-fast eval``).
- :func:`label_images`: label an image set with a class list (``seg4diff-fast label``): batched,
  streamed, resumable, sharded over processes.
- :class:`MagnetConfig` / :func:`train_magnet` / :func:`load_magnet_lora`: MAGNET LoRA fine-tuning
  (flow matching + focal/dice on the expert layer's raw image→text scores, through the fused op's
  backward) and loading the authors' released ``.pth`` (``seg4diff-fast magnet``; needs ``[train]``).

Example:
    >>> import torch
    >>> from seg4diff_fast import joint_attention
    >>> q, k, v = (torch.randn(1, 2, 40, 64) for _ in range(3))
    >>> out, maps = joint_attention(q, k, v, capture_cols=torch.arange(32, 40), capture_rows=(0, 32))
    >>> maps.shape
    torch.Size([1, 32, 8])
"""

from .capture import FastCapture, disable_fast_capture, enable_fast_capture
from .evaluation.metrics import MeanIoU
from .label import label_images
from .ops.joint_attention import joint_attention
from .ops.upsample_argmax import upsample_argmax
from .segment import Seg4DiffSegmenter
from .utils.version import __version__ as __version__

__all__ = [
    "joint_attention",
    "enable_fast_capture",
    "disable_fast_capture",
    "FastCapture",
    "upsample_argmax",
    "Seg4DiffSegmenter",
    "MeanIoU",
    "label_images",
    "MagnetConfig",
    "train_magnet",
    "load_magnet_lora",
]

_MAGNET = ("MagnetConfig", "train_magnet", "load_magnet_lora")


def __getattr__(name: str):  # MAGNET is imported on first use: ``import seg4diff_fast`` stays light
    if name in _MAGNET:
        from . import magnet

        return getattr(magnet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
