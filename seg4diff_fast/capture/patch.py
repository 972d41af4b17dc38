"""``enable_fast_capture`` / ``disable_fast_capture``: family detection and the patch itself.

Enabling does three things to the transformer, and disabling undoes them:

1. every attention module gets its own fast processor (``set_attn_processor``), the stock ones are kept;
2. a forward pre-hook makes one :class:`~seg4diff_fast.capture.state.CallInfo` per forward call (step
   count, CFG half, image grid from the actual latent size, text length) and hands it to the processors
   inside a copy of ``joint_attention_kwargs``;
3. where the transformer has ``cache_context`` (Flux), it is wrapped so that true-CFG negative calls
   (``"uncond"``) are recognised and neither counted nor captured.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Iterable
from typing import Any

import torch

from ..ops.joint_attention import HEAD_REDUCES, MODES
from .flux import FastFluxAttnProcessor, flux_call_geometry
from .sd3 import FastJointAttnProcessor, sd3_call_geometry
from .state import FastCapture

_ATTR = "_seg4diff_fast_capture"
SUPPORTED = (
    "Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, "
    "StableDiffusion3InpaintPipeline, SD3Transformer2DModel) and Flux (FluxPipeline and its img2img/inpaint "
    "variants, FluxTransformer2DModel)"
)


def _family_of_transformer(model: Any) -> str | None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    if isinstance(model, FluxTransformer2DModel):
        return "flux"
    return None


def _resolve(obj: Any) -> tuple[str, Any, torch.nn.Module]:
    """(family, pipeline or None, transformer) of a pipeline or bare transformer; TypeError otherwise."""
    family = _family_of_transformer(obj)
    if family is not None:
        return family, None, obj
    transformer = getattr(obj, "transformer", None)
    family = _family_of_transformer(transformer)
    if family is None or "PAG" in type(obj).__name__:
        raise TypeError(f"fast capture supports {SUPPORTED}; got {type(obj).__name__}")
    return family, obj, transformer


def _attention_modules(family: str, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """(processor key, attention module, layer number) of every attention module of the transformer."""
    mods = []
    if family == "sd3":
        for i, block in enumerate(transformer.transformer_blocks):
            mods.append((f"transformer_blocks.{i}.attn.processor", block.attn, i))
            if getattr(block, "attn2", None) is not None:
                mods.append((f"transformer_blocks.{i}.attn2.processor", block.attn2, i))
    else:
        n = len(transformer.transformer_blocks)
        for i, block in enumerate(transformer.transformer_blocks):
            mods.append((f"transformer_blocks.{i}.attn.processor", block.attn, i))
        for j, block in enumerate(transformer.single_transformer_blocks):
            mods.append((f"single_transformer_blocks.{j}.attn.processor", block.attn, n + j))
    return mods


def num_layers(family: str, transformer: torch.nn.Module) -> int:
    if family == "sd3":
        return len(transformer.transformer_blocks)
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def count_layers(pipe: Any) -> int:
    """Number of capturable blocks of a supported pipeline or transformer (Flux: double + single stream)."""
    family, _, transformer = _resolve(pipe)
    return num_layers(family, transformer)


def _stock_processor_types(family: str) -> tuple[type, ...]:
    if family == "sd3":
        from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

        return (JointAttnProcessor2_0, FusedJointAttnProcessor2_0)
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return (FluxAttnProcessor,)


def _as_int(x: Any) -> Any:
    """An integer-like layer index (int, numpy or 0-d torch integer) as int; anything else unchanged."""
    if isinstance(x, bool):
        return x
    try:
        return operator.index(x)
    except TypeError:
        return x


def check_layers(pipe: Any, layers: Any, who: str = "") -> tuple[int, ...]:
    """Block indices as a tuple of ints after one range / duplicate check (the only one in the package).

    Args:
        pipe: a supported pipeline or bare transformer (its block count is the range).
        layers: one index or an iterable of them (int, numpy or 0-d torch integers); may be empty.
        who: prefix of the error message (the caller's name).

    Raises:
        ValueError: an index out of range (the message gives the valid range; Flux lists the
            double- and single-stream ranges) or duplicates.

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> check_layers(tiny_sd3_pipeline(t5=False), [2, 0])
        (2, 0)
    """
    family, _, transformer = _resolve(pipe)
    n = num_layers(family, transformer)
    prefix = f"{who}: " if who else ""
    items = (layers,) if isinstance(_as_int(layers), int) and not isinstance(layers, bool) else tuple(layers)
    out = []
    for x in items:
        x = _as_int(x)
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
            extra = ""
            if family == "flux":
                nd = len(transformer.transformer_blocks)
                extra = f" (double-stream 0..{nd - 1}, single-stream {nd}..{n - 1})"
            raise ValueError(f"{prefix}layer {x!r} is out of range: this transformer has {n} blocks; valid layers "
                             f"are 0..{n - 1}{extra}")
        out.append(x)
    if len(set(out)) != len(out):
        raise ValueError(f"{prefix}layers {out} contain duplicates")
    return tuple(out)


def _check_args(family, transformer, layers, tokens, mode, head_reduce, steps):
    layers = check_layers(transformer, layers, "enable_fast_capture")
    if tokens is not None:
        tokens = tuple(int(t) for t in tokens)
        if not tokens or min(tokens) < 0:
            raise ValueError("enable_fast_capture: tokens must be a non-empty list of text positions >= 0, or None")
    if mode not in MODES:
        raise ValueError(f"enable_fast_capture: mode={mode!r} is not one of {MODES}")
    if head_reduce not in HEAD_REDUCES:
        raise ValueError(f"enable_fast_capture: head_reduce={head_reduce!r} is not one of {HEAD_REDUCES}")
    if steps is not None:
        steps = frozenset(int(s) for s in ((steps,) if isinstance(steps, int) else steps))
        if any(s < 0 for s in steps):
            raise ValueError("enable_fast_capture: steps must be step indices >= 0, or None for every step")
    return layers, tokens, steps


class _PreHook:
    """The transformer's forward pre-hook: one CallInfo per captured call, into joint_attention_kwargs."""

    NAMES = ("hidden_states", "encoder_hidden_states", "img_ids", "joint_attention_kwargs", "skip_layers")

    def __init__(self, capture: FastCapture, transformer: torch.nn.Module):
        self.capture = capture
        params = list(inspect.signature(type(transformer).forward).parameters)[1:]
        self.position = {name: params.index(name) for name in self.NAMES if name in params}

    def _get(self, args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        i = self.position.get(name)
        return args[i] if i is not None and i < len(args) else None

    def _cfg(self, batch: int) -> bool:
        cap = self.capture
        cfg = cap.cfg
        if cfg is None:  # SD3 pipelines batch [uncond; cond] when do_classifier_free_guidance; Flux never does
            cfg = cap.family == "sd3" and bool(getattr(cap.pipe, "do_classifier_free_guidance", False))
        return cfg and batch % 2 == 0

    def __call__(self, module, args, kwargs):
        cap = self.capture
        if not cap.enabled or not (cap.layers or cap.measure_mass):
            return None
        if cap.family == "sd3" and self._get(args, kwargs, "skip_layers") is not None:
            return None  # skip-layer guidance: an extra conditional call, not a denoising step of its own
        if cap._context == "uncond":
            return None  # Flux true-CFG negative prediction
        step = cap.step_count
        cap.step_count += 1
        if not cap.wants_step(step):
            return None
        hidden = self._get(args, kwargs, "hidden_states")
        context = self._get(args, kwargs, "encoder_hidden_states")
        if cap.family == "sd3":
            geometry = sd3_call_geometry(module, hidden, context)
        else:
            geometry = flux_call_geometry(module, hidden, context, self._get(args, kwargs, "img_ids"))
        batch = hidden.shape[0]
        keep = slice(batch // 2, batch) if self._cfg(batch) else None
        info = cap.new_call(step, *geometry, keep=keep, batch=batch)
        jak = dict(self._get(args, kwargs, "joint_attention_kwargs") or {})
        jak["seg4diff_call"] = info
        if "joint_attention_kwargs" in kwargs or len(args) <= self.position["joint_attention_kwargs"]:
            kwargs["joint_attention_kwargs"] = jak
        else:
            args = list(args)
            args[self.position["joint_attention_kwargs"]] = jak
            args = tuple(args)
        return args, kwargs


_NOTHING = object()


class EarlyExit(Exception):
    """Raised inside the transformer's forward by ``enable_fast_capture(stop_after=...)`` once that block's
    attention has run; catch it with :func:`early_exit`."""


def _raise_early_exit(module, args, output):
    raise EarlyExit


@contextlib.contextmanager
def early_exit():
    """Context for a transformer call under ``enable_fast_capture(stop_after=...)``: swallows the
    :class:`EarlyExit` that ends the forward after the stop block.

    Example:
        >>> import torch
        >>> from seg4diff_fast.capture import early_exit, enable_fast_capture, disable_fast_capture
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> tr = tiny_sd3_pipeline(t5=False).transformer
        >>> cap = enable_fast_capture(tr, layers=[1], stop_after=1, cfg=False)
        >>> with early_exit():
        ...     _ = tr(hidden_states=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500.0]),
        ...            encoder_hidden_states=torch.randn(1, 77, 32), pooled_projections=torch.randn(1, 32))
        >>> cap.maps.shape
        torch.Size([1, 1, 77, 8, 8])
        >>> disable_fast_capture(tr)
    """
    try:
        yield
    except EarlyExit:
        pass


def _wrap_cache_context(capture: FastCapture, transformer: torch.nn.Module):
    """Wrap ``transformer.cache_context`` (an instance attribute); returns what to put back, or None."""
    original = getattr(transformer, "cache_context", None)
    if original is None:
        return None
    previous_attr = transformer.__dict__.get("cache_context", _NOTHING)

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs):
        previous = capture._context
        capture._context = name
        try:
            with original(name, **kwargs):
                yield
        finally:
            capture._context = previous

    transformer.__dict__["cache_context"] = cache_context
    return previous_attr


def enable_fast_capture(
    pipe: Any,
    layers: int | Iterable[int] = (9,),
    tokens: Iterable[int] | None = None,
    mode: str = "probs",
    head_reduce: str = "mean",
    steps: int | Iterable[int] | None = None,
    keep_steps: bool = False,
    *,
    cfg: bool | None = None,
    backend: str | None = None,
    stop_after: int | None = None,
    measure_mass: bool = False,
) -> FastCapture:
    """Run every attention layer of an SD3 / SD3.5 / Flux transformer on the fused ``joint_attention``
    op and capture image→text attention maps at ``layers`` during generation.

    Args:
        pipe: a diffusers ``StableDiffusion3Pipeline`` (or its img2img / inpaint variants), a Flux
            pipeline, or a bare ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``.
        layers: block indices that capture (0-based). Flux counts the double-stream blocks first
            (0 … num_layers−1), then the single-stream blocks (num_layers + j). ``[]`` captures nothing
            but still runs every layer on the fused op.
        tokens: text positions to capture; None means all CLIP positions (T = 77) for SD3/SD3.5 and all
            T5 positions for Flux. SD3 text positions are ``[77 CLIP; T5]``, so T5 piece j is 77 + j.
        mode: ``"probs"`` (softmax over all joint keys, the paper's maps), ``"logits"`` (raw scaled
            scores, MAGNET) or ``"sel_probs"`` (softmax over the captured columns only).
        head_reduce: ``"mean"``, ``"max"`` or ``"none"`` (keep a head axis).
        steps: denoising-call indices to capture (counted since enabling / ``reset``), None for all.
        keep_steps: keep every captured call's maps ((S, B, L, T, h, w)) instead of a running mean.
        cfg: classifier-free-guidance rule for SD3 (None: from the pipeline at call time; True/False:
            forced); see :class:`FastCapture`.
        backend: ``joint_attention`` backend (None: best available).
        stop_after: early exit: right after this block's attention has run (and recorded), the forward
            raises :class:`EarlyExit`, so nothing after it runs (not even that block's MLP). The caller
            catches it (``with early_exit(): transformer(...)``); maps of the blocks up to it are those of
            a full forward. None: the forward runs to the end.
        measure_mass: at every block, also measure where each query row's attention mass goes: per head,
            the probability mass on the text keys, averaged over the image rows (I2T) and over the text
            rows (T2T), summed over the batch (:attr:`FastCapture.block_mass`). Uses the fused op with
            every row captured on the text columns, never an N×N matrix.

    Returns:
        The :class:`FastCapture` that collects the maps. Enabling again replaces the previous capture
        (one patch, the stock processors restored first); :func:`disable_fast_capture` undoes it.

    Raises:
        TypeError: an unsupported pipeline / model, or attention processors fast capture cannot replace
            (e.g. IP-Adapter's).
        ValueError: a layer out of range (the message gives the valid range), or bad arguments.

    Example:
        >>> from seg4diff_fast import enable_fast_capture, disable_fast_capture
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline()                       # tiny, random, offline; real SD3: layers=[9]
        >>> cap = enable_fast_capture(pipe, layers=[0, 1])
        >>> _ = pipe("a cat on a red sofa", num_inference_steps=2, height=32, width=32,
        ...          max_sequence_length=8, output_type="latent")
        >>> cap.maps.shape                                   # (B, L, T, h, w); CFG: conditional half only
        torch.Size([1, 2, 77, 8, 8])
        >>> sorted(cap.word_maps("a cat on a red sofa"))
        ['a', 'cat', 'on', 'red', 'sofa']
        >>> disable_fast_capture(pipe)
    """
    family, pipeline, transformer = _resolve(pipe)
    layers, tokens, steps = _check_args(family, transformer, layers, tokens, mode, head_reduce, steps)
    if stop_after is not None:
        (stop_after,) = check_layers(transformer, [stop_after], "enable_fast_capture: stop_after")
    disable_fast_capture(transformer)  # enabling twice: one patch

    mods = _attention_modules(family, transformer)
    stock = _stock_processor_types(family)
    for key, module, _ in mods:
        if not isinstance(module.processor, stock):
            raise TypeError(
                f"fast capture replaces diffusers' stock attention processors; {key} is "
                f"{type(module.processor).__name__} (IP-Adapter or a custom processor): remove it first"
            )
    saved = {key: module.processor for key, module, _ in mods}

    capture = FastCapture(family, layers, tokens, mode, head_reduce, steps, keep_steps,
                          pipe=pipeline, transformer=transformer, cfg=cfg, backend=backend,
                          measure_mass=measure_mass)
    slot_of = {layer: i for i, layer in enumerate(layers)}
    cls = FastJointAttnProcessor if family == "sd3" else FastFluxAttnProcessor
    new = {}
    for key, module, layer in mods:
        capturing = layer in slot_of and not key.endswith("attn2.processor")
        proc = cls(capture, slot_of[layer] if capturing else None, layer)
        if family == "flux":
            proc._attention_backend = getattr(module.processor, "_attention_backend", None)
            proc._parallel_config = getattr(module.processor, "_parallel_config", None)
        new[key] = proc
    for key, module, _ in mods:
        module.set_processor(new[key])

    hook = transformer.register_forward_pre_hook(_PreHook(capture, transformer), with_kwargs=True)
    stop = None
    if stop_after is not None:  # the attention module of that block (SD3.5's image-only attn2 is not it)
        module = next(m for key, m, layer in mods if layer == stop_after and not key.endswith("attn2.processor"))
        stop = module.register_forward_hook(_raise_early_exit)
    previous_cache_context = _wrap_cache_context(capture, transformer)
    capture._patch = {"saved": saved, "modules": mods, "hook": hook, "stop": stop,
                      "cache_context": previous_cache_context}
    capture.enabled = True
    transformer.__dict__[_ATTR] = capture
    return capture


def disable_fast_capture(pipe: Any) -> None:
    """Undo :func:`enable_fast_capture`: the stock processors, no hook; a no-op when not enabled.

    The capture object keeps the maps it has (``cap.maps`` still works) but records nothing more.
    """
    _, _, transformer = _resolve(pipe)
    capture = transformer.__dict__.get(_ATTR)
    if capture is None:
        return
    patch = capture._patch
    for key, module, _ in patch["modules"]:
        module.set_processor(patch["saved"][key])
    patch["hook"].remove()
    if patch["stop"] is not None:
        patch["stop"].remove()
    previous = patch["cache_context"]
    if previous is _NOTHING:
        transformer.__dict__.pop("cache_context", None)
    elif previous is not None:
        transformer.__dict__["cache_context"] = previous
    capture.enabled = False
    capture._context = None
    del transformer.__dict__[_ATTR]


def get_fast_capture(pipe: Any) -> FastCapture | None:
    """The active :class:`FastCapture` of a pipeline or transformer, or None."""
    _, _, transformer = _resolve(pipe)
    return transformer.__dict__.get(_ATTR)
