"""Qwen-Image (``QwenImagePipeline``, ``QwenImageTransformer2DModel``).

Joint sequence ``[text; image]`` with complex RoPE per stream; double-stream blocks only. Images: a 3-D
(video) VAE read one frame at a time, latents normalized per channel with the VAE's ``latents_mean`` /
``latents_std``, packed 2×2 by the pipeline (the reader keeps them unpacked). Text: Qwen2.5-VL's last
hidden states of the prompt inside a chat template whose system prefix (``prompt_template_encode_start_idx``
tokens) is dropped, so the prompt starts at text position 0 and ``<|im_end|>`` … ``assistant`` follow it;
the text length is the prompt's own, so a batch of prompts of different lengths is padded and carries a
mask (:attr:`~seg4diff_fast.reader.family.TextState.mask`), which the capture honours. Timestep scaled to
[0, 1]; ``img_shapes`` gives the grid.

No paper numbers exist for Qwen-Image: the default layer is an estimate (the block at SD3's relative
depth) and says so; ``seg4diff-fast layers`` sweeps the blocks to find a model's expert.
"""

from __future__ import annotations

from typing import Any

import torch

from .defaults import SD3_RELATIVE_DEPTH, ModelDefaults, estimated_layer
from .family import ModelFamily, TextState, TokenSpan, pack_2x2, unpack_2x2
from .templated import templated_tokens

__all__ = ["QwenImageFamily"]


class QwenImageFamily(ModelFamily):
    """Qwen-Image (see the module docs)."""

    name = "qwenimage"
    pipelines = "QwenImagePipeline (Qwen-Image)"
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
    explicit_sigmas = True
    components = ("vae", "tokenizer", "text_encoder", "scheduler")

    def matches(self, pipe: Any) -> bool:
        from diffusers import QwenImageTransformer2DModel

        return isinstance(getattr(pipe, "transformer", None), QwenImageTransformer2DModel)

    def defaults(self, pipe: Any) -> ModelDefaults:
        n = len(pipe.transformer.transformer_blocks)
        return ModelDefaults(layer=estimated_layer(n), resolution=1024, text_length=512, num_inference_steps=50,
                             noise_step=8, source="Qwen-Image (no paper numbers; diffusers' pipeline settings)",
                             layer_source=f"an estimate ({SD3_RELATIVE_DEPTH:.3f} of {n} blocks, SD3's expert depth): "
                                          "no paper number; run `seg4diff-fast layers` to measure")

    def vae_factor(self, pipe: Any) -> int:
        return 2 ** len(pipe.vae.temperal_downsample)

    def patch_size(self, pipe: Any) -> int:
        return 2  # packed 2×2 by the pipeline

    def encode_images(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = x.to(vae.device, vae.dtype)[:, :, None]  # one frame
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean[:, :, 0]
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1).to(latent.device, latent.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1).to(latent.device, latent.dtype)
        return (latent - mean) / std

    def tokenizer(self, pipe: Any) -> Any:
        return pipe.tokenizer

    def prompt_tokens(self, pipe: Any, prompt: str, text_length: int) -> list[TokenSpan]:
        drop = int(pipe.prompt_template_encode_start_idx)  # the system prefix the pipeline drops
        return templated_tokens(pipe.tokenizer, pipe.prompt_template_encode.format, prompt, drop=drop)

    def content_limit(self, pipe: Any, text_length: int) -> int:
        tail = pipe.prompt_template_encode.split("{}", 1)[1]  # <|im_end|> … assistant, after the prompt
        suffix = len(pipe.tokenizer(tail, add_special_tokens=False)["input_ids"])
        return min(int(text_length), int(pipe.tokenizer_max_length)) - suffix

    def capture_tokens(self, pipe: Any, text_length: int) -> int | None:
        return None  # every text position of the call (the prompt's own length)

    def encode_text(self, pipe: Any, prompts: list[str], text_length: int, use_long_encoder: bool) -> TextState:
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(prompt=prompts, device=pipe.text_encoder.device,
                                              max_sequence_length=int(text_length))
        tr = pipe.transformer
        if mask is not None:
            mask = mask.to(tr.device, torch.bool)
        return TextState(list(prompts), embeds.to(tr.device, tr.dtype), None, mask)

    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor,
                guidance: float | None = None) -> Any:
        b, _, h, w = latents.shape
        g = None
        if getattr(transformer, "module", transformer).config.guidance_embeds:
            g = torch.full((b,), 1.0 if guidance is None else float(guidance), device=latents.device,
                           dtype=torch.float32)
        mask = text.mask
        if mask is not None and bool(mask.all()):
            mask = None
        out = transformer(hidden_states=pack_2x2(latents), timestep=timestep / 1000, guidance=g,
                          encoder_hidden_states=text.embeds, encoder_hidden_states_mask=mask,
                          img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)
        return (unpack_2x2(out[0], h, w), *out[1:])
