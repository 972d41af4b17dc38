"""Every MM-DiT family through the reader and everything above it: SD3, Flux.1, Flux.2 (klein) and Qwen-Image.

Each test runs on all four tiny offline pipelines and checks against an independent reference: maps against a
float64 softmax materialised from the *stock* processors' q and k, the family's transformer call against a
call written here with the pipeline's own packing helpers, the noise level against the timesteps the
pipeline itself runs, token positions against the pipeline's own text path, labels against the argmax of
reference class maps; then labeling, evaluation (``--layers all``), the attention-mass table, MAGNET with a
LoRA round trip through the pipeline class, and loading a saved folder by its ``model_index.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _segment_ref import _labels_match
from conftest import fresh_seed
from PIL import Image

from seg4diff_fast import Seg4DiffSegmenter
from seg4diff_fast.reader import PipelineReader, family_of, load_pipeline, resolve_defaults
from seg4diff_fast.testing import (
    prompt_token_span,
    record_stock_attention,
    reference_maps,
    reference_mass,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_qwenimage_pipeline,
    tiny_sd3_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 32
GRID = (8, 8)  # every tiny family: 32 px → 8×8 image tokens
BUILDERS = {
    "sd3": lambda seed=0: tiny_sd3_pipeline(t5=False, num_layers=3, seed=seed),
    "flux": lambda seed=0: tiny_flux_pipeline(seed=seed),
    "flux2": lambda seed=0: tiny_flux2_pipeline(seed=seed),
    "qwenimage": lambda seed=0: tiny_qwenimage_pipeline(seed=seed),
}
NAMES = ["cat", "sofa", "red car"]  # "sofa" is two tokens in every tiny tokenizer


@pytest.fixture(scope="module", params=list(BUILDERS))
def pipe(request):
    return BUILDERS[request.param]()


def _images(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, int(torch.randint(20, 50, (1,), generator=g)), int(torch.randint(20, 50, (1,), generator=g)),
                       generator=g) for _ in range(n)]


def _reader(pipe, seed: int = 0, **kw) -> PipelineReader:
    return PipelineReader(pipe, resolution=RES, seed=seed, **kw)


def _stock(reader, latents, text):
    tr = reader.transformer
    with record_stock_attention(tr) as rec, torch.no_grad():
        out = reader.forward(tr, latents, text, reader.timestep.expand(latents.shape[0]))[0]
    return rec, out


def test_family_and_defaults(pipe):
    fam = family_of(pipe)
    d = resolve_defaults(pipe)
    assert fam.name == type(pipe).__name__.lower().replace("stablediffusion3pipeline", "sd3").replace(
        "fluxpipeline", "flux").replace("flux2kleinpipeline", "flux2").replace("qwenimagepipeline", "qwenimage")
    if fam.name in ("sd3", "flux"):
        assert d.layer_source.startswith("the paper")
    else:
        assert "estimate" in d.layer_source and 0 <= d.layer < _reader(pipe).num_layers


@pytest.mark.parametrize("mode,head_reduce", [("probs", "mean"), ("logits", "none"), ("sel_probs", "max")])
def test_read_matches_float64_reference(pipe, mode, head_reduce):
    seed = fresh_seed()
    reader = _reader(pipe, seed % 997)
    tensors, _ = reader.prepare(_images(seed, 2))
    latents = reader.latents(tensors)
    text = reader.encode_text(["a cat on a red sofa"] * 2)
    rec, _ = _stock(reader, latents, text)
    layers = [reader.num_layers - 1, 0]  # Flux families: a single-stream and a double-stream block
    ref = reference_maps(rec, reader.transformer, layers, GRID, list(range(text.length)), mode=mode,
                         head_reduce=head_reduce)
    got = reader.read(latents, text, layers, mode=mode, head_reduce=head_reduce, all_text=True)
    assert got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def _stock_call(pipe, latents, text, timestep):
    """The transformer call written with the pipeline's own packing helpers (the families' reference)."""
    from diffusers import Flux2KleinPipeline, FluxPipeline, QwenImagePipeline

    tr = pipe.transformer
    b, c, h, w = latents.shape
    name = family_of(pipe).name
    if name == "sd3":
        return tr(hidden_states=latents, timestep=timestep, encoder_hidden_states=text.embeds,
                  pooled_projections=text.pooled, return_dict=False)[0]
    if name == "flux":
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        g = torch.full((b,), 3.5) if tr.config.guidance_embeds else None
        out = tr(hidden_states=packed, timestep=timestep / 1000, guidance=g, pooled_projections=text.pooled,
                 encoder_hidden_states=text.embeds, txt_ids=torch.zeros(text.length, 3), img_ids=ids,
                 return_dict=False)[0]
        vsf = pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * vsf, w * vsf, vsf)
    if name == "flux2":
        packed = Flux2KleinPipeline._pack_latents(latents)
        out = tr(hidden_states=packed, timestep=timestep / 1000, guidance=None, encoder_hidden_states=text.embeds,
                 txt_ids=Flux2KleinPipeline._prepare_text_ids(text.embeds),
                 img_ids=Flux2KleinPipeline._prepare_latent_ids(latents), return_dict=False)[0]
        return Flux2KleinPipeline._unpack_latents_with_ids(out, Flux2KleinPipeline._prepare_latent_ids(latents), h, w)
    packed = QwenImagePipeline._pack_latents(latents, b, c, h, w)
    out = tr(hidden_states=packed, timestep=timestep / 1000, encoder_hidden_states=text.embeds,
             encoder_hidden_states_mask=text.mask, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    vsf = pipe.vae_scale_factor
    return QwenImagePipeline._unpack_latents(out, h * vsf, w * vsf, vsf)[:, :, 0]


def test_forward_matches_the_pipelines_own_packing(pipe):
    seed = fresh_seed()
    reader = _reader(pipe, seed % 997)
    latents = reader.latents(_images(seed, 2))
    text = reader.encode_text(["red car", "a cat on a red sofa"])  # Qwen-Image: unequal lengths, a mask
    t = reader.timestep.expand(2)
    with torch.no_grad():
        got = reader.forward(reader.transformer, latents, text, t)[0]
        ref = _stock_call(pipe, latents, text, t)
    assert got.shape == latents.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_noise_level_is_the_pipelines_own_timestep(pipe):
    """``timesteps[-noise_step]`` of the schedule the pipeline itself runs (the family's own shift rule)."""
    base = resolve_defaults(pipe)
    reader = PipelineReader(pipe, defaults=dataclasses.replace(base, shift_tokens=None, layer=0), resolution=RES,
                            num_inference_steps=6, noise_step=2)
    seen: list[float] = []

    def record(p, i, t, kwargs):
        seen.append(float(t))
        return {}

    pipe(prompt="a cat", num_inference_steps=6, height=RES, width=RES, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=record)
    assert len(seen) == 6
    assert float(reader.timestep) == pytest.approx(seen[-2], rel=1e-6)
    seed = fresh_seed()
    clean = reader.encode_images(reader.model_input(_images(seed, 1)))
    noise = torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(reader.noise(clean, seeds=[3])[0], reader.sigma * noise + (1 - reader.sigma) * clean[0])


def test_token_positions_are_the_prompts_tokens(pipe):
    reader = _reader(pipe)
    (chunk,) = reader.token_positions(NAMES)
    own = {"sd3": (1, 5), "flux": (0, 5)}  # CLIP: BOS at 0; T5: from 0; templated encoders: their own text path
    start, length = own.get(family_of(pipe).name) or prompt_token_span(pipe, chunk.prompt)
    flat = [p for pos in chunk.positions for p in pos]
    assert flat == list(range(start, start + length))  # every token of the prompt, in order, nothing else
    assert [len(p) for p in chunk.positions] == [1, 2, 2]  # sub-words merged ("so" "fa", "red" "car")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        reader.token_positions(["cat", "  "])


def test_segmentation_matches_reference(pipe):
    seed = fresh_seed()
    seg = Seg4DiffSegmenter(pipe, layer=[1], resolution=RES, seed=seed % 997)
    image = _images(seed, 1)[0]
    res = seg(image, NAMES)
    reader = seg.reader
    tensors, _ = reader.prepare([image])
    latents = reader.latents(tensors)
    (chunk,) = reader.token_positions(NAMES)
    text = reader.encode_text([chunk.prompt])
    rec, _ = _stock(reader, latents, text)
    ref = reference_maps(rec, reader.transformer, [1], GRID, list(range(text.length)))[0, 0]  # (T, h, w)
    scores = torch.stack([ref[list(pos)].mean(0) for pos in chunk.positions])
    _labels_match(scores, tuple(image.shape[-2:]), res.label_map)


def test_unsupervised_merges_every_captured_position(pipe):
    seed = fresh_seed()
    seg = Seg4DiffSegmenter(pipe, layer=[1], resolution=RES, seed=seed % 997)
    image = _images(seed, 1)[0]
    res = seg.unsupervised(image)
    assert res.label_map.shape == tuple(image.shape[-2:])
    n = seg.reader.capture_tokens()
    n = len(n) if n is not None else seg.reader.encode_text([""]).length
    assert sorted({i for g in res.groups for i in g}) == list(range(n))  # every text position is in a segment
    assert 0 <= res.label_map.min() and res.label_map.max() < res.num_segments


def test_label_equals_segmenter(pipe, tmp_path):
    from seg4diff_fast.label import label_images

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    os.makedirs(tmp_path / "imgs")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 40)), 30, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"im{i}.png")
    seg = Seg4DiffSegmenter(pipe, layer=[1], resolution=RES, seed=seed % 997)
    label_images(str(tmp_path / "imgs"), NAMES, str(tmp_path / "out"), segmenter=seg, progress=False, workers=0)
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "out" / f"im{i}.png"))
        want = seg(np.asarray(Image.open(tmp_path / "imgs" / f"im{i}.png")), NAMES).label_map
        np.testing.assert_array_equal(got, want)


def test_block_mass_matches_reference(pipe):
    seed = fresh_seed()
    reader = _reader(pipe, seed % 997)
    latents = reader.latents(_images(seed, 2))
    text = reader.encode_text(["a cat on a red sofa"] * 2)
    got = reader.block_mass(latents, text)
    rec, _ = _stock(reader, latents, text)
    ref = reference_mass(rec, reader.transformer, GRID[0] * GRID[1]).numpy()
    assert sorted(got) == list(range(reader.num_layers))
    np.testing.assert_allclose(np.stack([got[i].numpy() for i in range(reader.num_layers)]), ref, rtol=1e-4,
                               atol=1e-6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pipe):
    path = str(tmp_path_factory.mktemp(family_of(pipe).name))
    pipe.save_pretrained(path)
    return path


def test_load_pipeline_detects_the_family(saved, pipe, tmp_path):
    loaded = load_pipeline(saved, dtype="float32", device="cpu")
    assert type(loaded) is type(pipe) and family_of(loaded).name == family_of(pipe).name
    for name in family_of(pipe).dropped:
        assert getattr(loaded, name, None) is None
    bad = tmp_path / "bad"
    os.makedirs(bad)
    json.dump({"_class_name": "StableDiffusionXLPipeline"}, open(bad / "model_index.json", "w"))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline is not a supported pipeline; supported: .*"
                                         "FluxPipeline.*Flux2KleinPipeline.*QwenImagePipeline"):
        load_pipeline(str(bad))


def test_eval_cli_all_layers(saved, pipe, tmp_path, capsys):
    from test_eval_cli import _write_dataset

    from seg4diff_fast import cli

    rng = np.random.default_rng(fresh_seed())
    root = str(tmp_path / "datasets")
    _write_dataset(root, "voc20", 2, 20, rng)
    out = str(tmp_path / "res.json")
    assert cli.main(["eval", "--no-progress", "--resolution", "32", "--dataset", "voc20", "--root", root,
                     "--model", saved, "--layers", "all", "--out", out]) == 0
    result = json.load(open(out))
    n = _reader(pipe).num_layers
    assert sorted(int(k) for k in result["per_layer"]) == list(range(n))
    assert all(0 <= v <= 100 for v in result["per_layer"].values())


def test_magnet_trains_and_the_lora_round_trips(pipe, tmp_path):
    from seg4diff_fast.magnet import MagnetConfig, load_magnet_lora, train_magnet
    from seg4diff_fast.magnet.data import ShapesMagnetData

    name = family_of(pipe).name
    build = BUILDERS[name]
    trained = build()
    cfg = MagnetConfig(protocol="corrected", layer=1, rank=2, max_steps=2, batch_size=2, warmup_steps=0,
                       resolution=RES, lr=1e-2)
    summary = train_magnet(trained, ShapesMagnetData(4), cfg, str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 2 and all(math.isfinite(v) for k, v in summary["final"].items() if k != "masks")
    assert summary["totals"]["masks"] > 0  # the mask loss ran on this family's maps
    fresh = load_magnet_lora(build(), str(tmp_path / "run"))
    reader_t, reader_f = _reader(trained), _reader(fresh)
    latents = reader_t.latents(_images(fresh_seed(), 1))
    text = reader_t.encode_text(["red car"])
    with torch.no_grad():
        a = reader_t.forward(trained.transformer, latents, text, reader_t.timestep.expand(1))[0]
        b = reader_f.forward(fresh.transformer, latents, text, reader_f.timestep.expand(1))[0]
        base = reader_f.forward(build().transformer, latents, text, reader_f.timestep.expand(1))[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # saved with the pipeline class, loaded by it
    assert not torch.allclose(a, base)  # and the LoRA changed the model
    if name != "sd3":
        with pytest.raises(ValueError, match="paper protocol is the authors' SD3 training"):
            train_magnet(build(), ShapesMagnetData(2), MagnetConfig(protocol="paper", layer=1, max_steps=1,
                                                                     resolution=RES), str(tmp_path / "p"),
                         progress=False)


def test_layer_past_the_block_count_is_one_clear_error(pipe):
    reader = _reader(pipe)
    n = reader.num_layers
    with pytest.raises(ValueError, match=rf"layer {n} is out of range: this transformer has {n} blocks"):
        Seg4DiffSegmenter(pipe, layer=n, resolution=RES)


def test_class_positions_average_their_tokens(pipe):
    """A class's map is the mean of its tokens' maps (sub-words merged), read at the family's positions."""
    seed = fresh_seed()
    seg = Seg4DiffSegmenter(pipe, layer=[1], resolution=RES, seed=seed % 997)
    reader = seg.reader
    latents = reader.latents(_images(seed, 1))
    (chunk,) = reader.token_positions(NAMES)
    text = reader.encode_text([chunk.prompt])
    maps = reader.read(latents, text, [1], all_text=True)[0, 0]
    (scores,) = seg.score_latents(latents, [[chunk]], [1])
    want = torch.stack([maps[list(p)].mean(0) for p in chunk.positions])
    torch.testing.assert_close(scores[0] if scores.dim() == 4 else scores, want)
    assert F.softmax(want.flatten(1), -1).isfinite().all()


def test_cli_segment_label_and_layers(saved, pipe, tmp_path, capsys):
    """The real entry points on a saved folder of each family: segment (files equal the segmenter), label
    (the label PNG), layers (the attention-mass table, one row per block)."""
    from seg4diff_fast import cli

    rng = np.random.default_rng(fresh_seed())
    os.makedirs(tmp_path / "imgs")
    image = rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "imgs" / "photo.png")
    out = tmp_path / "seg"
    assert cli.main(["segment", str(tmp_path / "imgs" / "photo.png"), "--classes", "cat,sofa,red car", "--model",
                     saved, "--layer", "1", "--resolution", str(RES), "--out", str(out)]) == 0
    want = Seg4DiffSegmenter(load_pipeline(saved), layer=1, resolution=RES)(image, NAMES).label_map
    np.testing.assert_array_equal(np.asarray(Image.open(out / "photo_labels.png")), want)
    assert cli.main(["label", "--images", str(tmp_path / "imgs"), "--classes", "cat,sofa,red car", "--model", saved,
                     "--layer", "1", "--resolution", str(RES), "--out", str(tmp_path / "lab"), "--workers", "0",
                     "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "lab" / "photo.png")), want)
    rep = tmp_path / "rep"
    assert cli.main(["layers", "--model", saved, "--resolution", str(RES), "--mass-scenes", "2", "--no-plot",
                     "--out", str(rep)]) == 0
    mass = np.array(json.loads((rep / "layers.json").read_text())["mass"]["mass"])
    n = _reader(pipe).num_layers
    assert mass.shape[0] == n and np.isfinite(mass).all() and (mass >= 0).all()
    capsys.readouterr()
