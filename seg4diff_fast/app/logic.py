"""The app's logic: pure functions from inputs to numpy images and dicts, with no Gradio in them.

Every function here takes plain values (an image as a path, PIL image or array; class names as text; numbers)
and returns numpy images, dicts and dataclasses, so it is testable without a server. Bad input raises
:class:`AppInputError`, whose message is the one line the page shows.

- :class:`AppModel`: the loaded pipeline, its reading defaults (expert layer, resolution, noise step), a
  lock (one request at a time on the model), the segmenters per (layer, noise step, seed), the vocabulary;
- :func:`read_image`, :func:`parse_classes`, :func:`token_report`: input checks;
- :func:`segment`, :func:`unsupervised`, :func:`generate`, :func:`word_map_view`, :func:`layer_analysis`:
  the four tabs;
- :func:`bundled_scenes`, :func:`shapes_scene`, :func:`ground_truth_for`: the ShapesWorld scenes the page
  offers, and their label maps;
- rendering: :func:`heat_rgb` (a perceptual colour map without matplotlib), :func:`overlay_with_legend`,
  :func:`label_png_bytes`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..utils.files import palette

__all__ = [
    "AppInputError", "AppModel", "GenerationView", "LayersView", "MAX_CLASSES", "MAX_PIXELS", "MAX_STEPS", "Scene",
    "SegmentView", "UnsupervisedView", "bundled_scenes", "generate", "ground_truth_for", "heat_rgb",
    "label_png_bytes", "layer_analysis", "overlay_with_legend", "parse_classes", "read_image", "save_segment_files",
    "segment", "shapes_scene", "token_report", "unsupervised", "word_map_view",
]

#: Largest image accepted (pixels): 4096 × 4096. Larger ones are refused with a message (resize them first).
MAX_PIXELS = 4096 * 4096
#: Most class names in one request (a palette PNG holds 256; the page stays readable with far fewer).
MAX_CLASSES = 64
#: Most denoising steps of one generation.
MAX_STEPS = 100
#: Longest prompt accepted (characters).
MAX_PROMPT_CHARS = 1000
#: Shortest side of a displayed image: small images (the 32-pixel ShapesWorld scenes) are upscaled, nearest.
DISPLAY_MIN = 256
#: Longest side of a displayed image: large ones are shrunk for display (the label PNG keeps full size).
DISPLAY_MAX = 768
#: Suggestions offered from the tokenizer's vocabulary (its most frequent whole words).
VOCAB_SUGGESTIONS = 2000
#: Transformers smaller than this run on one thread (as ``seg4diff-fast demo``: intra-op threads only contend).
TINY_PARAMS = 50_000_000


class AppInputError(ValueError):
    """A bad input: the message is the one line the page shows."""


# ----------------------------------------------------------------------------------------------------
# inputs
def read_image(source: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image of ``source`` (a file path, PIL image or (H, W[, C]) uint8 array), checked.

    Raises:
        AppInputError: nothing given, a file that is not a readable image, or one over ``max_pixels`` (the size is
            read from the header, before anything is decoded).
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise AppInputError("no image: upload one, or pick a bundled ShapesWorld scene")
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise AppInputError(f"the image array has shape {source.shape}; give (H, W) or (H, W, 3)")
        _check_size(source.shape[1], source.shape[0], max_pixels)
        arr = source if source.dtype == np.uint8 else np.clip(source, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, max_pixels)
        return source.convert("RGB")
    path = os.fspath(source)
    name = os.path.basename(path)
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here, first
            _check_size(im.width, im.height, max_pixels)
            im.load()
            return im.convert("RGB")
    except AppInputError:
        raise
    except FileNotFoundError:
        raise AppInputError(f"no image at {name}: upload it again") from None
    except Image.DecompressionBombError:
        raise AppInputError(f"{name} is far too large to decode safely; the app takes images up to "
                            f"{_megapixels(max_pixels)} megapixels: resize it first") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated files
        raise AppInputError(f"cannot read {name} as an image ({_first_line(e)}); upload a PNG, JPEG or WebP "
                            "file") from None


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise AppInputError(f"the image is {width}×{height} pixels: it is empty")
    if width * height > max_pixels:
        raise AppInputError(f"the image is {width}×{height} pixels ({_megapixels(width * height)} megapixels); the "
                            f"app takes at most {_megapixels(max_pixels)} megapixels: resize it first")


def parse_classes(text: str | Sequence[str] | None) -> list[str]:
    """Class names from comma- (or newline-) separated text, or a list; checked.

    Example:
        >>> parse_classes("background, red circle ,blue square")
        ['background', 'red circle', 'blue square']

    Raises:
        AppInputError: no names, a name given twice, more than :data:`MAX_CLASSES`.
    """
    if text is None:
        items: list[str] = []
    elif isinstance(text, str):
        items = text.replace("\n", ",").split(",")
    else:
        items = [str(t) for t in text]
    names = [" ".join(t.split()) for t in items]
    names = [n for n in names if n]
    if not names:
        raise AppInputError("no classes: type the class names, separated by commas (e.g. \"background, red circle\")")
    seen: set[str] = set()
    for n in names:
        if n.lower() in seen:
            raise AppInputError(f"the class {n!r} is given twice; give each class once")
        seen.add(n.lower())
    if len(names) > MAX_CLASSES:
        raise AppInputError(f"{len(names)} classes; the app takes at most {MAX_CLASSES}")
    return names


def token_report(tokenizer: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    """Per class, its words and the pieces the tokenizer splits each into; a word split into several pieces is
    not ``known`` (the model has no token of its own for it: its map is the mean of its pieces').

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> [(w["word"], w["known"]) for w in token_report(tiny_clip_tokenizer(), ["red sofa"])[0]["words"]]
        [('red', True), ('sofa', False)]
    """
    out = []
    for name in names:
        words = []
        for word in name.split():
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            pieces = [p.replace("</w>", "").replace("Ġ", "").replace("▁", "")
                      for p in tokenizer.convert_ids_to_tokens(ids)]
            words.append({"word": word, "pieces": pieces, "known": len(ids) == 1})
        out.append({"class": name, "words": words, "known": all(w["known"] for w in words)})
    return out


def unknown_words(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The words of a :func:`token_report` that the tokenizer splits into several pieces."""
    return [w for c in report for w in c["words"] if not w["known"]]


def token_report_markdown(report: list[dict[str, Any]]) -> str:
    """One line: every class, unknown words flagged with their pieces."""
    if not report:
        return ""
    bad = unknown_words(report)
    parts = []
    for c in report:
        words = []
        for w in c["words"]:
            words.append(w["word"] if w["known"] else f"**{w['word']}** ⚠ ({' · '.join(w['pieces'])})")
        parts.append(" ".join(words))
    head = (f"⚠ {len(bad)} word(s) not in the model's vocabulary (split into pieces; their maps are the mean of "
            "the pieces'): " if bad else "✓ every word is in the model's vocabulary: ")
    return head + ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# the model
class AppModel:
    """The pipeline the app serves, with what the page needs to know about it.

    Args:
        pipe: a diffusers pipeline the reader supports (the embedded ShapesWorld one by default).
        name: how the page names it.
        args: the command-line namespace it was loaded from (``--model``, ``--lora``, ``--dtype``, ``--device``);
            :meth:`load_lora` reloads from it.
    """

    def __init__(self, pipe: Any, name: str | None = None, args: argparse.Namespace | None = None):
        self.args = args if args is not None else argparse.Namespace(model=None, lora=None, dtype="auto", device=None)
        self.name = name or (getattr(self.args, "model", None) or "the embedded ShapesWorld pipeline")
        self.lock = threading.RLock()
        self._set_pipe(pipe)

    def _set_pipe(self, pipe: Any) -> None:
        import torch

        from ..reader import MODEL_CONFIG_FILE, PipelineReader

        for comp in getattr(pipe, "components", {}).values():
            if isinstance(comp, torch.nn.Module):
                comp.eval().requires_grad_(False)
        reader = PipelineReader(pipe)
        self.pipe = pipe
        self.reader = reader
        self.defaults = reader.defaults
        self.num_layers = reader.num_layers
        self.expert_layer = int(reader.defaults.layer)
        self.resolution = reader.resolution
        self.num_inference_steps = reader.num_inference_steps
        self.noise_step = reader.noise_step
        self.is_shapes = str(self.defaults.source).endswith(MODEL_CONFIG_FILE)
        self.n_params = sum(p.numel() for p in pipe.transformer.parameters())
        self.device = str(pipe.transformer.device)
        self.dtype = str(pipe.transformer.dtype).replace("torch.", "")
        self._segmenters: dict[tuple, Any] = {}
        self.lora = getattr(self.args, "lora", None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AppModel:
        """:func:`seg4diff_fast.cli_common.load_model` of ``args`` (raises its ``CLIError``)."""
        from ..cli_common import load_model

        return cls(load_model(args), args=args)

    # -- facts
    @property
    def tokenizer(self) -> Any:
        return self.reader.tokenizer

    def describe(self) -> str:
        """One markdown line about the model."""
        lora = f", LoRA {os.path.basename(str(self.lora).rstrip('/'))}" if self.lora else ""
        return (f"**Model:** {self.name}{lora} — {self.reader.family.name}, {self.num_layers} blocks "
                f"({self.n_params / 1e6:.2f} M parameters), expert block {self.expert_layer}, resolution "
                f"{self.resolution}, {self.device} {self.dtype}")

    @functools.cached_property
    def vocabulary(self) -> list[str]:
        """Whole words of the tokenizer's vocabulary (its first :data:`VOCAB_SUGGESTIONS`, i.e. the most frequent
        for a BPE vocabulary), sorted; a ShapesWorld model offers its world's classes first."""
        return vocabulary_of(self.tokenizer, self.is_shapes)

    def check_layer(self, layer: Any) -> int:
        """A block number (None: the expert block), checked against the model's range."""
        if layer is None:
            return self.expert_layer
        value = _whole(layer, "layer")
        if not 0 <= value < self.num_layers:
            raise AppInputError(f"layer {value} is out of range: this model has blocks 0..{self.num_layers - 1}")
        return value

    def check_noise_step(self, noise_step: Any) -> int:
        """A noise step (None: the model's), in 1..num_inference_steps."""
        if noise_step is None:
            return self.noise_step
        value = _whole(noise_step, "noise step")
        if not 1 <= value <= self.num_inference_steps:
            raise AppInputError(f"noise step {value} is out of range: 1..{self.num_inference_steps}")
        return value

    @staticmethod
    def check_seed(seed: Any) -> int:
        """A seed (None: 0), in 0..2^63 - 1."""
        if seed is None:
            return 0
        value = _whole(seed, "seed")
        if not 0 <= value < 2**63:
            raise AppInputError(f"seed {value} is out of range: 0..2^63-1")
        return value

    def segmenter(self, layer: int | Sequence[int], noise_step: int, seed: int) -> Any:
        """The :class:`~seg4diff_fast.Seg4DiffSegmenter` of these settings (made once, kept)."""
        from ..segment import Seg4DiffSegmenter

        key = (tuple(layer) if isinstance(layer, (list, tuple)) else int(layer), int(noise_step), int(seed))
        seg = self._segmenters.get(key)
        if seg is None:
            seg = Seg4DiffSegmenter(self.pipe, layer=list(key[0]) if isinstance(key[0], tuple) else key[0],
                                    noise_step=key[1], seed=key[2])
            if len(self._segmenters) > 32:
                self._segmenters.clear()
            self._segmenters[key] = seg
        return seg

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The model to oneself (one request at a time), on one torch thread for a tiny model, without grad."""
        import torch

        with self.lock:
            saved = torch.get_num_threads()
            if self.n_params < TINY_PARAMS and self.device == "cpu":
                torch.set_num_threads(1)
            try:
                with torch.no_grad():
                    yield
            finally:
                torch.set_num_threads(saved)

    def load_lora(self, path: str | None) -> str:
        """Reload the model with the LoRA at ``path`` (a path on the server; empty: none). On failure the current
        model stays and :class:`AppInputError` says why (a file that does not fit the model, a missing file).
        Returns :meth:`describe` of the new model."""
        from ..cli_common import CLIError, load_model

        path = (path or "").strip() or None
        if path is not None and not os.path.exists(path):
            raise AppInputError(f"no LoRA at {path} (a path on the server running the app)")
        args = argparse.Namespace(**{**vars(self.args), "lora": path})
        with self.lock:
            try:
                pipe = load_model(args)
            except CLIError as e:
                raise AppInputError(str(e)) from None
            self.args = args
            self._set_pipe(pipe)
        return self.describe()


def vocabulary_of(tokenizer: Any, shapes: bool = False, limit: int = VOCAB_SUGGESTIONS) -> list[str]:
    """Whole alphabetic words of a (CLIP BPE, T5 sentencepiece or byte-level) tokenizer's vocabulary: its first
    ``limit`` by id, sorted; with ``shapes`` the ShapesWorld classes first."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - tokenizers without a vocabulary: no suggestions
        vocab = {}
    words: list[tuple[int, str]] = []
    for piece, i in vocab.items():
        if piece.endswith("</w>"):
            w = piece[:-4]
        elif piece.startswith(("Ġ", "▁")):
            w = piece[1:]
        else:
            continue
        if len(w) >= 2 and w.isalpha() and w.isascii():
            words.append((int(i), w.lower()))
    words.sort()
    out = sorted(dict.fromkeys(w for _, w in words[:limit]))
    if shapes:
        from ..shapes import CLASSES

        out = list(CLASSES) + [w for w in out if w not in CLASSES]
    return out


# ----------------------------------------------------------------------------------------------------
# scenes
@dataclass
class Scene:
    """A ShapesWorld scene the page offers: image, classes, label map (indices into ``classes``)."""

    name: str
    title: str
    image: Image.Image
    classes: list[str]
    label_map: np.ndarray
    caption: str = ""


@functools.lru_cache(maxsize=1)
def _bundled() -> tuple[Scene, ...]:
    from ..shapes.demo_data import DEMO_DIR, load_demo_scenes

    out = []
    for d in load_demo_scenes(DEMO_DIR):
        s = d.scene
        out.append(Scene(d.name, f"{d.name}: {', '.join(s.object_classes)}", s.image, list(s.classes),
                         s.label_map, s.caption))
    return tuple(out)


def bundled_scenes() -> list[Scene]:
    """The held-out scenes shipped in ``seg4diff_fast/data/demo/`` (as ``seg4diff-fast demo`` reads them)."""
    return list(_bundled())


def scene_by_name(name: str) -> Scene:
    for s in _bundled():
        if name in (s.name, s.title):
            return s
    raise AppInputError(f"no bundled scene {name!r}; pick one of {', '.join(s.name for s in _bundled())}")


def shapes_scene(seed: Any, size: int = 32) -> Scene:
    """A fresh ShapesWorld scene (``ShapesWorld(seed, size).sample()``)."""
    from ..shapes import ShapesWorld

    seed = AppModel.check_seed(seed)
    s = ShapesWorld(seed, size).sample()
    return Scene(f"shapes_{seed}", f"ShapesWorld seed {seed}: {', '.join(s.object_classes)}", s.image,
                 list(s.classes), s.label_map, s.caption)


def ground_truth_for(image: Image.Image, names: Sequence[str], extra: Sequence[Scene] = ()) -> np.ndarray | None:
    """The label map of ``image`` indexing ``names``, when the image is a known scene (bundled, or in ``extra``)
    with exactly those classes (in any order); else None."""
    arr = np.asarray(image.convert("RGB"))
    for s in list(extra) + list(_bundled()):
        if s is None or s.image.size != image.size:
            continue
        if not np.array_equal(np.asarray(s.image.convert("RGB")), arr):
            continue
        if sorted(names) != sorted(s.classes):
            return None
        lut = np.array([list(names).index(c) for c in s.classes], dtype=np.int64)
        return lut[s.label_map]
    return None


# ----------------------------------------------------------------------------------------------------
# rendering
#: Anchors of the heat colour map (viridis, sampled at 0, 0.25, 0.5, 0.75, 1).
_HEAT = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def heat_rgb(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """(H, W) floats → (H, W, 3) uint8 through a viridis-like colour map over [vmin, vmax] (default: the data's)."""
    v = np.asarray(values, dtype=np.float64)
    lo = float(np.nanmin(v)) if vmin is None else float(vmin)
    hi = float(np.nanmax(v)) if vmax is None else float(vmax)
    t = np.zeros_like(v) if hi <= lo else np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    t = np.nan_to_num(t) * (len(_HEAT) - 1)
    i = np.minimum(t.astype(np.int64), len(_HEAT) - 2)
    f = (t - i)[..., None]
    return np.round(_HEAT[i] * (1 - f) + _HEAT[i + 1] * f).astype(np.uint8)


def display_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) for showing an image: small ones upscaled to a short side of :data:`DISPLAY_MIN` (integer factor),
    large ones shrunk to a long side of :data:`DISPLAY_MAX`."""
    short, long = min(height, width), max(height, width)
    if short < DISPLAY_MIN:
        k = max(1, min(DISPLAY_MIN // max(short, 1), DISPLAY_MAX // max(long, 1)))
        return height * k, width * k
    if long > DISPLAY_MAX:
        s = DISPLAY_MAX / long
        return max(1, round(height * s)), max(1, round(width * s))
    return height, width


def resize_nearest(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, 3]) uint8 → size (H', W'), nearest neighbour."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.NEAREST))


def _font(size: int = 14) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font
        return ImageFont.load_default()


def legend_strip(width: int, names: Sequence[str], colours: Sequence[tuple[int, int, int]],
                 notes: Sequence[str] | None = None) -> np.ndarray:
    """A white strip ``width`` wide with a swatch and a name (and a note, e.g. a share) per class, wrapped."""
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [f"{n}{f' ({notes[i]})' if notes else ''}" for i, n in enumerate(names)]
    rows, x, y, line_h = [], 6, 6, 22
    for text, colour in zip(items, colours):
        w = 20 + int(probe.textlength(text, font=font)) + 14
        if x + w > width and x > 6:
            x, y = 6, y + line_h
        rows.append((x, y, text, colour))
        x += w
    canvas = Image.new("RGB", (width, y + line_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for x, y, text, colour in rows:
        draw.rectangle((x, y + 2, x + 14, y + 16), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + 20, y + 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def overlay_with_legend(image: Image.Image, labels: np.ndarray, names: Sequence[str],
                        colours: Sequence[tuple[int, int, int]], alpha: float = 0.5,
                        notes: Sequence[str] | None = None) -> np.ndarray:
    """The image blended with the class colours (``alpha``), at :func:`display_size`, a legend strip below."""
    h, w = labels.shape
    size = display_size(h, w)
    lut = np.asarray(colours, dtype=np.float32)
    if size[0] <= h:  # same size or shrunk: the image resampled, the labels nearest
        rgb = image.convert("RGB")
        if size != (h, w):
            rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
            labels = resize_nearest(labels.astype(np.int32), size)
        blend = (1 - alpha) * np.asarray(rgb, dtype=np.float32) + alpha * lut[labels]
        blend = blend.round().clip(0, 255).astype(np.uint8)
    else:  # upscaled: blend at the image's size, then nearest (crisp pixels)
        blend = (1 - alpha) * np.asarray(image.convert("RGB"), dtype=np.float32) + alpha * lut[labels]
        blend = resize_nearest(blend.round().clip(0, 255).astype(np.uint8), size)
    return np.concatenate([blend, legend_strip(blend.shape[1], names, colours, notes)], axis=0)


def label_rgb(labels: np.ndarray, colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) indices → (H, W, 3) uint8 in the class colours (exact: decodable back to indices)."""
    return np.asarray(colours, dtype=np.uint8)[labels]


def labels_from_rgb(rgb: np.ndarray, colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Inverse of :func:`label_rgb`: -1 where a pixel has none of the colours."""
    rgb = np.asarray(rgb)[..., :3].astype(np.int64)
    out = np.full(rgb.shape[:2], -1, dtype=np.int64)
    for j, c in enumerate(colours):
        out[(rgb == np.asarray(c, dtype=np.int64)).all(-1)] = j
    return out


def label_png_bytes(labels: np.ndarray, colours: Sequence[tuple[int, int, int]]) -> bytes:
    """A palette PNG whose pixel values are the class indices (as ``seg4diff-fast segment`` writes)."""
    png = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for rgb in colours for v in rgb]
    png.putpalette(flat + [0] * (768 - len(flat)))
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    return buf.getvalue()


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch

    t = torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size, mode="bilinear", align_corners=False)[0, 0].numpy()


# ----------------------------------------------------------------------------------------------------
# Segment
@dataclass
class SegmentView:
    """What the Segment tab shows.

    Attributes:
        label_map: int64 (H, W) at the image's size, indexing ``classes`` (the segmenter's, unchanged).
        classes, colours: the class names and their colours (the label PNG's palette).
        overlay: uint8 (H', W', 3): the image blended with the colours, legend below (display size).
        labels_rgb: uint8 (H, W, 3): the label map in the class colours, at the image's own size.
        heatmaps: per class (name, uint8 RGB): its raw image→text map on the token grid, upscaled (nearest),
            on one colour scale for all classes (0 … the largest score).
        confidence: uint8 RGB of the confidence map (0 … 1), display size.
        shares: per class ``{"pixels", "share", "confidence"}`` (share of the image's pixels, mean confidence).
        info: the JSON record (classes, shares, prompts, model, layer, noise step, timestep, seed, colours).
        tokens: :func:`token_report` of the classes.
    """

    label_map: np.ndarray
    classes: list[str]
    colours: list[tuple[int, int, int]]
    overlay: np.ndarray
    labels_rgb: np.ndarray
    heatmaps: list[tuple[str, np.ndarray]]
    confidence: np.ndarray
    shares: dict[str, dict[str, float]]
    info: dict[str, Any]
    tokens: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None


def _plan(model: AppModel, seg: Any, names: list[str]) -> list[Any]:
    try:
        return seg.plan(names)
    except (ValueError, TypeError) as e:
        raise AppInputError(str(e)) from None


def segment(model: AppModel, image: Any, classes: Any, layer: Any = None, noise_step: Any = None, seed: Any = 0,
            alpha: float = 0.5, progress: Callable[[float, str], None] | None = None) -> SegmentView:
    """Zero-shot segmentation of ``image`` into ``classes`` at block ``layer`` (default: the expert block):
    exactly ``Seg4DiffSegmenter(pipe, layer=layer, noise_step=noise_step, seed=seed)(image, classes)``."""
    img = read_image(image)
    names = parse_classes(classes)
    layer, noise_step, seed = model.check_layer(layer), model.check_noise_step(noise_step), model.check_seed(seed)
    alpha = float(np.clip(0.5 if alpha is None else float(alpha), 0.0, 1.0))
    seg = model.segmenter(layer, noise_step, seed)
    plan = _plan(model, seg, names)
    _progress(progress, 0.1, "segmenting")
    with model.running():
        res = seg(img, names)
    _progress(progress, 0.8, "drawing")
    colours = palette(len(names))
    labels = res.label_map
    counts = np.bincount(labels.ravel(), minlength=len(names))
    conf_sum = np.bincount(labels.ravel(), weights=res.confidence.ravel(), minlength=len(names))
    shares = {n: {"pixels": int(counts[j]), "share": float(counts[j] / labels.size),
                  "confidence": float(conf_sum[j] / counts[j]) if counts[j] else 0.0} for j, n in enumerate(names)}
    notes = [f"{100 * shares[n]['share']:.1f}%" for n in names]
    scores = res.scores.numpy()
    vmax = float(scores.max()) if scores.size else 1.0
    grid = scores.shape[-2:]
    heat_size = display_size(*grid) if min(grid) < DISPLAY_MIN else grid
    heatmaps = [(n, resize_nearest(heat_rgb(scores[j], 0.0, vmax), heat_size)) for j, n in enumerate(names)]
    conf_size = display_size(*labels.shape)
    conf = res.confidence
    conf_disp = resize_nearest(heat_rgb(conf, 0.0, 1.0), conf_size) if conf_size[0] >= conf.shape[0] else \
        heat_rgb(_upsample(conf, conf_size), 0.0, 1.0)
    report = token_report(model.tokenizer, names)
    info = {
        "size": [int(labels.shape[1]), int(labels.shape[0])],
        "classes": names,
        "present": {n: {"id": j, "pixels": shares[n]["pixels"], "share": round(shares[n]["share"], 6)}
                    for j, n in enumerate(names) if shares[n]["pixels"]},
        "mean_confidence": float(conf.mean()),
        "prompts": [c.prompt for c in plan],
        "model": model.name,
        "lora": model.lora,
        "layer": layer,
        "noise_step": noise_step,
        "timestep": seg.timestep,
        "seed": seed,
        "score_max": vmax,
        "colours": {n: list(c) for n, c in zip(names, colours)},
        "unknown_words": [w["word"] for w in unknown_words(report)],
    }
    _progress(progress, 1.0, "done")
    return SegmentView(
        label_map=labels, classes=names, colours=colours,
        overlay=overlay_with_legend(img, labels, names, colours, alpha, notes),
        labels_rgb=label_rgb(labels, colours), heatmaps=heatmaps, confidence=conf_disp, shares=shares, info=info,
        tokens=report, result=res,
    )


def save_segment_files(view: SegmentView, folder: str, stem: str = "segmentation") -> tuple[str, str]:
    """Write ``<stem>_labels.png`` (palette PNG, values = class indices) and ``<stem>.json`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    png = os.path.join(folder, f"{stem}_labels.png")
    js = os.path.join(folder, f"{stem}.json")
    with open(png, "wb") as f:
        f.write(label_png_bytes(view.label_map, view.colours))
    with open(js, "w") as f:
        json.dump(view.info, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return png, js


def shares_html(view: SegmentView) -> str:
    """The legend with the per-class pixel shares, as an HTML table."""
    rows = []
    for n, c in zip(view.classes, view.colours):
        s = view.shares[n]
        swatch = (f'<span style="display:inline-block;width:14px;height:14px;background:rgb{tuple(c)};'
                  'border:1px solid #000;vertical-align:middle"></span>')
        rows.append(f"<tr><td>{swatch}</td><td>{_esc(n)}</td><td style='text-align:right'>{100 * s['share']:.1f} %</td>"
                    f"<td style='text-align:right'>{s['pixels']}</td>"
                    f"<td style='text-align:right'>{s['confidence']:.2f}</td></tr>")
    return ("<table class='seg4diff-shares'><thead><tr><th></th><th>class</th><th>pixels %</th><th>pixels</th>"
            "<th>mean confidence</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _esc(text: str) -> str:
    import html

    return html.escape(str(text))


# ----------------------------------------------------------------------------------------------------
# Unsupervised
@dataclass
class UnsupervisedView:
    """What the Unsupervised tab shows: the segment ids (H, W), the overlay, each segment's tokens and share."""

    label_map: np.ndarray
    overlay: np.ndarray
    segments: list[dict[str, Any]]
    threshold: float
    result: Any = None


def _token_names(model: AppModel, n: int) -> list[str]:
    """Names of the empty prompt's text positions: BOS, EOS, then padding."""
    ids = model.tokenizer("")["input_ids"]
    names = []
    for i in range(n):
        if i < len(ids):
            names.append("BOS" if i == 0 and len(ids) > 1 else "EOS")
        else:
            names.append("pad")
    return names


def unsupervised(model: AppModel, image: Any, threshold: Any = 0.1, layer: Any = None, noise_step: Any = None,
                 seed: Any = 0, progress: Callable[[float, str], None] | None = None) -> UnsupervisedView:
    """The KL-merged segments of ``image`` (``Seg4DiffSegmenter.unsupervised(image, threshold=threshold)``)."""
    img = read_image(image)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise AppInputError(f"threshold {threshold!r} is not a number") from None
    if not (threshold > 0 and math.isfinite(threshold)):
        raise AppInputError(f"the threshold must be a positive number, got {threshold}")
    layer, noise_step, seed = model.check_layer(layer), model.check_noise_step(noise_step), model.check_seed(seed)
    seg = model.segmenter(layer, noise_step, seed)
    _progress(progress, 0.1, "merging the empty prompt's token maps")
    with model.running():
        res = seg.unsupervised(img, threshold=threshold)
    labels = res.label_map
    colours = palette(max(res.num_segments, 1))
    counts = np.bincount(labels.ravel(), minlength=res.num_segments)
    names = _token_names(model, 1 + max((max(g) for g in res.groups), default=0))
    segments = []
    for k, group in enumerate(res.groups):
        kinds: dict[str, int] = {}
        for p in group:
            kinds[names[p]] = kinds.get(names[p], 0) + 1
        segments.append({"segment": k, "tokens": len(group), "positions": _ranges(group),
                         "kinds": ", ".join(f"{v}× {n}" for n, v in kinds.items()),
                         "share": float(counts[k] / labels.size)})
    seg_names = [f"segment {k}" for k in range(res.num_segments)]
    notes = [f"{100 * s['share']:.1f}%" for s in segments]
    overlay = overlay_with_legend(img, labels, seg_names, colours, 0.6, notes)
    return UnsupervisedView(label_map=labels, overlay=overlay, segments=segments, threshold=threshold, result=res)


def _ranges(positions: Sequence[int]) -> str:
    """``[0, 2, 3, 4, 9]`` → ``"0, 2–4, 9"``."""
    out, ps = [], sorted(positions)
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}–{ps[j]}")
        i = j + 1
    return ", ".join(out)


# ----------------------------------------------------------------------------------------------------
# Generate
@dataclass
class GenerationView:
    """A generated image and each word's map at one block, per denoising step.

    Attributes:
        image: uint8 (H, W, 3).
        words: the prompt's words (each once, in order).
        maps: float32 (S, W, h, w): word j's map at step s (the mean of its sub-word tokens' maps).
        layer, steps, seed, guidance, prompt: the settings.
    """

    image: np.ndarray
    words: list[str]
    maps: np.ndarray
    layer: int
    steps: int
    seed: int
    guidance: float
    prompt: str


def generate(model: AppModel, prompt: str, steps: Any = 20, seed: Any = 0, guidance: Any = 4.0, layer: Any = None,
             progress: Callable[[float, str], None] | None = None) -> GenerationView:
    """Generate an image from ``prompt`` while capturing every word's map at block ``layer`` at every step
    (``enable_fast_capture(pipe, layers=[layer], keep_steps=True)``, ``cap.word_maps(prompt)``)."""
    import torch

    from ..capture import capture_family, disable_fast_capture, enable_fast_capture

    prompt = " ".join(str(prompt or "").split())
    if not prompt:
        raise AppInputError("no prompt: type what to generate, e.g. \"red circle and blue square on background\"")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise AppInputError(f"the prompt has {len(prompt)} characters; the app takes at most {MAX_PROMPT_CHARS}")
    try:
        steps = int(steps)
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise AppInputError("steps must be a whole number and guidance a number") from None
    if not 1 <= steps <= MAX_STEPS:
        raise AppInputError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if not (0.0 <= guidance <= 30.0):
        raise AppInputError(f"guidance must be in 0..30, got {guidance}")
    layer, seed = model.check_layer(layer), model.check_seed(seed)
    pipe = model.pipe
    kwargs: dict[str, Any] = {}
    if capture_family(pipe) == "sd3":
        kwargs["max_sequence_length"] = int(model.defaults.text_length)

    def on_step(_pipe: Any, i: int, _t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
        _progress(progress, (i + 1) / steps, f"denoising step {i + 1}/{steps}")
        return cb_kwargs

    _progress(progress, 0.0, f"denoising step 0/{steps}")
    with model.running():
        cap = enable_fast_capture(pipe, layers=[layer], keep_steps=True)
        try:
            out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, height=model.resolution,
                       width=model.resolution, generator=torch.Generator("cpu").manual_seed(seed),
                       callback_on_step_end=on_step, **kwargs)
            try:
                word_maps = cap.word_maps(prompt)
            except ValueError as e:
                raise AppInputError(f"cannot map the prompt's words to its tokens: {e}") from None
        finally:
            disable_fast_capture(pipe)
    image = np.asarray(out.images[0].convert("RGB"))
    words = list(word_maps)
    if not words:
        raise AppInputError("the prompt has no word the model reads (only punctuation or words past its text limit)")
    maps = np.stack([word_maps[w][:, 0, 0].float().cpu().numpy() for w in words], axis=1)  # (S, W, h, w)
    return GenerationView(image=image, words=words, maps=maps, layer=layer, steps=steps, seed=seed,
                          guidance=guidance, prompt=prompt)


def word_map_view(gen: GenerationView, step: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Each word's map as (caption, uint8 RGB): averaged over the steps (``step`` None) or at step ``step``
    (1-based), on one colour scale for all words, upscaled (nearest) to the image's display size."""
    if step is None:
        maps, which = gen.maps.mean(0), "mean over steps"
    else:
        s = int(step)
        if not 1 <= s <= gen.maps.shape[0]:
            raise AppInputError(f"step {s} is out of range: 1..{gen.maps.shape[0]}")
        maps, which = gen.maps[s - 1], f"step {s}/{gen.maps.shape[0]}"
    vmax = float(maps.max()) if maps.size else 1.0
    size = display_size(*gen.image.shape[:2])
    return [(f"{w} ({which}, max {maps[j].max():.3f})", resize_nearest(heat_rgb(maps[j], 0.0, vmax), size))
            for j, w in enumerate(gen.words)]


def generation_to_state(gen: GenerationView) -> dict[str, Any]:
    """A plain dict of a :class:`GenerationView` (kept in the page's session state)."""
    return {"image": gen.image, "words": gen.words, "maps": gen.maps, "layer": gen.layer, "steps": gen.steps,
            "seed": gen.seed, "guidance": gen.guidance, "prompt": gen.prompt}


def generation_from_state(state: dict[str, Any] | None) -> GenerationView:
    if not state:
        raise AppInputError("nothing generated yet: press Generate first")
    return GenerationView(**state)


# ----------------------------------------------------------------------------------------------------
# Layers
@dataclass
class LayersView:
    """What the Layers tab shows.

    Attributes:
        rows: per block ``{"block", "I2I", "I2T", "T2I", "T2T"`` (attention mass %, head mean),
            ``"confidence"`` (mean confidence of its segmentation), ``"agreement"`` (% pixels labelled as the
            expert block labels them) and, when the image is a known scene, ``"mIoU"`` and ``"accuracy"`` (%)``}``.
        label_maps: per block, (caption, uint8 RGB) of its segmentation.
        has_truth: whether ``mIoU`` / ``accuracy`` are there.
        expert: the model's expert block.
    """

    rows: list[dict[str, Any]]
    label_maps: list[tuple[str, np.ndarray]]
    has_truth: bool
    expert: int
    mass: dict[str, Any] = field(default_factory=dict)


def miou(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean IoU (%) over the classes present in the prediction or the truth."""
    ious = []
    for j in range(k):
        p, t = pred == j, truth == j
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return 100.0 * float(np.mean(ious)) if ious else float("nan")


def layer_analysis(model: AppModel, image: Any, classes: Any, noise_step: Any = None, seed: Any = 0,
                   truth_scenes: Sequence[Scene] = (),
                   progress: Callable[[float, str], None] | None = None) -> LayersView:
    """Per block: the attention mass (:func:`~seg4diff_fast.evaluation.layers.attention_block_mass` with the
    class prompt) and the segmentation at that block (``Seg4DiffSegmenter(pipe, layer=list(range(n)))(image,
    classes, per_layer=True)``), scored against the label map when the image is a known ShapesWorld scene."""
    from ..evaluation.layers import SHARES, attention_block_mass

    img = read_image(image)
    names = parse_classes(classes)
    noise_step, seed = model.check_noise_step(noise_step), model.check_seed(seed)
    n = model.num_layers
    seg = model.segmenter(tuple(range(n)), noise_step, seed)
    plan = _plan(model, seg, names)
    _progress(progress, 0.1, "measuring the attention mass per block")
    with model.running():
        mass = attention_block_mass(model.pipe, [img], plan[0].prompt, seed=seed, noise_step=noise_step,
                                    num_inference_steps=model.num_inference_steps)
        _progress(progress, 0.5, "segmenting at every block")
        per_layer = seg(img, names, per_layer=True)
    truth = ground_truth_for(img, names, truth_scenes)
    expert = per_layer[model.expert_layer].label_map
    colours = palette(len(names))
    head_mean = np.asarray(mass["mass"], dtype=np.float64).mean(1) * 100.0  # (L, 4)
    rows, maps = [], []
    size = display_size(*expert.shape)
    for b in range(n):
        r = per_layer[b]
        row: dict[str, Any] = {"block": b}
        row.update({s: round(float(head_mean[b, j]), 3) for j, s in enumerate(SHARES)})
        row["confidence"] = round(float(r.confidence.mean()), 4)
        row["agreement"] = round(100.0 * float((r.label_map == expert).mean()), 3)
        caption = f"block {b}{' (expert)' if b == model.expert_layer else ''}"
        if truth is not None:
            row["mIoU"] = round(miou(r.label_map, truth, len(names)), 3)
            row["accuracy"] = round(100.0 * float((r.label_map == truth).mean()), 3)
            caption += f": mIoU {row['mIoU']:.1f}"
        rows.append(row)
        maps.append((caption, resize_nearest(label_rgb(r.label_map, colours), size)))
    return LayersView(rows=rows, label_maps=maps, has_truth=truth is not None, expert=model.expert_layer,
                      mass={k: mass[k] for k in ("n_image_tokens", "n_text_tokens", "timestep", "sigma")})


# ----------------------------------------------------------------------------------------------------
def _whole(value: Any, what: str) -> int:
    """An int from an int, a whole float or a numeric string; :class:`AppInputError` otherwise."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(f) or not f.is_integer():
        raise AppInputError(f"{what} {value!r} is not a whole number")
    return int(f)


def _progress(progress: Callable[[float, str], None] | None, fraction: float, desc: str) -> None:
    if progress is not None:
        progress(fraction, desc)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
