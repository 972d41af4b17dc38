"""Fast capture on tiny Flux pipelines: double- and single-stream blocks, [text; image] order, RoPE;
outputs match the stock processors, maps match a materialised float64 reference."""

from functools import partial

import pytest
import torch
from _capture_check import check_true_cfg_negative_calls_not_captured, generate, stock_restored_after
from conftest import fresh_seed as _seed

from seg4diff_fast import disable_fast_capture, enable_fast_capture
from seg4diff_fast.capture.flux import FastFluxAttnProcessor
from seg4diff_fast.testing import record_stock_attention, reference_maps, tiny_flux_pipeline, tiny_flux_transformer

pytestmark = pytest.mark.usefixtures("one_thread", "unpatch_capture")

_gen = partial(generate, max_sequence_length=8)


@pytest.fixture(scope="module")
def pipe():
    p = tiny_flux_pipeline()  # layers 0, 1 double-stream; 2, 3 single-stream
    yield p
    disable_fast_capture(p)


def test_generation_matches_stock_and_disable_restores(pipe):
    seed = _seed()
    with stock_restored_after(pipe, _gen, seed) as stock:
        cap = enable_fast_capture(pipe, layers=[0, 3])
        assert all(isinstance(p, FastFluxAttnProcessor) for p in pipe.transformer.attn_processors.values())
        torch.testing.assert_close(_gen(pipe, seed, width=48), stock, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
        assert cap.num_captured == 2


@pytest.mark.parametrize(
    "layers,size,batch,seq",
    [([1], (32, 32), 1, 8), ([3, 0], (32, 48), 2, 12), ([0, 1, 2, 3], (48, 32), 1, 8)],
    ids=["double-32x32-b1", "single+double-32x48-b2", "all-48x32"],
)
def test_maps_match_reference(pipe, layers, size, batch, seq):
    seed = _seed()
    kw = dict(height=size[0], width=size[1], num_images_per_prompt=batch, max_sequence_length=seq)
    with record_stock_attention(pipe.transformer) as rec:
        stock = _gen(pipe, seed, **kw)
    cap = enable_fast_capture(pipe, layers=layers)
    torch.testing.assert_close(_gen(pipe, seed, **kw), stock, rtol=1e-5, atol=1e-5)
    grid = (size[0] // 4, size[1] // 4)  # VAE /2, 2x2 packing
    ref = reference_maps(rec, pipe.transformer, layers, grid, range(seq))
    assert cap.maps.shape == (batch, len(layers), seq, *grid)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")


def test_true_cfg_negative_calls_are_not_captured(pipe):
    check_true_cfg_negative_calls_not_captured(pipe, _gen)


@pytest.mark.parametrize("mode,head_reduce", [("logits", "none"), ("sel_probs", "max"), ("probs", "none")])
def test_modes_bare_transformer(mode, head_reduce):
    model = tiny_flux_transformer(seed=_seed() % 1000)
    g = torch.Generator().manual_seed(_seed())
    b, n_txt, h, w = 2, 10, 6, 5
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3).float()
    x = dict(hidden_states=torch.randn(b, h * w, 4, generator=g),
             encoder_hidden_states=torch.randn(b, n_txt, 32, generator=g),
             pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.rand(b, generator=g),
             img_ids=img_ids, txt_ids=torch.zeros(n_txt, 3))
    with torch.no_grad(), record_stock_attention(model) as rec:
        stock = model(**x).sample
    cap = enable_fast_capture(model, layers=[1, 2], mode=mode, head_reduce=head_reduce)
    with torch.no_grad():
        fast = model(**x).sample
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    ref = reference_maps(rec, model, [1, 2], (h, w), range(n_txt), mode=mode, head_reduce=head_reduce)
    assert cap.maps.shape == ref.shape
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-6)
    disable_fast_capture(model)


def test_bf16_pipeline_matches_stock():
    pipe = tiny_flux_pipeline(dtype=torch.bfloat16)
    seed = _seed()
    with record_stock_attention(pipe.transformer) as rec:
        stock = _gen(pipe, seed)
    cap = enable_fast_capture(pipe, layers=[1, 3])
    fast = _gen(pipe, seed)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), stock.float(), rtol=2e-2, atol=2e-2)
    ref = reference_maps(rec, pipe.transformer, [1, 3], (8, 8), range(8))
    torch.testing.assert_close(cap.maps.double(), ref, rtol=2e-2, atol=2e-3)
    disable_fast_capture(pipe)
