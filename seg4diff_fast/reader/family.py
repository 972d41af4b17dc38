"""Model families: what differs between MM-DiT pipelines when they are read, one adapter each.

A :class:`ModelFamily` answers, for one kind of diffusers pipeline, every question the reader asks:

- which pipelines it serves (their class names, for ``model_index.json`` detection) and which components
  it needs;
- its defaults as data (:class:`~seg4diff_fast.reader.defaults.ModelDefaults`: expert layer, resolution,
  text layout, noise step, guidance);
- images: the VAE's input range and factor, the latent grid a token covers, how a batch becomes latents.
  Latents are always handed around *unpacked*, (B, C, h, w) with (h / p, w / p) image tokens; families
  whose transformer reads packed 2×2 patches (Flux, Flux.2, Qwen-Image) pack in :meth:`ModelFamily.forward`
  and unpack the prediction there, so noise, flow-matching targets and maps above never see packing;
- noise: the scheduler recipe that gives the timestep ``timesteps[-noise_step]`` and how it noises a latent;
- text: how prompts become the transformer's text inputs (:class:`TextState`) and where each character of
  a prompt lands among the transformer's text positions (:meth:`ModelFamily.prompt_tokens`);
- the transformer call itself (argument names, timestep scale, pooled / guidance / position-id inputs).

Where the image rows and text columns sit in the joint sequence is :mod:`seg4diff_fast.capture`'s
business (it reads the layout off each call). The adapters live in one module each (:mod:`.sd3`,
:mod:`.flux`, :mod:`.flux2`, :mod:`.qwenimage`); :mod:`.families` holds the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .defaults import ModelDefaults
from .images import to_model_input
from .prompts import content_limit, tokenizer_spans

__all__ = ["ModelFamily", "TextState", "TokenSpan", "pack_2x2", "unpack_2x2"]

#: One token of a prompt: (position among the transformer's text positions, first char, end char).
TokenSpan = tuple[int, int, int]


@dataclass
class TextState:
    """The transformer's text inputs for P prompts, row p for ``prompts[p]``.

    Attributes:
        prompts: the prompts, in row order.
        embeds: (P, T, D) the joint sequence's text part (SD3: 77 CLIP + ``t5_length`` T5 positions).
        pooled: (P, D') pooled text embedding (SD3, Flux.1), or None for families without one.
        mask: (P, T) bool, True for real text positions, where prompts of one batch have different
            lengths (Qwen-Image); None when every position is real.
    """

    prompts: list[str]
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def length(self) -> int:
        """Text positions per row (the joint sequence's text length)."""
        return int(self.embeds.shape[1])

    def select(self, rows: torch.Tensor) -> TextState:
        """The rows ``rows`` (an int64 tensor on ``embeds``' device), in that order."""
        pooled = self.pooled.index_select(0, rows) if self.pooled is not None else None
        mask = self.mask.index_select(0, rows.to(self.mask.device)) if self.mask is not None else None
        return TextState([self.prompts[int(i)] for i in rows.tolist()], self.embeds.index_select(0, rows), pooled,
                         mask)


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, (h/2)·(w/2), 4C): 2×2 latent patches as tokens, row-major (Flux / Qwen-Image order).

    Example:
        >>> x = torch.randn(2, 3, 4, 6)
        >>> torch.equal(unpack_2x2(pack_2x2(x), 4, 6), x)
        True
    """
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_2x2` for a latent grid of (h, w)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


class ModelFamily:
    """The adapter interface (one subclass per family). Methods take the pipeline explicitly, so one
    adapter object serves every pipeline of its family."""

    #: Short name (``"sd3"``); also the name :mod:`seg4diff_fast.capture` uses for the transformer's layout.
    name: str = ""
    #: Pipelines served (for messages).
    pipelines: str = ""
    #: Pipeline class names of ``model_index.json`` this family loads (the first is the default class).
    pipeline_classes: tuple[str, ...] = ()
    #: Components :class:`~seg4diff_fast.reader.PipelineReader` needs on the pipeline.
    components: tuple[str, ...] = ()
    #: Components :func:`~seg4diff_fast.reader.load_pipeline` leaves out (set to None when loading).
    dropped: tuple[str, ...] = ()
    #: Text encoders (frozen while training MAGNET).
    text_encoders: tuple[str, ...] = ("text_encoder",)
    #: LoRA target modules MAGNET trains (peft name suffixes).
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: The authors trained MAGNET on this family (their paper protocol applies).
    authors_magnet: bool = False
    #: The least text length a reader accepts (SD3: 0 T5 positions after the 77 CLIP ones).
    min_text_length: int = 1

    def matches(self, pipe: Any) -> bool:
        """Whether ``pipe`` (a pipeline) belongs to this family."""
        raise NotImplementedError

    def defaults(self, pipe: Any) -> ModelDefaults:
        """The family's defaults (a model folder's own config overrides them: :func:`.defaults.read_model_config`)."""
        raise NotImplementedError

    # images
    def vae_factor(self, pipe: Any) -> int:
        """Pixels per cell of the (unpacked) latent grid."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def patch_size(self, pipe: Any) -> int:
        """Latent cells per token side."""
        return int(pipe.transformer.config.patch_size)

    def model_input(self, images: list[torch.Tensor], resolution: int, pad_multiple: int | None,
                    signed: bool = True) -> torch.Tensor:
        """Float (3, H, W) images in [0, 1] → the VAE's input batch (B, 3, R, R), in [−1, 1] (``signed``) or
        left in [0, 1] (the authors' Flux path)."""
        return to_model_input(images, resolution, pad_multiple, signed=signed)

    def encode_images(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        """Unpacked latents (B, C, h, w) of a model-input batch (no noise), in the VAE's dtype."""
        raise NotImplementedError

    # noise
    #: The pipeline passes its own sigmas ``linspace(1, 1/n, n)`` (Flux.1, Qwen-Image) rather than letting the
    #: scheduler space its timesteps (SD3).
    explicit_sigmas: bool = False
    #: ``max_shift`` of the dynamic shift when the scheduler's config does not say (the pipeline's own default).
    default_max_shift: float = 1.15

    def image_tokens(self, pipe: Any, resolution: int) -> int:
        """Image tokens of a ``resolution``² input."""
        return (resolution // self.vae_factor(pipe) // self.patch_size(pipe)) ** 2

    def noise_scheduler(self, pipe: Any, resolution: int, num_inference_steps: int,
                        shift_tokens: int | None = None) -> Any:
        """A copy of the pipeline's scheduler with ``num_inference_steps`` set as the pipeline would set it
        (``shift_tokens``: the sequence length a dynamic shift is computed for; None: the image's tokens)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # the same function in every pipeline

        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        kwargs: dict[str, Any] = {}
        if sched.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(
                shift_tokens or self.image_tokens(pipe, resolution), sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", self.default_max_shift),
            )
        if self.explicit_sigmas:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), **kwargs)
        else:
            sched.set_timesteps(num_inference_steps, **kwargs)
        return sched

    def add_noise(self, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """``x_t`` of clean latents at ``timestep`` (flow matching: ``σ·noise + (1 − σ)·latent``)."""
        return scheduler.scale_noise(latents, timestep, noise)

    # text
    def tokenizer(self, pipe: Any) -> Any:
        """The tokenizer whose positions index the captured text columns."""
        raise NotImplementedError

    def encode_text(self, pipe: Any, prompts: list[str], text_length: int, use_long_encoder: bool) -> TextState:
        """Text inputs of the prompts (no gradient), on the transformer's device and dtype."""
        raise NotImplementedError

    def prompt_tokens(self, pipe: Any, prompt: str, text_length: int) -> list[TokenSpan]:
        """Each token of ``prompt`` that carries its characters: (text position, char start, char end).

        Default: the tokenizer's offsets with its own special tokens (CLIP: BOS at 0, so the prompt starts
        at 1; T5: at 0, EOS dropped). Families that wrap the prompt in a template override it."""
        return tokenizer_spans(self.tokenizer(pipe), prompt)

    def content_limit(self, pipe: Any, text_length: int) -> int:
        """Prompt tokens one prompt can hold."""
        return content_limit(self.tokenizer(pipe))

    def capture_tokens(self, pipe: Any, text_length: int) -> int | None:
        """Text positions captured by default: the first N (SD3: the 77 CLIP ones), or None for all."""
        return int(self.tokenizer(pipe).model_max_length)

    # the transformer
    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor,
                guidance: float | None = None) -> Any:
        """One transformer call (``return_dict=False``) on unpacked latents, ``timestep`` one value per batch
        row on the scheduler's scale (0…1000); element 0 of the result is the unpacked prediction."""
        raise NotImplementedError
