"""SD3 / SD3.5 attention processor: diffusers' ``JointAttnProcessor2_0`` with the attention core on
:func:`~seg4diff_fast.joint_attention`.

Everything around the core is the attention module's own submodules (``to_q``/``to_k``/``to_v``, the
``add_*_proj`` text projections, the RMS qk-norms of SD3.5, ``to_out``/``to_add_out``), so LoRA adapters
loaded with peft or ``pipe.load_lora_weights`` act exactly as with the stock processor. The joint
sequence is ``[image; text]``; captured maps are the image rows × the selected text columns. The last
block is ``context_pre_only`` (no ``to_add_out``); SD3.5-medium's ``attn2`` shares the processor and is
called without text (plain image self-attention, never captured).
"""

from __future__ import annotations

import torch

from .processor import FastProcessor
from .state import CallInfo


def _heads_first(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """(B, N, H·D) → (B, H, N, D) view."""
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


def _sample_projections(attn, x: torch.Tensor):
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def _context_projections(attn, x: torch.Tensor):
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        return attn.to_added_qkv(x).chunk(3, dim=-1)
    return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v of the joint sequence ``[image; text]`` as (B, H, N, D), exactly as ``JointAttnProcessor2_0``
    makes them (the module's own projections and qk-norms); image only when there is no text."""
    batch = hidden_states.shape[0]
    heads = attn.heads
    q, k, v = _sample_projections(attn, hidden_states)
    head_dim = k.shape[-1] // heads
    q, k, v = (_heads_first(t, batch, heads, head_dim) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if encoder_hidden_states is not None:
        cq, ck, cv = _context_projections(attn, encoder_hidden_states)
        cq, ck, cv = (_heads_first(t, batch, heads, head_dim) for t in (cq, ck, cv))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
    return q, k, v


def joint_output(attn, out: torch.Tensor, n_img: int, with_text: bool, dtype: torch.dtype):
    """The attention core's (B, H, N, D) output → the module's outputs: image (and text) projections."""
    batch, heads, _, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(dtype)
    if not with_text:
        return attn.to_out[1](attn.to_out[0](out))
    out, context_out = out[:, :n_img], out[:, n_img:]
    if not attn.context_pre_only:
        context_out = attn.to_add_out(context_out)
    return attn.to_out[1](attn.to_out[0](out)), context_out


class FastJointAttnProcessor(FastProcessor):
    """Drop-in replacement for diffusers' ``JointAttnProcessor2_0`` (SD3, SD3.5) running on the fused op
    (arguments: :class:`~.processor.FastProcessor`)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,  # ignored, as by JointAttnProcessor2_0
        seg4diff_call: CallInfo | None = None,
    ):
        n_img = hidden_states.shape[1]
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)

        info = seg4diff_call if encoder_hidden_states is not None else None  # image-only calls record nothing
        if info is not None and self.capture is not None and info.n_img != n_img:
            raise RuntimeError(
                f"fast capture: block {self.layer} sees {n_img} image tokens but the call's latent grid "
                f"{info.grid} has {info.n_img}"
            )
        out = self._attend(q, k, v, info)
        return joint_output(attn, out, n_img, encoder_hidden_states is not None, q.dtype)


def sd3_call_geometry(transformer, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """(grid, n_txt, row0, col0) of an SD3 transformer call: latents (B, C, H, W) → (H/p, W/p) tokens."""
    patch = transformer.config.patch_size
    grid = (hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch)
    n_txt = encoder_hidden_states.shape[1]
    return grid, n_txt, 0, grid[0] * grid[1]
