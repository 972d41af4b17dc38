"""Qwen-Image attention processor: diffusers' ``QwenDoubleStreamAttnProcessor2_0`` with the attention core
on :func:`~seg4diff_fast.joint_attention`.

Layout. Every block is double-stream: image ``hidden_states`` and text ``encoder_hidden_states`` are
projected separately (``to_q``/``to_k``/``to_v`` and ``add_*_proj``, RMS qk-norms), each stream gets its
own complex RoPE (``apply_rotary_emb_qwen(use_real=False)``), and attention runs over ``[text; image]``.
The image part is the generated image's tokens, followed in edit pipelines by the conditioning images'
tokens; the forward's ``img_shapes`` lists (frames, h, w) per image for each sample, and only the first
entry (the generated image) is captured. Processor kwargs reach the blocks through the forward's
``attention_kwargs`` (not ``joint_attention_kwargs``).

Text mask. ``encoder_hidden_states_mask`` (B, T) marks the valid text positions; the stock processor turns
it into a key mask over ``[text; image]``. The fused op takes no mask and needs equal q / k lengths, so:

- mask None or all true: the fused op on the whole sequence;
- otherwise, per batch row: gather the valid text positions and all image positions, run the fused op on
  that shorter sequence (captured text positions map through the valid positions; a captured position
  that is masked out gives map 0 in every mode, and ``sel_probs`` normalises over the valid ones), scatter
  the outputs back, and compute the masked-out text rows' outputs with plain SDPA over the gathered keys,
  so that every output equals the stock one. With ``measure_mass`` the T2T share averages over the valid
  text rows only.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .processor import DispatchingProcessor
from .state import CallInfo


class _MaskLayout:
    """Per batch row of a (B, T) text mask with padding: where the gathered sequence's tokens come from.

    For row b: ``keep[b]`` joint indices of the gathered sequence (valid text, then every image token),
    ``masked[b]`` the masked-out text positions, ``n_valid[b]``, ``order[b]`` the joint position of each
    row of ``[gathered; masked]`` inverted (index_select it to put rows back in joint order), ``rank[b]``
    (T,) the gathered index of each text position, -1 where masked.
    """

    def __init__(self, mask: torch.Tensor, n: int):
        cpu = mask.detach().to("cpu", torch.bool)
        b, t = cpu.shape
        device = mask.device
        self.keep, self.masked, self.n_valid, self.order, self.rank = [], [], [], [], []
        image = torch.arange(t, n)
        for row in cpu:
            valid = torch.nonzero(row).flatten()
            masked = torch.nonzero(~row).flatten()
            keep = torch.cat([valid, image])
            order = torch.empty(n, dtype=torch.int64)
            order[torch.cat([keep, masked])] = torch.arange(n)
            rank = torch.full((t,), -1, dtype=torch.int64)
            rank[valid] = torch.arange(len(valid))
            self.keep.append(keep.to(device))
            self.masked.append(masked.to(device))
            self.n_valid.append(len(valid))
            self.order.append(order.to(device))
            self.rank.append(rank.to(device))


_last_layout: list = [None, -1, None, None]  # weakref to the last mask tensor, its version, N, its layout


def _mask_layout(mask: torch.Tensor | None, n: int) -> _MaskLayout | None:
    """The layout of a text mask for a joint length ``n``, or None when nothing is masked (no mask, all true).

    Kept for the same mask tensor object: diffusers hands one mask to every block of a forward, so a call
    pays one device sync.
    """
    if mask is None:
        return None
    ref, version, length, layout = _last_layout
    if ref is not None and ref() is mask and version == mask._version and length == n:
        return layout
    layout = None if bool(mask.all()) else _MaskLayout(mask, n)
    _last_layout[:] = [weakref.ref(mask), mask._version, n, layout]
    return layout


class FastQwenDoubleStreamAttnProcessor(DispatchingProcessor):
    """Drop-in replacement for diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (Qwen-Image, ``[text; image]``).

    Under context parallelism the call goes through diffusers' own attention dispatcher (with the stock
    processor's key mask); capturing is not supported there.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        seg4diff_call: CallInfo | None = None,
    ):
        if encoder_hidden_states is None:
            raise ValueError("FastQwenDoubleStreamAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "FastQwenDoubleStreamAttnProcessor does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        n_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in
                   (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)))
        cq, ck, cv = (t.unflatten(-1, (-1, head_dim)) for t in
                      (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            cq = apply_rotary_emb_qwen(cq, txt_freqs, use_real=False)
            ck = apply_rotary_emb_qwen(ck, txt_freqs, use_real=False)
        q = torch.cat([cq, q], dim=1)  # (B, N, H, D), [text; image]
        k = torch.cat([ck, k], dim=1)
        v = torch.cat([cv, v], dim=1)

        out = self._attention(q, k, v, encoder_hidden_states_mask, seg4diff_call, n_txt)
        out = out.flatten(2, 3).to(q.dtype)

        context_out, out = out[:, :n_txt], out[:, n_txt:]
        out = attn.to_out[0](out.contiguous())
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        context_out = attn.to_add_out(context_out.contiguous())
        return out, context_out

    # -----------------------------------------------------------------------------------------------
    def _attention(self, q, k, v, mask, info: CallInfo | None, n_txt: int) -> torch.Tensor:
        """(B, N, H, D) q, k, v after RoPE → (B, N, H, D) output; records maps / mass when asked."""
        capturing, measuring = self._wants(info)
        if self._parallel_config is not None:
            if capturing or measuring:
                raise NotImplementedError("fast capture: Qwen-Image calls under context parallelism cannot capture")
            attention_mask = None
            if mask is not None:
                image = torch.ones(q.shape[0], q.shape[1] - n_txt, dtype=torch.bool, device=q.device)
                attention_mask = torch.cat([mask.to(torch.bool), image], dim=1)[:, None, None, :]
            return self._dispatch(q, k, v, attention_mask)
        if capturing or measuring:
            self._check_text_layout(q.shape[1], n_txt, info)
        layout = _mask_layout(mask, q.shape[1])
        if layout is None:
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
            return self._attend(qh, kh, vh, info).transpose(1, 2)

        outs, maps, mass = [], [], None
        cols = info.cols(q.device) - info.col0 if capturing else None  # captured text positions
        kept = set(range(q.shape[0])[info.keep]) if info is not None and info.keep is not None else None
        for b in range(q.shape[0]):
            keep, masked, nv = layout.keep[b], layout.masked[b], layout.n_valid[b]
            qb, kb, vb = (t[b:b + 1].index_select(1, keep).transpose(1, 2) for t in (q, k, v))  # (1, H, n_b, D)
            sub = None
            if capturing or measuring:  # the gathered row: [valid text; image]
                sub = CallInfo(info.index, info.step, info.grid, nv, nv, 0, info.positions, None)
            row_cols = layout.rank[b].index_select(0, cols) if capturing else None
            o, m, part = self._core(qb, kb, vb, sub, capturing, measuring, row_cols)
            if masked.numel():  # masked-out text rows: plain attention over the gathered (valid) keys
                qm = q[b:b + 1].index_select(1, masked).transpose(1, 2)
                o = torch.cat([o, F.scaled_dot_product_attention(qm, kb, vb).to(o.dtype)], dim=2)
            outs.append(o.index_select(2, layout.order[b]))
            if m is not None:
                maps.append(m)
            if part is not None and (kept is None or b in kept):  # a forced CFG rule keeps the second half
                mass = part if mass is None else mass + part
        if measuring:
            self.capture.record_mass(self.layer, mass, info)
        if capturing:
            self.capture.record(self.slot, torch.cat(maps, dim=0), info)
        return torch.cat(outs, dim=0).transpose(1, 2)


def _first_image_shape(img_shapes) -> tuple[int, int, int]:
    """(frames, h, w) of the generated image from ``img_shapes``: per sample a list of (frames, h, w)
    (the first the generated image), or one such list, or one (frames, h, w)."""
    shapes = img_shapes
    while isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
        shapes = shapes[0]
    if not (isinstance(shapes, (list, tuple)) and len(shapes) == 3):
        raise ValueError(f"fast capture: cannot read the image grid off Qwen-Image's img_shapes={img_shapes!r}")
    return tuple(int(x) for x in shapes)  # type: ignore[return-value]


def qwenimage_call_geometry(transformer, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                            img_shapes) -> tuple[tuple[int, int], int, int, int]:
    """(grid, n_txt, row0, col0) of a Qwen-Image transformer call: [text; image (; conditioning images)],
    the grid the first ``img_shapes`` entry's (h, w)."""
    if img_shapes is None:
        raise ValueError("fast capture: a Qwen-Image call without img_shapes cannot be captured (no image grid)")
    frames, h, w = _first_image_shape(img_shapes)
    if frames != 1:
        raise ValueError(f"fast capture: Qwen-Image img_shapes with {frames} frames per image; only still images "
                         "(frames = 1) can be captured")
    if h * w > hidden_states.shape[1]:
        raise ValueError(f"fast capture: Qwen-Image img_shapes describe a {h}x{w} grid but the call has "
                         f"{hidden_states.shape[1]} image tokens")
    n_txt = encoder_hidden_states.shape[1]
    return (h, w), n_txt, n_txt, 0
