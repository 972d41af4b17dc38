"""Model families: what differs between MM-DiT pipelines when they are read, one adapter each.

A :class:`ModelFamily` answers, for one kind of diffusers pipeline, every question the reader asks:

- which pipelines it serves and which components it needs;
- its defaults as data (:class:`~seg4diff_fast.reader.defaults.ModelDefaults`: expert layer, resolution,
  text layout, noise step);
- images: the VAE's input range and factor, the patch size, how a batch becomes latents;
- noise: the scheduler recipe that gives the timestep ``timesteps[-noise_step]`` and how it noises a latent;
- text: the tokenizer whose positions the captured text columns index, how prompts become the
  transformer's text inputs (:class:`TextState`);
- the transformer call itself (argument names, timestep, pooled / guidance inputs).

Where the image rows and text columns sit in the joint sequence is :mod:`seg4diff_fast.capture`'s
business (it reads the layout off each call). SD3 / SD3.5 is the first family; further families are one
subclass each, added to :data:`FAMILIES` with :func:`register_family`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .defaults import ModelDefaults
from .images import to_model_input

__all__ = ["FAMILIES", "ModelFamily", "SD3Family", "TextState", "family_of", "register_family"]


@dataclass
class TextState:
    """The transformer's text inputs for P prompts, row p for ``prompts[p]``.

    Attributes:
        prompts: the prompts, in row order.
        embeds: (P, T, D) the joint sequence's text part (SD3: 77 CLIP + ``t5_length`` T5 positions).
        pooled: (P, D') pooled text embedding (SD3), or None for families without one.
    """

    prompts: list[str]
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def length(self) -> int:
        """Text positions per row (the joint sequence's text length)."""
        return int(self.embeds.shape[1])

    def select(self, rows: torch.Tensor) -> TextState:
        """The rows ``rows`` (an int64 tensor on ``embeds``' device), in that order."""
        pooled = self.pooled.index_select(0, rows) if self.pooled is not None else None
        return TextState([self.prompts[int(i)] for i in rows.tolist()], self.embeds.index_select(0, rows), pooled)


class ModelFamily:
    """The adapter interface (one subclass per family). Methods take the pipeline explicitly, so one
    adapter object serves every pipeline of its family."""

    #: Short name (``"sd3"``); also the name :mod:`seg4diff_fast.capture` uses for the transformer's layout.
    name: str = ""
    #: Pipeline classes served (for error messages).
    pipelines: str = ""
    #: Components :class:`~seg4diff_fast.reader.PipelineReader` needs on the pipeline.
    components: tuple[str, ...] = ()

    def matches(self, pipe: Any) -> bool:
        """Whether ``pipe`` (a pipeline) belongs to this family."""
        raise NotImplementedError

    def defaults(self, pipe: Any) -> ModelDefaults:
        """The family's paper defaults (a model folder's own config overrides them: :func:`.defaults.read_defaults`)."""
        raise NotImplementedError

    # images
    def vae_factor(self, pipe: Any) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def patch_size(self, pipe: Any) -> int:
        """Latent cells per token side."""
        return int(pipe.transformer.config.patch_size)

    def model_input(self, images: list[torch.Tensor], resolution: int, pad_multiple: int | None) -> torch.Tensor:
        """Float (3, H, W) images in [0, 1] → the VAE's input batch (B, 3, R, R)."""
        raise NotImplementedError

    def encode_images(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        """VAE latents of a model-input batch (no noise), in the VAE's dtype."""
        raise NotImplementedError

    # noise
    def noise_scheduler(self, pipe: Any, resolution: int, num_inference_steps: int) -> Any:
        """A copy of the pipeline's scheduler with ``num_inference_steps`` set as the pipeline would set it."""
        raise NotImplementedError

    def add_noise(self, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """``x_t`` of clean latents at ``timestep`` (one per batch row or one for all)."""
        raise NotImplementedError

    # text
    def tokenizer(self, pipe: Any) -> Any:
        """The tokenizer whose positions index the captured text columns."""
        raise NotImplementedError

    def encode_text(self, pipe: Any, prompts: list[str], text_length: int, use_long_encoder: bool) -> TextState:
        """Text inputs of the prompts (no gradient), on the transformer's device and dtype."""
        raise NotImplementedError

    def capture_tokens(self, pipe: Any) -> int:
        """Text positions captured by default (the tokenizer's window, e.g. SD3's 77 CLIP positions)."""
        return int(self.tokenizer(pipe).model_max_length)

    # the transformer
    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor) -> Any:
        """One transformer call (``return_dict=False``), ``timestep`` one value per batch row."""
        raise NotImplementedError


class SD3Family(ModelFamily):
    """Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): joint sequence ``[image; text]``, text =
    77 CLIP-L/G positions + ``t5_length`` T5 positions (zeros unless T5 is used, as in the authors' fork),
    pooled CLIP embedding, VAE input in [−1, 1], flow-matching Euler scheduler (dynamic shift when the
    scheduler asks for it)."""

    name = "sd3"
    pipelines = "StableDiffusion3Pipeline (SD3, SD3.5) and its img2img / inpaint variants"
    components = ("vae", "tokenizer", "text_encoder", "text_encoder_2", "scheduler")

    def matches(self, pipe: Any) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)

    def defaults(self, pipe: Any) -> ModelDefaults:
        return ModelDefaults(layer=9, resolution=1024, text_length=77, num_inference_steps=28, noise_step=8,
                             source="SD3-medium (the paper)")

    def model_input(self, images: list[torch.Tensor], resolution: int, pad_multiple: int | None) -> torch.Tensor:
        return to_model_input(images, resolution, pad_multiple)  # [−1, 1]

    def encode_images(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = x.to(vae.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean
        shift = vae.config.get("shift_factor", None) or 0.0
        return (latent - shift) * vae.config.scaling_factor

    def noise_scheduler(self, pipe: Any, resolution: int, num_inference_steps: int) -> Any:
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            seq = (resolution // self.vae_factor(pipe) // self.patch_size(pipe)) ** 2
            kwargs["mu"] = calculate_shift(
                seq, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16),
            )
        sched.set_timesteps(num_inference_steps, **kwargs)
        return sched

    def add_noise(self, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_noise(latents, timestep, noise)

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

    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor) -> Any:
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text.embeds,
                           pooled_projections=text.pooled, return_dict=False)


#: The registered families, tried in order by :func:`family_of`.
FAMILIES: list[ModelFamily] = [SD3Family()]


def register_family(family: ModelFamily) -> None:
    """Add a family adapter (tried before the ones already registered)."""
    FAMILIES.insert(0, family)


def family_of(pipe: Any) -> ModelFamily:
    """The family adapter serving ``pipe``.

    Raises:
        TypeError: no registered family serves it (the message lists the supported pipelines).

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> family_of(tiny_sd3_pipeline(t5=False)).name
        'sd3'
    """
    for family in FAMILIES:
        if family.matches(pipe):
            return family
    supported = "; ".join(f.pipelines for f in FAMILIES)
    raise TypeError(f"reading attention maps needs a supported diffusers pipeline ({supported}); got "
                    f"{type(pipe).__name__}. (Flux.1, Flux.2 and Qwen-Image are not readable yet.)")


def supported_pipelines(families: Sequence[ModelFamily] | None = None) -> str:
    """The supported pipelines, for messages."""
    return "; ".join(f.pipelines for f in (families or FAMILIES))
