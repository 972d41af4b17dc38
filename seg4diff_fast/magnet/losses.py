"""MAGNET's mask loss: sigmoid focal + dice on token-grid logits upsampled bilinearly to the masks' size.

The op (argument checks, backend choice, the Triton / chunked torch / reference implementations) lives in
:mod:`seg4diff_fast.ops.focal_dice`; this module re-exports it for the MAGNET code and its users.
"""

from __future__ import annotations

from ..ops.focal_dice import CHUNK_BYTES, FOCAL_FORMS, focal_dice_loss

__all__ = ["focal_dice_loss", "CHUNK_BYTES", "FOCAL_FORMS"]
