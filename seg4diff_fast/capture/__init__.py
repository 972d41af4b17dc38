"""Drop-in fast attention and map capture for diffusers' SD3 / SD3.5 and Flux transformers.

``enable_fast_capture(pipe, layers=[9])`` puts every attention layer on :func:`seg4diff_fast.joint_attention`
and captures image→text maps at the listed layers while the pipeline generates; see :class:`FastCapture`.
"""

from .flux import FastFluxAttnProcessor
from .patch import SUPPORTED, disable_fast_capture, enable_fast_capture, get_fast_capture
from .sd3 import FastJointAttnProcessor
from .state import CallInfo, FastCapture

__all__ = [
    "SUPPORTED",
    "CallInfo",
    "FastCapture",
    "FastFluxAttnProcessor",
    "FastJointAttnProcessor",
    "disable_fast_capture",
    "enable_fast_capture",
    "get_fast_capture",
]
