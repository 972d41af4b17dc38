"""Fast capture on Qwen-Image: double-stream blocks over [text; image (; conditioning images)], complex
RoPE per stream, processor kwargs through ``attention_kwargs``, and the text key mask
(``encoder_hidden_states_mask``): masked calls run the fused op per batch row on the valid text + image
positions, so every attention output (masked text rows included) equals the stock processor's and maps
equal a float64 masked reference."""

from contextlib import contextmanager
from functools import partial

import pytest
import torch
from _capture_check import (
    PROMPT,
    check_block_mass,
    check_true_cfg_negative_calls_not_captured,
    generate,
    run_to_early_exit,
    stock_restored_after,
)
from conftest import fresh_seed as _seed

from seg4diff_fast import disable_fast_capture, enable_fast_capture
from seg4diff_fast.capture import (
    FastQwenDoubleStreamAttnProcessor,
    capture_family,
    count_layers,
)
from seg4diff_fast.testing import (
    prompt_token_span,
    record_stock_attention,
    reference_maps,
    reference_mass,
    tiny_qwenimage_pipeline,
    tiny_qwenimage_transformer,
)

pytestmark = pytest.mark.usefixtures("one_thread", "unpatch_capture")


# ------------------------------------------------------------------------------------------ helpers
record_sdpa = partial(record_stock_attention, with_mask=True)  # (q, k, key mask) per SDPA call, by module name
_gen = partial(generate, true_cfg_scale=1.0)


@contextmanager
def record_attention_outputs(transformer):
    """Every attention module's (image, text) outputs, by module name, in call order."""
    out, handles = {}, []
    for i, block in enumerate(transformer.transformer_blocks):
        handles.append(block.attn.register_forward_hook(
            lambda m, a, o, _i=i: out.setdefault(_i, []).append(tuple(t.detach().clone() for t in o))))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def inputs(batch, n_txt, grid, mask=None, conditions=(), seed=0):
    """Bare-transformer inputs: the generated image's tokens, then conditioning images' (edit layout)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, *grid), *[(1, *c) for c in conditions]]
    n_img = sum(h * w for _, h, w in shapes)
    return dict(hidden_states=torch.randn(batch, n_img, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, n_txt, 32, generator=g),
                encoder_hidden_states_mask=mask, timestep=torch.rand(batch, generator=g),
                img_shapes=[shapes] * batch)


def padded_mask(batch, n_txt):
    """Row 0 all valid; row 1 with holes (a masked position inside the prompt) and right padding."""
    mask = torch.ones(batch, n_txt, dtype=torch.int64)
    if batch > 1:
        mask[1, 2] = 0
        mask[1, n_txt - 3:] = 0
    return mask


@pytest.fixture(scope="module")
def pipe():
    p = tiny_qwenimage_pipeline(num_layers=3)
    yield p
    disable_fast_capture(p)


@pytest.fixture(scope="module")
def model():
    return tiny_qwenimage_transformer(num_layers=3, seed=_seed() % 1000)


def _text_len(pipe, prompt):
    from seg4diff_fast.testing import text_sequence_length

    return text_sequence_length(pipe, prompt)


# -------------------------------------------------------------------------------------------- tests
def test_generation_matches_stock_and_disable_restores(pipe):
    seed = _seed()
    assert capture_family(pipe) == capture_family(pipe.transformer) == "qwenimage" and count_layers(pipe) == 3
    with stock_restored_after(pipe, _gen, seed) as stock:
        cap = enable_fast_capture(pipe, layers=[0, 2])
        assert cap.family == "qwenimage"
        assert all(isinstance(p, FastQwenDoubleStreamAttnProcessor) for p in pipe.transformer.attn_processors.values())
        fast = _gen(pipe, seed, width=48, attention_kwargs={"scale": 1.0})  # the user's kwargs still pass through
        torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
        assert cap.num_captured == 2 and cap.maps.shape == (1, 2, _text_len(pipe, PROMPT), 8, 12)


def test_true_cfg_negative_calls_are_not_captured(pipe):
    check_true_cfg_negative_calls_not_captured(pipe, _gen, record_sdpa, n_txt=_text_len(pipe, PROMPT))


def test_batch_of_prompts_with_padding_matches_stock(pipe):
    seed = _seed()
    prompts = [PROMPT, "a dog"]  # different lengths: the pipeline passes a (2, T) mask with padding
    n_txt = _text_len(pipe, PROMPT)
    with record_sdpa(pipe.transformer) as rec:
        stock = _gen(pipe, seed, prompts, height=48, width=32)
    assert rec["transformer_blocks.0.attn"][0][2] is not None and not rec["transformer_blocks.0.attn"][0][2].all()
    cap = enable_fast_capture(pipe, layers=[2, 0], measure_mass=True)
    torch.testing.assert_close(_gen(pipe, seed, prompts, height=48, width=32), stock, rtol=1e-5, atol=1e-5)
    ref = reference_maps(rec, pipe.transformer, [2, 0], (12, 8), range(n_txt), n_txt=n_txt)
    assert cap.maps.shape == (2, 2, n_txt, 12, 8)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")
    assert float(cap.maps[1, :, _text_len(pipe, "a dog"):].abs().max()) == 0.0  # the padding gets nothing


@pytest.mark.parametrize(
    "backend,mode,head_reduce,batch,layers,tokens,masked,conditions",
    [("torch", "probs", "mean", 1, [0, 2], None, False, ()),
     ("torch", "logits", "none", 2, [1], [0, 2, 4, 8], True, [(2, 4)]),
     ("torch", "sel_probs", "mean", 2, [2, 0], [2, 7, 8], True, ()),
     ("torch", "probs", "none", 2, [1, 2], None, True, ()),
     ("triton", "probs", "none", 2, [0, 1], [0, 2, 8], True, [(2, 4)]),
     ("triton", "sel_probs", "mean", 1, [2], None, False, ()),
     ("triton", "logits", "mean", 2, [1], None, True, ())],
    ids=["torch-probs-mean-b1", "torch-logits-none-b2-mask-cond", "torch-sel-mean-b2-mask", "torch-probs-none-b2-mask",
         "triton-probs-none-b2-mask-cond", "triton-sel-mean-b1", "triton-logits-mean-b2-mask"],
)
def test_maps_and_outputs_bare_transformer(model, backend, mode, head_reduce, batch, layers, tokens, masked,
                                           conditions):
    seed = _seed()
    n_txt, grid = 9, (3, 5)
    x = inputs(batch, n_txt, grid, padded_mask(batch, n_txt) if masked else None, conditions, seed=seed)
    with torch.no_grad(), record_sdpa(model) as rec, record_attention_outputs(model) as stock_attn:
        stock = model(**x).sample
    cap = enable_fast_capture(model, layers=layers, tokens=tokens, mode=mode, head_reduce=head_reduce, backend=backend)
    with torch.no_grad(), record_attention_outputs(model) as fast_attn:
        fast = model(**x).sample
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    for i in stock_attn:  # image and text outputs of every block, masked text rows included
        for (fi, ft), (si, st) in zip(fast_attn[i], stock_attn[i]):
            torch.testing.assert_close(fi, si, rtol=1e-5, atol=1e-5, msg=f"block {i} image, seed {seed}")
            torch.testing.assert_close(ft, st, rtol=1e-5, atol=1e-5, msg=f"block {i} text, seed {seed}")
    positions = range(n_txt) if tokens is None else tokens
    ref = reference_maps(rec, model, layers, grid, positions, mode=mode, head_reduce=head_reduce, n_txt=n_txt)
    assert cap.maps.shape == ref.shape
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-6, msg=f"seed {seed}")


def test_mask_edge_cases_all_true_and_no_valid_text(model):
    seed = _seed()
    n_txt, grid = 6, (3, 5)
    mask = torch.ones(3, n_txt, dtype=torch.bool)
    mask[1] = False  # a row with no valid text at all
    mask[2, 4:] = False
    for m in (torch.ones(2, n_txt, dtype=torch.bool), mask):
        x = inputs(m.shape[0], n_txt, grid, m, seed=seed)
        with torch.no_grad(), record_sdpa(model) as rec, record_attention_outputs(model) as stock_attn:
            stock = model(**x).sample
        cap = enable_fast_capture(model, layers=[1], measure_mass=True)
        with torch.no_grad(), record_attention_outputs(model) as fast_attn:
            fast = model(**x).sample
        torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
        for i in stock_attn:
            for f, s in zip(fast_attn[i][0], stock_attn[i][0]):
                torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5, msg=f"block {i}, seed {seed}")
        torch.testing.assert_close(cap.maps.double(), reference_maps(rec, model, [1], grid, range(n_txt), n_txt=n_txt),
                                   rtol=1e-4, atol=1e-7)
        got = torch.stack([cap.block_mass[i] for i in range(3)])
        torch.testing.assert_close(got, reference_mass(rec, model, 15, n_txt), rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
        disable_fast_capture(model)
    assert float(cap.maps[1].abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_early_exit_and_measure_mass_with_mask(model, backend):
    seed = _seed()
    n_txt, grid = 8, (3, 5)
    x = inputs(2, n_txt, grid, padded_mask(2, n_txt), conditions=[(2, 3)], seed=seed)
    with torch.no_grad(), record_sdpa(model) as rec:
        model(**x)
    cap = run_to_early_exit(model, x, [0, 1], 1, backend, model.transformer_blocks[2].attn)
    assert cap.num_captured == 2
    torch.testing.assert_close(cap.maps.double(), reference_maps(rec, model, [0, 1], grid, range(n_txt), n_txt=n_txt),
                               rtol=1e-4, atol=1e-7, msg=f"seed {seed}")
    check_block_mass(model, x, rec, 3, 15, n_txt, backend, seed)


def test_layer_range_error_and_grid_errors(model):
    with pytest.raises(ValueError, match=r"has 3 blocks; valid layers are 0\.\.2$"):
        enable_fast_capture(model, layers=[3])
    enable_fast_capture(model, layers=[0])
    x = inputs(1, 4, (2, 3))
    x["img_shapes"] = [[(2, 2, 3)]]  # a video-like entry
    with torch.no_grad(), pytest.raises(ValueError, match="frames"):
        model(**x)
    x["img_shapes"] = [[(1, 4, 4)]]  # more tokens than the call has
    with torch.no_grad(), pytest.raises(ValueError, match="4x4 grid"):
        model(**x)


def test_word_maps_positions(pipe):
    prompt = "A cat, on a red sofa."
    cap = enable_fast_capture(pipe, layers=[1])
    _gen(pipe, _seed(), prompt)  # (one step: the scheduler's terminal shift divides by zero)
    start, length = prompt_token_span(pipe, prompt)
    positions = cap.token_positions(prompt)
    assert start == 0 and positions["A"] == [0] and positions["sofa"] == [length - 3, length - 2]
    words = cap.word_maps(prompt)
    assert list(words) == ["A", "cat", "on", "a", "red", "sofa"]
    torch.testing.assert_close(words["cat"], cap.maps[:, :, 1])
