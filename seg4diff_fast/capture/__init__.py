"""Drop-in fast attention and map capture for diffusers' MM-DiT transformers: SD3 / SD3.5, Flux, Flux.2
and Qwen-Image.

``enable_fast_capture(pipe, layers=[9])`` puts every attention layer on :func:`seg4diff_fast.joint_attention`
and captures image→text maps at the listed layers while the pipeline generates; see :class:`FastCapture`.
``stop_after=`` ends the forward after a block (early exit, :func:`early_exit`); ``measure_mass=True`` measures
each block's and head's attention mass on the text keys. :func:`check_layers` is the package's one layer-range
check. What differs between transformer families (attention modules, processors, where the image rows and
text columns sit, the CFG rule) lives in one adapter per family, registered in :data:`CAPTURE_FAMILIES`
(:mod:`.families`); :func:`capture_family` names a pipeline's.
"""

from .families import CAPTURE_FAMILIES, CaptureFamily, register_capture_family
from .flux import FastFluxAttnProcessor
from .flux2 import FastFlux2AttnProcessor, FastFlux2ParallelSelfAttnProcessor
from .patch import (
    SUPPORTED,
    EarlyExit,
    capture_family,
    check_layers,
    count_layers,
    disable_fast_capture,
    early_exit,
    enable_fast_capture,
    get_fast_capture,
)
from .qwenimage import FastQwenDoubleStreamAttnProcessor
from .sd3 import FastJointAttnProcessor
from .state import CallInfo, FastCapture

__all__ = [
    "CAPTURE_FAMILIES",
    "SUPPORTED",
    "CallInfo",
    "CaptureFamily",
    "FastCapture",
    "FastFlux2AttnProcessor",
    "FastFlux2ParallelSelfAttnProcessor",
    "FastFluxAttnProcessor",
    "FastJointAttnProcessor",
    "FastQwenDoubleStreamAttnProcessor",
    "EarlyExit",
    "capture_family",
    "check_layers",
    "count_layers",
    "early_exit",
    "disable_fast_capture",
    "enable_fast_capture",
    "get_fast_capture",
    "register_capture_family",
]
