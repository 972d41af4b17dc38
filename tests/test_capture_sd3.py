"""Fast capture on SD3 / SD3.5 tiny pipelines: outputs match the stock processors, maps match a
materialised float64 reference computed from the q/k the stock processors hand to SDPA."""

from functools import partial

import pytest
import torch
from _capture_check import PROMPT, generate, stock_restored_after
from conftest import fresh_seed as _seed

from seg4diff_fast import disable_fast_capture, enable_fast_capture
from seg4diff_fast.capture.sd3 import FastJointAttnProcessor
from seg4diff_fast.testing import (
    record_stock_attention,
    reference_maps,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_sd35_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread", "unpatch_capture")

_gen = partial(generate, max_sequence_length=8)


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pipe(request):
    p = tiny_sd3_pipeline() if request.param == "sd3" else tiny_sd35_pipeline()
    yield p
    disable_fast_capture(p)


def test_generation_matches_stock_and_disable_restores(pipe):
    seed = _seed()
    with stock_restored_after(pipe, _gen, seed) as stock:
        cap = enable_fast_capture(pipe, layers=[0, 1, 2])
        assert all(isinstance(p, FastJointAttnProcessor) for p in pipe.transformer.attn_processors.values())
        fast = _gen(pipe, seed, width=48)
        torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
        assert cap.num_captured == 2


@pytest.mark.parametrize(
    "layers,size,batch,guidance",
    [([1], (32, 32), 1, 5.0), ([2, 0], (32, 48), 2, 1.0), ([0, 1, 2], (48, 32), 2, 4.0)],
    ids=["l1-32x32-b1-cfg", "l2+0-32x48-b2-nocfg", "all-48x32-b2-cfg"],
)
def test_maps_match_reference(pipe, layers, size, batch, guidance):
    seed = _seed()
    kw = dict(height=size[0], width=size[1], num_images_per_prompt=batch, guidance_scale=guidance)
    with record_stock_attention(pipe.transformer) as rec:
        stock = _gen(pipe, seed, **kw)
    cap = enable_fast_capture(pipe, layers=layers)
    fast = _gen(pipe, seed, **kw)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    grid = (size[0] // 4, size[1] // 4)  # VAE /2, patch /2
    ref = reference_maps(rec, pipe.transformer, layers, grid, range(77), cfg=guidance > 1)
    assert cap.maps.shape == (batch, len(layers), 77, *grid)
    assert cap.maps.dtype == torch.float32
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")


def test_steps_keep_steps_and_skip_layer_guidance(pipe):
    seed = _seed()
    kw = dict(num_inference_steps=4, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
              skip_layer_guidance_stop=1.0)
    with record_stock_attention(pipe.transformer) as rec:
        stock = _gen(pipe, seed, **kw)
    # stock call order at layer 1: step 0, then (main, skip-layer) for steps 1..3
    main_calls = [0, 1, 3, 5]
    assert len(rec["transformer_blocks.1.attn"]) == 7
    cap = enable_fast_capture(pipe, layers=[1, 2], steps=[1, 3], keep_steps=True)
    torch.testing.assert_close(_gen(pipe, seed, **kw), stock, rtol=1e-5, atol=1e-5)
    assert cap.step_count == 4 and cap.captured_steps == [1, 3]
    ref = reference_maps(rec, pipe.transformer, [1, 2], (8, 8), range(77), cfg=True,
                         calls=[main_calls[1], main_calls[3]], keep_steps=True)
    assert cap.maps.shape == (2, 1, 2, 77, 8, 8)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)

    cap = enable_fast_capture(pipe, layers=[1], steps=[2])
    _gen(pipe, seed, **kw)
    ref = reference_maps(rec, pipe.transformer, [1], (8, 8), range(77), cfg=True, calls=[main_calls[2]])
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)


def _transformer_inputs(batch, n_txt, hw=(16, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, *hw, generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


@pytest.mark.parametrize("mode", ["probs", "logits", "sel_probs"])
@pytest.mark.parametrize("head_reduce", ["mean", "max", "none"])
def test_modes_heads_tokens_bare_transformer(mode, head_reduce):
    model = tiny_sd3_transformer(qk_norm="rms_norm", dual_attention_layers=(0,), seed=_seed() % 1000)
    x = _transformer_inputs(2, 77 + 6, seed=_seed())
    tokens = [0, 3, 5, 80]  # BOS, two CLIP positions and a T5 piece (77 + 3)
    with torch.no_grad(), record_stock_attention(model) as rec:
        stock = model(**x).sample
    cap = enable_fast_capture(model, layers=[0, 2], tokens=tokens, mode=mode, head_reduce=head_reduce)
    with torch.no_grad():
        fast = model(**x).sample
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    ref = reference_maps(rec, model, [0, 2], (8, 12), tokens, mode=mode, head_reduce=head_reduce)
    assert cap.maps.shape == ref.shape
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-6)
    disable_fast_capture(model)


def test_bare_transformer_forced_cfg_and_positional_args():
    model = tiny_sd3_transformer()
    x = _transformer_inputs(4, 77)
    args = (x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"])
    with torch.no_grad(), record_stock_attention(model) as rec:
        stock = model(*args).sample
    cap = enable_fast_capture(model, layers=[1], cfg=True)
    with torch.no_grad():
        fast = model(*args, None, {}).sample  # joint_attention_kwargs given positionally too
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    ref = reference_maps(rec, model, [1], (8, 12), range(77), cfg=True)
    assert cap.maps.shape == (2, 1, 77, 8, 12)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)
    disable_fast_capture(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_stock(dtype):
    model = tiny_sd3_transformer(qk_norm="rms_norm", dual_attention_layers=(0, 1)).to(dtype)
    x = {k: v.to(dtype) for k, v in _transformer_inputs(2, 80, seed=_seed()).items()}
    with torch.no_grad(), record_stock_attention(model) as rec:
        stock = model(**x).sample
    cap = enable_fast_capture(model, layers=[1])
    with torch.no_grad():
        fast = model(**x).sample
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), stock.float(), rtol=2e-2, atol=2e-2)
    ref = reference_maps(rec, model, [1], (8, 12), range(77))
    assert cap.maps.dtype == torch.float32
    torch.testing.assert_close(cap.maps.double(), ref, rtol=2e-2, atol=2e-4)
    disable_fast_capture(model)


@pytest.mark.parametrize("variant", ["img2img", "inpaint"])
def test_img2img_and_inpaint_pipelines(variant):
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    cls = StableDiffusion3Img2ImgPipeline if variant == "img2img" else StableDiffusion3InpaintPipeline
    pipe = tiny_sd3_pipeline(pipeline_class=cls)
    g = torch.Generator().manual_seed(_seed())
    image = torch.rand(1, 3, 32, 48, generator=g)
    kw = dict(image=image, strength=0.8, num_inference_steps=3, height=32, width=48, max_sequence_length=8,
              output_type="latent")
    if variant == "inpaint":
        kw["mask_image"] = (torch.rand(1, 1, 32, 48, generator=g) > 0.5).float()
    seed = _seed()
    with record_stock_attention(pipe.transformer) as rec:
        stock = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw).images
    cap = enable_fast_capture(pipe, layers=[1])
    fast = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw).images
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    ref = reference_maps(rec, pipe.transformer, [1], (8, 12), range(77), cfg=True)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)
    disable_fast_capture(pipe)
