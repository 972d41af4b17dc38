"""Flux attention processor: diffusers' ``FluxAttnProcessor`` with the attention core on
:func:`~seg4diff_fast.joint_attention`.

Double-stream blocks get image ``hidden_states`` and text ``encoder_hidden_states`` and attend over
``[text; image]``; single-stream blocks get the already concatenated ``[text; image]`` sequence and no
``encoder_hidden_states``, so their text length comes from the call (the pre-hook reads it from the
transformer's inputs). RoPE is applied to q and k before attention with diffusers' own
``apply_rotary_emb``; projections and RMS norms are the module's own submodules (LoRA/peft safe).
Layers count the double-stream blocks first, then the single-stream ones; Kontext conditioning tokens
follow the image (another frame id in ``img_ids``) and are never captured. :class:`FluxStyleProcessor` (the
call, the attention core on the fused op) and :func:`flux_qkv` (projections, qk-norms, RoPE) are shared with
Flux.2 (:mod:`.flux2`), whose double-stream math is the same.
"""

from __future__ import annotations

import weakref

import torch

from .processor import DispatchingProcessor
from .state import CallInfo


def _projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        cq = ck = cv = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return q, k, v, cq, ck, cv
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    cq = ck = cv = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        cq = attn.add_q_proj(encoder_hidden_states)
        ck = attn.add_k_proj(encoder_hidden_states)
        cv = attn.add_v_proj(encoder_hidden_states)
    return q, k, v, cq, ck, cv


def _rope(q: torch.Tensor, k: torch.Tensor, image_rotary_emb):
    """diffusers' ``apply_rotary_emb`` on (B, N, H, D) q and k (text and image together); none without one."""
    if image_rotary_emb is None:
        return q, k
    from diffusers.models.embeddings import apply_rotary_emb

    return (apply_rotary_emb(q, image_rotary_emb, sequence_dim=1),
            apply_rotary_emb(k, image_rotary_emb, sequence_dim=1))


def flux_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, image_rotary_emb):
    """(B, N, H, D) q, k, v after RoPE, exactly as diffusers' ``FluxAttnProcessor`` and ``Flux2AttnProcessor``
    make them: the module's own projections and RMS qk-norms, ``[text; image]`` when the module has text
    projections (double-stream blocks), else the sequence as given (Flux.1's single-stream blocks)."""
    q, k, v, cq, ck, cv = _projections(attn, hidden_states, encoder_hidden_states)
    head_dim = attn.head_dim
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))  # (B, N, H, D)
    q = attn.norm_q(q)
    k = attn.norm_k(k)
    if attn.added_kv_proj_dim is not None:
        cq, ck, cv = (t.unflatten(-1, (-1, head_dim)) for t in (cq, ck, cv))
        cq = attn.norm_added_q(cq)
        ck = attn.norm_added_k(ck)
        q = torch.cat([cq, q], dim=1)
        k = torch.cat([ck, k], dim=1)
        v = torch.cat([cv, v], dim=1)
    q, k = _rope(q, k, image_rotary_emb)
    return q, k, v


class FluxStyleProcessor(DispatchingProcessor):
    """The base of the ``[text; image ...]`` processors of Flux.1 and Flux.2: the double-stream call (Flux.1's
    single-stream blocks too) and the attention core. Subclasses give the output projections (:meth:`_output`)
    and the family's name in error messages; Flux.2's parallel blocks have their own ``__call__``."""

    _family = "Flux"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        seg4diff_call: CallInfo | None = None,
    ):
        q, k, v = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        out = self._attention(q, k, v, seg4diff_call, n_txt, attention_mask)
        return self._output(attn, out.flatten(2, 3).to(q.dtype), n_txt)

    def _output(self, attn, out: torch.Tensor, n_txt: int | None):
        """The (B, N, H·D) attention output → the module's outputs; ``n_txt`` None: no text stream."""
        raise NotImplementedError

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: CallInfo | None,
                   n_txt: int | None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention core on (B, N, H, D) q, k, v after RoPE: the fused op (recording maps / text mass when
        this layer asks), or diffusers' dispatcher for calls with an ``attention_mask`` or under context
        parallelism. Returns (B, N, H, D). ``n_txt``: the text length this module sees (None: single-stream
        blocks, whose text length is the call's)."""
        capturing, measuring = self._wants(info)
        if attention_mask is not None or self._parallel_config is not None:
            if capturing:
                raise NotImplementedError(f"fast capture: {self._family} calls with an attention_mask or context "
                                          "parallelism cannot capture maps")
            return self._dispatch(q, k, v, attention_mask)
        if capturing or measuring:
            self._check_text_layout(q.shape[1], info.n_txt if n_txt is None else n_txt, info)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
        return self._attend(qh, kh, vh, info).transpose(1, 2)  # (B, N, H, D)


class FastFluxAttnProcessor(FluxStyleProcessor):
    """Drop-in replacement for diffusers' ``FluxAttnProcessor`` (double- and single-stream blocks).

    Calls with an ``attention_mask`` or under context parallelism go through diffusers' own attention
    dispatcher (as the stock processor does); capturing is not supported there.
    """

    def _output(self, attn, out: torch.Tensor, n_txt: int | None):
        if n_txt is None:  # single-stream: the block projects
            return out
        context_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)
        context_out = attn.to_add_out(context_out.contiguous())
        return out, context_out


_last_grid: list = [None, -1, None]  # weakref to the last img_ids tensor, its version, its grid


def _image_grid(img_ids: torch.Tensor, family: str = "Flux") -> tuple[int, int]:
    """(h, w) of the generated image's tokens from Flux's ``img_ids`` (rows: (frame, y, x); Flux.2's
    (t, h, w, l) read the same way).

    The generated image is the leading block of ids sharing the first id's frame coordinate (Kontext-
    style pipelines append conditioning images with another frame id). The last answer is kept for the
    same ids tensor object, so a pipeline passing the same ids every step pays one device sync.
    """
    ref, version, grid = _last_grid
    if ref is not None and ref() is img_ids and version == img_ids._version:
        return grid
    ids = (img_ids[0] if img_ids.ndim == 3 else img_ids).detach().to("cpu", torch.float64)
    same = (ids[:, 0] == ids[0, 0]).to(torch.int64)
    n = int(same.cumprod(0).sum())
    ys, xs = ids[:n, 1], ids[:n, 2]
    h = int(ys.max() - ys.min()) + 1
    w = int(xs.max() - xs.min()) + 1
    if h * w != n:
        raise ValueError(f"fast capture: {family} img_ids of {n} generated-image tokens do not form an {h}x{w} grid")
    _last_grid[:] = [weakref.ref(img_ids), img_ids._version, (h, w)]
    return (h, w)


def flux_call_geometry(transformer, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       img_ids: torch.Tensor | None):
    """(grid, n_txt, row0, col0) of a Flux transformer call; the sequence is [text; image]."""
    n_txt = encoder_hidden_states.shape[1]
    if img_ids is not None:
        grid = _image_grid(img_ids)
    else:
        raise ValueError("fast capture: a Flux call without img_ids cannot be captured (no image grid)")
    return grid, n_txt, n_txt, 0
