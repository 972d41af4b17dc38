"""upsample_argmax (C++ `_C` path and torch fallback) against F.interpolate(...) in float64."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import seg4diff_fast.ops.upsample_argmax as ua
from seg4diff_fast.ops.joint_attention import triton_available
from seg4diff_fast.ops.upsample_argmax import has_cpp_extension, upsample_argmax

NEAR_TIE = 1e-5

BACKENDS = [
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(
            not has_cpp_extension(),
            reason="C++ extension seg4diff_fast._C was not built (no compiler at install time?); "
            "reinstall with `pip install --no-build-isolation -e .`",
        ),
    ),
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="triton is not installed")),
]

# (K, h, w, H, W): upsample, downsample, mixed, equal, non-square, K=1, K=150, 1x1 in and out.
CASES = [
    (5, 7, 9, 23, 31),
    (4, 30, 20, 11, 7),
    (3, 12, 10, 40, 6),
    (3, 16, 16, 16, 16),
    (1, 5, 6, 13, 4),
    (150, 8, 8, 64, 80),
    (150, 16, 12, 70, 97),
    (6, 1, 1, 5, 7),
    (4, 1, 9, 3, 20),
    (2, 5, 5, 1, 1),
    (9, 64, 64, 133, 201),
]


def _scores(k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, h, w, generator=g)


def _reference(scores: torch.Tensor, size):
    up = F.interpolate(scores[None].double(), size=size, mode="bilinear", align_corners=False)[0]
    return up


def _check_against_reference(scores, size, labels, top, total):
    up = _reference(scores, size)
    H, W = size
    assert labels.shape == (H, W) and labels.dtype == torch.int64
    assert top.shape == (H, W) and top.dtype == torch.float32
    assert total.shape == (H, W) and total.dtype == torch.float32
    for t in (top, total):
        assert torch.isfinite(t).all()
    assert ((labels >= 0) & (labels < scores.shape[0])).all()

    ref_labels = up.argmax(0)
    diff = labels != ref_labels
    if diff.any():
        # Allowed only where the float64 top-2 scores are within NEAR_TIE, and the chosen class is one of them.
        top2 = up.topk(min(2, up.shape[0]), dim=0).values
        gap = top2[0] - top2[-1]
        assert (gap[diff] <= NEAR_TIE).all(), f"{int(diff.sum())} labels differ away from near-ties"
        chosen = up.gather(0, labels[None])[0]
        assert (top2[0] - chosen)[diff].max() <= NEAR_TIE
    torch.testing.assert_close(top.double(), up.amax(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.double(), up.sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}_{}x{}_to_{}x{}".format(*c))
def test_matches_interpolate_argmax(backend, case):
    k, h, w, H, W = case
    scores = _scores(k, h, w, seed=hash(case) % 2**31)
    labels, top, total = upsample_argmax(scores, (H, W), backend=backend)
    _check_against_reference(scores, (H, W), labels, top, total)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd3_like_ragged_size(backend):
    # A 64x64 token grid to a non-square image size, with many classes (ADE-150-like).
    scores = _scores(150, 64, 64, seed=7)
    labels, top, total = upsample_argmax(scores, (96, 131), backend=backend)
    _check_against_reference(scores, (96, 131), labels, top, total)


@pytest.mark.skipif(not has_cpp_extension(), reason="C++ extension seg4diff_fast._C was not built")
def test_default_dispatch_uses_cpp_on_cpu_and_agrees_with_fallback(monkeypatch):
    scores = _scores(12, 9, 11, seed=3)
    calls = []
    real = ua._C.upsample_argmax

    class Spy:
        @staticmethod
        def upsample_argmax(*args):
            calls.append(args[1:])
            return real(*args)

    monkeypatch.setattr(ua, "_C", Spy)
    labels, top, total = upsample_argmax(scores, (37, 29))
    assert calls == [(37, 29)]
    labels_t, top_t, total_t = upsample_argmax(scores, (37, 29), backend="torch")
    # Same index/weight arithmetic in both paths: equal up to float rounding.
    assert torch.equal(labels, labels_t)
    torch.testing.assert_close(top, top_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, total_t, rtol=1e-6, atol=1e-5)


def test_without_cpp_extension_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(ua, "_C", None)
    assert not ua.has_cpp_extension()
    scores = _scores(5, 6, 6, seed=11)
    labels, top, total = upsample_argmax(scores, (17, 19))
    _check_against_reference(scores, (17, 19), labels, top, total)
    with pytest.raises(RuntimeError, match="not built"):
        upsample_argmax(scores, (17, 19), backend="cpp")


def test_torch_fallback_bands_bound_memory(monkeypatch):
    scores = _scores(10, 8, 8, seed=5)
    whole = upsample_argmax(scores, (50, 40), backend="torch")
    # A tiny band budget forces one output row per band; the result must not change.
    monkeypatch.setattr(ua, "CHUNK_BYTES", 1)
    banded = upsample_argmax(scores, (50, 40), backend="torch")
    assert torch.equal(whole[0], banded[0]) and torch.equal(whole[1], banded[1])
    torch.testing.assert_close(whole[2], banded[2], rtol=1e-6, atol=1e-5)  # sum order may follow the shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pick_first_class(backend):
    scores = torch.zeros(4, 3, 5)
    scores[2] = 1.0
    scores[3] = 1.0  # same as class 2: the first one wins
    labels, top, total = upsample_argmax(scores, (7, 9), backend=backend)
    assert (labels == 2).all()
    assert (top == 1.0).all() and (total == 2.0).all()
    labels, _, _ = upsample_argmax(torch.zeros(3, 2, 2), (4, 4), backend=backend)
    assert (labels == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_behaves_like_argmax(backend):
    scores = torch.zeros(3, 4, 4)
    scores[1] = 0.5
    scores[2, 0, 0] = float("nan")
    labels, top, _ = upsample_argmax(scores, (8, 8), backend=backend)
    up = F.interpolate(scores[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.equal(labels, up.argmax(0))
    assert torch.equal(torch.isnan(top), torch.isnan(up.amax(0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_other_dtypes(backend):
    base = _scores(6, 10, 7, seed=9)
    strided = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not strided.is_contiguous()
    ref = upsample_argmax(base, (21, 15), backend=backend)
    got = upsample_argmax(strided, (21, 15), backend=backend)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = base.to(dtype)
        labels, top, total = upsample_argmax(x, (21, 15), backend=backend)
        _check_against_reference(x.float(), (21, 15), labels, top, total)


@pytest.mark.skipif(not has_cpp_extension(), reason="C++ extension seg4diff_fast._C was not built")
def test_cpp_concurrent_calls_from_threads():
    # The op releases the GIL; concurrent calls must give the same results as serial ones.
    inputs = [_scores(20, 16, 16, seed=s) for s in range(4)]
    serial = [upsample_argmax(x, (64, 48)) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        results[i] = upsample_argmax(inputs[i], (64, 48))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(serial, results):
        for a, b in zip(want, got):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "scores, size, exc, match",
    [
        (torch.zeros(4, 4), (8, 8), ValueError, "3-D"),
        (torch.zeros(1, 2, 4, 4), (8, 8), ValueError, "3-D"),
        (torch.zeros(2, 4, 4, dtype=torch.int64), (8, 8), TypeError, "floating"),
        (torch.zeros(2, 4, 4, dtype=torch.bool), (8, 8), TypeError, "floating"),
        (torch.zeros(0, 4, 4), (8, 8), ValueError, "empty"),
        (torch.zeros(2, 0, 4), (8, 8), ValueError, "empty"),
        (torch.zeros(2, 4, 4), (0, 8), ValueError, "positive"),
        (torch.zeros(2, 4, 4), (8, -1), ValueError, "positive"),
        (torch.zeros(2, 4, 4), 8, TypeError, "pair"),
        (torch.zeros(2, 4, 4), (8, 8, 8), TypeError, "pair"),
        ([[[0.0]]], (8, 8), TypeError, "torch.Tensor"),
    ],
)
def test_input_validation(scores, size, exc, match):
    with pytest.raises(exc, match=match):
        upsample_argmax(scores, size)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        upsample_argmax(torch.zeros(2, 4, 4), (8, 8), backend="cuda")
