"""The tiny offline Flux.2 klein and Qwen-Image pipelines: generation, save/load round trip, seeding,
the tiny Qwen tokenizer, and where the prompt's tokens sit in the transformer's text sequence."""

import PIL.Image
import pytest
import torch

from seg4diff_fast.testing import (
    EXTRA_WORDS,
    SPLIT_WORDS,
    WORDS,
    prompt_token_span,
    text_sequence_length,
    tiny_flux2_pipeline,
    tiny_flux2_transformer,
    tiny_qwen_tokenizer,
    tiny_qwenimage_pipeline,
    tiny_qwenimage_transformer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("flux2", "qwenimage")
PROMPTS = ("a red cat", "a cat on a sofa at sunset", "Purple circle, yellow square and orange triangle!", "x")


@pytest.fixture(scope="module")
def pipes():
    return {"flux2": tiny_flux2_pipeline(), "qwenimage": tiny_qwenimage_pipeline()}


def _gen(pipe, seed=0, **kw):
    # Flux2KleinPipeline.__call__ takes ``image`` first, so the prompt must go by keyword
    args = dict(prompt="a red cat", num_inference_steps=2, height=32, width=32, output_type="latent")
    args.update(kw)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


def _record_transformer_inputs(pipe):
    calls = []

    def pre(module, args, kwargs):
        calls.append({k: v for k, v in kwargs.items()
                      if k in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask")})

    return calls, pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("flavour", ["qwen3", "qwen2_5_vl"])
def test_tokenizer_keeps_words_whole(flavour):
    tok = tiny_qwen_tokenizer(flavour)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert 300 < len(tok) < 600
    for w in (*WORDS, *EXTRA_WORDS):
        for form in (w, " " + w):
            pieces = tok.convert_ids_to_tokens(tok(form).input_ids)
            if w in SPLIT_WORDS:
                first, rest = SPLIT_WORDS[w]
                assert pieces == [form[: len(form) - len(w)].replace(" ", "Ġ") + first, rest], (form, pieces)
            else:
                assert pieces == [form.replace(" ", "Ġ")], (form, pieces)
    pieces = tok.convert_ids_to_tokens(tok("a black cat on a white sofa").input_ids)
    assert pieces == ["a", "Ġblack", "Ġcat", "Ġon", "Ġa", "Ġwhite", "Ġso", "fa"]
    # anything else still encodes (byte-level fallback) and decodes back
    odd = "Zebra 42 ümlaut\tend"
    assert tok.decode(tok(odd).input_ids) == odd
    ids = tok.convert_tokens_to_ids
    assert ids("<|endoftext|>") + 1 == ids("<|im_start|>") == ids("<|im_end|>") - 1
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.padding_side == "right"
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok(special).input_ids == [ids(special)]
    assert tok.convert_ids_to_tokens(tok("\n\n").input_ids) == ["ĊĊ"]


def test_qwen3_chat_template_with_thinking_switch():
    tok = tiny_qwen_tokenizer("qwen3")
    messages = [{"role": "user", "content": "a red cat"}]
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert on == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n"
    pieces = tok.convert_ids_to_tokens(tok(off).input_ids)
    assert pieces == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcat", "<|im_end|>", "Ċ", "<|im_start|>",
                      "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]


def test_qwenimage_template_prefix_is_drop_idx_tokens(pipes):
    pipe = pipes["qwenimage"]
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34


# ---------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_image_and_latents(pipes, family):
    pipe = pipes[family]
    calls, handle = _record_transformer_inputs(pipe)
    try:
        image = pipe(prompt="a red cat", num_inference_steps=2, height=32, width=32,
                     generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        handle.remove()
    assert isinstance(image, PIL.Image.Image) and image.size == (32, 32)
    latents = _gen(pipe)
    assert torch.isfinite(latents).all()
    in_ch = pipe.transformer.config.in_channels
    # (H/4)·(W/4) image tokens for an H×W image
    assert all(c["hidden_states"].shape == (1, 8 * 8, in_ch) for c in calls)
    if family == "flux2":
        assert latents.shape == (1, in_ch // 4, 16, 16)  # unpacked, un-normalised VAE latents
        assert len(calls) == 4  # klein base + guidance 4: prompt then "" at each of the 2 steps
        assert all(c["encoder_hidden_states"].shape == (1, 512, 48) for c in calls)
        assert all("encoder_hidden_states_mask" not in c for c in calls)
    else:
        assert latents.shape == (1, 8 * 8, in_ch)  # packed
        assert len(calls) == 2
        n_text = text_sequence_length(pipe, "a red cat")
        assert n_text == 3 + 5
        assert all(c["encoder_hidden_states"].shape == (1, n_text, 32) for c in calls)
        assert all(c["encoder_hidden_states_mask"] is None for c in calls)


def test_flux2_distilled_and_short_text(pipes):
    pipe = tiny_flux2_pipeline(is_distilled=True)
    calls, handle = _record_transformer_inputs(pipe)
    try:
        _gen(pipe, max_sequence_length=16)
    finally:
        handle.remove()
    assert [c["encoder_hidden_states"].shape for c in calls] == [(1, 16, 48)] * 2
    assert text_sequence_length(pipe, "a red cat", max_sequence_length=16) == 16


def test_qwenimage_mask_only_for_unequal_batch(pipes):
    pipe = pipes["qwenimage"]
    calls, handle = _record_transformer_inputs(pipe)
    try:
        # (not 1 step: Qwen-Image's shift_terminal makes a 1-step schedule NaN, in diffusers itself)
        _gen(pipe, prompt=["a red cat", "a cat on a red sofa"])
        _gen(pipe, prompt=["a red cat", "a blue dog"])
    finally:
        handle.remove()
    mask = calls[0]["encoder_hidden_states_mask"]  # 3 and 7 prompt tokens, + 5 template tokens each
    assert calls[0]["encoder_hidden_states"].shape[:2] == mask.shape == (2, 7 + 5)
    assert mask.tolist() == [[1] * 8 + [0] * 4, [1] * 12]
    assert calls[2]["encoder_hidden_states_mask"] is None


# --------------------------------------------------------------------------------- round trip, seeds


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(pipes, family, tmp_path):
    import json

    pipe = pipes[family]
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == type(pipe).__name__
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "text_encoder", "vae"):
        a, b = pipe.components[name].state_dict(), loaded.components[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer("a red cat on a sofa").input_ids == pipe.tokenizer("a red cat on a sofa").input_ids
    assert loaded.tokenizer.chat_template == pipe.tokenizer.chat_template
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    # same weights; the loaded ones live in other (mmap'd) buffers, so CPU matmuls may round differently
    torch.testing.assert_close(_gen(loaded, 3), _gen(pipe, 3), rtol=1e-5, atol=1e-5)
    assert prompt_token_span(loaded, "a red cat") == prompt_token_span(pipe, "a red cat")


@pytest.mark.parametrize("make", [tiny_flux2_transformer, tiny_qwenimage_transformer])
def test_same_seed_same_weights(make):
    a, b, c = make(seed=5), make(seed=5), make(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


def test_same_seed_same_pipeline(pipes):
    for family, make in (("flux2", tiny_flux2_pipeline), ("qwenimage", tiny_qwenimage_pipeline)):
        again = make(seed=0)
        for name in ("transformer", "text_encoder", "vae"):
            a, b = pipes[family].components[name].state_dict(), again.components[name].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), (family, name)
        assert not any(p.requires_grad for p in again.transformer.parameters())
    vae = pipes["flux2"].vae
    assert not torch.equal(vae.bn.running_mean, torch.zeros_like(vae.bn.running_mean))  # normalisation exercised


# ---------------------------------------------------------------------------------- prompt positions


def _pipeline_text_ids(pipe, prompt, max_sequence_length=512):
    """The token ids of the text sequence the transformer receives, the way the pipeline makes them."""
    tok = pipe.tokenizer
    if type(pipe).__name__ == "Flux2KleinPipeline":
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        return tok(text, padding="max_length", truncation=True, max_length=max_sequence_length).input_ids
    drop = pipe.prompt_template_encode_start_idx
    ids = tok(pipe.prompt_template_encode.format(prompt)).input_ids[drop:]
    return ids[:max_sequence_length]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_token_span(pipes, family, prompt):
    pipe = pipes[family]
    tok = pipe.tokenizer
    start, length = prompt_token_span(pipe, prompt)
    ids = _pipeline_text_ids(pipe, prompt)
    # the prompt follows a newline in both templates: it is tokenised on its own, without a leading space
    assert ids[start:start + length] == tok(prompt).input_ids
    assert tok.decode(ids[start:start + length]) == prompt
    if family == "flux2":
        assert start == 3 and len(ids) == 512 == text_sequence_length(pipe, prompt)
        assert tok.convert_ids_to_tokens(ids[start + length:start + length + 9]) == [
            "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]
        assert set(ids[start + length + 9:]) == {tok.pad_token_id}
    else:
        assert start == 0 and len(ids) == length + 5 == text_sequence_length(pipe, prompt)


def test_prompt_token_span_truncation_and_left_padding(pipes):
    assert prompt_token_span(pipes["flux2"], "") == (3, 0)  # the unconditional pass of klein base
    assert prompt_token_span(pipes["qwenimage"], "") == (0, 0)
    long = " ".join(["red"] * 40)
    assert prompt_token_span(pipes["flux2"], long, max_sequence_length=16) == (3, 13)
    assert prompt_token_span(pipes["qwenimage"], long, max_sequence_length=16) == (0, 16)
    flux2 = pipes["flux2"]
    flux2.tokenizer.padding_side = "left"
    try:
        start, length = prompt_token_span(flux2, "a red cat", max_sequence_length=32)
        ids = _pipeline_text_ids(flux2, "a red cat", 32)
    finally:
        flux2.tokenizer.padding_side = "right"
    assert (start, length) == (32 - (3 + 3 + 9) + 3, 3)  # left padding, then 3 template tokens
    assert ids[start:start + length] == flux2.tokenizer("a red cat").input_ids
