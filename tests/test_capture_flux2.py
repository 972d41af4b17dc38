"""Fast capture on Flux.2: double-stream (``Flux2Attention``) and single-stream parallel blocks
(``Flux2ParallelSelfAttention``), [text; image (; reference images)], 4-D ``img_ids``; outputs match the
stock processors, maps and attention mass match a float64 reference materialised from the q/k the stock
processors hand to SDPA."""

from functools import partial

import pytest
import torch
from _capture_check import check_block_mass, generate, run_to_early_exit, stock_restored_after
from conftest import fresh_seed as _seed

from seg4diff_fast import disable_fast_capture, enable_fast_capture
from seg4diff_fast.capture import (
    FastFlux2AttnProcessor,
    FastFlux2ParallelSelfAttnProcessor,
    capture_family,
    check_layers,
    count_layers,
)
from seg4diff_fast.testing import (
    prompt_token_span,
    record_stock_attention,
    reference_maps,
    tiny_flux2_pipeline,
    tiny_flux2_transformer,
)

pytestmark = pytest.mark.usefixtures("one_thread", "unpatch_capture")

_gen = partial(generate, max_sequence_length=12)


# ------------------------------------------------------------------------------------------ helpers
def inputs(batch, n_txt, grid, refs=(), seed=0):
    """Bare-transformer inputs: the generated image's tokens (t = 0) then reference images' (t = 10, 20, …)."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for t, (h, w) in enumerate([grid, *refs]):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids.append(torch.stack([torch.full_like(ys, 10 * t), ys, xs, torch.zeros_like(ys)], -1).reshape(-1, 4))
    img_ids = torch.cat(ids).unsqueeze(0).expand(batch, -1, -1)
    txt_ids = torch.stack([torch.zeros(n_txt, dtype=torch.int64)] * 3 + [torch.arange(n_txt)], -1)
    return dict(hidden_states=torch.randn(batch, img_ids.shape[1], 16, generator=g),
                encoder_hidden_states=torch.randn(batch, n_txt, 48, generator=g),
                timestep=torch.rand(batch, generator=g), img_ids=img_ids, txt_ids=txt_ids.expand(batch, -1, -1))


@pytest.fixture(scope="module")
def pipe():
    p = tiny_flux2_pipeline()  # klein base: true CFG (a second call per step with ""); layers 0, 1 double, 2, 3 single
    yield p
    disable_fast_capture(p)


@pytest.fixture(scope="module")
def model():
    return tiny_flux2_transformer(seed=_seed() % 1000)


# -------------------------------------------------------------------------------------------- tests
def test_generation_matches_stock_and_disable_restores(pipe):
    seed = _seed()
    assert capture_family(pipe) == capture_family(pipe.transformer) == "flux2" and count_layers(pipe) == 4
    with stock_restored_after(pipe, _gen, seed) as stock:
        cap = enable_fast_capture(pipe, layers=[0, 3])
        assert cap.family == "flux2"
        procs = pipe.transformer.attn_processors
        assert all(isinstance(p, FastFlux2AttnProcessor) for k, p in procs.items() if k.startswith("transformer_"))
        assert all(isinstance(p, FastFlux2ParallelSelfAttnProcessor)
                   for k, p in procs.items() if k.startswith("single"))
        torch.testing.assert_close(_gen(pipe, seed, width=48), stock, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
        assert cap.num_captured == 2 and cap.step_count == 2  # the "uncond" calls are neither counted nor captured


def test_pipeline_maps_match_reference_under_true_cfg(pipe):
    seed = _seed()
    kw = dict(width=48, num_images_per_prompt=2)
    with record_stock_attention(pipe.transformer) as rec:
        stock = _gen(pipe, seed, **kw)
    assert len(rec["transformer_blocks.1.attn"]) == 4  # (cond, uncond) per step
    cap = enable_fast_capture(pipe, layers=[1, 2], keep_steps=True)
    torch.testing.assert_close(_gen(pipe, seed, **kw), stock, rtol=1e-5, atol=1e-5)
    assert cap.captured_steps == [0, 1]
    ref = reference_maps(rec, pipe.transformer, [1, 2], (8, 12), range(12), calls=[0, 2], keep_steps=True, n_txt=12)
    assert cap.maps.shape == (2, 2, 2, 12, 8, 12)  # (S, B, L, T, h, w)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")


def test_reference_image_editing_captures_only_the_generated_grid(pipe):
    import numpy as np
    from PIL import Image

    seed = _seed()
    image = Image.fromarray((np.random.default_rng(seed).random((64, 96, 3)) * 255).astype("uint8"))
    kw = dict(image=image, width=48, guidance_scale=1.0)
    with record_stock_attention(pipe.transformer) as rec:
        stock = _gen(pipe, seed, **kw)
    assert rec["transformer_blocks.0.attn"][0][0].shape[2] == 12 + 8 * 12 + 16 * 24  # text, image, reference
    cap = enable_fast_capture(pipe, layers=[0, 3], tokens=[0, 3, 4])
    torch.testing.assert_close(_gen(pipe, seed, **kw), stock, rtol=1e-5, atol=1e-5)
    ref = reference_maps(rec, pipe.transformer, [0, 3], (8, 12), [0, 3, 4], n_txt=12)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")


@pytest.mark.parametrize(
    "backend,mode,head_reduce,batch,layers,tokens,refs",
    [("torch", "probs", "mean", 1, [0, 3], None, ()),
     ("torch", "logits", "none", 2, [1, 2], [0, 2, 6], [(2, 4)]),
     ("torch", "sel_probs", "mean", 2, [3, 0], [1, 5], ()),
     ("triton", "probs", "none", 2, [1, 2], None, [(2, 4)]),
     ("triton", "sel_probs", "mean", 1, [0, 3], [0, 2, 6], ()),
     ("triton", "logits", "mean", 2, [2], None, ())],
    ids=["torch-probs-mean-b1", "torch-logits-none-b2-ref", "torch-sel-mean-b2", "triton-probs-none-b2-ref",
         "triton-sel-mean-b1", "triton-logits-mean-b2"],
)
def test_maps_and_outputs_bare_transformer(model, backend, mode, head_reduce, batch, layers, tokens, refs):
    seed = _seed()
    n_txt, grid = 7, (3, 5)
    x = inputs(batch, n_txt, grid, refs, seed=seed)
    with torch.no_grad(), record_stock_attention(model) as rec:
        stock = model(**x).sample
    cap = enable_fast_capture(model, layers=layers, tokens=tokens, mode=mode, head_reduce=head_reduce, backend=backend)
    with torch.no_grad():
        fast = model(**x).sample
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    positions = range(n_txt) if tokens is None else tokens
    ref = reference_maps(rec, model, layers, grid, positions, mode=mode, head_reduce=head_reduce, n_txt=n_txt)
    assert cap.maps.shape == ref.shape
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-6, msg=f"seed {seed}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_early_exit_and_measure_mass(model, backend):
    seed = _seed()
    n_txt, grid = 6, (3, 5)
    x = inputs(2, n_txt, grid, refs=[(2, 3)], seed=seed)
    with torch.no_grad(), record_stock_attention(model) as rec:
        model(**x)
    # stop after block 2, the first single-stream one: the second single-stream block never runs
    cap = run_to_early_exit(model, x, [0, 2], 2, backend, model.single_transformer_blocks[1].attn)
    ref = reference_maps(rec, model, [0, 2], grid, range(n_txt), n_txt=n_txt)
    assert cap.num_captured == 2
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")
    check_block_mass(model, x, rec, 4, 15, n_txt, backend, seed)


def test_layer_range_error_and_kv_cache_refused(model):
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.3 \(double-stream 0\.\.1, single-stream 2\.\.3\)"):
        enable_fast_capture(model, layers=[4])
    with pytest.raises(ValueError, match=r"stop_after: layer 7 is out of range"):
        enable_fast_capture(model, layers=[0], stop_after=7)
    assert check_layers(model, [3, 0]) == (3, 0)

    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    stock = dict(model.attn_processors)
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    with pytest.raises(TypeError, match="KV-cache mode"):
        enable_fast_capture(model, layers=[1])
    model.set_attn_processor(stock)
    enable_fast_capture(model, layers=[1])
    with torch.no_grad(), pytest.raises(NotImplementedError, match="kv_cache_mode"):
        model(**inputs(1, 4, (2, 2)), kv_cache_mode="extract", num_ref_tokens=0)


def test_word_maps_use_klein_chat_template_positions(pipe):
    prompt = "A cat, on a red sofa."
    cap = enable_fast_capture(pipe, layers=[1])
    _gen(pipe, _seed(), prompt=prompt, num_inference_steps=1, max_sequence_length=24)
    start, length = prompt_token_span(pipe, prompt, 24)
    positions = cap.token_positions(prompt)
    assert positions["A"] == [start] and positions["sofa"] == [start + length - 3, start + length - 2]
    words = cap.word_maps(prompt)
    assert list(words) == ["A", "cat", "on", "a", "red", "sofa"]
    torch.testing.assert_close(words["sofa"], cap.maps[:, :, positions["sofa"]].mean(2))
