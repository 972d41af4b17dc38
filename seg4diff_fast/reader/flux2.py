"""Flux.2 (``Flux2Pipeline`` with Mistral-3, ``Flux2KleinPipeline`` with Qwen3; ``Flux2Transformer2DModel``).

Joint sequence ``[text; image]`` with 4-axis RoPE ids (t, h, w, l); double-stream blocks first, then the
single-stream (parallel attention + MLP) blocks, numbered on. Images: the VAE's 32-channel latents are
patchified 2×2 into 128 channels and normalized with the VAE's batch-norm statistics; that (B, 128, h, w)
grid is where noise is added and what the transformer reads one token per cell, so the reader's latents
are that grid (16 pixels per cell, patch 1). Text: the prompt inside the encoder's chat template
(Mistral-3's system message and ``[INST]``; Qwen3's ``<|im_start|>user``), padded to
``max_sequence_length`` (512), hidden states of three encoder layers concatenated; the prompt's tokens sit
after the template's prefix (:func:`~seg4diff_fast.reader.templated.templated_tokens`). Timestep scaled
to [0, 1]; a guidance embedding where the transformer has one (Flux.2-dev: 4.0 in diffusers' default).

No paper numbers exist for Flux.2: the default layer is an estimate (the block at SD3's relative depth,
9/24 of the stack) and says so; ``seg4diff-fast layers`` sweeps the blocks to find a model's expert.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .defaults import SD3_RELATIVE_DEPTH, ModelDefaults, estimated_layer
from .family import ModelFamily, TextState, TokenSpan
from .templated import templated_tokens

__all__ = ["Flux2Family"]

#: diffusers' default guidance for Flux.2-dev.
DEFAULT_GUIDANCE = 4.0


def _blocks(pipe: Any) -> int:
    tr = pipe.transformer
    return len(tr.transformer_blocks) + len(getattr(tr, "single_transformer_blocks", ()))


class Flux2Family(ModelFamily):
    """Flux.2 (see the module docs)."""

    name = "flux2"
    pipelines = "Flux2Pipeline / Flux2KleinPipeline (Flux.2)"
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline")
    components = ("vae", "tokenizer", "text_encoder", "scheduler")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")  # single blocks fuse q, k, v and MLP

    def matches(self, pipe: Any) -> bool:
        from diffusers import Flux2Transformer2DModel

        return isinstance(getattr(pipe, "transformer", None), Flux2Transformer2DModel)

    def defaults(self, pipe: Any) -> ModelDefaults:
        n = _blocks(pipe)
        return ModelDefaults(layer=estimated_layer(n), resolution=1024, text_length=512, num_inference_steps=50,
                             noise_step=8, source="Flux.2 (no paper numbers; diffusers' pipeline settings)",
                             layer_source=f"an estimate ({SD3_RELATIVE_DEPTH:.3f} of {n} blocks, SD3's expert depth): "
                                          "no paper number; run `seg4diff-fast layers` to measure")

    def vae_factor(self, pipe: Any) -> int:
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1) * 2  # then 2×2 patchified

    def patch_size(self, pipe: Any) -> int:
        return 1

    def encode_images(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = x.to(vae.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean
        latent = type(pipe)._patchify_latents(latent)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latent.device, latent.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latent.device,
                                                                                             latent.dtype)
        return (latent - mean) / std

    def noise_scheduler(self, pipe: Any, resolution: int, num_inference_steps: int,
                        shift_tokens: int | None = None) -> Any:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if sched.config.get("use_flow_sigmas", False):
            sigmas = None
        seq = shift_tokens or (resolution // self.vae_factor(pipe)) ** 2
        kwargs: dict[str, Any] = {"mu": compute_empirical_mu(seq, num_inference_steps)}
        if sigmas is None:
            sched.set_timesteps(num_inference_steps, **kwargs)
        else:
            sched.set_timesteps(sigmas=sigmas, **kwargs)
        return sched

    def tokenizer(self, pipe: Any) -> Any:
        tok = pipe.tokenizer
        return getattr(tok, "tokenizer", tok)  # Flux2Pipeline's Pixtral processor wraps its tokenizer

    def _render(self, pipe: Any) -> Any:
        tok = pipe.tokenizer
        if type(pipe).__name__ == "Flux2Pipeline":
            from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

            return lambda p: tok.apply_chat_template(format_input([p], SYSTEM_MESSAGE)[0], tokenize=False,
                                                     add_generation_prompt=False)
        return lambda p: tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)

    def prompt_tokens(self, pipe: Any, prompt: str, text_length: int) -> list[TokenSpan]:
        tok, render = self.tokenizer(pipe), self._render(pipe)
        spans = templated_tokens(tok, render, prompt)
        if getattr(tok, "padding_side", "right") == "left":  # padding to text_length comes first
            pad = int(text_length) - len(tok(render(prompt), add_special_tokens=False)["input_ids"])
            spans = [(p + pad, s, e) for p, s, e in spans]
        return spans

    def content_limit(self, pipe: Any, text_length: int) -> int:
        render = self._render(pipe)
        overhead = len(self.tokenizer(pipe)(render(""), add_special_tokens=False)["input_ids"])
        return int(text_length) - overhead

    def capture_tokens(self, pipe: Any, text_length: int) -> int | None:
        return int(text_length)

    def encode_text(self, pipe: Any, prompts: list[str], text_length: int, use_long_encoder: bool) -> TextState:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt=prompts, device=pipe.text_encoder.device,
                                           max_sequence_length=int(text_length))
        tr = pipe.transformer
        return TextState(list(prompts), embeds.to(tr.device, tr.dtype))

    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor,
                guidance: float | None = None) -> Any:
        from diffusers import Flux2KleinPipeline

        b, c, h, w = latents.shape
        img_ids = Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(text.embeds).to(latents.device)
        g = None
        if getattr(transformer, "module", transformer).config.guidance_embeds:
            value = DEFAULT_GUIDANCE if guidance is None else float(guidance)
            g = torch.full((b,), value, device=latents.device, dtype=torch.float32)
        tokens = latents.reshape(b, c, h * w).permute(0, 2, 1)
        out = transformer(hidden_states=tokens, timestep=timestep / 1000, guidance=g,
                          encoder_hidden_states=text.embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
        return (out[0].permute(0, 2, 1).reshape(b, -1, h, w), *out[1:])
