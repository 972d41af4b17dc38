"""Tiny, randomly initialised Flux.2 (klein) and Qwen-Image pipelines built entirely offline.

The companions of :mod:`seg4diff_fast.testing` for the two newer MM-DiT families: the real diffusers
pipeline classes (``Flux2KleinPipeline``, ``QwenImagePipeline``) with tiny configs, a byte-level BPE
Qwen tokenizer built in code (written to a temporary folder once per process and loaded with
``Qwen2Tokenizer``, the class the real checkpoints use), tiny Qwen3 / Qwen2.5-VL text encoders and
tiny VAEs. The images are noise; the shapes, the templates and the code paths are real.

Both pipelines use a VAE scale factor of 2 and pack latents 2×2, so **an image of H×W pixels gives
(H/4)·(W/4) image tokens** (32×32 → 8×8 = 64), and both put the text first in the joint sequence the
transformer attends over: ``[text; image]``.

Where the prompt's tokens sit (see :func:`prompt_token_span`, which computes it from the tokenizer):

* **Flux.2 klein** (``Flux2KleinPipeline``): the prompt goes through the Qwen3 chat template with
  ``add_generation_prompt=True, enable_thinking=False``::

      <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n

  i.e. 3 template tokens before the prompt (``<|im_start|>``, ``user``, ``\\n``) and 9 after it
  (``<|im_end|> \\n <|im_start|> assistant \\n <think> \\n\\n </think> \\n\\n``); in general the
  number before is ``len(tokenizer(template rendered up to the prompt).input_ids)``. The tokenizer
  pads on the right to ``max_sequence_length`` (default 512), so the transformer's text length is
  always ``max_sequence_length`` whatever the prompt, and **no attention mask reaches the
  transformer** (the pad tokens, ``<|endoftext|>``, are attended like any other text token). The
  text features are hidden states (9, 18, 27) of the encoder, concatenated: 3 × 16 = 48 channels.
  If a checkpoint's tokenizer padded on the left, the prompt would start at
  ``max_sequence_length - n_tokens + 3`` instead. With klein *base* (``is_distilled=False``) and
  ``guidance_scale > 1`` (default 4.0) the transformer runs twice per step, the prompt first, then
  the empty prompt "" (same text length, prompt span empty); distilled klein runs once.
* **Qwen-Image** (``QwenImagePipeline``): the prompt is formatted into
  ``pipe.prompt_template_encode`` and the first ``drop_idx = pipe.prompt_template_encode_start_idx
  = 34`` tokens (the system prefix up to ``<|im_start|>user\\n``) are dropped after encoding; the
  tiny tokenizer knows every word of that prefix whole, so it is exactly 34 tokens, as with the real
  tokenizer. The prompt therefore starts at text position 0 and is followed by 5 template tokens
  (``<|im_end|> \\n <|im_start|> assistant \\n``): text length = prompt tokens + 5 (cut at
  ``max_sequence_length``). There is no padding for a single prompt; the pipeline builds an
  ``encoder_hidden_states_mask`` but **drops it (passes None) when it is all ones**, i.e. for one
  prompt or a batch of equally long ones; a batch of prompts of different lengths is right-padded
  with zeros and the mask (B, L) is passed. Guidance (a second call per step, with the negative
  prompt's own text length) runs only with ``true_cfg_scale > 1`` and a ``negative_prompt``. Beware:
  Qwen-Image's ``shift_terminal`` makes a 1-step schedule NaN (diffusers' own behaviour); use ≥ 2 steps.

In both templates the prompt follows a newline, so its first word is tokenised without a leading
space (``a``, ``Ġred``, ``Ġcat``), exactly as ``tokenizer(prompt)`` alone tokenises it.

Flux.2 [dev] (``Flux2Pipeline``) is not built here: its ``tokenizer`` component is a
``PixtralProcessor``, which transformers 5 refuses to instantiate without torchvision (not installed in
this environment: ``@requires(backends=("torchvision", "torch"))``), and a plain tokenizer in its place
would give a pipeline whose components differ from the real checkpoints'. Building it would also need
a hand-written Mistral "tekken"-style tokenizer and Mistral-Small chat template (content as a list of
parts, fixed ``SYSTEM_MESSAGE``) that cannot be checked against the real files offline, and a
``Mistral3ForConditionalGeneration`` of ≥ 31 layers (hidden states (10, 20, 30)). Its transformer is
the same ``Flux2Transformer2DModel`` as klein's; only the text side differs.

Calling convention: ``Flux2KleinPipeline.__call__`` takes ``image`` as its first positional argument,
so the prompt must be passed by keyword, ``pipe(prompt="a red cat", ...)`` (``pipe("a red cat")``
treats the string as the image and fails); ``QwenImagePipeline`` takes the prompt first.

Example:
    >>> import torch
    >>> from seg4diff_fast.testing import tiny_qwenimage_pipeline
    >>> pipe = tiny_qwenimage_pipeline()
    >>> image = pipe(prompt="a red cat", num_inference_steps=2, height=32, width=32,
    ...              generator=torch.Generator().manual_seed(0)).images[0]
    >>> image.size
    (32, 32)
"""

from __future__ import annotations

import os
import tempfile

import torch

from .tiny import _VAE_LAYOUT, SPLIT_WORDS, WORDS, _finish, _seed_all, _tiny_transformer

# Words the tiny Qwen tokenizer knows whole, with and without a leading space, on top of WORDS
# (SPLIT_WORDS, e.g. "sofa" → "so" + "fa", stay split in two, to exercise sub-word merging).
EXTRA_WORDS = (
    "circle", "square", "triangle", "background", "yellow", "purple", "orange", "white", "black", "cat", "sofa",
)
# Every word of the Qwen-Image system prefix and of the chat templates, so that the prefix is exactly
# ``drop_idx`` = 34 tokens, as with the real Qwen2.5-VL tokenizer.
_TEMPLATE_WORDS = (
    "system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape", "size",
    "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background",
)
# Special tokens, in the real Qwen order, after the BPE vocabulary; ``<think>``/``</think>`` are
# ordinary added tokens (not special), as in Qwen3.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_ADDED_TOKENS = ("<think>", "</think>")

# Qwen3's chat template, reduced to plain messages (no tools): system and user turns and the
# generation prompt render exactly as with the real one, including the empty think block that
# ``enable_thinking=False`` appends; assistant turns always show their (possibly empty) think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n')"
    " + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
# Qwen2-VL's chat template for text-only messages (QwenImagePipeline formats its own template and
# never calls this; it is there so the tokenizer looks like the real one).
QWEN2VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_QWEN_TOKENIZER_DIR: str | None = None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-token: repeatedly merge the lowest-ranked adjacent pair."""
    syms = list(symbols)
    while len(syms) > 1:
        best = None
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return syms


def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A deterministic byte-level BPE vocabulary (~490 tokens): the 256 bytes, then the merges that
    make every listed word one token, with and without a leading space (``Ġ``), and ``\\n\\n``.

    Merges are added by simulation: for each target piece, BPE it with the merges so far and append a
    merge for its first adjacent pair until it is a single token. A merge appended later has the
    highest rank, so it never changes how an earlier piece is merged.
    """
    b2u = _bytes_to_unicode()

    def enc(s: str) -> str:
        return "".join(b2u[b] for b in s.encode("utf-8"))

    vocab = {b2u[b]: i for i, b in enumerate(sorted(b2u))}
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []

    def ensure(piece: str) -> None:
        while True:
            segs = _bpe(piece, ranks)
            if len(segs) == 1:
                return
            pair = (segs[0], segs[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))

    # split words first: their pieces must exist before any longer word could chain through them
    for first, rest in SPLIT_WORDS.values():
        for piece in (first, rest, " " + first):
            ensure(enc(piece))
    words: list[str] = []
    for w in (*WORDS, *EXTRA_WORDS, *_TEMPLATE_WORDS):
        if w not in SPLIT_WORDS and w not in words:
            words.append(w)
    for w in words:
        ensure(enc(w))
        ensure(enc(" " + w))
    ensure(enc("\n\n"))
    for w, pieces in SPLIT_WORDS.items():  # guard: the split words must still come out in two
        assert _bpe(enc(w), ranks) == [enc(p) for p in pieces], w
    for tok in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS:
        vocab[tok] = len(vocab)
    return vocab, merges


def _write_qwen_tokenizers(folder: str) -> None:
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab_and_merges()
    for sub, template in (("qwen3", QWEN3_CHAT_TEMPLATE), ("qwen2_5_vl", QWEN2VL_CHAT_TEMPLATE)):
        tok = Qwen2Tokenizer(
            vocab=dict(vocab), merges=list(merges), unk_token=None, bos_token=None, eos_token="<|im_end|>",
            pad_token="<|endoftext|>", model_max_length=131072,
        )
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
        tok.chat_template = template
        tok.save_pretrained(os.path.join(folder, sub))


def qwen_tokenizer_folder() -> str:
    """The temporary folder holding the tiny Qwen tokenizers (``qwen3/``, ``qwen2_5_vl/``), written once."""
    global _QWEN_TOKENIZER_DIR
    if _QWEN_TOKENIZER_DIR is None or not os.path.isdir(_QWEN_TOKENIZER_DIR):
        folder = tempfile.mkdtemp(prefix="seg4diff_tiny_qwen_tok_")
        _write_qwen_tokenizers(folder)
        _QWEN_TOKENIZER_DIR = folder
    return _QWEN_TOKENIZER_DIR


def tiny_qwen_tokenizer(flavour: str = "qwen3"):
    """A ``Qwen2Tokenizer`` over the tiny byte-level BPE vocabulary (right padding, pad ``<|endoftext|>``,
    eos ``<|im_end|>``). ``flavour`` "qwen3" carries Qwen3's chat template (``enable_thinking``),
    "qwen2_5_vl" Qwen2-VL's; the vocabulary is the same."""
    from transformers import Qwen2Tokenizer

    if flavour not in ("qwen3", "qwen2_5_vl"):
        raise ValueError(f"unknown tokenizer flavour {flavour!r}")
    return Qwen2Tokenizer.from_pretrained(os.path.join(qwen_tokenizer_folder(), flavour))


# --------------------------------------------------------------------------------------------- Flux.2

# Hidden-state indices the klein pipeline reads from its Qwen3 encoder (the pipeline's default).
FLUX2_KLEIN_TEXT_LAYERS = (9, 18, 27)


def tiny_flux2_transformer(num_layers: int = 2, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
                           seed: int = 0, in_channels: int = 16, joint_attention_dim: int = 48):
    """A randomly initialised ``Flux2Transformer2DModel`` (klein-style: no guidance embedding), in eval mode.

    Four RoPE axes (t, h, w, l) of ``head_dim/4`` each; ``in_channels`` = 4 × the VAE's latent
    channels (2×2 patchified); ``joint_attention_dim`` = 3 × the text encoder's hidden size.
    """
    from diffusers import Flux2Transformer2DModel

    if head_dim % 8:
        raise ValueError("head_dim must be a multiple of 8 (four even RoPE axes)")
    return _tiny_transformer(
        Flux2Transformer2DModel, seed, num_layers, heads, head_dim,
        patch_size=1,
        in_channels=in_channels,
        num_single_layers=num_single_layers,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(head_dim // 4,) * 4,
        rope_theta=2000,
        guidance_embeds=False,
    )


def _tiny_flux2_vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**_VAE_LAYOUT, latent_channels=latent_channels, patch_size=(2, 2))
    # the pipeline (de)normalises the 2×2-patchified latents with the batch-norm running stats;
    # give them non-trivial values so that path is exercised (they are buffers: saved and loaded)
    g = torch.Generator().manual_seed(seed + 7)
    n = vae.bn.num_features
    vae.bn.running_mean.copy_(0.1 * torch.randn(n, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return vae


def _tiny_qwen3_encoder(vocab_size: int, hidden: int, num_layers: int, pad_id: int, eos_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=pad_id,
    )
    return Qwen3ForCausalLM(config)


def _exponential_shift_scheduler(shift: float, max_shift: float, max_image_seq_len: int, **extra):
    """Flow-matching Euler with exponential dynamic shifting, ``mu`` from the image token count: 0.5 at 256
    tokens to ``max_shift`` at ``max_image_seq_len`` (the schedulers of Flux.2 klein and Qwen-Image)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=shift,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=max_shift,
        base_image_seq_len=256,
        max_image_seq_len=max_image_seq_len,
        time_shift_type="exponential",
        **extra,
    )


def flux2_klein_scheduler():
    """FLUX.2 klein's scheduler: flow-matching Euler with (exponential) dynamic shifting; the pipeline
    computes ``mu`` itself from the image token count and the number of steps."""
    return _exponential_shift_scheduler(shift=3.0, max_shift=1.15, max_image_seq_len=4096)


def tiny_flux2_pipeline(
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    text: str = "qwen3",
    is_distilled: bool = False,
):
    """A tiny ``Flux2KleinPipeline``: ``num_layers`` double-stream and ``num_single_layers`` single-stream
    blocks (head_dim 16), a 28-layer Qwen3 encoder of width 16 (the pipeline stacks hidden states
    (9, 18, 27), as for the real klein, into 48 text channels), an ``AutoencoderKLFlux2`` with VAE
    scale factor 2 and 4 latent channels (patchified 2×2 into 16), and klein's scheduler.

    Image tokens: an image of H×W pixels gives (H/4)·(W/4) image tokens, joint sequence ``[text; image]``.

    Text: the Qwen3 chat template (``enable_thinking=False``) puts 3 tokens before the prompt
    (``<|im_start|> user \\n``), so the prompt's tokens start at text position 3 (in general: the token
    count of the template rendered up to the prompt; :func:`prompt_token_span` computes it), followed by
    9 template tokens and ``<|endoftext|>`` padding on the right up to ``max_sequence_length`` (default
    512) — the transformer's text length is always ``max_sequence_length``. No attention mask is given
    to the transformer; padding is attended. With ``is_distilled=False`` (klein *base*, the default)
    and the default ``guidance_scale=4.0``, every step calls the transformer twice, first with the
    prompt, then with the empty prompt "" (same text length), each with batch 1 per image;
    ``is_distilled=True`` (klein 4B/9B) or ``guidance_scale<=1`` gives one call per step.

    Call it with the prompt by keyword: ``pipe(prompt="a red cat", ...)`` (the first positional
    argument of ``Flux2KleinPipeline.__call__`` is ``image``).
    """
    from diffusers import Flux2KleinPipeline

    if text != "qwen3":
        raise ValueError(
            f"text={text!r}: only the klein (Qwen3) text side is built; Flux2Pipeline's Mistral3/Pixtral one is "
            "not (see the module docstring)"
        )
    latent_channels = 4
    hidden = 16
    transformer = tiny_flux2_transformer(
        num_layers, num_single_layers, heads, 16, seed, in_channels=4 * latent_channels,
        joint_attention_dim=len(FLUX2_KLEIN_TEXT_LAYERS) * hidden,
    )
    tokenizer = tiny_qwen_tokenizer("qwen3")
    _seed_all(seed + 1)
    text_encoder = _tiny_qwen3_encoder(
        len(tokenizer), hidden, max(FLUX2_KLEIN_TEXT_LAYERS) + 1, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    vae = _tiny_flux2_vae(latent_channels, seed)
    pipe = Flux2KleinPipeline(
        scheduler=flux2_klein_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    return _finish(pipe, dtype, device)


# ----------------------------------------------------------------------------------------- Qwen-Image


def tiny_qwenimage_transformer(num_layers: int = 2, heads: int = 2, head_dim: int = 16, seed: int = 0,
                               in_channels: int = 16, joint_attention_dim: int = 32):
    """A randomly initialised ``QwenImageTransformer2DModel`` (patch 2, RoPE axes (frame, h, w) summing to
    ``head_dim``), in eval mode. ``in_channels`` = 4 × the VAE's ``z_dim`` (packed 2×2);
    ``joint_attention_dim`` = the text encoder's hidden size."""
    from diffusers import QwenImageTransformer2DModel

    if head_dim % 8:
        raise ValueError("head_dim must be a multiple of 8 (three even RoPE axes)")
    # real: (16, 56, 56) for head_dim 128; here the frame axis gets a quarter, h and w the rest: (4, 6, 6)
    frame = 2 * (head_dim // 8)
    height = 2 * ((head_dim - frame) // 4)
    axes = (frame, height, head_dim - frame - height)
    return _tiny_transformer(
        QwenImageTransformer2DModel, seed, num_layers, heads, head_dim,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels // 4,
        joint_attention_dim=joint_attention_dim,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )


def _tiny_qwenimage_vae(z_dim: int, seed: int):
    from diffusers import AutoencoderKLQwenImage

    g = torch.Generator().manual_seed(seed + 7)
    mean = (0.5 * torch.randn(z_dim, generator=g)).tolist()
    std = (1.0 + torch.rand(z_dim, generator=g)).tolist()
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False],  # one (spatial) downsampling: vae_scale_factor 2
        latents_mean=[round(m, 4) for m in mean],
        latents_std=[round(s, 4) for s in std],
    )


def _tiny_qwen25vl_encoder(tokenizer, hidden: int, num_layers: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    half = hidden // 2 // 2  # rotary pairs per head (head_dim = hidden/2); real: [16, 24, 24] of 64
    mrope_section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "max_window_layers": num_layers,
            "rope_parameters": {
                "rope_type": "default", "rope_theta": 1000000.0,
                "mrope_section": mrope_section,
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 8,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def qwenimage_scheduler():
    """Qwen-Image's scheduler: flow-matching Euler, exponential dynamic shifting (mu from the image
    token count between 256 and 8192 tokens, 0.5 → 0.9), terminal shift 0.02."""
    return _exponential_shift_scheduler(shift=1.0, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02)


def tiny_qwenimage_pipeline(
    num_layers: int = 2,
    heads: int = 2,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
):
    """A tiny ``QwenImagePipeline``: ``num_layers`` dual-stream blocks (head_dim 16), a 2-layer
    ``Qwen2_5_VLForConditionalGeneration`` of text width 32 (plus a 1-block vision tower, unused), an
    ``AutoencoderKLQwenImage`` with VAE scale factor 2 and ``z_dim`` 4 (packed 2×2 into 16), and
    Qwen-Image's scheduler.

    Image tokens: an image of H×W pixels gives (H/4)·(W/4) image tokens, joint sequence ``[text; image]``.

    Text: the pipeline drops the first ``drop_idx`` = 34 tokens (the system prefix through
    ``<|im_start|>user\\n``; exactly 34 with this tokenizer too), so the prompt's tokens start at text
    position 0, followed by 5 template tokens (``<|im_end|> \\n <|im_start|> assistant \\n``): text
    length = prompt tokens + 5, cut at ``max_sequence_length`` (default 512). The last hidden state of
    the encoder is used. ``encoder_hidden_states_mask`` is None for a single prompt (the pipeline drops an
    all-ones mask); only a batch of prompts of different lengths is padded and passes a (B, L) mask.
    Classifier-free guidance runs only with ``true_cfg_scale > 1`` and a ``negative_prompt``: then a
    second transformer call per step with the negative prompt's own text length.
    """
    from diffusers import QwenImagePipeline

    z_dim = 4
    hidden = 32
    transformer = tiny_qwenimage_transformer(
        num_layers, heads, 16, seed, in_channels=4 * z_dim, joint_attention_dim=hidden
    )
    tokenizer = tiny_qwen_tokenizer("qwen2_5_vl")
    _seed_all(seed + 1)
    text_encoder = _tiny_qwen25vl_encoder(tokenizer, hidden, 2)
    vae = _tiny_qwenimage_vae(z_dim, seed)
    pipe = QwenImagePipeline(
        scheduler=qwenimage_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _finish(pipe, dtype, device)


# ------------------------------------------------------------------------------------ prompt positions


def _token_span(tokenizer, text: str, char_start: int, char_end: int, max_length: int | None) -> tuple[int, int, int]:
    """(first token index, token count, total tokens) of the tokens of ``text`` overlapping
    ``[char_start, char_end)``, after truncation to ``max_length``."""
    enc = tokenizer(text, return_offsets_mapping=True, truncation=max_length is not None, max_length=max_length)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < char_end and e > char_start and e > s]
    n = len(enc["input_ids"])
    if not inside:  # an empty (or truncated-away) prompt: where it would start
        return sum(1 for _, e in enc["offset_mapping"] if e <= char_start), 0, n
    return inside[0], inside[-1] - inside[0] + 1, n


_SENTINEL = "\u2063SEG4DIFF\u2063"


def prompt_token_span(pipe, prompt: str, max_sequence_length: int | None = None) -> tuple[int, int]:
    """``(start, length)``: where ``prompt``'s tokens sit in the text sequence the transformer receives.

    Computed from the pipeline's own tokenizer and template, so it holds for the real checkpoints
    too. ``Flux2KleinPipeline``: the chat-templated text, padded to ``max_sequence_length`` (default
    512; with left padding the start moves by the padding); ``QwenImagePipeline``: the formatted
    template minus the ``drop_idx`` dropped prefix tokens, cut at ``max_sequence_length`` (default 512,
    the ``__call__`` default). A prompt cut by truncation gives the part that is left.
    """
    from diffusers import Flux2KleinPipeline, QwenImagePipeline

    tok = pipe.tokenizer
    if isinstance(pipe, Flux2KleinPipeline):
        max_len = 512 if max_sequence_length is None else max_sequence_length

        def render(p: str) -> str:
            return tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )

        char_start = render(_SENTINEL).index(_SENTINEL)
        text = render(prompt)
        if text[:char_start] != render(_SENTINEL)[:char_start]:
            raise ValueError("the chat template does not put the prompt at a fixed place")
        start, length, n = _token_span(tok, text, char_start, char_start + len(prompt), max_len)
        if tok.padding_side == "left":
            start += max_len - n
        return start, length
    if isinstance(pipe, QwenImagePipeline):
        template = pipe.prompt_template_encode
        drop_idx = pipe.prompt_template_encode_start_idx
        max_len = 512 if max_sequence_length is None else max_sequence_length
        char_start = template.index("{}")
        text = template.format(prompt)
        start, length, _ = _token_span(
            tok, text, char_start, char_start + len(prompt), pipe.tokenizer_max_length + drop_idx
        )
        start -= drop_idx
        if start < 0:
            raise ValueError(f"the prompt starts inside the {drop_idx} dropped template tokens")
        length = max(0, min(length, max_len - start))
        return min(start, max_len), length
    raise TypeError(f"prompt_token_span: unsupported pipeline {type(pipe).__name__}")


def text_sequence_length(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    """The text length the transformer receives for ``prompt`` (one prompt, no batch padding):
    ``max_sequence_length`` (default 512) for Flux.2 klein; prompt tokens + 5 template tokens, cut at
    ``max_sequence_length``, for Qwen-Image."""
    from diffusers import Flux2KleinPipeline, QwenImagePipeline

    max_len = 512 if max_sequence_length is None else max_sequence_length
    if isinstance(pipe, Flux2KleinPipeline):
        return max_len
    if isinstance(pipe, QwenImagePipeline):
        drop_idx = pipe.prompt_template_encode_start_idx
        ids = pipe.tokenizer(
            pipe.prompt_template_encode.format(prompt), truncation=True,
            max_length=pipe.tokenizer_max_length + drop_idx,
        ).input_ids
        return min(len(ids) - drop_idx, max_len)
    raise TypeError(f"text_sequence_length: unsupported pipeline {type(pipe).__name__}")


__all__ = [
    "EXTRA_WORDS",
    "FLUX2_KLEIN_TEXT_LAYERS",
    "QWEN3_CHAT_TEMPLATE",
    "flux2_klein_scheduler",
    "prompt_token_span",
    "qwen_tokenizer_folder",
    "qwenimage_scheduler",
    "text_sequence_length",
    "tiny_flux2_pipeline",
    "tiny_flux2_transformer",
    "tiny_qwen_tokenizer",
    "tiny_qwenimage_pipeline",
    "tiny_qwenimage_transformer",
]
