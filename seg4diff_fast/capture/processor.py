"""The base of the fast attention processors (:mod:`.sd3`, :mod:`.flux`, :mod:`.flux2`, :mod:`.qwenimage`).

:class:`FastProcessor` holds what every processor of a patched transformer carries (its
:class:`~seg4diff_fast.capture.FastCapture`, its capture slot, its block number) and the one attention
core they share: on (B, H, N, D) q, k, v, the text-key mass when the capture measures it, the maps when
this layer captures, else plain attention, all on :func:`~seg4diff_fast.joint_attention`.
:class:`DispatchingProcessor` adds diffusers' dispatch settings (``set_attention_backend``, context
parallelism), for the families whose stock processor goes through ``dispatch_attention_fn`` (Flux.1,
Flux.2, Qwen-Image) and whose calls the fused op cannot take go there too.
"""

from __future__ import annotations

import torch

from ..ops.joint_attention import joint_attention
from .mass import attention_with_text_mass
from .state import CallInfo, FastCapture


class FastProcessor:
    """A fast attention processor's state and attention core.

    Args:
        capture: the :class:`FastCapture` this layer records into, or None.
        slot: this layer's position in ``capture.layers`` when it captures, else None.
        layer: this module's block number (``layers=``, ``stop_after=``, ``block_mass`` keys).
    """

    def __init__(self, capture: FastCapture | None = None, slot: int | None = None, layer: int | None = None):
        self.capture = capture
        self.slot = slot
        self.layer = layer

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, capturing={self.slot is not None})"

    @property
    def _fused_backend(self) -> str | None:
        """The fused op's backend: the capture's, or the op's default without a capture."""
        return self.capture.backend if self.capture is not None else None

    def _wants(self, info: CallInfo | None) -> tuple[bool, bool]:
        """(capturing, measuring) for a call described by ``info`` (None: a call that records nothing)."""
        if info is None or self.capture is None:
            return False, False
        return self.slot is not None, bool(self.capture.measure_mass)

    def _check_text_layout(self, n: int, n_txt: int, info: CallInfo) -> None:
        """Refuse a ``[text; image ...]`` call of ``n`` tokens (``n_txt`` text) that does not fit the call's
        layout (another text length, or fewer tokens than text + the generated image)."""
        if n_txt != info.n_txt or n_txt + info.n_img > n:
            raise RuntimeError(
                f"fast capture: block {self.layer} sees {n} tokens ({n_txt} text) but the call "
                f"has {info.n_txt} text tokens and an image grid {info.grid}"
            )

    def _core(self, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, info: CallInfo | None,
              capturing: bool, measuring: bool, cols: torch.Tensor | None = None):
        """The fused op on (B, H, N, D) q, k, v whose layout ``info`` describes: (out, maps or None, text-mass
        part or None), recording nothing. The mass when ``measuring``, the maps when ``capturing`` (``cols``:
        the captured key columns, default ``info``'s), else plain attention."""
        capture, backend = self.capture, self._fused_backend
        out = maps = part = None
        if measuring:
            out, part = attention_with_text_mass(qh, kh, vh, info, backend)
        if capturing:
            o, maps = joint_attention(
                qh, kh, vh, capture_cols=info.cols(qh.device) if cols is None else cols, capture_rows=info.rows,
                mode=capture.mode, head_reduce=capture.head_reduce, backend=backend,
            )
            out = o if out is None else out
        if out is None:
            out, _ = joint_attention(qh, kh, vh, backend=backend)
        return out, maps, part

    def _attend(self, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, info: CallInfo | None) -> torch.Tensor:
        """:meth:`_core` on (B, H, N, D) q, k, v, then the text mass and the maps recorded as this layer asks;
        returns the (B, H, N, D) attention output."""
        capturing, measuring = self._wants(info)
        out, maps, part = self._core(qh, kh, vh, info, capturing, measuring)
        if part is not None:
            self.capture.record_mass(self.layer, part, info)
        if maps is not None:
            self.capture.record(self.slot, maps, info)
        return out


class DispatchingProcessor(FastProcessor):
    """A fast processor that sends the calls the fused op cannot take (an attention mask, context
    parallelism) to diffusers' attention dispatcher, with the stock processor's settings."""

    _attention_backend = None  # set by transformer.set_attention_backend(); copied from the stock processor
    _parallel_config = None  # set under context parallelism

    def _dispatch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' ``dispatch_attention_fn`` on (B, N, H, D) q, k, v, as the stock processor calls it."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)
