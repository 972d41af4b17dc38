"""SD3 / SD3.5 (``StableDiffusion3Pipeline``): the paper's family.

Joint sequence ``[image; text]``; text = 77 CLIP-L/G positions + ``t5_length`` T5 positions (zeros unless T5
is used, as in the authors' fork), pooled CLIP embedding; VAE input in [−1, 1]; flow-matching Euler
scheduler (dynamic shift when the scheduler asks for it); the transformer reads unpacked latents with
patch 2. Paper defaults: layer 9, 1024², ``timesteps[-8]`` of 28.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .defaults import ModelDefaults
from .family import ModelFamily, TextState

__all__ = ["SD3Family"]


class SD3Family(ModelFamily):
    """Stable Diffusion 3 / 3.5 (see the module docs)."""

    name = "sd3"
    pipelines = "StableDiffusion3Pipeline (SD3, SD3.5) and its img2img / inpaint variants"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")
    default_max_shift = 1.16
    components = ("vae", "tokenizer", "text_encoder", "text_encoder_2", "scheduler")
    dropped = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    min_text_length = 0
    authors_magnet = True

    def matches(self, pipe: Any) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)

    def defaults(self, pipe: Any) -> ModelDefaults:
        return ModelDefaults(layer=9, resolution=1024, text_length=77, num_inference_steps=28, noise_step=8,
                             source="SD3-medium (the paper)")

    def encode_images(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = x.to(vae.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean
        shift = vae.config.get("shift_factor", None) or 0.0
        return (latent - shift) * vae.config.scaling_factor

    def tokenizer(self, pipe: Any) -> Any:
        return pipe.tokenizer  # CLIP-L; CLIP-G shares its vocabulary and positions

    def encode_text(self, pipe: Any, prompts: list[str], text_length: int, use_long_encoder: bool) -> TextState:
        dev = pipe.text_encoder.device
        with torch.no_grad():
            pe1, pooled1 = pipe._get_clip_prompt_embeds(prompts, device=dev, clip_model_index=0)
            pe2, pooled2 = pipe._get_clip_prompt_embeds(prompts, device=dev, clip_model_index=1)
            clip = torch.cat([pe1, pe2], dim=-1)
            if use_long_encoder:
                t5 = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=text_length, device=dev)
            else:
                t5 = torch.zeros(len(prompts), text_length, pipe.transformer.config.joint_attention_dim,
                                 device=dev, dtype=pipe.text_encoder.dtype)
            clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds = torch.cat([clip, t5], dim=-2)
            pooled = torch.cat([pooled1, pooled2], dim=-1)
        tr = pipe.transformer
        return TextState(list(prompts), embeds.to(tr.device, tr.dtype), pooled.to(tr.device, tr.dtype))

    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor,
                guidance: float | None = None) -> Any:
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text.embeds,
                           pooled_projections=text.pooled, return_dict=False)
