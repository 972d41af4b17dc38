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


def _reference_merge(maps: np.ndarray, threshold: float, power: float):
    """SEG4DIFF.md's procedure written with loops in float64."""
    t = maps.shape[0]
    x = maps.reshape(t, -1).astype(np.float64)
    lo, hi = x.min(0), x.max(0)
    x = (x - lo) / np.where(hi - lo > 0, hi - lo, np.inf)
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


@pytest.fixture(scope="module")
def pipe(one_thread):
    return tiny_sd3_pipeline(num_layers=3, t5=False)


def test_unsupervised_matches_stock_reference(pipe):
    seed = _seed()
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (21, 27, 3), dtype=np.uint8)  # padded to 32x32 before the stretch
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=RES, seed=seed)
    res = seg.unsupervised(img, threshold=0.05)
    padded = F.pad(as_float(to_rgb(img)), (0, 32 - 27, 0, 32 - 21))
    tok = _reference_token_maps(pipe, padded, "", seed)[0]
    ref_segs, ref_groups = _reference_merge(tok.numpy(), 0.05, 1.0)
    assert res.groups == ref_groups
    np.testing.assert_allclose(res.segments.numpy(), ref_segs, rtol=1e-3, atol=1e-7)
    assert res.label_map.shape == (21, 27) and res.label_map.dtype == np.int64
    up = F.interpolate(res.segments[None], (32, 32), mode="bilinear", align_corners=False)[0, :, :21, :27]
    if res.num_segments > 1:
        top2 = up.topk(2, 0).values
        clear = (top2[0] - top2[1]).numpy() > 1e-9
        np.testing.assert_array_equal(res.label_map[clear], up.argmax(0).numpy()[clear])
    # per-layer results in one pass equal single-layer runs
    sweep = seg.unsupervised([img], threshold=0.05, per_layer=True, layers=[0, 1, 2])[0]
    assert sweep[1].groups == res.groups
    torch.testing.assert_close(sweep[1].segments, res.segments)
    assert tuple(res.segments.shape[1:]) == GRID
