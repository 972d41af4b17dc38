"""The reader and the capture options it rests on: early exit (``stop_after``), attention mass
(``measure_mass``, SD3 and Flux layouts), reads against a float64 materialised reference, the row batch loop,
gradients through a read, defaults as data, the family registry and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import fresh_seed

from seg4diff_fast.capture import (
    EarlyExit,
    check_layers,
    disable_fast_capture,
    early_exit,
    enable_fast_capture,
)
from seg4diff_fast.reader import ModelDefaults, PipelineReader, TextState, family_of, resolve_defaults
from seg4diff_fast.testing import (
    record_stock_attention,
    reference_maps,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd35_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline(t5=False, num_layers=4)


def _images(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, int(torch.randint(20, 60, (1,), generator=g)), int(torch.randint(20, 60, (1,), generator=g)),
                       generator=g) for _ in range(n)]


def _inputs(reader: PipelineReader, seed: int, prompts: list[str]):
    tensors, _ = reader.prepare(_images(seed, len(prompts)))
    return reader.latents(tensors), reader.encode_text(prompts)


def _stock_forward(reader: PipelineReader, latents, text):
    tr = reader.transformer
    with record_stock_attention(tr) as rec, torch.no_grad():
        out = reader.forward(tr, latents, text, reader.timestep.expand(latents.shape[0]))[0]
    return rec, out


@pytest.mark.parametrize("layers,mode,head_reduce", [([2], "probs", "mean"), ([3, 0], "logits", "none"),
                                                     ([1, 2], "sel_probs", "max")])
def test_read_matches_float64_reference(sd3, layers, mode, head_reduce):
    seed = fresh_seed()
    reader = PipelineReader(sd3, resolution=32, seed=seed % 1000)
    latents, text = _inputs(reader, seed, ["a cat on a red sofa", "dog", "red car and grass"])
    rec, _ = _stock_forward(reader, latents, text)
    ref = reference_maps(rec, sd3.transformer, layers, (8, 8), list(range(77)), mode=mode, head_reduce=head_reduce)
    got = reader.read(latents, text, layers, mode=mode, head_reduce=head_reduce)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def test_read_all_text_and_t5_positions():
    seed = fresh_seed()
    pipe = tiny_sd3_pipeline(t5=True)
    reader = PipelineReader(pipe, resolution=32, text_length=5, use_t5=True)
    latents, text = _inputs(reader, seed, ["a cat", "red sofa"])
    assert text.length == 77 + 5
    rec, _ = _stock_forward(reader, latents, text)
    ref = reference_maps(rec, pipe.transformer, [1], (8, 8), list(range(82)))
    torch.testing.assert_close(reader.read(latents, text, [1], all_text=True).double(), ref, rtol=1e-4, atol=1e-5,
                               msg=f"seed {seed}")


def test_early_exit_stops_after_the_block_and_keeps_its_maps(sd3):
    seed = fresh_seed()
    reader = PipelineReader(sd3, resolution=32)
    latents, text = _inputs(reader, seed, ["cat sofa", "dog"])
    ran: list[int] = []
    blocks = sd3.transformer.transformer_blocks
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        early = reader.read(latents, text, [1])
        assert ran == [0, 1]  # block 1's attention ran, then the forward ended (its MLP and blocks 2, 3 never)
        ran.clear()
        full = PipelineReader(sd3, resolution=32, early_exit=False).read(latents, text, [1])
        assert ran == [0, 1, 2, 3]
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(early, full)
    # the bare capture option: the exception is raised, early_exit() swallows it, disable removes the hook
    tr = sd3.transformer
    enable_fast_capture(tr, layers=[0], stop_after=0, cfg=False)
    with pytest.raises(EarlyExit):
        reader.forward(tr, latents, text, reader.timestep.expand(2))
    with early_exit():
        reader.forward(tr, latents, text, reader.timestep.expand(2))
    disable_fast_capture(tr)
    out = reader.forward(tr, latents, text, reader.timestep.expand(2))[0]
    assert out.shape == latents.shape
    with pytest.raises(ValueError, match="out of range"):
        enable_fast_capture(tr, layers=[0], stop_after=4)


def _reference_mass(rec, transformer, n_img: int, flux: bool) -> np.ndarray:
    """(L, H, 2) [I2T, T2T] from a float64 materialised softmax, summed over the batch."""
    from seg4diff_fast.testing import attention_module_name

    n_layers = len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    out = []
    for layer in range(n_layers):
        q, k = (t.double() for t in rec[attention_module_name(transformer, layer)][0])
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        n = q.shape[2]
        img = slice(n - n_img, n) if flux else slice(0, n_img)
        txt = slice(0, n - n_img) if flux else slice(n_img, n)
        i2t = p[:, :, img][..., txt].sum(-1).mean(-1)
        t2t = p[:, :, txt][..., txt].sum(-1).mean(-1)
        out.append(torch.stack([i2t, t2t], -1).sum(0))
    return torch.stack(out).numpy()


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_block_mass_matches_float64_reference(sd3, variant):
    seed = fresh_seed()
    pipe = sd3 if variant == "sd3" else tiny_sd35_pipeline()
    reader = PipelineReader(pipe, resolution=32)
    latents, text = _inputs(reader, seed, ["a cat on a red sofa", "grass"])
    rec, _ = _stock_forward(reader, latents, text)
    got = reader.block_mass(latents, text)
    assert sorted(got) == list(range(reader.num_layers))
    got = torch.stack([got[i] for i in range(reader.num_layers)]).numpy()
    np.testing.assert_allclose(got, _reference_mass(rec, pipe.transformer, 64, flux=False), rtol=1e-5, atol=1e-6,
                               err_msg=f"seed {seed}")


def test_capture_mass_on_flux_text_first_layout():
    """``measure_mass`` reads the layout off each call: Flux's [text; image], single-stream blocks included."""
    seed = fresh_seed()
    pipe = tiny_flux_pipeline()
    kw = dict(num_inference_steps=1, height=32, width=48, max_sequence_length=8, output_type="latent")
    with record_stock_attention(pipe.transformer) as rec:
        pipe("a cat on a red sofa", generator=torch.Generator().manual_seed(seed), **kw)
    cap = enable_fast_capture(pipe, layers=[], measure_mass=True)
    try:
        pipe("a cat on a red sofa", generator=torch.Generator().manual_seed(seed), **kw)
    finally:
        disable_fast_capture(pipe)
    got = torch.stack([cap.block_mass[i] for i in range(4)]).numpy()
    np.testing.assert_allclose(got, _reference_mass(rec, pipe.transformer, 8 * 12, flux=True), rtol=1e-5, atol=1e-6,
                               err_msg=f"seed {seed}")


def test_read_rows_batches_rows_like_single_reads(sd3):
    seed = fresh_seed()
    reader = PipelineReader(sd3, resolution=32)
    tensors, _ = reader.prepare(_images(seed, 3))
    latents = reader.latents(tensors)
    text = reader.encode_text(["cat", "sofa and grass"])
    rows = [(2, 0), (0, 1), (2, 1), (1, 0), (0, 0)]
    for batch_size in (None, 2, 1):
        got = reader.read_rows(latents, text, rows, [1, 3], batch_size=batch_size, head_reduce="none")
        assert len(got) == len(rows)
        for (i, p), m in zip(rows, got):
            one = reader.read(latents[i:i + 1], text.select(torch.tensor([p])), [1, 3], head_reduce="none")[0]
            torch.testing.assert_close(m, one, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


def test_read_with_grad_reaches_only_blocks_up_to_the_layer(sd3):
    seed = fresh_seed()
    reader = PipelineReader(sd3, resolution=32)
    latents, text = _inputs(reader, seed, ["cat sofa"])
    tr = sd3.transformer
    tr.requires_grad_(True)
    try:
        maps = reader.read(latents, text, [1], mode="logits", grad=True)
        assert maps.requires_grad
        maps.square().sum().backward()
        blocks = tr.transformer_blocks
        assert blocks[0].attn.to_q.weight.grad is not None and blocks[0].attn.to_q.weight.grad.abs().sum() > 0
        assert blocks[1].attn.add_k_proj.weight.grad.abs().sum() > 0  # the text keys the logits read
        assert blocks[1].attn.to_k.weight.grad.abs().sum() == 0  # image keys: not in image→text logits
        assert blocks[2].attn.to_q.weight.grad is None and blocks[3].attn.to_q.weight.grad is None
        assert not reader.read(latents, text, [1]).requires_grad
    finally:
        tr.zero_grad(set_to_none=True)
        tr.requires_grad_(False)


def test_noise_is_per_image_and_matches_the_scheduler(sd3):
    reader = PipelineReader(sd3, resolution=32, seed=5, num_inference_steps=10, noise_step=3)
    sched = reader.scheduler
    assert float(reader.timestep) == float(sched.timesteps[-3])
    x = reader.model_input(_images(fresh_seed(), 2))
    clean = reader.encode_images(x)
    noised = reader.noise(clean)
    noise = torch.randn(clean.shape[1:], generator=torch.Generator("cpu").manual_seed(5))
    for b in range(2):
        want = reader.sigma * noise.double() + (1 - reader.sigma) * clean[b].double()
        torch.testing.assert_close(noised[b].double(), want, rtol=1e-5, atol=1e-5)
    own = reader.noise(clean, seeds=[5, 11])
    assert torch.equal(own[0], noised[0])
    other = torch.randn(clean.shape[1:], generator=torch.Generator("cpu").manual_seed(11))
    want = reader.sigma * other.double() + (1 - reader.sigma) * clean[1].double()
    torch.testing.assert_close(own[1].double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 latents"):
        reader.noise(clean, seeds=[1])


def test_defaults_as_data():
    from seg4diff_fast.shapes import EXPERT_LAYER, SIZE, T5_LENGTH, load_shapes_pipeline

    shapes = resolve_defaults(load_shapes_pipeline())
    assert (shapes.layer, shapes.resolution, shapes.text_length) == (EXPERT_LAYER, SIZE, T5_LENGTH)
    assert shapes.source.endswith("shapes_config.json")
    sd3 = resolve_defaults(tiny_sd3_pipeline(t5=False))
    assert (sd3.layer, sd3.resolution, sd3.text_length, sd3.num_inference_steps, sd3.noise_step) == (9, 1024, 77, 28, 8)
    mine = ModelDefaults(layer=2, resolution=64, text_length=0)
    reader = PipelineReader(tiny_sd3_pipeline(t5=False), defaults=mine, noise_step=4)
    assert (reader.resolution, reader.text_length, reader.noise_step) == (64, 0, 4)
    assert reader.encode_text(["cat"]).length == 77


def test_text_state_select():
    g = torch.Generator().manual_seed(fresh_seed())
    t = TextState(["a", "b", "c"], torch.randn(3, 4, 2, generator=g), torch.randn(3, 5, generator=g))
    s = t.select(torch.tensor([2, 0, 2]))
    assert s.prompts == ["c", "a", "c"] and torch.equal(s.embeds, t.embeds[[2, 0, 2]])
    assert torch.equal(s.pooled, t.pooled[[2, 0, 2]]) and s.length == 4


def test_bad_input_errors(sd3):
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="StableDiffusion3Pipeline"):
        family_of(SimpleNamespace(transformer=torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline.*FluxPipeline.*Flux2Pipeline.*QwenImagePipeline"):
        PipelineReader(SimpleNamespace(transformer=torch.nn.Linear(2, 2)))
    reader = PipelineReader(sd3, resolution=32)
    with pytest.raises(ValueError, match=r"out of range.*valid layers are 0\.\.3"):
        reader.check_layers([4])
    with pytest.raises(ValueError, match="duplicates"):
        reader.check_layers([1, 1])
    with pytest.raises(ValueError, match="at least one layer"):
        reader.check_layers([])
    with pytest.raises(ValueError, match="multiple of 4"):
        PipelineReader(sd3, resolution=30)
    with pytest.raises(ValueError, match="noise_step"):
        PipelineReader(sd3, resolution=32, noise_step=40)
    with pytest.raises(ValueError, match="text_encoder_3"):
        PipelineReader(sd3, resolution=32, use_t5=True)
    assert check_layers(sd3, np.int64(2)) == (2,)
    latents, text = _inputs(reader, 0, ["cat"])
    with reader.capturing([1]):
        with pytest.raises(RuntimeError, match="already has fast capture"):
            reader.read(latents, text, [1])
    assert reader.read(latents, text, [1]).shape == (1, 1, 77, 8, 8)  # the capture was removed
