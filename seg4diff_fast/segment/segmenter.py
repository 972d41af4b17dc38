"""``Seg4DiffSegmenter``: images + class names → full-resolution label maps, the Seg4Diff way.

The path of one batch (SEG4DIFF.md, "Zero-shot open-vocabulary segmentation"):

1. images → RGB floats in [0, 1] (:mod:`.inputs`), optionally pre-resized (short side 640, evaluation),
   stretched to ``resolution``², ``2x − 1``;
2. one VAE call for the batch: ``latent = (vae.encode(x).latent_dist.mean − shift) · scale``;
3. per image its own noise, ``torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(seed))``
   (so a result never depends on batching), ``x_t = scheduler.scale_noise(latent, [t], noise)`` with
   ``t = timesteps[-noise_step]`` after ``set_timesteps(num_inference_steps)`` on a copy of the scheduler;
4. one text-encoder call for the batch's distinct prompts (CLIP-L and CLIP-G, 77 positions; T5 replaced
   by ``t5_length`` = 77 zero positions as in the authors' fork, unless ``use_t5=True``);
5. one transformer call per ``batch_size`` prompt rows (several images, each its own class list, and
   the chunks of long vocabularies) with :func:`~seg4diff_fast.enable_fast_capture` at ``layer``, mode
   ``"probs"``, head mean; all CLIP positions are captured (77 columns: cheap) and each row picks its
   classes' positions afterwards. **Early exit**: a forward hook on the capture layer's attention module
   raises a private exception as soon as its maps are recorded, so nothing after it runs (not even that
   block's MLP); the maps are those of a full forward (nothing before the hook differs);
6. class map = mean of its token maps (several layers: mean over layers first); the fused
   :func:`~seg4diff_fast.upsample_argmax` gives labels at the image's own size and the confidence.

Vocabularies longer than one prompt (75 content tokens) are split into chunks (:mod:`.prompts`) that
run as extra rows of the same image (same latent, same noise). Probabilities from different prompts are
normalised by different softmax denominators; with ``chunk_merge="image-mass"`` (the default) each
chunk's class maps are divided, per pixel, by the probability mass that pixel gives the image keys in
that chunk's softmax, ``1 − Σ_text p`` (all 77 + T5 text positions are captured for that). That makes a
class score ``exp(s_c) / Σ_image exp(s_i)``: the softmax denominator's text part, which is what the other
names in the prompt change, cancels. Within one chunk it is a positive per-pixel factor, so the argmax
among a chunk's classes is unchanged; a vocabulary that fits one prompt is never rescaled (the paper's
scores exactly). ``chunk_merge="none"`` merges raw probabilities. ``benchmarks/bench_segment.py``
measures both against a single prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..capture import disable_fast_capture, enable_fast_capture, get_fast_capture
from ..ops.upsample_argmax import upsample_argmax
from .inputs import ImageLike, as_float, resize_short_side, to_model_input, to_rgb
from .prompts import PromptChunk, plan_prompts
from .unsupervised import DEFAULT_POWER, DEFAULT_THRESHOLD, merge_maps

__all__ = ["Seg4DiffSegmenter", "SegmentationResult", "UnsupervisedResult", "CHUNK_MERGES"]

CHUNK_MERGES = ("image-mass", "none")
CLIP_LEN = 77


class _EarlyExit(Exception):
    """Raised by the capture layer's forward hook once its maps are recorded."""


def _raise_early_exit(module, args, output):
    raise _EarlyExit


@dataclass
class SegmentationResult:
    """One image's zero-shot segmentation.

    Attributes:
        label_map: int64 (H, W) at the image's own size; values index ``classes``.
        scores: float32 (K, h, w) class maps on the token grid (CPU).
        confidence: float32 (H, W): the winning class's upsampled score divided by the sum of all K
            upsampled scores at that pixel (in [1/K, 1] for probabilities; 0 where all scores are 0).
        classes: the class names, as given.
        prompts: the prompt(s) the classes were read from (several for a chunked vocabulary).
        layers: the transformer block(s) the maps come from (averaged when several).
    """

    label_map: np.ndarray
    scores: torch.Tensor
    confidence: np.ndarray
    classes: list[str]
    prompts: list[str]
    layers: tuple[int, ...] = field(default=())


@dataclass
class UnsupervisedResult:
    """One image's unsupervised segmentation.

    Attributes:
        label_map: int64 (H, W) segment ids (0 … S−1) at the image's working size (its own size, or the
            pre-resized one when the segmenter has ``short_side``).
        segments: float32 (S, h, w) merged maps on the token grid (CPU).
        groups: the CLIP token positions merged into each segment.
        layers: the transformer block(s) the maps come from.
    """

    label_map: np.ndarray
    segments: torch.Tensor
    groups: list[list[int]]
    layers: tuple[int, ...] = field(default=())

    @property
    def num_segments(self) -> int:
        return int(self.segments.shape[0])


@dataclass
class _Row:
    image: int
    prompt: str
    chunk: PromptChunk | None = None


class Seg4DiffSegmenter:
    """Zero-shot open-vocabulary (and unsupervised) segmentation from SD3's joint attention.

    Args:
        pipe: a diffusers ``StableDiffusion3Pipeline`` (SD3 / SD3.5), typically loaded with
            ``text_encoder_3=None, tokenizer_3=None`` (the paper's setting).
        layer: capture block (0-based; 9 is SD3-medium's expert layer), or several (maps averaged); None:
            the model's expert layer (:func:`~seg4diff_fast.models.model_defaults`).
        num_inference_steps: scheduler steps the noise level is read from (28).
        noise_step: ``t = timesteps[-noise_step]`` (8: t ≈ 515, σ ≈ 0.515 on SD3).
        resolution: side of the square the image is stretched to (1024 → 64×64 tokens); None: the model's.
        seed: noise seed, the same for every image.
        mode, head_reduce: capture mode and head reduction (paper: ``"probs"``, ``"mean"``).
        use_t5: encode the prompt with T5 too (needs ``text_encoder_3``); default: zero T5 positions.
        t5_length: number of T5 positions (zeros unless ``use_t5``); None: the model's
            (:func:`~seg4diff_fast.models.model_defaults`: 77 as in the authors' fork, 0 for ShapesWorld).
        split_dash: a class name's text before its first ``-`` goes into the prompt (authors' rule).
        chunk_merge: how the chunks of a long vocabulary are made comparable (see the module docs).
        max_prompt_tokens: content tokens per prompt (default and maximum 75).
        batch_size: prompt rows per transformer call (and images per VAE call).
        short_side: pre-resize images to this short side first (evaluation protocol: 640); None: off.
        early_exit: stop the transformer right after the capture layer (maps are identical either way).
        backend: ``joint_attention`` backend (None: best available).

    Example:
        >>> import torch
        >>> from seg4diff_fast import Seg4DiffSegmenter
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> seg = Seg4DiffSegmenter(tiny_sd3_pipeline(t5=False), layer=1, resolution=32)
        >>> res = seg(torch.rand(3, 40, 50), classes=["cat", "sofa", "grass"])
        >>> res.label_map.shape, res.label_map.dtype, tuple(res.scores.shape)
        ((40, 50), dtype('int64'), (3, 8, 8))
        >>> [r.label_map.shape for r in seg([torch.rand(3, 20, 20)] * 2, classes=[["cat"], ["dog", "sky"]])]
        [(20, 20), (20, 20)]
    """

    def __init__(
        self,
        pipe: Any,
        layer: int | Sequence[int] | None = None,
        num_inference_steps: int = 28,
        noise_step: int = 8,
        resolution: int | None = None,
        seed: int = 0,
        *,
        mode: str = "probs",
        head_reduce: str = "mean",
        use_t5: bool = False,
        t5_length: int | None = None,
        split_dash: bool = True,
        chunk_merge: str = "image-mass",
        max_prompt_tokens: int | None = None,
        batch_size: int = 4,
        short_side: int | None = None,
        early_exit: bool = True,
        backend: str | None = None,
    ):
        from diffusers import SD3Transformer2DModel

        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, SD3Transformer2DModel):
            raise TypeError(
                "Seg4DiffSegmenter needs a diffusers StableDiffusion3Pipeline (SD3 / SD3.5); got "
                f"{type(pipe).__name__}. (Flux's protocol — T5 positions, 50 steps, [0, 1] VAE input — is not "
                "implemented here.)"
            )
        for name in ("vae", "tokenizer", "text_encoder", "text_encoder_2", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise ValueError(f"Seg4DiffSegmenter: the pipeline has no {name}")
        self.pipe = pipe
        self.transformer = transformer
        self.num_layers = len(transformer.transformer_blocks)
        if layer is None or resolution is None or t5_length is None:
            from ..models import model_defaults

            defaults = model_defaults(pipe)
            layer = defaults["layer"] if layer is None else layer
            resolution = defaults["resolution"] if resolution is None else resolution
            t5_length = defaults["t5_length"] if t5_length is None else t5_length
        self.layers = self._check_layers(layer)
        if not 1 <= int(noise_step) <= int(num_inference_steps):
            raise ValueError(f"noise_step must be in 1..num_inference_steps ({num_inference_steps}), got {noise_step}")
        self.num_inference_steps = int(num_inference_steps)
        self.noise_step = int(noise_step)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.patch = int(transformer.config.patch_size)
        unit = self.vae_scale * self.patch
        if int(resolution) <= 0 or int(resolution) % unit:
            raise ValueError(f"resolution must be a positive multiple of {unit} (VAE factor × patch), got {resolution}")
        self.resolution = int(resolution)
        self.seed = int(seed)
        if mode not in ("probs", "logits", "sel_probs"):
            raise ValueError(f"mode must be 'probs', 'logits' or 'sel_probs', got {mode!r}")
        if head_reduce not in ("mean", "max"):
            raise ValueError(f"head_reduce must be 'mean' or 'max' for segmentation, got {head_reduce!r}")
        self.mode, self.head_reduce = mode, head_reduce
        if use_t5 and getattr(pipe, "text_encoder_3", None) is None:
            raise ValueError("use_t5=True needs a pipeline with text_encoder_3 (T5); this one has none")
        if int(t5_length) < (1 if use_t5 else 0):
            raise ValueError(f"t5_length must be >= {1 if use_t5 else 0}, got {t5_length}")
        self.use_t5, self.t5_length = bool(use_t5), int(t5_length)
        self.split_dash = bool(split_dash)
        if chunk_merge not in CHUNK_MERGES:
            raise ValueError(f"chunk_merge must be one of {CHUNK_MERGES}, got {chunk_merge!r}")
        self.chunk_merge = chunk_merge
        self.max_prompt_tokens = max_prompt_tokens
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.short_side = None if short_side is None else int(short_side)
        self.early_exit = bool(early_exit)
        self.backend = backend
        self._timestep, self._sigma = self._noise_level()

    # ------------------------------------------------------------------------------------------
    # set-up
    def _check_layers(self, layer: int | Sequence[int]) -> tuple[int, ...]:
        layers = (layer,) if isinstance(layer, (int, np.integer)) else tuple(layer)
        if not layers:
            raise ValueError("give at least one layer")
        out = []
        for x in layers:
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= int(x) < self.num_layers:
                raise ValueError(
                    f"layer {x!r} is out of range: this transformer has {self.num_layers} blocks "
                    f"(layers 0..{self.num_layers - 1})"
                )
            out.append(int(x))
        if len(set(out)) != len(out):
            raise ValueError(f"layers {out} contain duplicates")
        return tuple(out)

    def _noise_level(self) -> tuple[torch.Tensor, float]:
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            seq = (self.resolution // self.vae_scale // self.patch) ** 2
            kwargs["mu"] = calculate_shift(
                seq, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16),
            )
        sched.set_timesteps(self.num_inference_steps, **kwargs)
        self._scheduler = sched
        t = sched.timesteps[-self.noise_step]
        return t, float(sched.sigmas[len(sched.timesteps) - self.noise_step])

    @property
    def timestep(self) -> float:
        """The timestep the image is noised to and the transformer runs at."""
        return float(self._timestep)

    @property
    def sigma(self) -> float:
        """The noise level σ of that timestep (``x_t = σ·noise + (1 − σ)·latent``)."""
        return self._sigma

    # ------------------------------------------------------------------------------------------
    # stages
    def _prepare(self, images: Sequence[ImageLike]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """RGB float tensors (after the optional pre-resize) and each input's original (H, W)."""
        out, sizes = [], []
        for i, image in enumerate(images):
            try:
                rgb = to_rgb(image)
            except (TypeError, ValueError) as e:
                raise type(e)(f"image {i}: {e}") from None
            sizes.append(tuple(rgb.shape[:2]) if isinstance(rgb, np.ndarray) else tuple(rgb.shape[-2:]))
            if self.short_side is not None:
                rgb = resize_short_side(rgb, self.short_side)
            out.append(as_float(rgb))
        return out, sizes

    def latents(self, images: list[torch.Tensor], pad_multiple: int | None = None) -> torch.Tensor:
        """Noised latents x_t (B, C, h, w) in the transformer's dtype: one VAE call, per-image noise."""
        return self.encode_latents(to_model_input(images, self.resolution, pad_multiple))

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Noised latents x_t from model inputs ``x`` (B, 3, R, R) in [−1, 1] (:func:`.inputs.to_model_input`):
        one VAE call, each image its own noise from ``seed``. (Used by ``label``, whose loader workers make
        ``x``.)"""
        vae = self.pipe.vae
        x = x.to(vae.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean
        shift = vae.config.get("shift_factor", None) or 0.0
        latent = (latent - shift) * vae.config.scaling_factor
        noise = torch.stack([
            torch.randn(latent.shape[1:], generator=torch.Generator("cpu").manual_seed(self.seed), dtype=torch.float32)
            for _ in range(latent.shape[0])
        ]).to(latent.device, latent.dtype)
        x_t = self._scheduler.scale_noise(latent, self._timestep[None].to(latent.device), noise)
        return x_t.to(self.transformer.device, self.transformer.dtype)

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (P, 77 + t5_length, D), pooled (P, D')) as ``pipe.encode_prompt`` makes them with
        ``max_sequence_length=t5_length`` (T5 positions zero unless ``use_t5``)."""
        pipe = self.pipe
        dev = pipe.text_encoder.device
        with torch.no_grad():
            pe1, pooled1 = pipe._get_clip_prompt_embeds(prompts, device=dev, clip_model_index=0)
            pe2, pooled2 = pipe._get_clip_prompt_embeds(prompts, device=dev, clip_model_index=1)
            clip = torch.cat([pe1, pe2], dim=-1)
            if self.use_t5:
                t5 = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=self.t5_length, device=dev)
            else:
                t5 = torch.zeros(len(prompts), self.t5_length, self.transformer.config.joint_attention_dim,
                                 device=dev, dtype=pipe.text_encoder.dtype)
            clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds = torch.cat([clip, t5], dim=-2)
            pooled = torch.cat([pooled1, pooled2], dim=-1)
        tr = self.transformer
        return embeds.to(tr.device, tr.dtype), pooled.to(tr.device, tr.dtype)

    def transformer_maps(self, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                         layers: Sequence[int] | None = None, all_text: bool = False) -> torch.Tensor:
        """One transformer call with capture: float32 maps (B, L, T, h, w) of the CLIP positions (T = 77),
        or of every text position (77 + t5_length) with ``all_text``; stops after the last capture layer
        when ``early_exit``."""
        tr = self.transformer
        layers = self.layers if layers is None else self._check_layers(layers)
        if get_fast_capture(tr) is not None:
            raise RuntimeError("Seg4DiffSegmenter: this pipeline already has fast capture enabled; "
                               "call disable_fast_capture(pipe) first")
        tokens = range(embeds.shape[1]) if all_text else None
        cap = enable_fast_capture(tr, layers=list(layers), tokens=tokens, mode=self.mode,
                                  head_reduce=self.head_reduce, cfg=False, backend=self.backend)
        handle = None
        if self.early_exit:
            handle = tr.transformer_blocks[max(layers)].attn.register_forward_hook(_raise_early_exit)
        try:
            with torch.no_grad():
                try:
                    tr(hidden_states=latents, timestep=self._timestep.expand(latents.shape[0]).to(latents.device),
                       encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)
                except _EarlyExit:
                    pass
            return cap.maps
        finally:
            if handle is not None:
                handle.remove()
            disable_fast_capture(tr)

    def _run_rows(self, latents: torch.Tensor, rows: list[_Row], layers: tuple[int, ...],
                  all_text: bool) -> list[torch.Tensor]:
        """Maps (L, T, h, w) of every row; text encoded once for the distinct prompts."""
        prompts = list(dict.fromkeys(r.prompt for r in rows))
        embeds, pooled = self.encode_text(prompts)
        which = {p: i for i, p in enumerate(prompts)}
        out: list[torch.Tensor] = []
        for s in range(0, len(rows), self.batch_size):
            part = rows[s:s + self.batch_size]
            img = torch.tensor([r.image for r in part], device=latents.device)
            txt = torch.tensor([which[r.prompt] for r in part], device=embeds.device)
            maps = self.transformer_maps(latents.index_select(0, img), embeds.index_select(0, txt),
                                         pooled.index_select(0, txt), layers, all_text)
            out.extend(maps.unbind(0))
        return out

    # ------------------------------------------------------------------------------------------
    # zero-shot
    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        classes: Sequence[str] | Sequence[Sequence[str]],
        *,
        per_layer: bool = False,
        layers: int | Sequence[int] | None = None,
    ) -> Any:
        """Segment one image or a list of images.

        Args:
            images: one image or a list (PIL, numpy (H, W[, C]) uint8, tensor (C, H, W) in [0, 1]).
            classes: one class list for every image, or one list per image.
            per_layer: return, per image, ``{layer: SegmentationResult}`` for every layer of ``layers``
                (one pass per batch; a layer sweep) instead of one result from their mean.
            layers: override the segmenter's layer(s) for this call.

        Returns:
            A :class:`SegmentationResult` for a single image, else a list of them (dicts with
            ``per_layer``).
        """
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        if not image_list:
            return []
        class_lists = self._class_lists(classes, len(image_list))
        layers_t = self.layers if layers is None else self._check_layers(layers)
        plans = [plan_prompts(c, self.pipe.tokenizer, self.max_prompt_tokens, self.split_dash) for c in class_lists]
        results: list[Any] = []
        for s in range(0, len(image_list), self.batch_size):
            idx = range(s, min(s + self.batch_size, len(image_list)))
            tensors, sizes = self._prepare([image_list[i] for i in idx])
            latents = self.latents(tensors)
            rows = [_Row(k, chunk.prompt, chunk) for k, i in enumerate(idx) for chunk in plans[i]]
            merge = self.mode == "probs" and self.chunk_merge == "image-mass"
            all_text = merge and any(len(plans[i]) > 1 for i in idx)
            row_maps = self._run_rows(latents, rows, layers_t, all_text)
            for k, i in enumerate(idx):
                mine = [(r, m) for r, m in zip(rows, row_maps) if r.image == k]
                scores = self._class_scores(mine, merge)  # (L, K, h, w)
                if per_layer:
                    results.append({layer: self._finish(scores[j], sizes[k], class_lists[i], plans[i], (layer,))
                                    for j, layer in enumerate(layers_t)})
                else:
                    results.append(self._finish(scores.mean(0), sizes[k], class_lists[i], plans[i], layers_t))
        return results[0] if single else results

    @staticmethod
    def _class_lists(classes: Any, n: int) -> list[list[str]]:
        if isinstance(classes, str):
            raise TypeError("classes must be a list of class names (or one list per image), not a string")
        classes = list(classes)
        if classes and all(isinstance(c, (list, tuple)) for c in classes):
            if len(classes) != n:
                raise ValueError(f"got {len(classes)} class lists for {n} images")
            return [list(c) for c in classes]
        return [classes] * n

    @staticmethod
    def _class_scores(rows: list[tuple[_Row, torch.Tensor]], merge: bool) -> torch.Tensor:
        """Per-class maps (L, K, h, w) of one image from its prompt rows' token maps (L, T, h, w)."""
        parts = []
        for row, maps in rows:
            chunk = row.chunk
            cls = torch.stack([maps[:, list(pos)].mean(1) for pos in chunk.positions], dim=1)
            if merge and len(rows) > 1:
                mass = (1.0 - maps.double().sum(1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
                cls = (cls.double() / mass).float()
            parts.append(cls)
        return torch.cat(parts, dim=1)

    @staticmethod
    def _finish(scores: torch.Tensor, size: tuple[int, int], classes: list[str], plan: list[PromptChunk],
                layers: tuple[int, ...]) -> SegmentationResult:
        labels, top, total = upsample_argmax(scores, size)
        conf = torch.where(total > 0, top / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(top))
        return SegmentationResult(
            label_map=labels.cpu().numpy().astype(np.int64, copy=False),
            scores=scores.float().cpu(),
            confidence=conf.cpu().numpy().astype(np.float32, copy=False),
            classes=list(classes),
            prompts=[c.prompt for c in plan],
            layers=tuple(layers),
        )

    # ------------------------------------------------------------------------------------------
    # unsupervised
    def unsupervised(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        threshold: float = DEFAULT_THRESHOLD,
        power: float = DEFAULT_POWER,
        pad_multiple: int | None = 32,
        per_layer: bool = False,
        layers: int | Sequence[int] | None = None,
    ) -> Any:
        """Unsupervised segmentation: empty prompt, the 77 CLIP maps, KL-threshold greedy merging.

        The image (after the optional pre-resize) is zero-padded at the bottom/right to a multiple of
        ``pad_multiple`` (32, the protocol; None: off) before the stretch to ``resolution``²; segment maps
        are upsampled to the padded size and cropped back. Merging: :func:`~.unsupervised.merge_maps`.

        Returns:
            An :class:`UnsupervisedResult` per image (a dict ``{layer: result}`` with ``per_layer``);
            a single one for a single image.

        Example:
            >>> import torch
            >>> from seg4diff_fast import Seg4DiffSegmenter
            >>> from seg4diff_fast.testing import tiny_sd3_pipeline
            >>> seg = Seg4DiffSegmenter(tiny_sd3_pipeline(t5=False), layer=1, resolution=32)
            >>> res = seg.unsupervised(torch.rand(3, 24, 30))
            >>> res.label_map.shape, int(res.label_map.max()) < res.num_segments
            ((24, 30), True)
        """
        if threshold <= 0 or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a positive number, got {threshold}")
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        layers_t = self.layers if layers is None else self._check_layers(layers)
        results: list[Any] = []
        for s in range(0, len(image_list), self.batch_size):
            tensors, _ = self._prepare(image_list[s:s + self.batch_size])
            latents = self.latents(tensors, pad_multiple)
            rows = [_Row(k, "") for k in range(len(tensors))]
            row_maps = self._run_rows(latents, rows, layers_t, all_text=False)
            for img, maps in zip(tensors, row_maps):
                h, w = img.shape[-2:]
                ph = h + ((-h) % pad_multiple if pad_multiple else 0)
                pw = w + ((-w) % pad_multiple if pad_multiple else 0)
                size = (ph, pw)
                if per_layer:
                    results.append({layer: self._one_unsupervised(maps[j], size, (h, w), (layer,), threshold, power)
                                    for j, layer in enumerate(layers_t)})
                else:
                    results.append(self._one_unsupervised(maps.mean(0), size, (h, w), layers_t, threshold, power))
        return results[0] if single else results

    @staticmethod
    def _one_unsupervised(maps: torch.Tensor, padded: tuple[int, int], size: tuple[int, int],
                          layers: tuple[int, ...], threshold: float, power: float) -> UnsupervisedResult:
        segments, groups = merge_maps(maps, threshold, power)
        labels, _, _ = upsample_argmax(segments, padded)
        labels = labels[: size[0], : size[1]]
        return UnsupervisedResult(labels.cpu().numpy().astype(np.int64, copy=False), segments.cpu(), groups, layers)
