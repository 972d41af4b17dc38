"""Moved to :mod:`seg4diff_fast.reader.images` (the reader owns how images become model inputs); kept so
old imports work."""

from ..reader.images import ImageLike, as_float, resize_short_side, short_side_size, to_model_input, to_rgb

__all__ = ["ImageLike", "as_float", "resize_short_side", "short_side_size", "to_model_input", "to_rgb"]
