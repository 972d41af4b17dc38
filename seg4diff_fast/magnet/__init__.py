"""MAGNET fine-tuning: a LoRA trained with flow matching plus a focal/dice mask loss on the expert layer's
raw image→text scores, through the fused op's backward. ``MagnetConfig(protocol="paper")`` (the default) trains
as the authors' code does, ``protocol="corrected"`` with this package's choices (docs/PAPER_PROTOCOL_MAGNET.md).

Example:
    >>> import tempfile
    >>> from seg4diff_fast.magnet import MagnetConfig, ShapesMagnetData, train_magnet
    >>> from seg4diff_fast.testing import tiny_sd3_pipeline
    >>> cfg = MagnetConfig(layer=1, rank=2, max_steps=1, batch_size=2, warmup_steps=0, resolution=32)
    >>> train_magnet(tiny_sd3_pipeline(t5=False), ShapesMagnetData(8), cfg, tempfile.mkdtemp(), progress=False)["steps"]
    1
"""

from .config import PROTOCOLS, MagnetConfig
from .data import (
    CocoMagnetData,
    CocoStuffMagnetData,
    MagnetSample,
    PaperView,
    SA1BMagnetData,
    ShapesMagnetData,
    open_magnet_data,
)
from .head import MapHead
from .lora import add_magnet_lora, check_lora_fits, load_magnet_head, load_magnet_lora, save_magnet_lora
from .losses import focal_dice_loss
from .matching import match_costs, match_masks
from .train import train_magnet

__all__ = [
    "CocoMagnetData",
    "CocoStuffMagnetData",
    "MagnetConfig",
    "MagnetSample",
    "MapHead",
    "PROTOCOLS",
    "PaperView",
    "SA1BMagnetData",
    "ShapesMagnetData",
    "add_magnet_lora",
    "check_lora_fits",
    "focal_dice_loss",
    "match_masks",
    "load_magnet_head",
    "load_magnet_lora",
    "match_costs",
    "open_magnet_data",
    "save_magnet_lora",
    "train_magnet",
]


def __getattr__(name: str):  # the 0.1.0 name, kept importable
    if name == "hungarian_match":
        from . import matching as _m

        return getattr(_m, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
