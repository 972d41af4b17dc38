"""Transformer families fast capture supports: one small adapter object each, in a registry.

In the style of diffusers' ``attention_dispatch`` (a registry, not if-chains), every question
:mod:`~seg4diff_fast.capture.patch` asks about a transformer is answered by its :class:`CaptureFamily`:

- which transformers it serves (:meth:`~CaptureFamily.matches`) and its short ``name``;
- its attention modules, with their layer numbers and whether they can capture (:meth:`~CaptureFamily.sites`),
  the block count and the layer ranges named in errors;
- the stock processors it replaces and the fast processor for each module (:meth:`~CaptureFamily.make_processor`);
- the forward argument that carries the processor kwargs (``joint_attention_kwargs`` for SD3 / Flux /
  Flux.2, ``attention_kwargs`` for Qwen-Image);
- per forward call: whether it is refused or skipped, and its geometry (image grid, text length, first
  image row, joint index of text position 0) from the forward's arguments;
- the classifier-free-guidance rule (SD3 batches ``[uncond; cond]``; the others call the transformer
  separately for the negative prompt, under ``cache_context("uncond")``);
- text: the captured window by default and the pipeline tokenizer whose positions the columns index.

Registered families, in matching order (:data:`CAPTURE_FAMILIES`):

========== ======================================= =========================================================
name       transformer                             joint sequence per attention call
========== ======================================= =========================================================
sd3        SD3Transformer2DModel (SD3, SD3.5)      ``[image; text]``; SD3.5-medium's ``attn2`` image only
flux       FluxTransformer2DModel                  ``[text; image (; Kontext conditioning)]``, double then
                                                   single-stream blocks
flux2      Flux2Transformer2DModel                 ``[text; image (; reference images)]``, double then
                                                   single-stream (parallel) blocks
qwenimage  QwenImageTransformer2DModel             ``[text; image (; conditioning images)]``, with a text
                                                   key mask
========== ======================================= =========================================================

A new family is one :class:`CaptureFamily` subclass plus its processors, added with
:func:`register_capture_family`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .flux import FastFluxAttnProcessor, flux_call_geometry
from .flux2 import FastFlux2AttnProcessor, FastFlux2ParallelSelfAttnProcessor, flux2_call_geometry
from .qwenimage import FastQwenDoubleStreamAttnProcessor, qwenimage_call_geometry
from .sd3 import FastJointAttnProcessor, sd3_call_geometry

__all__ = [
    "CAPTURE_FAMILIES",
    "AttentionSite",
    "CaptureFamily",
    "CaptureFamilyRegistry",
    "Flux2CaptureFamily",
    "FluxCaptureFamily",
    "QwenImageCaptureFamily",
    "SD3CaptureFamily",
    "register_capture_family",
]

#: ``get(name)``: the value of the transformer forward's argument ``name`` in the running call (None if absent).
ArgGetter = Callable[[str], Any]


class AttentionSite(NamedTuple):
    """One attention module of a transformer, as fast capture patches it."""

    key: str  #: processor key (``transformer.attn_processors`` name)
    module: torch.nn.Module  #: the attention module
    layer: int  #: block number (``layers=``, ``stop_after=``)
    captures: bool  #: whether it sees the joint image+text sequence (False: SD3.5's image-only ``attn2``)


def _copy_dispatch_settings(new: Any, stock: Any) -> Any:
    """The stock processor's diffusers dispatch settings (``set_attention_backend``, context parallelism)."""
    new._attention_backend = getattr(stock, "_attention_backend", None)
    new._parallel_config = getattr(stock, "_parallel_config", None)
    return new


class CaptureFamily:
    """What fast capture needs to know about one transformer family (one instance serves all its models)."""

    #: Short name (``FastCapture.family``, :func:`~seg4diff_fast.capture.capture_family`).
    name: str = ""
    #: The pipelines and transformers served, for error messages and ``SUPPORTED``.
    description: str = ""
    #: The transformer forward's argument whose dict diffusers hands to every attention processor.
    kwargs_arg: str = "joint_attention_kwargs"
    #: Pipeline attribute of the tokenizer whose positions the captured text columns index, and its kind.
    tokenizer_attr: str = "tokenizer"
    tokenizer_kind: str = "the text encoder's tokenizer"
    #: Byte-level BPE tokenizer: a word after a space is tokenized with that space (``"Ġcat"``).
    byte_level_text: bool = False

    def transformer_class(self) -> type:
        """The diffusers transformer class served (imported on call)."""
        raise NotImplementedError

    def matches(self, transformer: Any) -> bool:
        return isinstance(transformer, self.transformer_class())

    # modules ---------------------------------------------------------------------------------------
    def sites(self, transformer: torch.nn.Module) -> list[AttentionSite]:
        """Every attention module of the transformer, in processor-key order."""
        raise NotImplementedError

    def num_layers(self, transformer: torch.nn.Module) -> int:
        """Capturable blocks."""
        raise NotImplementedError

    def layer_ranges(self, transformer: torch.nn.Module) -> str:
        """Extra text after ``valid layers are 0..n-1`` in range errors (e.g. the block kinds' ranges)."""
        return ""

    def stock_processor_types(self) -> tuple[type, ...]:
        """The diffusers processors fast capture replaces; any other processor is refused."""
        raise NotImplementedError

    def unsupported_reason(self, processor: Any) -> str | None:
        """Why a non-stock processor cannot be replaced, when the family knows better than the default text."""
        return None

    def make_processor(self, site: AttentionSite, stock: Any, capture: Any, slot: int | None) -> Any:
        """The fast processor for ``site`` (``slot``: its capture slot, or None when it does not capture)."""
        raise NotImplementedError

    # calls -----------------------------------------------------------------------------------------
    def check_call(self, get: ArgGetter) -> None:
        """Raise for a forward call the fast processors cannot run (before anything else is decided)."""

    def skip_call(self, get: ArgGetter) -> bool:
        """Whether the call is an extra one that is neither counted as a step nor captured."""
        return False

    def call_geometry(self, transformer: torch.nn.Module, get: ArgGetter) -> tuple[tuple[int, int], int, int, int]:
        """(grid, n_txt, row0, col0) of a forward call: the generated image's token grid, the text length,
        the joint index of the first image row and of text position 0."""
        raise NotImplementedError

    def batched_cfg(self, pipe: Any) -> bool:
        """Whether the pipeline (at call time) batches ``[uncond; cond]`` in one call (then only the second
        half is kept); families that call the transformer separately for the negative prompt say False."""
        return False

    # text ------------------------------------------------------------------------------------------
    def text_length(self, n_txt: int) -> int:
        """Text positions captured by default (``tokens=None``) out of a call's ``n_txt``."""
        return n_txt

    def prompt_offset(self, pipe: Any, tokenizer: Any) -> int:
        """Text position of the prompt's first token when the pipeline wraps prompts in a template
        (a BOS the tokenizer adds itself is counted by :meth:`FastCapture.token_positions`, not here)."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CaptureFamilyRegistry(dict):
    """The supported families: a dict name → :class:`CaptureFamily`, tried in registration order."""

    def register(self, family: CaptureFamily | type[CaptureFamily]) -> Any:
        """Add a family (an instance, or a class to instantiate: usable as a class decorator)."""
        obj = family() if isinstance(family, type) else family
        if not obj.name:
            raise ValueError(f"capture family {obj!r} has no name")
        if obj.name in self:
            raise ValueError(f"capture family {obj.name!r} is registered twice")
        self[obj.name] = obj
        return family

    def of(self, transformer: Any) -> CaptureFamily | None:
        """The family serving a bare transformer, or None."""
        if not isinstance(transformer, torch.nn.Module):
            return None
        for family in self.values():
            if family.matches(transformer):
                return family
        return None

    def supported(self) -> str:
        """The supported pipelines and transformers, for messages."""
        names = [f.description for f in self.values()]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def __repr__(self) -> str:
        return f"CaptureFamilyRegistry({list(self)})"


#: The registered families (name → adapter), tried in order.
CAPTURE_FAMILIES = CaptureFamilyRegistry()


def register_capture_family(family: CaptureFamily | type[CaptureFamily]) -> Any:
    """Add a transformer family to fast capture (an instance or a class; returned unchanged)."""
    return CAPTURE_FAMILIES.register(family)


# ---------------------------------------------------------------------------------------------------
@register_capture_family
class SD3CaptureFamily(CaptureFamily):
    """SD3 / SD3.5: joint blocks over ``[image; text]``, text = 77 CLIP positions then T5; SD3.5-medium's
    dual-attention blocks add an image-only ``attn2`` (patched, never captured); CFG batches
    ``[uncond; cond]``; skip-layer-guidance calls (``skip_layers``) are extra calls."""

    name = "sd3"
    description = ("Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, "
                   "StableDiffusion3InpaintPipeline, SD3Transformer2DModel)")
    tokenizer_attr = "tokenizer"
    tokenizer_kind = "the CLIP tokenizer"

    def transformer_class(self) -> type:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def sites(self, transformer):
        out = []
        for i, block in enumerate(transformer.transformer_blocks):
            out.append(AttentionSite(f"transformer_blocks.{i}.attn.processor", block.attn, i, True))
            if getattr(block, "attn2", None) is not None:
                out.append(AttentionSite(f"transformer_blocks.{i}.attn2.processor", block.attn2, i, False))
        return out

    def num_layers(self, transformer):
        return len(transformer.transformer_blocks)

    def stock_processor_types(self):
        from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

        return (JointAttnProcessor2_0, FusedJointAttnProcessor2_0)

    def make_processor(self, site, stock, capture, slot):
        return FastJointAttnProcessor(capture, slot, site.layer)

    def skip_call(self, get):
        return get("skip_layers") is not None  # skip-layer guidance: an extra conditional call

    def call_geometry(self, transformer, get):
        return sd3_call_geometry(transformer, get("hidden_states"), get("encoder_hidden_states"))

    def batched_cfg(self, pipe):
        return bool(getattr(pipe, "do_classifier_free_guidance", False))

    def text_length(self, n_txt):
        return min(77, n_txt)  # the CLIP window


class _DoubleSingleFamily(CaptureFamily):
    """Flux-style transformers: ``transformer_blocks`` (double-stream) numbered first, then
    ``single_transformer_blocks``."""

    def sites(self, transformer):
        n = len(transformer.transformer_blocks)
        out = [AttentionSite(f"transformer_blocks.{i}.attn.processor", b.attn, i, True)
               for i, b in enumerate(transformer.transformer_blocks)]
        out += [AttentionSite(f"single_transformer_blocks.{j}.attn.processor", b.attn, n + j, True)
                for j, b in enumerate(transformer.single_transformer_blocks)]
        return out

    def num_layers(self, transformer):
        return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)

    def layer_ranges(self, transformer):
        nd, n = len(transformer.transformer_blocks), self.num_layers(transformer)
        return f" (double-stream 0..{nd - 1}, single-stream {nd}..{n - 1})"


@register_capture_family
class FluxCaptureFamily(_DoubleSingleFamily):
    """Flux.1: ``[text; image]`` (Kontext conditioning tokens after the image), grid from ``img_ids``
    (frame, y, x); true CFG calls the transformer again under ``cache_context("uncond")``."""

    name = "flux"
    description = "Flux (FluxPipeline and its img2img/inpaint variants, FluxTransformer2DModel)"
    tokenizer_attr = "tokenizer_2"
    tokenizer_kind = "the T5 tokenizer"

    def transformer_class(self) -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def stock_processor_types(self):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return (FluxAttnProcessor,)

    def make_processor(self, site, stock, capture, slot):
        return _copy_dispatch_settings(FastFluxAttnProcessor(capture, slot, site.layer), stock)

    def call_geometry(self, transformer, get):
        return flux_call_geometry(transformer, get("hidden_states"), get("encoder_hidden_states"), get("img_ids"))


@register_capture_family
class Flux2CaptureFamily(_DoubleSingleFamily):
    """Flux.2: double-stream ``Flux2Attention`` blocks over ``[text; image]`` and single-stream parallel
    blocks (``Flux2ParallelSelfAttention``: fused QKV + MLP input, one output projection of their concat);
    grid from the 4-D ``img_ids`` (t, h, w, l) of the generated image (reference images follow it with
    another t); Klein's true CFG calls again under ``cache_context("uncond")``. KV-cache mode is refused."""

    name = "flux2"
    description = "Flux.2 (Flux2Pipeline, Flux2KleinPipeline and its inpaint variant, Flux2Transformer2DModel)"
    tokenizer_attr = "tokenizer"
    tokenizer_kind = "the Mistral / Qwen3 tokenizer"
    byte_level_text = True

    def transformer_class(self) -> type:
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel

    def stock_processor_types(self):
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

        return (Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor)

    def unsupported_reason(self, processor):
        if type(processor).__name__.startswith("Flux2KV"):
            return (f"{type(processor).__name__} is Flux.2's KV-cache mode (Flux2KleinKVPipeline), which fast "
                    f"capture does not support; use Flux2KleinPipeline")
        return None

    def make_processor(self, site, stock, capture, slot):
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttnProcessor

        cls = FastFlux2ParallelSelfAttnProcessor if isinstance(stock, Flux2ParallelSelfAttnProcessor) \
            else FastFlux2AttnProcessor
        return _copy_dispatch_settings(cls(capture, slot, site.layer), stock)

    def check_call(self, get):
        mode = get("kv_cache_mode")
        if mode is not None:
            raise NotImplementedError(
                f"fast capture: Flux.2 calls with kv_cache_mode={mode!r} (reference-image KV caching) are not "
                "supported; call disable_fast_capture first or run without the KV cache"
            )

    def prompt_offset(self, pipe, tokenizer):
        if pipe is None:  # a bare transformer: the caller's tokenizer, positions as it gives them
            return 0
        if not hasattr(pipe, "_get_qwen3_prompt_embeds"):
            raise NotImplementedError(
                f"word_maps on {type(pipe).__name__}: its text positions include Mistral's chat template and "
                "system prompt; find the prompt's positions yourself and use maps_at(positions)"
            )
        # Flux2KleinPipeline: Qwen3's chat template, not dropped; count its tokens before the prompt
        sentinel = "\u2063SEG4DIFF\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        prefix = text[:text.index(sentinel)]
        return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    def call_geometry(self, transformer, get):
        return flux2_call_geometry(transformer, get("hidden_states"), get("encoder_hidden_states"), get("img_ids"))


@register_capture_family
class QwenImageCaptureFamily(CaptureFamily):
    """Qwen-Image: double-stream blocks over ``[text; image (; conditioning images)]`` with complex RoPE per
    stream, a text key mask (``encoder_hidden_states_mask``), grid from ``img_shapes`` (the first entry of
    the first sample); processor kwargs travel in ``attention_kwargs``; true CFG calls again under
    ``cache_context("uncond")``."""

    name = "qwenimage"
    description = ("Qwen-Image (QwenImagePipeline and its img2img/inpaint/edit variants, "
                   "QwenImageTransformer2DModel)")
    kwargs_arg = "attention_kwargs"
    tokenizer_attr = "tokenizer"
    tokenizer_kind = "the Qwen2.5-VL tokenizer"
    byte_level_text = True

    def transformer_class(self) -> type:
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    def sites(self, transformer):
        return [AttentionSite(f"transformer_blocks.{i}.attn.processor", b.attn, i, True)
                for i, b in enumerate(transformer.transformer_blocks)]

    def num_layers(self, transformer):
        return len(transformer.transformer_blocks)

    def stock_processor_types(self):
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        return (QwenDoubleStreamAttnProcessor2_0,)

    def make_processor(self, site, stock, capture, slot):
        return _copy_dispatch_settings(FastQwenDoubleStreamAttnProcessor(capture, slot, site.layer), stock)

    def prompt_offset(self, pipe, tokenizer):
        template = getattr(pipe, "prompt_template_encode", None)
        if template is not None and "<|vision_start|>" in template:
            raise NotImplementedError(
                f"word_maps on {type(pipe).__name__}: its text positions include the condition image's vision "
                "tokens; find the prompt's positions yourself and use maps_at(positions)"
            )
        return 0  # QwenImagePipeline drops the template's system prefix: the prompt starts at position 0

    def call_geometry(self, transformer, get):
        return qwenimage_call_geometry(transformer, get("hidden_states"), get("encoder_hidden_states"),
                                       get("img_shapes"))
