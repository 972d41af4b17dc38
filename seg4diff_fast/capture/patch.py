"""``enable_fast_capture`` / ``disable_fast_capture``: family lookup and the patch itself.

The transformer's family comes from the registry :data:`~seg4diff_fast.capture.families.CAPTURE_FAMILIES`
(one :class:`~seg4diff_fast.capture.families.CaptureFamily` adapter per family: SD3 / SD3.5, Flux, Flux.2,
Qwen-Image); nothing here branches on the family. Enabling does three things to the transformer, and
disabling undoes them:

1. every attention module gets its own fast processor (the family's ``make_processor``), the stock ones are
   kept;
2. a forward pre-hook makes one :class:`~seg4diff_fast.capture.state.CallInfo` per forward call (step
   count, CFG half, image grid and text length from the call's arguments, through the family's
   ``call_geometry``) and hands it to the processors inside a copy of the family's processor-kwargs
   argument (``joint_attention_kwargs``; ``attention_kwargs`` for Qwen-Image);
3. where the transformer has ``cache_context`` (Flux, Flux.2, Qwen-Image), it is wrapped so that true-CFG
   negative calls (``"uncond"``) are recognised and neither counted nor captured.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Iterable
from typing import Any

import torch

from ..ops.joint_attention import HEAD_REDUCES, MODES
from .families import CAPTURE_FAMILIES, AttentionSite, CaptureFamily
from .state import FastCapture

_ATTR = "_seg4diff_fast_capture"
#: The supported pipelines and transformers (the registered families at import time).
SUPPORTED = CAPTURE_FAMILIES.supported()


def _resolve(obj: Any) -> tuple[CaptureFamily, Any, torch.nn.Module]:
    """(family, pipeline or None, transformer) of a pipeline or bare transformer; TypeError otherwise."""
    family = CAPTURE_FAMILIES.of(obj)
    if family is not None:
        return family, None, obj
    transformer = getattr(obj, "transformer", None)
    family = CAPTURE_FAMILIES.of(transformer)
    if family is None or "PAG" in type(obj).__name__:
        raise TypeError(f"fast capture supports {CAPTURE_FAMILIES.supported()}; got {type(obj).__name__}")
    return family, obj, transformer


def capture_family(pipe: Any) -> str:
    """The name of the transformer family fast capture sees in a pipeline or bare transformer
    (``"sd3"``, ``"flux"``, ``"flux2"``, ``"qwenimage"``; see :data:`~seg4diff_fast.capture.families.CAPTURE_FAMILIES`).

    Raises:
        TypeError: an unsupported pipeline or model.

    Example:
        >>> from seg4diff_fast.testing import tiny_flux_pipeline
        >>> capture_family(tiny_flux_pipeline())
        'flux'
    """
    return _resolve(pipe)[0].name


def _attention_modules(family: CaptureFamily, transformer: torch.nn.Module) -> list[AttentionSite]:
    """Every attention module of the transformer (processor key, module, layer number, captures)."""
    return family.sites(transformer)


def num_layers(family: CaptureFamily | str, transformer: torch.nn.Module) -> int:
    """Capturable blocks of ``transformer`` (``family``: its adapter or registered name)."""
    family = CAPTURE_FAMILIES[family] if isinstance(family, str) else family
    return family.num_layers(transformer)


def count_layers(pipe: Any) -> int:
    """Number of capturable blocks of a supported pipeline or transformer (Flux / Flux.2: double + single
    stream)."""
    family, _, transformer = _resolve(pipe)
    return family.num_layers(transformer)


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
        ValueError: an index out of range (the message gives the valid range; Flux and Flux.2 list the
            double- and single-stream ranges) or duplicates.

    Example:
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> check_layers(tiny_sd3_pipeline(t5=False), [2, 0])
        (2, 0)
    """
    family, _, transformer = _resolve(pipe)
    n = family.num_layers(transformer)
    prefix = f"{who}: " if who else ""
    items = (layers,) if isinstance(_as_int(layers), int) and not isinstance(layers, bool) else tuple(layers)
    out = []
    for x in items:
        x = _as_int(x)
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
            extra = family.layer_ranges(transformer)
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
    """The transformer's forward pre-hook: one CallInfo per captured call, into the processor kwargs
    (the family's ``kwargs_arg``: ``joint_attention_kwargs``, or ``attention_kwargs`` for Qwen-Image)."""

    def __init__(self, capture: FastCapture, family: CaptureFamily, transformer: torch.nn.Module):
        self.capture = capture
        self.family = family
        params = list(inspect.signature(type(transformer).forward).parameters)[1:]
        self.position = {name: i for i, name in enumerate(params)}
        self.kwargs_arg = family.kwargs_arg
        if self.kwargs_arg not in self.position:
            raise TypeError(f"fast capture: {type(transformer).__name__}.forward has no {self.kwargs_arg!r} argument")

    def _get(self, args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        i = self.position.get(name)
        return args[i] if i is not None and i < len(args) else None

    def _cfg(self, batch: int) -> bool:
        cap = self.capture
        cfg = cap.cfg
        if cfg is None:  # SD3 pipelines batch [uncond; cond] when do_classifier_free_guidance; the others never do
            cfg = self.family.batched_cfg(cap.pipe)
        return cfg and batch % 2 == 0

    def __call__(self, module, args, kwargs):
        cap = self.capture
        family = self.family

        def get(name):
            return self._get(args, kwargs, name)

        family.check_call(get)
        if not cap.enabled or not (cap.layers or cap.measure_mass):
            return None
        if family.skip_call(get):
            return None  # e.g. SD3 skip-layer guidance: an extra conditional call, not a denoising step
        if cap._context == "uncond":
            return None  # true-CFG negative prediction (Flux, Flux.2 Klein, Qwen-Image)
        step = cap.step_count
        cap.step_count += 1
        if not cap.wants_step(step):
            return None
        geometry = family.call_geometry(module, get)
        batch = get("hidden_states").shape[0]
        keep = slice(batch // 2, batch) if self._cfg(batch) else None
        info = cap.new_call(step, *geometry, keep=keep, batch=batch)
        name = self.kwargs_arg
        processor_kwargs = dict(get(name) or {})
        processor_kwargs["seg4diff_call"] = info
        if name in kwargs or len(args) <= self.position[name]:
            kwargs[name] = processor_kwargs
        else:
            args = list(args)
            args[self.position[name]] = processor_kwargs
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
    """Run every attention layer of an SD3 / SD3.5 / Flux / Flux.2 / Qwen-Image transformer on the fused
    ``joint_attention`` op and capture image→text attention maps at ``layers`` during generation.

    Supported (:data:`SUPPORTED`; :func:`capture_family` names a pipeline's family):

    - ``"sd3"``: ``StableDiffusion3Pipeline`` and its img2img / inpaint variants, ``SD3Transformer2DModel``
      (SD3, SD3.5); joint sequence ``[image; text]``;
    - ``"flux"``: ``FluxPipeline`` and its img2img / inpaint variants, ``FluxTransformer2DModel``;
      ``[text; image]``;
    - ``"flux2"``: ``Flux2Pipeline``, ``Flux2KleinPipeline`` (and its inpaint variant),
      ``Flux2Transformer2DModel``; ``[text; image (; reference images)]`` (KV-cache mode is refused);
    - ``"qwenimage"``: ``QwenImagePipeline`` and its img2img / inpaint / edit variants,
      ``QwenImageTransformer2DModel``; ``[text; image (; conditioning images)]``, padded text masked.

    Only the generated image's tokens are captured (never edit pipelines' reference / conditioning images).

    Args:
        pipe: a supported diffusers pipeline or bare transformer (above).
        layers: block indices that capture (0-based). Flux and Flux.2 count the double-stream blocks
            first (0 … num_layers−1), then the single-stream blocks (num_layers + j). ``[]`` captures
            nothing but still runs every layer on the fused op.
        tokens: text positions to capture (at most 512 at once); None means all CLIP positions (T = 77)
            for SD3/SD3.5 and every text position of the call for the others (Flux: T5; Flux.2: the chat-
            templated text, padded to ``max_sequence_length``; Qwen-Image: the prompt after the dropped
            template prefix). SD3 text positions are ``[77 CLIP; T5]``, so T5 piece j is 77 + j.
        mode: ``"probs"`` (softmax over all joint keys, the paper's maps), ``"logits"`` (raw scaled
            scores, MAGNET) or ``"sel_probs"`` (softmax over the captured columns only).
        head_reduce: ``"mean"``, ``"max"`` or ``"none"`` (keep a head axis).
        steps: denoising-call indices to capture (counted since enabling / ``reset``), None for all.
        keep_steps: keep every captured call's maps ((S, B, L, T, h, w)) instead of a running mean.
        cfg: classifier-free-guidance rule for batched CFG (None: the family's rule at call time, i.e.
            SD3 pipelines' ``do_classifier_free_guidance``; the other families call the transformer
            separately for negative prompts, and those calls are never captured; True/False: forced);
            see :class:`FastCapture`.
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
    stock = family.stock_processor_types()
    for site in mods:
        if not isinstance(site.module.processor, stock):
            reason = family.unsupported_reason(site.module.processor)
            raise TypeError(
                f"fast capture replaces diffusers' stock attention processors; {site.key} is "
                + (reason or f"{type(site.module.processor).__name__} (IP-Adapter or a custom processor): "
                   "remove it first")
            )
    saved = {site.key: site.module.processor for site in mods}

    capture = FastCapture(family, layers, tokens, mode, head_reduce, steps, keep_steps,
                          pipe=pipeline, transformer=transformer, cfg=cfg, backend=backend,
                          measure_mass=measure_mass)
    prehook = _PreHook(capture, family, transformer)  # before anything is patched: it checks the forward
    slot_of = {layer: i for i, layer in enumerate(layers)}
    new = {}
    for site in mods:
        slot = slot_of.get(site.layer) if site.captures else None
        new[site.key] = family.make_processor(site, site.module.processor, capture, slot)
    for site in mods:
        site.module.set_processor(new[site.key])

    hook = transformer.register_forward_pre_hook(prehook, with_kwargs=True)
    stop = None
    if stop_after is not None:  # the attention module of that block (SD3.5's image-only attn2 is not it)
        module = next(site.module for site in mods if site.layer == stop_after and site.captures)
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
    for site in patch["modules"]:
        site.module.set_processor(patch["saved"][site.key])
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
