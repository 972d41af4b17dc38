"""seg4diff-fast: Seg4Diff's attention maps from MM-DiT diffusion transformers, fast and memory-lean."""

from .ops.joint_attention import joint_attention

__all__ = ["joint_attention"]
__version__ = "0.1.0"
