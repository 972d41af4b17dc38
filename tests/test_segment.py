"""Seg4DiffSegmenter against independent references built from stock diffusers parts.

The reference of a segmentation: the image stretched with F.interpolate, the stock VAE, noise from its
own generator mixed with the scheduler's σ, ``pipe.encode_prompt(max_sequence_length=77)`` with no T5,
a full forward of the transformer with diffusers' stock processors recorded by
``record_stock_attention``, the float64 materialized softmax (``reference_maps``), class maps from each
name tokenized alone, ``F.interpolate(...).argmax(0)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _segment_ref import (
    GRID,
    RES,
    _image,
    _labels_match,
    _reference_class_maps,
    _reference_token_maps,
)
from conftest import fresh_seed as _seed
from PIL import Image

from seg4diff_fast import Seg4DiffSegmenter
from seg4diff_fast.segment.inputs import as_float, to_rgb
from seg4diff_fast.segment.prompts import plan_prompts
from seg4diff_fast.testing import WORDS, tiny_sd3_pipeline


@pytest.fixture(scope="module")
def pipe(one_thread):
    return tiny_sd3_pipeline(num_layers=3, t5=False)


def test_matches_full_stock_forward_reference(pipe):
    seed = _seed()
    rng = np.random.default_rng(seed)
    names = [["cat", "sofa", "grass"], ["red car", "tree", "sky", "water"]]
    sizes = [(37, 50), (24, 24)]
    images = [_image(rng, *sizes[0]), Image.fromarray(_image(rng, *sizes[1]))]
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed, batch_size=2)
    assert abs(seg.timestep - 515.07) < 0.01
    results = seg(images, names)
    for img, cls, size, res in zip(images, names, sizes, results):
        img01 = as_float(to_rgb(img))
        tok = _reference_token_maps(pipe, img01, " ".join(cls), seed)[0]
        ref = _reference_class_maps(pipe, tok, cls)
        assert res.scores.dtype == torch.float32 and res.scores.shape == (len(cls), *GRID)
        torch.testing.assert_close(res.scores.double(), ref, rtol=1e-4, atol=1e-6)
        assert res.label_map.dtype == np.int64 and res.label_map.shape == size
        _labels_match(ref, size, res.label_map)
        up = F.interpolate(res.scores[None], size, mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(res.confidence, (up.amax(0) / up.sum(0)).numpy(), rtol=1e-5)
        assert res.prompts == [" ".join(cls)]


def test_several_layers_are_averaged(pipe):
    seed = _seed()
    img = _image(np.random.default_rng(seed), 20, 28)
    res = Seg4DiffSegmenter(pipe, layer=[0, 2], resolution=RES, seed=seed)(img, ["dog", "sofa"])
    tok = _reference_token_maps(pipe, as_float(to_rgb(img)), "dog sofa", seed, layers=(0, 2))
    ref = _reference_class_maps(pipe, tok, ["dog", "sofa"]).mean(0)
    torch.testing.assert_close(res.scores.double(), ref, rtol=1e-4, atol=1e-6)


def test_early_exit_identical_and_later_blocks_never_run(pipe):
    seed = _seed()
    img = torch.rand(3, 30, 26, generator=torch.Generator().manual_seed(seed))
    calls: dict[str, int] = {}
    handles = []
    tr = pipe.transformer
    named = [(f"block{i}", b) for i, b in enumerate(tr.transformer_blocks)]
    named += [(f"block{i}.ff", b.ff) for i, b in enumerate(tr.transformer_blocks)]
    named += [("norm_out", tr.norm_out), ("proj_out", tr.proj_out)]
    for name, mod in named:
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: calls.__setitem__(n, calls.get(n, 0) + 1)))
    try:
        full = Seg4DiffSegmenter(pipe, layer=0, resolution=RES, seed=seed, early_exit=False)(img, ["cat", "dog"])
        full_calls = dict(calls)
        calls.clear()
        fast = Seg4DiffSegmenter(pipe, layer=0, resolution=RES, seed=seed)(img, ["cat", "dog"])
    finally:
        for h in handles:
            h.remove()
    assert full_calls["block2"] == 1 and full_calls["proj_out"] == 1
    assert calls == {"block0": 1}  # not even block 0's MLP, nothing after it
    assert torch.equal(full.scores, fast.scores)
    np.testing.assert_array_equal(full.label_map, fast.label_map)
    # the pipeline is left with its stock processors
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    assert all(isinstance(p, JointAttnProcessor2_0) for p in tr.attn_processors.values())


def test_batching_invariance_with_per_image_classes(pipe):
    seed = _seed()
    rng = np.random.default_rng(seed)
    images = [_image(rng, 20 + 4 * i, 32 - 2 * i) for i in range(5)]
    classes = [list(rng.choice(WORDS[3:], size=int(rng.integers(1, 5)), replace=False)) for _ in images]
    batched = Seg4DiffSegmenter(pipe, layer=2, resolution=RES, seed=seed, batch_size=3)(images, classes)
    for img, cls, b in zip(images, classes, batched):
        one = Seg4DiffSegmenter(pipe, layer=2, resolution=RES, seed=seed, batch_size=1)(img, cls)
        torch.testing.assert_close(b.scores, one.scores, rtol=1e-5, atol=1e-7)
        _labels_match(one.scores.double(), img.shape[:2], b.label_map)
        assert b.classes == cls


def test_input_kinds_are_equivalent(pipe):
    seed = _seed()
    rng = np.random.default_rng(seed)
    rgb = _image(rng, 18, 22)
    gray = rgb[..., 0]
    rgba = np.concatenate([rgb, rng.integers(0, 256, (18, 22, 1), dtype=np.uint8)], axis=2)
    ref = as_float(to_rgb(rgb))
    for x in (Image.fromarray(rgb), Image.fromarray(rgba), rgba, torch.from_numpy(rgb).permute(2, 0, 1),
              torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, torch.from_numpy(rgba).permute(2, 0, 1)):
        torch.testing.assert_close(as_float(to_rgb(x)), ref)
    gref = as_float(to_rgb(gray))
    assert torch.equal(gref[0], gref[2])
    for x in (Image.fromarray(gray), gray[..., None], torch.from_numpy(gray)[None].float() / 255):
        torch.testing.assert_close(as_float(to_rgb(x)), gref)
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed)
    a, b = seg([Image.fromarray(rgba), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255], ["cat", "sky"])
    torch.testing.assert_close(a.scores, b.scores)
    for bad in (np.zeros((4, 4, 2), np.uint8), torch.full((3, 4, 4), 2.0), "image.png", np.zeros((4, 4), np.int32)):
        with pytest.raises((TypeError, ValueError)):
            seg(bad, ["cat"])


def test_pre_resize_and_output_size(pipe):
    seed = _seed()
    img = _image(np.random.default_rng(seed), 30, 45)
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed, short_side=64)
    res = seg(img, ["cat", "dog"])
    assert res.label_map.shape == (30, 45)  # back at the input's own size
    pre = np.asarray(Image.fromarray(img).resize((96, 64), Image.BILINEAR))  # detectron2: PIL bilinear
    tok = _reference_token_maps(pipe, as_float(pre), "cat dog", seed)[0]
    torch.testing.assert_close(res.scores.double(), _reference_class_maps(pipe, tok, ["cat", "dog"]),
                               rtol=1e-4, atol=1e-6)


def test_long_vocabulary_chunks_and_merge(pipe):
    """Chunks are extra rows of the same image; each chunk's maps are its own prompt's maps (checked
    against the stock reference), divided by the image-key mass 1 - sum(text probs) with image-mass."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    img = _image(rng, 24, 20)
    names = [str(w) for w in rng.choice(WORDS[3:], size=7, replace=False)]
    chunks = plan_prompts(names, pipe.tokenizer, max_tokens=4)
    assert len(chunks) > 1 and [i for c in chunks for i in c.classes] == list(range(7))
    single = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed)(img, names)
    assert len(single.prompts) == 1
    for merge in ("none", "image-mass"):
        res = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed, max_prompt_tokens=4,
                                chunk_merge=merge)(img, names)
        assert res.prompts == [c.prompt for c in chunks] and res.scores.shape[0] == 7
        for c in chunks:
            tok = _reference_token_maps(pipe, as_float(to_rgb(img)), c.prompt, seed, positions=range(154))[0]
            ref = _reference_class_maps(pipe, tok, [names[i] for i in c.classes])
            if merge == "image-mass":
                ref = ref / (1 - tok.sum(0, keepdim=True))
            torch.testing.assert_close(res.scores[list(c.classes)].double(), ref, rtol=1e-4, atol=1e-6)
    # a vocabulary longer than one prompt (80 one-token names) works and stays finite
    many = [str(w) for w in rng.choice(WORDS, size=80)]
    res = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed)(img, many)
    assert len(res.prompts) == 2 and res.scores.shape[0] == 80 and torch.isfinite(res.scores).all()
    assert res.label_map.max() < 80


def test_bad_arguments(pipe):
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=RES)
    img = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="empty"):
        seg(img, [])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        seg(img, ["cat", "™"])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        seg(img, ["  "])
    with pytest.raises(ValueError, match="out of range"):
        Seg4DiffSegmenter(pipe, layer=3)
    with pytest.raises(ValueError, match="multiple"):
        Seg4DiffSegmenter(pipe, layer=1, resolution=30)
    with pytest.raises(ValueError, match="class lists"):
        seg([img, img], [["cat"]])
    with pytest.raises(TypeError):
        Seg4DiffSegmenter(object())
