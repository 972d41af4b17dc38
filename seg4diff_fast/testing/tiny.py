"""Tiny, randomly initialised SD3, SD3.5 and Flux.1 pipelines built entirely offline.

They use the real diffusers pipeline classes with tiny configs, CLIP and T5 tokenizers made from vocab
files written to a temporary folder, and a tiny VAE, so that the capture machinery (and anything else
that drives a pipeline) can be exercised in seconds without downloading weights. The images they make
are noise; only the shapes and the code paths are real. (An example: the package docstring.)
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from ..shapes.pipeline import BPE_CHARS, write_clip_bpe

# Words the tiny tokenizers know whole; anything else falls back to characters. "sofa" and "sunset"
# are deliberately split into two sub-word tokens in both tokenizers, to exercise sub-word merging.
WORDS = (
    "a", "an", "the", "cat", "dog", "on", "in", "of", "red", "blue", "green", "car", "tree", "sky",
    "photo", "person", "grass", "road", "house", "and", "with", "at", "bird", "water", "table",
)
SPLIT_WORDS = {"sofa": ("so", "fa"), "sunset": ("sun", "set")}

_TOKENIZER_DIR: str | None = None


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def _write_clip_files(folder: str) -> None:
    """A CLIP BPE vocabulary: every character (alone and word-final), the WORDS whole, SPLIT_WORDS in two."""
    split = [piece for first, rest in SPLIT_WORDS.values() for piece in ((first, False), (rest, True))]
    write_clip_bpe(folder, [*((w, True) for w in WORDS), *split])


def _write_t5_files(folder: str) -> None:
    """A T5-style Unigram tokenizer (tokenizers JSON) with the same words, built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for w in WORDS:
        pieces.append(("▁" + w, -3.0))
    for first, rest in SPLIT_WORDS.values():
        pieces.append(("▁" + first, -3.0))
        pieces.append((rest, -3.0))
    for c in BPE_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        pieces.append((c, -6.0))
        pieces.append(("▁" + c, -7.0))
    seen: set[str] = set()
    pieces = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "model_max_length": 512,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "tokenizer_class": "T5Tokenizer",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def tokenizer_folder() -> str:
    """The temporary folder holding the tiny tokenizers' files (``clip/`` and ``t5/``), written once."""
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None or not os.path.isdir(_TOKENIZER_DIR):
        folder = tempfile.mkdtemp(prefix="seg4diff_tiny_tok_")
        os.makedirs(os.path.join(folder, "clip"))
        os.makedirs(os.path.join(folder, "t5"))
        _write_clip_files(os.path.join(folder, "clip"))
        _write_t5_files(os.path.join(folder, "t5"))
        _TOKENIZER_DIR = folder
    return _TOKENIZER_DIR


def tiny_clip_tokenizer():
    """A CLIPTokenizer (model_max_length 77, BOS at position 0) over the tiny vocabulary."""
    from transformers import CLIPTokenizer

    folder = os.path.join(tokenizer_folder(), "clip")
    return CLIPTokenizer(
        vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"), model_max_length=77
    )


def tiny_t5_tokenizer():
    """A T5 tokenizer (no BOS, ``</s>`` at the end) over the tiny vocabulary."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(os.path.join(tokenizer_folder(), "t5"))


def _clip_text_encoder(vocab_size: int, hidden: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _t5_encoder(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


# Every tiny VAE's encoder and decoder: two blocks of width 8 (vae_scale_factor 2), one layer each, RGB in and out.
_VAE_LAYOUT = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)


def _tiny_vae(latent_channels: int, shift: float = 0.0609, scale: float = 1.5035):
    """An ``AutoencoderKL`` of :data:`_VAE_LAYOUT` (latent shift and scale: SD3's by default)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **_VAE_LAYOUT,
        latent_channels=latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift,
        scaling_factor=scale,
    )


def _tiny_transformer(cls, seed: int, num_layers: int, heads: int, head_dim: int, **config):
    """``cls`` with ``num_layers`` blocks of ``heads`` × ``head_dim`` and ``config``, initialised from ``seed``,
    in eval mode."""
    _seed_all(seed)
    model = cls(num_layers=num_layers, num_attention_heads=heads, attention_head_dim=head_dim, **config)
    return model.eval()


def _finish(pipe, dtype: torch.dtype | None, device: str | torch.device | None):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # models built from configs start in training mode (T5 dropout, ...)
            component.requires_grad_(False)
    if dtype is not None or device is not None:
        pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_transformer(
    num_layers: int = 3,
    heads: int = 4,
    head_dim: int = 8,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
    seed: int = 0,
    latent_channels: int = 4,
):
    """A randomly initialised SD3Transformer2DModel (patch 2, 4 latent channels by default), in eval mode."""
    from diffusers import SD3Transformer2DModel

    if num_layers < 2:
        raise ValueError("num_layers must be >= 2 (with one block, the only block is context_pre_only)")
    return _tiny_transformer(
        SD3Transformer2DModel, seed, num_layers, heads, head_dim,
        sample_size=16,
        patch_size=2,
        in_channels=latent_channels,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_projection_dim,
        out_channels=latent_channels,
        pos_embed_max_size=32,
        dual_attention_layers=tuple(dual_attention_layers),
        qk_norm=qk_norm,
    )


def tiny_sd3_pipeline(
    num_layers: int = 3,
    heads: int = 4,
    head_dim: int = 8,
    t5: bool = True,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    pipeline_class=None,
    latent_channels: int | None = None,
):
    """A tiny StableDiffusion3Pipeline (or ``pipeline_class``, e.g. the img2img/inpaint variants).

    Transformer: ``num_layers`` joint blocks (the last one context_pre_only), patch 2, 4 latent
    channels; VAE scale factor 2, so an image of H×W pixels gives (H/4)·(W/4) image tokens. Text:
    two tiny CLIP encoders (77 positions, BOS first) and, if ``t5``, a tiny T5 encoder (else
    ``text_encoder_3=None`` and the pipeline fills ``max_sequence_length`` zero positions, as in the
    paper). Every component is in eval mode with gradients off. ``latent_channels`` defaults to 4, or
    16 for the inpaint pipeline (which insists on 16 or 33 transformer input channels).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipeline_class = pipeline_class or StableDiffusion3Pipeline
    if latent_channels is None:
        latent_channels = 16 if "Inpaint" in pipeline_class.__name__ else 4
    transformer = tiny_sd3_transformer(
        num_layers=num_layers, heads=heads, head_dim=head_dim, qk_norm=qk_norm,
        dual_attention_layers=dual_attention_layers, joint_attention_dim=32, pooled_projection_dim=32, seed=seed,
        latent_channels=latent_channels,
    )
    clip_tok = tiny_clip_tokenizer()
    _seed_all(seed + 1)
    text_encoder = _clip_text_encoder(len(clip_tok), 16, with_projection=True)
    text_encoder_2 = _clip_text_encoder(len(clip_tok), 16, with_projection=True)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = _t5_encoder(len(tokenizer_3), 32)
    vae = _tiny_vae(latent_channels)
    pipe = pipeline_class(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe, dtype, device)


def tiny_sd35_pipeline(num_layers: int = 3, dual_attention_layers: tuple[int, ...] = (0, 1), **kwargs):
    """A tiny SD3.5-style pipeline: RMS qk-norm and SD3.5-medium's dual-attention ``attn2`` blocks."""
    return tiny_sd3_pipeline(
        num_layers=num_layers, qk_norm="rms_norm", dual_attention_layers=dual_attention_layers, **kwargs
    )


def tiny_flux_transformer(num_layers: int = 2, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
                          seed: int = 0):
    """A randomly initialised FluxTransformer2DModel (4 packed channels, RoPE axes 4+6+6), in eval mode."""
    from diffusers import FluxTransformer2DModel

    if head_dim != 16:
        raise ValueError("the tiny Flux transformer's RoPE axes (4, 6, 6) need head_dim=16")
    return _tiny_transformer(
        FluxTransformer2DModel, seed, num_layers, heads, head_dim,
        patch_size=1,
        in_channels=4,
        num_single_layers=num_single_layers,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_flux_pipeline(
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    pipeline_class=None,
):
    """A tiny FluxPipeline (or ``pipeline_class``): ``num_layers`` double-stream and ``num_single_layers``
    single-stream blocks, a tiny CLIP (pooled) and T5 encoder, VAE scale factor 2 with 1 latent channel
    (packed 2×2 into 4), so an image of H×W pixels gives (H/4)·(W/4) image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipeline_class = pipeline_class or FluxPipeline
    transformer = tiny_flux_transformer(num_layers, num_single_layers, heads, 16, seed)
    clip_tok = tiny_clip_tokenizer()
    t5_tok = tiny_t5_tokenizer()
    _seed_all(seed + 1)
    text_encoder = _clip_text_encoder(len(clip_tok), 32, with_projection=False)
    text_encoder_2 = _t5_encoder(len(t5_tok), 32)
    vae = _tiny_vae(1)
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe, dtype, device)


__all__ = [
    "WORDS",
    "SPLIT_WORDS",
    "tiny_clip_tokenizer",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_sd35_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd3_transformer",
    "tiny_t5_tokenizer",
    "tokenizer_folder",
]
