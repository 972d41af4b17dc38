"""Flux.2 attention processors: diffusers' ``Flux2AttnProcessor`` and ``Flux2ParallelSelfAttnProcessor``
with the attention core on :func:`~seg4diff_fast.joint_attention`.

Layout. Double-stream blocks (``Flux2Attention``) get the image stream ``hidden_states`` and the text
stream ``encoder_hidden_states`` and attend over ``[text; image]``; single-stream blocks
(``Flux2ParallelSelfAttention``, a "parallel" block) get the concatenated ``[text; image]`` sequence: one
fused projection ``to_qkv_mlp_proj`` gives q, k, v and the MLP input, and ``to_out`` projects the concat of
the attention output and the SwiGLU'd MLP half. Layers count the double-stream blocks first, then the
single-stream blocks (as Flux.1). The image part is the generated image's tokens followed, for editing
with reference images, by the references' tokens (``img_ids`` t = 10, 20, … against the generated image's
0); only the generated image's rows are captured, its grid read off the leading run of ``img_ids`` rows
(4-D coordinates (t, h, w, l)) sharing the first t. RoPE is diffusers' own ``apply_rotary_emb`` on q and k
(text and image together); projections and RMS qk-norms are the module's own submodules (LoRA / peft safe).

``Flux2Attention.forward`` drops the kwargs its processor's ``__call__`` does not declare, so the
processors declare ``seg4diff_call``. KV-cache mode (``Flux2KleinKVPipeline``'s ``Flux2KV*`` processors,
``kv_cache_mode=``) is refused.
"""

from __future__ import annotations

import torch

from .flux import FluxStyleProcessor, _image_grid, _rope
from .state import CallInfo


class FastFlux2AttnProcessor(FluxStyleProcessor):
    """Drop-in replacement for diffusers' ``Flux2AttnProcessor`` (double-stream blocks, ``[text; image]``):
    Flux.1's q, k, v and attention core; the text output through ``to_add_out``, the image's through ``to_out``.

    Calls with an ``attention_mask`` or under context parallelism go through diffusers' own attention
    dispatcher (as the stock processor does); capturing is not supported there.
    """

    _family = "Flux.2"

    def _output(self, attn, out: torch.Tensor, n_txt: int | None):
        context_out = None
        if n_txt is not None:
            context_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            context_out = attn.to_add_out(context_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out if context_out is None else (out, context_out)


class FastFlux2ParallelSelfAttnProcessor(FluxStyleProcessor):
    """Drop-in replacement for diffusers' ``Flux2ParallelSelfAttnProcessor`` (single-stream parallel blocks):
    fused QKV + MLP-input projection, attention on the fused op, ``to_out`` of [attention; SwiGLU(MLP)]."""

    _family = "Flux.2"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        seg4diff_call: CallInfo | None = None,
    ):
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)  # as the stock processor (TP-agnostic)
        qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))  # (B, N, H, D)
        q = attn.norm_q(q)
        k = attn.norm_k(k)
        q, k = _rope(q, k, image_rotary_emb)

        out = self._attention(q, k, v, seg4diff_call, None, attention_mask)
        out = out.flatten(2, 3).to(q.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def flux2_call_geometry(transformer, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        img_ids: torch.Tensor | None):
    """(grid, n_txt, row0, col0) of a Flux.2 transformer call: the sequence is [text; image (; references)]."""
    if img_ids is None:
        raise ValueError("fast capture: a Flux.2 call without img_ids cannot be captured (no image grid)")
    if img_ids.shape[-1] < 3:
        raise ValueError(
            f"fast capture: Flux.2 img_ids must have (t, h, w[, l]) rows, got shape {tuple(img_ids.shape)}"
        )
    n_txt = encoder_hidden_states.shape[1]
    grid = _image_grid(img_ids, "Flux.2")
    if grid[0] * grid[1] > hidden_states.shape[1]:
        raise ValueError(f"fast capture: Flux.2 img_ids describe a {grid[0]}x{grid[1]} grid but the call has "
                         f"{hidden_states.shape[1]} image tokens")
    return grid, n_txt, n_txt, 0
