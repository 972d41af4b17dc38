"""``Seg4DiffSegmenter``: images + class names → full-resolution label maps, the Seg4Diff way.

The path of one batch — steps 1–5 are :class:`~seg4diff_fast.reader.PipelineReader`'s (SEG4DIFF.md,
"Zero-shot open-vocabulary segmentation"):

1. images → RGB floats in [0, 1], optionally pre-resized (short side 640, evaluation), stretched to
   ``resolution``², the VAE's input range; one VAE call for the batch;
2. per image its own noise from ``seed`` (a result never depends on batching), noised to
   ``t = timesteps[-noise_step]`` of ``num_inference_steps``;
3. one text-encoder call for the batch's distinct prompts (SD3: CLIP-L and CLIP-G, 77 positions; T5
   replaced by ``t5_length`` = 77 zero positions as in the authors' fork, unless ``use_t5=True``);
4. each class name's token positions in its prompt (:meth:`Seg4DiffSegmenter.plan`);
5. one transformer call per ``batch_size`` prompt rows (several images, each its own class list, and
   the chunks of long vocabularies) capturing ``layer`` (mode ``"probs"``, head mean); all CLIP positions
   are captured (77 columns: cheap) and each row picks its classes' positions afterwards. **Early exit**:
   the forward ends right after the capture layer's attention (``enable_fast_capture(stop_after=)``), so
   nothing after it runs; the maps are those of a full forward;
6. class map = mean of its token maps (:func:`class_scores`; several layers: mean over layers first); the
   fused :func:`~seg4diff_fast.upsample_argmax` gives labels at the image's own size and the confidence.

Vocabularies longer than one prompt (75 content tokens) are split into chunks (:mod:`seg4diff_fast.reader.prompts`) that
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..ops.upsample_argmax import upsample_argmax
from ..reader import ImageLike, PipelineReader, PromptChunk, TextState
from .unsupervised import DEFAULT_POWER, DEFAULT_THRESHOLD, PAPER_RANGE_EPSILON, merge_maps

__all__ = ["Seg4DiffSegmenter", "SegmentationResult", "UnsupervisedResult", "CHUNK_MERGES", "PROTOCOLS",
           "class_scores", "confidence_of"]

CHUNK_MERGES = ("image-mass", "none")
#: ``"paper"``: what the authors' code computes where the paper's numbers are made; ``"corrected"``: the
#: same method without their quirks (see :meth:`Seg4DiffSegmenter.unsupervised` and README "Paper protocol").
PROTOCOLS = ("paper", "corrected")


def class_scores(rows: Sequence[tuple[PromptChunk, torch.Tensor]], merge: bool) -> torch.Tensor:
    """One image's per-class maps (L, K, h, w) from its prompt rows: (chunk, token maps (L, T, h, w)).

    A class map is the mean of its tokens' maps; with ``merge`` and several chunks each chunk's classes are
    divided, per pixel, by the image-key mass of that chunk's softmax (module docs, ``"image-mass"``)."""
    parts = []
    for chunk, maps in rows:
        cls = torch.stack([maps[:, list(pos)].mean(1) for pos in chunk.positions], dim=1)
        if merge and len(rows) > 1:
            mass = (1.0 - maps.double().sum(1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
            cls = (cls.double() / mass).float()
        parts.append(cls)
    return torch.cat(parts, dim=1)


def confidence_of(top: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The winning class's upsampled score over the sum of all classes' (0 where every score is 0)."""
    return torch.where(total > 0, top / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(top))


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


class Seg4DiffSegmenter:
    """Zero-shot open-vocabulary (and unsupervised) segmentation from SD3's joint attention.

    Args:
        pipe: a diffusers ``StableDiffusion3Pipeline`` (SD3 / SD3.5), typically loaded with
            ``text_encoder_3=None, tokenizer_3=None`` (the paper's setting); or a
            :class:`~seg4diff_fast.reader.PipelineReader` (then the reader's settings are used and
            ``num_inference_steps`` … ``seed``, ``use_t5``, ``t5_length``, ``early_exit``, ``backend`` are ignored).
        layer: capture block (0-based; 9 is SD3-medium's expert layer), or several (maps averaged); None:
            the model's expert layer (the reader's :class:`~seg4diff_fast.reader.ModelDefaults`).
        num_inference_steps: scheduler steps the noise level is read from (28).
        noise_step: ``t = timesteps[-noise_step]`` (8: t ≈ 515, σ ≈ 0.515 on SD3).
        resolution: side of the square the image is stretched to (1024 → 64×64 tokens); None: the model's.
        seed: noise seed, the same for every image.
        mode, head_reduce: capture mode and head reduction (paper: ``"probs"``, ``"mean"``).
        use_t5: encode the prompt with T5 too (needs ``text_encoder_3``); default: zero T5 positions.
        t5_length: number of T5 positions (zeros unless ``use_t5``); None: the model's
            (:class:`~seg4diff_fast.reader.ModelDefaults`: 77 as in the authors' fork, 0 for ShapesWorld).
        split_dash: a class name's text before its first ``-`` goes into the prompt (authors' rule).
        chunk_merge: how the chunks of a long vocabulary are made comparable (see the module docs).
        max_prompt_tokens: content tokens per prompt (default and maximum 75).
        batch_size: prompt rows per transformer call (and images per VAE call).
        short_side: pre-resize images to this short side first (evaluation protocol: 640); None: off.
        early_exit: stop the transformer right after the capture layer (maps are identical either way).
        backend: ``joint_attention`` backend (None: best available).
        protocol: ``"paper"`` (default: the authors' code exactly where it has quirks) or ``"corrected"``;
            today only unsupervised segmentation differs (:meth:`unsupervised`), and evaluation follows it.
        map_head: called on each layer's token maps (T, h, w) before the class means, e.g. a MAGNET conv head
            (``seg4diff_fast.magnet.load_magnet_head(run).reader(protocol)``); None: the maps as captured.
            Unsupervised segmentation never applies it (the authors' unsupervised model computes the head and
            discards it).

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
        protocol: str = "paper",
        map_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.map_head = map_head
        if isinstance(pipe, PipelineReader):
            self.reader = pipe
        else:
            self.reader = PipelineReader(
                pipe, resolution=resolution, num_inference_steps=num_inference_steps, noise_step=noise_step,
                seed=seed, text_length=t5_length, use_t5=use_t5, backend=backend, early_exit=early_exit,
            )
        reader = self.reader
        self.pipe = reader.pipe
        self.transformer = reader.transformer
        self.num_layers = reader.num_layers
        self.layers = reader.check_layers(reader.defaults.layer if layer is None else layer)
        if mode not in ("probs", "logits", "sel_probs"):
            raise ValueError(f"mode must be 'probs', 'logits' or 'sel_probs', got {mode!r}")
        if head_reduce not in ("mean", "max"):
            raise ValueError(f"head_reduce must be 'mean' or 'max' for segmentation, got {head_reduce!r}")
        self.mode, self.head_reduce = mode, head_reduce
        self.split_dash = bool(split_dash)
        if chunk_merge not in CHUNK_MERGES:
            raise ValueError(f"chunk_merge must be one of {CHUNK_MERGES}, got {chunk_merge!r}")
        self.chunk_merge = chunk_merge
        self.max_prompt_tokens = max_prompt_tokens
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.short_side = None if short_side is None else int(short_side)

    # ------------------------------------------------------------------------------------------
    # the reader's settings
    resolution = property(lambda self: self.reader.resolution, doc="Side of the square input (pixels).")
    num_inference_steps = property(lambda self: self.reader.num_inference_steps)
    noise_step = property(lambda self: self.reader.noise_step)
    seed = property(lambda self: self.reader.seed, doc="Noise seed (the same for every image).")
    use_t5 = property(lambda self: self.reader.use_t5)
    t5_length = property(lambda self: self.reader.text_length, doc="T5 positions after the 77 CLIP ones.")
    early_exit = property(lambda self: self.reader.early_exit)
    backend = property(lambda self: self.reader.backend)
    vae_scale = property(lambda self: self.reader.vae_scale)
    patch = property(lambda self: self.reader.patch)

    @property
    def timestep(self) -> float:
        """The timestep the image is noised to and the transformer runs at."""
        return float(self.reader.timestep)

    @property
    def sigma(self) -> float:
        """The noise level σ of that timestep (``x_t = σ·noise + (1 − σ)·latent``)."""
        return self.reader.sigma

    def plan(self, classes: Sequence[str]) -> list[PromptChunk]:
        """The prompt chunks of a class list and each class's token positions."""
        return self.reader.token_positions(classes, self.max_prompt_tokens, self.split_dash)

    # ------------------------------------------------------------------------------------------
    # stages (kept for callers of the first version; the reader has them all)
    def latents(self, images: list[torch.Tensor], pad_multiple: int | None = None) -> torch.Tensor:
        """Noised latents x_t (B, C, h, w) of [0, 1] float images (:meth:`PipelineReader.latents`)."""
        return self.reader.latents(images, pad_multiple)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Noised latents x_t from model inputs ``x`` (:meth:`PipelineReader.noised_latents`)."""
        return self.reader.noised_latents(x)

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) of ``prompts`` (:meth:`PipelineReader.encode_text`)."""
        text = self.reader.encode_text(prompts)
        return text.embeds, text.pooled

    def transformer_maps(self, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                         layers: Sequence[int] | None = None, all_text: bool = False) -> torch.Tensor:
        """One transformer call with capture: float32 maps (B, L, T, h, w) (:meth:`PipelineReader.read`)."""
        text = TextState([""] * embeds.shape[0], embeds, pooled)
        return self.reader.read(latents, text, self.layers if layers is None else layers, mode=self.mode,
                                head_reduce=self.head_reduce, all_text=all_text)

    # ------------------------------------------------------------------------------------------
    # zero-shot
    def score_latents(self, latents: torch.Tensor, plans: Sequence[Sequence[PromptChunk]],
                      layers: int | Sequence[int] | None = None, text: TextState | None = None,
                      batch_size: int | None = None) -> list[torch.Tensor]:
        """Class maps (L, K, h, w) of each image of a latent batch from its prompt plan.

        Args:
            latents: (B, C, h, w) noised latents (:meth:`PipelineReader.latents`).
            plans: per image, its chunks (:meth:`plan`).
            layers: None: the segmenter's.
            text: the encoded prompts of every chunk (encoded here when None: the batch's distinct prompts).
            batch_size: prompt rows per transformer call (None: the segmenter's).
        """
        layers_t = self.layers if layers is None else self.reader.check_layers(layers)
        rows = [(k, chunk) for k, plan in enumerate(plans) for chunk in plan]
        if text is None:
            text = self.reader.encode_text(list(dict.fromkeys(chunk.prompt for _, chunk in rows)))
        which = {p: i for i, p in enumerate(text.prompts)}
        merge = self.mode == "probs" and self.chunk_merge == "image-mass"
        all_text = merge and any(len(plan) > 1 for plan in plans)
        maps = self.reader.read_rows(latents, text, [(k, which[chunk.prompt]) for k, chunk in rows], layers_t,
                                     batch_size=batch_size or self.batch_size, mode=self.mode,
                                     head_reduce=self.head_reduce, all_text=all_text)
        if self.map_head is not None:
            with torch.no_grad():
                maps = [torch.stack([self.map_head(m[j]) for j in range(m.shape[0])]) for m in maps]
        return [class_scores([(chunk, m) for (k, chunk), m in zip(rows, maps) if k == i], merge)
                for i in range(len(plans))]

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
        layers_t = self.layers if layers is None else self.reader.check_layers(layers)
        plans = [self.plan(c) for c in class_lists]
        results: list[Any] = []
        for s in range(0, len(image_list), self.batch_size):
            idx = range(s, min(s + self.batch_size, len(image_list)))
            tensors, sizes = self.reader.prepare([image_list[i] for i in idx], self.short_side)
            scores = self.score_latents(self.reader.latents(tensors), [plans[i] for i in idx], layers_t)
            for k, i in enumerate(idx):
                if per_layer:
                    results.append({layer: self._finish(scores[k][j], sizes[k], class_lists[i], plans[i], (layer,))
                                    for j, layer in enumerate(layers_t)})
                else:
                    results.append(self._finish(scores[k].mean(0), sizes[k], class_lists[i], plans[i], layers_t))
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
    def _finish(scores: torch.Tensor, size: tuple[int, int], classes: list[str], plan: list[PromptChunk],
                layers: tuple[int, ...]) -> SegmentationResult:
        labels, top, total = upsample_argmax(scores, size)
        conf = confidence_of(top, total)
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
        ``pad_multiple`` (32, the protocol; None: off) before the stretch to ``resolution``². Merging:
        :func:`~.unsupervised.merge_maps`. The segmenter's ``protocol`` decides two details:

        - ``"paper"`` (the authors' code): per-pixel normalization by ``(max − min) + 1e-6``; the whole padded
          token grid is stretched back onto the image's original (H, W) (detectron2's ``sem_seg_postprocess``
          of a padded batch), so the padding's share of the grid lands inside the image.
        - ``"corrected"``: normalization by the range itself; segment maps are upsampled to the padded working
          size and the padding is cropped off (labels at the working size: the pre-resized one with
          ``short_side``).

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
        layers_t = self.layers if layers is None else self.reader.check_layers(layers)
        results: list[Any] = []
        for s in range(0, len(image_list), self.batch_size):
            tensors, sizes = self.reader.prepare(image_list[s:s + self.batch_size], self.short_side)
            latents = self.reader.latents(tensors, pad_multiple)
            text = self.reader.encode_text([""])
            row_maps = self.reader.read_rows(latents, text, [(k, 0) for k in range(len(tensors))], layers_t,
                                             batch_size=self.batch_size, mode=self.mode,
                                             head_reduce=self.head_reduce)
            for img, maps, original in zip(tensors, row_maps, sizes):
                h, w = img.shape[-2:]
                if self.protocol == "paper":  # the whole padded grid onto the original size, nothing cropped
                    out, crop = original, original
                else:
                    pad_h, pad_w = ((-h) % pad_multiple, (-w) % pad_multiple) if pad_multiple else (0, 0)
                    out, crop = (h + pad_h, w + pad_w), (h, w)
                args = (out, crop)
                if per_layer:
                    results.append({layer: self._one_unsupervised(maps[j], *args, (layer,), threshold, power)
                                    for j, layer in enumerate(layers_t)})
                else:
                    results.append(self._one_unsupervised(maps.mean(0), *args, layers_t, threshold, power))
        return results[0] if single else results

    def _one_unsupervised(self, maps: torch.Tensor, out: tuple[int, int], crop: tuple[int, int],
                          layers: tuple[int, ...], threshold: float, power: float) -> UnsupervisedResult:
        eps = PAPER_RANGE_EPSILON if self.protocol == "paper" else None
        segments, groups = merge_maps(maps, threshold, power, eps)
        labels, _, _ = upsample_argmax(segments, out)
        labels = labels[: crop[0], : crop[1]]
        return UnsupervisedResult(labels.cpu().numpy().astype(np.int64, copy=False), segments.cpu(), groups, layers)
