"""``PipelineReader``: how a diffusers pipeline turns images and words into attention maps — in one place.

The path of a batch (SEG4DIFF.md, "Zero-shot open-vocabulary segmentation"):

1. :meth:`~PipelineReader.prepare`: images (PIL / numpy / tensor) → RGB floats in [0, 1], optionally
   pre-resized to a short side (the evaluation protocol's 640);
2. :meth:`~PipelineReader.model_input`: optional zero padding to a multiple of 32 (unsupervised protocol),
   the stretch to ``resolution``², the family's VAE input range;
3. :meth:`~PipelineReader.encode_images`: one VAE call, ``(mean − shift) · scale``;
4. :meth:`~PipelineReader.noise`: each image its own noise from ``seed``
   (``torch.Generator("cpu").manual_seed(seed)``, so a result never depends on batching), noised to
   ``t = timesteps[-noise_step]`` of ``num_inference_steps`` by a copy of the pipeline's scheduler;
5. :meth:`~PipelineReader.encode_text`: one text-encoder call for the distinct prompts
   (:class:`~seg4diff_fast.reader.family.TextState`); :meth:`~PipelineReader.token_positions`: each class
   name's token positions in its prompt;
6. :meth:`~PipelineReader.read`: one transformer call with :func:`~seg4diff_fast.enable_fast_capture` at the
   requested blocks, stopped right after the last one (``stop_after``: nothing after it runs);
   :meth:`~PipelineReader.read_rows` batches (image, prompt) rows through it;
   :meth:`~PipelineReader.block_mass` measures every block's attention mass instead;
   :meth:`~PipelineReader.capturing` / :meth:`~PipelineReader.forward` are the training path (gradients,
   full forward, MAGNET).

Everything family-specific is asked of the :class:`~seg4diff_fast.reader.family.ModelFamily` adapter;
the defaults (expert layer, resolution, text layout, noise step) are data resolved once, here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..capture import (
    check_layers,
    count_layers,
    disable_fast_capture,
    early_exit,
    enable_fast_capture,
    get_fast_capture,
)
from ..capture.state import FastCapture
from .defaults import ModelDefaults, read_model_config
from .families import family_of
from .family import ModelFamily, TextState
from .images import ImageLike, as_float, resize_short_side, to_rgb
from .prompts import PromptChunk, plan_prompts

__all__ = ["PipelineReader", "resolve_defaults"]


def resolve_defaults(pipe: Any, family: ModelFamily | None = None) -> ModelDefaults:
    """A pipeline's reading defaults: its folder's own config, else its family's (:mod:`.defaults`).

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> resolve_defaults(tiny_sd3_pipeline(t5=False)).layer
        9
    """
    family = family or family_of(pipe)
    return read_model_config(pipe, family.defaults(pipe))


class PipelineReader:
    """Reads image→text attention maps out of a diffusers MM-DiT pipeline.

    Args:
        pipe: a pipeline of a supported family (SD3 / SD3.5: ``StableDiffusion3Pipeline``, typically
            without T5).
        defaults: the model's :class:`ModelDefaults`; None: resolved from the pipeline
            (:func:`resolve_defaults`).
        resolution: side of the square the image is stretched to; None: the defaults'.
        num_inference_steps, noise_step: ``t = timesteps[-noise_step]`` of that many steps; None: the defaults'.
        seed: noise seed, the same for every image.
        text_length: SD3: T5 positions after the 77 CLIP ones (zeros unless ``use_t5``); None: the defaults'.
        use_t5: encode prompts with T5 too (needs ``text_encoder_3``).
        backend: ``joint_attention`` backend (None: best available).
        early_exit: stop each read right after its last block.

    Example:
        >>> import torch
        >>> from seg4diff_fast.reader import PipelineReader
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> reader = PipelineReader(tiny_sd3_pipeline(t5=False), resolution=32)
        >>> latents = reader.latents([torch.rand(3, 40, 50), torch.rand(3, 20, 20)])
        >>> text = reader.encode_text(["cat sofa", "dog"])
        >>> reader.read(latents, text, layers=[1]).shape          # (B, L, T, h, w): 77 CLIP positions
        torch.Size([2, 1, 77, 8, 8])
        >>> [c.positions for c in reader.token_positions(["cat", "red car"])]
        [((1,), (2, 3))]
    """

    def __init__(
        self,
        pipe: Any,
        *,
        defaults: ModelDefaults | None = None,
        resolution: int | None = None,
        num_inference_steps: int | None = None,
        noise_step: int | None = None,
        seed: int = 0,
        text_length: int | None = None,
        use_t5: bool = False,
        backend: str | None = None,
        early_exit: bool = True,
    ):
        family = family_of(pipe)
        for name in family.components:
            if getattr(pipe, name, None) is None:
                raise ValueError(f"the pipeline has no {name}; reading a {family.name} pipeline needs "
                                 f"{', '.join(family.components)}")
        self.family = family
        self.pipe = pipe
        self.transformer = pipe.transformer
        base = defaults if defaults is not None else resolve_defaults(pipe, family)
        self.defaults = base.updated(resolution=resolution, num_inference_steps=num_inference_steps,
                                     noise_step=noise_step, text_length=text_length)
        d = self.defaults
        self.num_layers = count_layers(self.transformer)
        if not 1 <= int(d.noise_step) <= int(d.num_inference_steps):
            raise ValueError(f"noise_step must be in 1..num_inference_steps ({d.num_inference_steps}), "
                             f"got {d.noise_step}")
        self.num_inference_steps = int(d.num_inference_steps)
        self.noise_step = int(d.noise_step)
        self.vae_scale = family.vae_factor(pipe)
        self.patch = family.patch_size(pipe)
        unit = self.vae_scale * self.patch
        if int(d.resolution) <= 0 or int(d.resolution) % unit:
            raise ValueError(f"resolution must be a positive multiple of {unit} (VAE factor × patch), "
                             f"got {d.resolution}")
        self.resolution = int(d.resolution)
        self.seed = int(seed)
        if use_t5 and getattr(pipe, "text_encoder_3", None) is None:
            raise ValueError("use_t5=True needs a pipeline with text_encoder_3 (T5); this one has none")
        least = 1 if use_t5 else family.min_text_length
        if int(d.text_length) < least:
            raise ValueError(f"text_length (SD3: t5_length) must be >= {least}, got {d.text_length}")
        self.use_t5, self.text_length = bool(use_t5), int(d.text_length)
        self.backend = backend
        self.early_exit = bool(early_exit)
        self.guidance = d.guidance
        self.scheduler = family.noise_scheduler(pipe, self.resolution, self.num_inference_steps, d.shift_tokens)
        self._timestep = self.scheduler.timesteps[-self.noise_step]
        self._sigma = float(self.scheduler.sigmas[len(self.scheduler.timesteps) - self.noise_step])

    # ------------------------------------------------------------------------------------------
    # facts
    @property
    def timestep(self) -> torch.Tensor:
        """The timestep the image is noised to and the transformer runs at (a 0-d tensor)."""
        return self._timestep

    @property
    def sigma(self) -> float:
        """The noise level σ of that timestep (``x_t = σ·noise + (1 − σ)·latent``)."""
        return self._sigma

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose positions index the captured text columns."""
        return self.family.tokenizer(self.pipe)

    def check_layers(self, layers: int | Sequence[int], who: str = "") -> tuple[int, ...]:
        """``layers`` as a tuple of valid, distinct block indices (at least one)."""
        layers_t = check_layers(self.transformer, layers, who)
        if not layers_t:
            raise ValueError(f"{who + ': ' if who else ''}give at least one layer")
        return layers_t

    # ------------------------------------------------------------------------------------------
    # images
    def prepare(self, images: Sequence[ImageLike], short_side: int | None = None
                ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """RGB float (3, H, W) tensors in [0, 1] (after the optional short-side pre-resize) and each input's
        original (H, W)."""
        out, sizes = [], []
        for i, image in enumerate(images):
            try:
                rgb = to_rgb(image)
            except (TypeError, ValueError) as e:
                raise type(e)(f"image {i}: {e}") from None
            sizes.append(tuple(rgb.shape[:2]) if isinstance(rgb, np.ndarray) else tuple(rgb.shape[-2:]))
            if short_side is not None:
                rgb = resize_short_side(rgb, short_side)
            out.append(as_float(rgb))
        return out, sizes

    def model_input(self, images: list[torch.Tensor], pad_multiple: int | None = None) -> torch.Tensor:
        """(B, 3, R, R) VAE input of [0, 1] images: optional bottom/right zero padding, the stretch to R²."""
        return self.family.model_input(images, self.resolution, pad_multiple, signed=self.defaults.signed_input)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Clean latents of a model-input batch: one VAE call, in the VAE's dtype."""
        return self.family.encode_images(self.pipe, x)

    def noise(self, latents: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``x_t`` at :attr:`timestep`, each image its own noise (``seeds``, one per image; default ``seed`` for
        every image: a result never depends on batching); in the transformer's dtype."""
        seeds = [self.seed] * latents.shape[0] if seeds is None else [int(s) for s in seeds]
        if len(seeds) != latents.shape[0]:
            raise ValueError(f"noise: {len(seeds)} seeds for {latents.shape[0]} latents")
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
            for seed in seeds
        ]).to(latents.device, latents.dtype)
        x_t = self.family.add_noise(self.scheduler, latents, self._timestep[None].to(latents.device), noise)
        return x_t.to(self.transformer.device, self.transformer.dtype)

    def noised_latents(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`noise` of :meth:`encode_images`: model inputs → the latents the transformer reads."""
        return self.noise(self.encode_images(x))

    def latents(self, images: list[torch.Tensor], pad_multiple: int | None = None) -> torch.Tensor:
        """Noised latents of [0, 1] float images (:meth:`prepare`'s output)."""
        return self.noised_latents(self.model_input(images, pad_multiple))

    # ------------------------------------------------------------------------------------------
    # text
    def encode_text(self, prompts: Sequence[str]) -> TextState:
        """The transformer's text inputs for ``prompts`` (one encoder call; no gradient)."""
        return self.family.encode_text(self.pipe, list(prompts), self.text_length, self.use_t5)

    def token_positions(self, names: Sequence[str], max_tokens: int | None = None,
                        split_dash: bool = True) -> list[PromptChunk]:
        """Prompts for a class list and each name's token positions in them (chunked when the names do not
        fit one prompt): :func:`~seg4diff_fast.reader.prompts.plan_prompts` with this family's tokenizer."""
        pipe, length = self.pipe, self.text_length
        return plan_prompts(list(names), self.tokenizer, max_tokens, split_dash,
                            locate=lambda prompt: self.family.prompt_tokens(pipe, prompt, length),
                            limit=self.family.content_limit(pipe, length))

    def capture_tokens(self) -> range | None:
        """The text positions captured by default (SD3: the 77 CLIP ones; Flux: every T5 position), or None
        for every text position of each call (Qwen-Image, whose text length is the prompt's own)."""
        n = self.family.capture_tokens(self.pipe, self.text_length)
        return None if n is None else range(n)

    # ------------------------------------------------------------------------------------------
    # reading
    @contextlib.contextmanager
    def capturing(self, layers: Sequence[int], *, mode: str = "probs", head_reduce: str = "mean",
                  tokens: Sequence[int] | None = None, stop_after: int | None = None,
                  measure_mass: bool = False) -> Iterator[FastCapture]:
        """Fast capture on the transformer for the duration of the block (refused if one is active).

        ``tokens`` None: the family's default text positions (SD3: the 77 CLIP ones); ``stop_after``: end each
        forward after that block (calls must run under :func:`~seg4diff_fast.capture.early_exit`, as
        :meth:`read` does); ``measure_mass``: record every block's attention mass (:meth:`block_mass`)."""
        tr = self.transformer
        if get_fast_capture(tr) is not None:
            raise RuntimeError("this pipeline already has fast capture enabled; call disable_fast_capture(pipe) "
                               "first")
        cap = enable_fast_capture(tr, layers=list(layers), tokens=tokens, mode=mode, head_reduce=head_reduce,
                                  cfg=False, backend=self.backend, stop_after=stop_after, measure_mass=measure_mass)
        try:
            yield cap
        finally:
            disable_fast_capture(tr)

    def forward(self, transformer: Any, latents: torch.Tensor, text: TextState, timestep: torch.Tensor) -> Any:
        """One call of ``transformer`` (this pipeline's, possibly wrapped, e.g. by accelerate) on latents and
        text, ``timestep`` one value per row: the family's argument layout."""
        return self.family.forward(transformer, latents, text, timestep, self.guidance)

    def _timesteps(self, latents: torch.Tensor) -> torch.Tensor:
        return self._timestep.expand(latents.shape[0]).to(latents.device)

    def read(self, latents: torch.Tensor, text: TextState, layers: int | Sequence[int] | None = None, *,
             mode: str = "probs", head_reduce: str = "mean", all_text: bool = False,
             grad: bool = False) -> torch.Tensor:
        """One transformer call with capture: float32 maps (B, L, T, h, w) (``head_reduce="none"``:
        (B, L, H, T, h, w)).

        Args:
            latents: (B, C, h, w) noised latents (:meth:`latents`); text: B rows (:meth:`encode_text`).
            layers: blocks to capture (None: the expert layer).
            mode, head_reduce: the capture's (``"probs"`` / ``"logits"`` / ``"sel_probs"``; mean / max / none).
            all_text: capture every text position (SD3: 77 CLIP + T5) instead of the family's default ones.
            grad: keep the autograd graph (the maps get gradients into the transformer).
        """
        layers_t = self.check_layers(self.defaults.layer if layers is None else layers)
        tokens = range(text.length) if all_text else None
        with self.capturing(layers_t, mode=mode, head_reduce=head_reduce, tokens=tokens,
                            stop_after=max(layers_t) if self.early_exit else None) as cap:
            with torch.set_grad_enabled(grad), early_exit():
                self.forward(self.transformer, latents, text, self._timesteps(latents))
            return cap.maps

    def read_rows(self, latents: torch.Tensor, text: TextState, rows: Sequence[tuple[int, int]],
                  layers: int | Sequence[int] | None = None, *, batch_size: int | None = None,
                  **read_kwargs: Any) -> list[torch.Tensor]:
        """Maps of (image, prompt) rows: row ``(i, p)`` reads ``latents[i]`` with ``text`` row ``p``;
        ``batch_size`` rows per transformer call (None: all at once). Returns one (L, [H,] T, h, w) tensor
        per row, in order."""
        out: list[torch.Tensor] = []
        step = len(rows) if batch_size is None else int(batch_size)
        for s in range(0, len(rows), max(step, 1)):
            part = rows[s:s + step]
            img = torch.tensor([r[0] for r in part], device=latents.device)
            txt = torch.tensor([r[1] for r in part], device=text.embeds.device)
            maps = self.read(latents.index_select(0, img), text.select(txt), layers, **read_kwargs)
            out.extend(maps.unbind(0))
        return out

    def block_mass(self, latents: torch.Tensor, text: TextState) -> dict[int, torch.Tensor]:
        """``{block: (H, 2) float64}`` ``[I2T, T2T]`` text-key mass of every block (summed over the batch),
        from one forward that stops after the last block's attention
        (``enable_fast_capture(measure_mass=True)``)."""
        with self.capturing([], stop_after=self.num_layers - 1, measure_mass=True) as cap:
            with torch.no_grad(), early_exit():
                self.forward(self.transformer, latents, text, self._timesteps(latents))
            return cap.block_mass
