"""Flux.1 dev / schnell (``FluxPipeline``, ``FluxTransformer2DModel``).

Joint sequence ``[text; image]`` with RoPE (text ids all zero, image ids (0, row, col)); 19 double-stream
blocks numbered 0–18, then 38 single-stream blocks 19–56 (the capture counts them that way). Text: T5
positions from 0 (``max_sequence_length`` of them, EOS after the prompt, pads after it) plus CLIP's pooled
vector; the transformer reads 2×2-packed latents (:func:`~seg4diff_fast.reader.family.pack_2x2`), timestep
scaled to [0, 1], and a guidance embedding (dev; schnell has none).

Defaults follow the authors' Flux path (their ``FluxBackbone``; SEG4DIFF.md): 50 steps with sigmas
``linspace(1, 1/50, 50)``, ``t = timesteps[-8]``, guidance 3.5, 77 T5 positions (their
``tokenizer_max_length``), the image left in [0, 1] for the VAE, and the dynamic shift ``mu`` computed for
16 tokens (their code passes the latent channel count where diffusers passes the image's token count);
expert layers 12 and 17 (the paper); 12 is the default.
"""

from __future__ import annotations

from typing import Any

import torch

from .defaults import ModelDefaults
from .family import ModelFamily, TextState, pack_2x2, unpack_2x2

__all__ = ["FluxFamily"]

#: The authors' Flux path: ``calculate_shift(num_channels_latents, ...)`` (16 for Flux.1).
AUTHORS_SHIFT_TOKENS = 16
#: Flux.1-dev's guidance value in the authors' code.
AUTHORS_GUIDANCE = 3.5


class FluxFamily(ModelFamily):
    """Flux.1 (see the module docs)."""

    name = "flux"
    pipelines = "FluxPipeline (Flux.1 dev / schnell) and its img2img / inpaint variants"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    explicit_sigmas = True
    components = ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "scheduler")
    dropped = ("image_encoder", "feature_extractor")
    text_encoders = ("text_encoder", "text_encoder_2")

    def matches(self, pipe: Any) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)

    def defaults(self, pipe: Any) -> ModelDefaults:
        return ModelDefaults(layer=12, resolution=1024, text_length=77, num_inference_steps=50, noise_step=8,
                             source="Flux.1-dev (the authors' Flux path)", layer_source="the paper (12; also 17)",
                             signed_input=False, shift_tokens=AUTHORS_SHIFT_TOKENS, guidance=AUTHORS_GUIDANCE)

    def patch_size(self, pipe: Any) -> int:
        return 2  # the pipeline packs 2×2 latent cells into one token

    def encode_images(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = x.to(vae.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean
        return (latent - vae.config.shift_factor) * vae.config.scaling_factor

    def tokenizer(self, pipe: Any) -> Any:
        return pipe.tokenizer_2  # T5: the joint sequence's text positions

    def content_limit(self, pipe: Any, text_length: int) -> int:
        return int(text_length) - 1  # EOS after the prompt

    def capture_tokens(self, pipe: Any, text_length: int) -> int | None:
        return int(text_length)

    def encode_text(self, pipe: Any, prompts: list[str], text_length: int, use_long_encoder: bool) -> TextState:
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.text_encoder_2.device,
                                                   max_sequence_length=int(text_length))
        tr = pipe.transformer
        return TextState(list(prompts), embeds.to(tr.device, tr.dtype), pooled.to(tr.device, tr.dtype))

    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor,
                guidance: float | None = None) -> Any:
        from diffusers import FluxPipeline

        b, _, h, w = latents.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(text.length, 3, device=latents.device, dtype=latents.dtype)
        g = None
        if getattr(transformer, "module", transformer).config.guidance_embeds:  # (unwrap DDP)
            value = AUTHORS_GUIDANCE if guidance is None else float(guidance)
            g = torch.full((b,), value, device=latents.device, dtype=torch.float32)
        out = transformer(hidden_states=pack_2x2(latents), timestep=timestep / 1000, guidance=g,
                          pooled_projections=text.pooled, encoder_hidden_states=text.embeds, txt_ids=txt_ids,
                          img_ids=img_ids, return_dict=False)
        return (unpack_2x2(out[0], h, w), *out[1:])
