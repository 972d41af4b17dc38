"""Unsupervised segmentation: the greedy KL merging against a plain-loop numpy reference, and the
segmenter's empty-prompt maps against a full stock forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _segment_ref import GRID, RES, _reference_token_maps
from conftest import fresh_seed as _seed

from seg4diff_fast import Seg4DiffSegmenter
from seg4diff_fast.segment.inputs import as_float, to_rgb
from seg4diff_fast.segment.unsupervised import merge_maps
from seg4diff_fast.testing import tiny_sd3_pipeline


def _reference_merge(maps: np.ndarray, threshold: float, power: float, eps: float | None = None):
    """SEG4DIFF.md's procedure written with loops in float64 (``eps``: the authors' ``/ (range + 1e-6)``)."""
    t = maps.shape[0]
    x = maps.reshape(t, -1).astype(np.float64)
    lo, hi = x.min(0), x.max(0)
    x = (x - lo) / (np.where(hi - lo > 0, hi - lo, np.inf) if eps is None else (hi - lo) + eps)
    x = x**power
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)

    def kl(a, b):
        return float(np.sum(a * np.log(a / b)))

    matched = [False] * t
    groups = []
    for i in range(t):
        if matched[i]:
            continue
        group = [j for j in range(t) if (kl(p[i], p[j]) + kl(p[j], p[i])) / 2 < threshold]
        for j in group:
            matched[j] = True
        groups.append(group)
    segs = np.stack([p[g].mean(0) for g in groups]).reshape(len(groups), *maps.shape[1:])
    return segs, groups


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_merge_maps_matches_loop_reference(power):
    rng = np.random.default_rng(_seed())
    base = rng.random((6, 9, 7)) ** 3
    # 30 maps: noisy copies of 6 shapes, so groups of several form and some overlap
    maps = base[rng.integers(0, 6, 30)] + 0.05 * rng.random((30, 9, 7))
    for threshold in (0.01, 0.1, 0.5):
        segs, groups = merge_maps(torch.from_numpy(maps).float(), threshold, power)
        ref_segs, ref_groups = _reference_merge(maps.astype(np.float32), threshold, power)
        assert groups == ref_groups
        np.testing.assert_allclose(segs.numpy(), ref_segs, rtol=1e-5, atol=1e-9)
    assert len(merge_maps(torch.from_numpy(maps).float(), 1e-12, power)[1]) == 30  # nothing merges


def test_paper_normalization_at_attention_sized_ranges():
    """The authors' ``/ (range + 1e-6)`` against the exact range, on maps shaped like attention probabilities
    (values ~1/4000, per-pixel ranges ~1e-4 down to 1e-6): paper merging equals the eps reference, and the
    epsilon changes the grouping (so the protocol switch matters)."""
    rng = np.random.default_rng(_seed())
    differs = 0
    for _ in range(6):
        base = rng.random((5, 12, 12))
        scale = 10.0 ** rng.uniform(-6, -4, (1, 12, 12))  # per-pixel range between 1e-6 and 1e-4
        maps = (1 / 4000 + scale * base[rng.integers(0, 5, 40)] + 0.1 * scale * rng.random((40, 12, 12)))
        for threshold in (0.001, 0.01, 0.035):
            segs, groups = merge_maps(torch.from_numpy(maps), threshold, 1.0, range_epsilon=1e-6)
            ref_segs, ref_groups = _reference_merge(maps, threshold, 1.0, eps=1e-6)
            assert groups == ref_groups
            np.testing.assert_allclose(segs.numpy(), ref_segs, rtol=1e-5, atol=1e-12)
            exact = merge_maps(torch.from_numpy(maps), threshold, 1.0)[1]
            assert exact == _reference_merge(maps, threshold, 1.0)[1]
            differs += len(exact) != len(groups)
    assert differs > 0


@pytest.fixture(scope="module")
def pipe(one_thread):
    return tiny_sd3_pipeline(num_layers=3, t5=False)


@pytest.mark.parametrize("protocol", ["corrected", "paper"])
def test_unsupervised_matches_stock_reference(pipe, protocol):
    seed = _seed()
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (21, 27, 3), dtype=np.uint8)  # padded to 32x32 before the stretch
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed, protocol=protocol)
    res = seg.unsupervised(img, threshold=0.05)
    padded = F.pad(as_float(to_rgb(img)), (0, 32 - 27, 0, 32 - 21))
    tok = _reference_token_maps(pipe, padded, "", seed)[0]
    ref_segs, ref_groups = _reference_merge(tok.numpy(), 0.05, 1.0, 1e-6 if protocol == "paper" else None)
    assert res.groups == ref_groups
    np.testing.assert_allclose(res.segments.numpy(), ref_segs, rtol=1e-3, atol=1e-7)
    assert res.label_map.shape == (21, 27) and res.label_map.dtype == np.int64
    if protocol == "corrected":  # padded size, padding cropped off
        up = F.interpolate(res.segments[None], (32, 32), mode="bilinear", align_corners=False)[0, :, :21, :27]
    else:  # the authors' sem_seg_postprocess: the whole padded grid stretched onto the image
        up = F.interpolate(res.segments[None], (21, 27), mode="bilinear", align_corners=False)[0]
    if res.num_segments > 1:
        top2 = up.topk(2, 0).values
        clear = (top2[0] - top2[1]).numpy() > 1e-9
        np.testing.assert_array_equal(res.label_map[clear], up.argmax(0).numpy()[clear])
    # per-layer results in one pass equal single-layer runs
    sweep = seg.unsupervised([img], threshold=0.05, per_layer=True, layers=[0, 1, 2])[0]
    assert sweep[1].groups == res.groups
    torch.testing.assert_close(sweep[1].segments, res.segments)
    assert tuple(res.segments.shape[1:]) == GRID
