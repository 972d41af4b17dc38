"""Flux attention processor: diffusers' ``FluxAttnProcessor`` with the attention core on
:func:`~seg4diff_fast.joint_attention`.

Double-stream blocks get image ``hidden_states`` and text ``encoder_hidden_states`` and attend over
``[text; image]``; single-stream blocks get the already concatenated ``[text; image]`` sequence and no
``encoder_hidden_states``, so their text length comes from the call (the pre-hook reads it from the
transformer's inputs). RoPE is applied to q and k before attention with diffusers' own
``apply_rotary_emb``; projections and RMS norms are the module's own submodules (LoRA/peft safe).
Layers count the double-stream blocks first, then the single-stream ones; Kontext conditioning tokens
follow the image (another frame id in ``img_ids``) and are never captured. :func:`fused_attention`, the
attention core on the fused op, is shared with Flux.2 (:mod:`.flux2`).
"""

from __future__ import annotations

import weakref

import torch

from ..ops.joint_attention import joint_attention
from .mass import attention_with_text_mass
from .state import CallInfo, FastCapture


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


def fused_attention(proc, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: CallInfo | None,
                    n_txt: int | None, attention_mask: torch.Tensor | None = None, family: str = "Flux"):
    """The attention core of the ``[text; image ...]`` processors (Flux, Flux.2) on (B, N, H, D) q, k, v
    after RoPE: the fused op (recording maps / text mass when the processor's layer asks), or diffusers'
    dispatcher for calls with an ``attention_mask`` or under context parallelism. Returns (B, N, H, D).

    ``proc`` is the processor (``capture``, ``slot``, ``layer``, ``_attention_backend``,
    ``_parallel_config``); ``n_txt`` the text length this module sees (None: single-stream blocks, whose
    text length is the call's).
    """
    capture = proc.capture
    capturing = info is not None and proc.slot is not None and capture is not None
    if attention_mask is not None or proc._parallel_config is not None:
        if capturing:
            raise NotImplementedError(
                f"fast capture: {family} calls with an attention_mask or context parallelism cannot capture maps"
            )
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=proc._attention_backend,
                                     parallel_config=proc._parallel_config)
    backend = capture.backend if capture is not None else None
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
    measuring = info is not None and capture is not None and capture.measure_mass
    out = None
    if capturing or measuring:
        n_txt = info.n_txt if n_txt is None else n_txt
        if n_txt != info.n_txt or n_txt + info.n_img > q.shape[1]:
            raise RuntimeError(
                f"fast capture: block {proc.layer} sees {q.shape[1]} tokens ({n_txt} text) but the call "
                f"has {info.n_txt} text tokens and an image grid {info.grid}"
            )
    if measuring:
        out, part = attention_with_text_mass(qh, kh, vh, info, backend)
        capture.record_mass(proc.layer, part, info)
    if capturing:
        o, maps = joint_attention(
            qh, kh, vh, capture_cols=info.cols(q.device), capture_rows=info.rows,
            mode=capture.mode, head_reduce=capture.head_reduce, backend=backend,
        )
        out = o if out is None else out
        capture.record(proc.slot, maps, info)
    if out is None:
        out, _ = joint_attention(qh, kh, vh, backend=backend)
    return out.transpose(1, 2)  # (B, N, H, D)


class FastFluxAttnProcessor:
    """Drop-in replacement for diffusers' ``FluxAttnProcessor`` (double- and single-stream blocks).

    Calls with an ``attention_mask`` or under context parallelism go through diffusers' own attention
    dispatcher (as the stock processor does); capturing is not supported there.
    """

    _attention_backend = None  # set by transformer.set_attention_backend(); used only for masked calls
    _parallel_config = None

    def __init__(self, capture: FastCapture | None = None, slot: int | None = None, layer: int | None = None):
        self.capture = capture
        self.slot = slot
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        seg4diff_call: CallInfo | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

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
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        out = fused_attention(self, q, k, v, seg4diff_call, n_txt, attention_mask, "Flux")
        out = out.flatten(2, 3).to(q.dtype)

        if encoder_hidden_states is None:
            return out
        n_txt = encoder_hidden_states.shape[1]
        context_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)
        context_out = attn.to_add_out(context_out.contiguous())
        return out, context_out

    def __repr__(self) -> str:
        return f"FastFluxAttnProcessor(layer={self.layer}, capturing={self.slot is not None})"


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
