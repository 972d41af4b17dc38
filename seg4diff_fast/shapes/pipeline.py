"""The ShapesWorld model: a real diffusers ``StableDiffusion3Pipeline`` built from a small config.

Design (from the facts of issue #4):

- **Pixel-space-like VAE.** A real ``AutoencoderKL`` with one encoder/decoder block and no
  downsampling (``vae_scale_factor`` 1, no mid-block attention): a 32×32 image becomes a 32×32×4
  latent, patchified 2×2 by the transformer into 16×16 image tokens. It is trained briefly as an
  autoencoder (``train.py``'s first stage); ``shift_factor`` / ``scaling_factor`` are then set from the
  latent statistics, as SD3's are.
- **One distinct state per word.** Both CLIP encoders are ``CLIPTextModelWithProjection`` with ONE
  hidden layer by default (``text_layers=2``, the shipped model, reads the first layer's output instead:
  each word then also sees the words before it through CLIP's causal attention, a shape its colour).
  The SD3 pipeline reads ``hidden_states[-2]``, which for a 1-layer CLIP is the embedding
  output itself: token embedding + position embedding, with no causal mixing at all. Each word's
  state is a learned embedding (trained jointly with the transformer); the layer and the projection
  only make the (unused) pooled vector. Token embeddings start at N(0, 1), so words are distinct from
  the pads and the zero T5 positions from step 0; position embeddings start small (N(0, 0.1)).
  Both tokenizers share one vocabulary: the world's words whole (:data:`~.world.WORDS`, "background"
  included) plus single characters.
- **Pooled shortcut closed.** ``transformer.time_text_embed.text_embedder.linear_2`` is zeroed and the
  whole ``text_embedder`` frozen, so the pooled text vector adds exactly 0 to the AdaLN conditioning:
  the caption can only reach the image through joint attention (probe 3 of the issue: otherwise all of
  it goes through AdaLN and attention grounding never forms).
- **Text keys.** ``clip_length`` CLIP positions + ``t5_length`` zero T5 positions (77 + 77 by default,
  the paper's setting and the segmenter's default); T5 itself is absent (``text_encoder_3=None``).
  Shorter ones (e.g. 16 + 0) leave the caption's words almost alone as text keys, as in issue #4's
  probe 1; the segmenter must then be built with the same ``t5_length``.
- ``SD3Transformer2DModel``: ``num_layers`` × ``heads`` × ``head_dim`` (default 6 × 4 × 16, ~1 M
  parameters), optional qk-norm; ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` as SD3.

Example:
    >>> from seg4diff_fast.shapes.pipeline import ShapesConfig, build_pipeline
    >>> pipe = build_pipeline(ShapesConfig(num_layers=2, heads=2, head_dim=8))
    >>> pipe.vae_scale_factor, pipe.text_encoder_3 is None
    (1, True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .shipped import WEIGHTS_DIR
from .world import WORDS

__all__ = ["BPE_CHARS", "ShapesConfig", "WEIGHTS_DIR", "build_pipeline", "close_pooled_shortcut",
           "load_shapes_pipeline", "save_pipeline", "trainable_parameters", "world_tokenizer", "write_clip_bpe"]

# the characters a tiny CLIP vocabulary spells unknown words with
BPE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


@dataclass
class ShapesConfig:
    """Everything that defines the ShapesWorld pipeline's architecture.

    Attributes:
        size: world resolution in pixels (the segmenter's ``resolution``).
        num_layers, heads, head_dim: transformer blocks, heads per block, head width.
        qk_norm: None or ``"rms_norm"`` (SD3.5-style).
        text_dim: hidden width of each CLIP encoder (joint_attention_dim = 2 · text_dim).
        text_layers: CLIP layers. The pipeline reads ``hidden_states[-2]``: with 1 layer that is the
            embedding output (one unmixed vector per word); with 2 it is the first layer's output, where
            CLIP's causal attention lets a word see the words before it (a noun sees its colour), as in
            real CLIP. Trained jointly either way.
        latent_channels: VAE latent channels.
        vae_channels: VAE block width.
        t5_length: zero T5 positions appended to the CLIP positions (training and segmenter).
        clip_length: CLIP positions (tokenizer ``model_max_length`` = encoder positions); 77 as SD3. A short
            one (e.g. 16: the longest caption is 12 tokens) leaves few padding keys (issue #4, probe 1).
        scheduler_shift: ``FlowMatchEulerDiscreteScheduler`` shift.
        token_init_std, position_init_std: init scale of the CLIP token / position embeddings.
        seed: initialisation seed.
    """

    size: int = 32
    num_layers: int = 6
    heads: int = 4
    head_dim: int = 16
    qk_norm: str | None = None
    text_dim: int = 32
    text_layers: int = 1
    latent_channels: int = 4
    vae_channels: int = 16
    t5_length: int = 77
    clip_length: int = 77
    scheduler_shift: float = 3.0
    token_init_std: float = 1.0
    position_init_std: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapesConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def write_clip_bpe(folder: str, pieces: Iterable[tuple[str, bool]], chars: str = BPE_CHARS) -> None:
    """CLIP BPE files (``vocab.json``, ``merges.txt``) in ``folder``: BOS and EOS, every one of ``chars`` alone
    and word-final (``</w>``), then each ``(piece, word_final)`` merged left to right into one token, its last
    symbol carrying ``</w>`` when word-final. A merge is listed once, where it first appears (earlier pieces
    outrank later ones).

    Example:
        >>> import json, os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> write_clip_bpe(folder, [("cat", True), ("car", True), ("so", False)], chars="acorst")
        >>> open(os.path.join(folder, "merges.txt")).read().splitlines()[1:]
        ['c a', 'ca t</w>', 'ca r</w>', 's o']
        >>> len(json.load(open(os.path.join(folder, "vocab.json"))))  # 2 + 6 × 2 characters + ca, cat, car, so
        18
    """
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for piece, word_final in pieces:
        syms = list(piece)
        if word_final:
            syms[-1] += "</w>"
        cur = syms[0]
        for s in syms[1:]:
            if f"{cur} {s}" not in merges:
                merges.append(f"{cur} {s}")
            cur += s
            vocab.setdefault(cur, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def world_tokenizer(length: int = 77) -> Any:
    """A ``CLIPTokenizer`` (``length`` positions, BOS first, pad = EOS) that knows every world word whole."""
    from transformers import CLIPTokenizer

    folder = tempfile.mkdtemp(prefix="shapesworld_tok_")
    # every character and the world's words whole, longest first: their merges outrank sub-pairs
    write_clip_bpe(folder, ((w, True) for w in sorted(WORDS, key=len, reverse=True)))
    return CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"),
                         model_max_length=length)


def _text_encoder(vocab_size: int, cfg: ShapesConfig) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=1, max_position_embeddings=cfg.clip_length,
        projection_dim=cfg.text_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    )
    enc = CLIPTextModelWithProjection(config)
    emb = enc.text_model.embeddings
    with torch.no_grad():
        emb.token_embedding.weight.normal_(0.0, cfg.token_init_std)
        emb.position_embedding.weight.normal_(0.0, cfg.position_init_std)
    return enc


def _vae(cfg: ShapesConfig) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(cfg.vae_channels,), layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=4, sample_size=cfg.size, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, shift_factor=0.0, scaling_factor=1.0,
    )


def close_pooled_shortcut(transformer: Any) -> None:
    """Zero ``time_text_embed.text_embedder``'s output layer and freeze it: pooled text adds exactly 0."""
    te = transformer.time_text_embed.text_embedder
    with torch.no_grad():
        te.linear_2.weight.zero_()
        te.linear_2.bias.zero_()
    te.requires_grad_(False)


def build_pipeline(config: ShapesConfig | None = None) -> Any:
    """A freshly initialised ShapesWorld ``StableDiffusion3Pipeline`` (see the module docs).

    Components are in train mode with gradients on, except the frozen parts (the pooled path, the unused
    CLIP layer and projection); :func:`trainable_parameters` lists what training updates.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    cfg = config or ShapesConfig()
    if cfg.size % 2:
        raise ValueError(f"size must be even (patch 2), got {cfg.size}")
    torch.manual_seed(cfg.seed)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.size, patch_size=2, in_channels=cfg.latent_channels, num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.text_dim,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * cfg.text_dim,
        out_channels=cfg.latent_channels, pos_embed_max_size=max(32, cfg.size), qk_norm=cfg.qk_norm,
    )
    close_pooled_shortcut(transformer)
    tok = world_tokenizer(cfg.clip_length)
    torch.manual_seed(cfg.seed + 1)
    te1, te2 = _text_encoder(len(tok), cfg), _text_encoder(len(tok), cfg)
    for te in (te1, te2):  # only the embeddings feed the transformer (hidden_states[-2])
        te.requires_grad_(False)
        te.text_model.embeddings.requires_grad_(True)
        for layer in te.text_model.encoder.layers[:-1]:  # layers before the last feed hidden_states[-2]
            layer.requires_grad_(True)
    torch.manual_seed(cfg.seed + 2)
    vae = _vae(cfg)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.scheduler_shift), vae=vae,
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=world_tokenizer(cfg.clip_length),
        text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trainable_parameters(pipe: Any) -> list[torch.nn.Parameter]:
    """The transformer's and the CLIP embeddings' parameters that require grad (not the VAE)."""
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        params += [p for p in te.parameters() if p.requires_grad]
    return params


def save_pipeline(pipe: Any, path: str = WEIGHTS_DIR, config: ShapesConfig | None = None) -> str:
    """``save_pretrained`` (safetensors) into ``path``, plus ``shapes_config.json`` when given."""
    pipe.save_pretrained(path, safe_serialization=True)
    if config is not None:
        with open(os.path.join(path, "shapes_config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1)
    return path


def load_shapes_pipeline(path: str | None = None, dtype: str = "float32", device: str | None = "cpu") -> Any:
    """The saved ShapesWorld pipeline (default: the package's ``weights/``) via the stock
    ``StableDiffusion3Pipeline.from_pretrained`` (no T5), in eval mode with gradients off."""
    from ..reader.loading import ModelNotAvailableError
    from ..reader.loading import load_pipeline as _load

    path = path or WEIGHTS_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelNotAvailableError(f"no ShapesWorld pipeline at {path} (train one: python -m "
                                     "seg4diff_fast.shapes.train --out DIR)")
    pipe = _load(path, dtype=dtype, device=device)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval().requires_grad_(False)
    return pipe


def __getattr__(name: str):  # the 0.1.0 name, kept importable
    if name == "load_pipeline":
        import warnings

        warnings.warn("seg4diff_fast.shapes.load_pipeline is deprecated; use load_shapes_pipeline (the name says "
                      "which pipeline; seg4diff_fast.reader.load_pipeline loads any folder)", DeprecationWarning,
                      stacklevel=2)
        return load_shapes_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
