"""Drop-in fast attention and map capture for diffusers' SD3 / SD3.5 and Flux transformers.

``enable_fast_capture(pipe, layers=[9])`` puts every attention layer on :func:`seg4diff_fast.joint_attention`
and captures image→text maps at the listed layers while the pipeline generates; see :class:`FastCapture`.
``stop_after=`` ends the forward after a block (early exit, :func:`early_exit`); ``measure_mass=True`` measures
each block's and head's attention mass on the text keys. :func:`check_layers` is the package's one layer-range
check.
"""

from .flux import FastFluxAttnProcessor
from .patch import (
    SUPPORTED,
    EarlyExit,
    check_layers,
    count_layers,
    disable_fast_capture,
    early_exit,
    enable_fast_capture,
    get_fast_capture,
)
from .sd3 import FastJointAttnProcessor
from .state import CallInfo, FastCapture

__all__ = [
    "SUPPORTED",
    "CallInfo",
    "FastCapture",
    "FastFluxAttnProcessor",
    "FastJointAttnProcessor",
    "EarlyExit",
    "check_layers",
    "count_layers",
    "early_exit",
    "disable_fast_capture",
    "enable_fast_capture",
    "get_fast_capture",
]
