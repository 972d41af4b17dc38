"""focal_dice_loss ("triton" and "torch" backends) against a float64 reference written from the definition.

Values and gradients (of focal·a + dice·b with random a, b), both focal forms, ragged sizes, K = 1 … 32,
target dtypes, α < 0, generic γ, half-precision logits. Without CUDA the Triton backend runs in Triton's
interpreter on CPU tensors (small shapes: a few programs per call); with CUDA the same tests run natively.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_seed

import seg4diff_fast.magnet.losses as losses
import seg4diff_fast.ops.focal_dice as focal_dice_mod
from seg4diff_fast.magnet import focal_dice_loss
from seg4diff_fast.ops.backends import triton_available

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="triton is not installed")),
    "torch",
]
# max |error| / max |reference|
FWD_TOL = 2e-5
BWD_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def poison(poison_outputs, monkeypatch):
    """Every buffer the ops allocate with empty_output starts as NaN: an element left unwritten fails."""
    monkeypatch.setattr(focal_dice_mod, "empty_output", poison_outputs)
    if triton_available():
        import seg4diff_fast.kernels.focal_dice as kernel_mod

        monkeypatch.setattr(kernel_mod, "empty_output", poison_outputs)


def reference(pred, target, alpha=0.25, gamma=2.0, form="standard"):
    """The definition in float64: F.interpolate, then the per-pixel focal and the per-mask dice."""
    x = F.interpolate(pred[None].double(), size=target.shape[1:], mode="bilinear", align_corners=False)[0]
    t = target.double()
    p = 1.0 / (1.0 + torch.exp(-x))
    ce = x.clamp_min(0) - x * t + torch.log1p(torch.exp(-x.abs()))  # BCE with logits
    base = x if form == "authors" else p
    p_t = base * t + (1 - base) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    focal = loss.mean(dim=(1, 2)).mean()
    dice = (1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)).mean()
    return focal, dice


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-30))


def make_inputs(k, h, w, H, W, seed, device, pred_dtype=torch.float32, target_dtype=torch.bool, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(k, h, w, generator=g) * scale).to(device=device, dtype=pred_dtype)
    # blobby targets: a thresholded smooth field, plus one all-empty mask when K > 1
    field = F.interpolate(torch.randn(1, k, 4, 4, generator=g), size=(H, W), mode="bilinear")[0]
    target = field > 0.3
    if k > 1:
        target[-1] = False
    return pred.requires_grad_(True), target.to(device=device, dtype=target_dtype)


def check(pred, target, backend, alpha=0.25, gamma=2.0, form="standard", seed=0, ab=None):
    focal, dice = focal_dice_loss(pred, target, alpha=alpha, gamma=gamma, focal_form=form, backend=backend)
    leaf = pred.detach().double().requires_grad_(True)
    focal_ref, dice_ref = reference(leaf, target, alpha, gamma, form)
    msg = f"seed={seed}"
    for got, ref in ((focal, focal_ref), (dice, dice_ref)):
        assert got.shape == () and got.dtype == torch.float32, msg
        assert rel_err(got, ref) <= FWD_TOL, f"{msg}: {float(got)} vs {float(ref)}"
    a, b = torch.randn(2, dtype=torch.float64).tolist() if ab is None else ab
    (grad,) = torch.autograd.grad(focal * a + dice * b, pred)
    (grad_ref,) = torch.autograd.grad(focal_ref * a + dice_ref * b, leaf)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape, msg
    assert torch.isfinite(grad).all(), msg
    assert rel_err(grad, grad_ref) <= BWD_TOL[pred.dtype], f"{msg}: grad rel err {rel_err(grad, grad_ref)}"
    return focal, dice, grad


# (K, h, w, H, W): ragged upsampling, a multi-block image (32×32), equal sizes, non-integer scales,
# K = 32, downsampling, a 1×1 grid; with the target dtype each case uses.
CASES = [
    (1, 3, 5, 13, 17, torch.bool),
    (3, 7, 7, 32, 32, torch.uint8),
    (3, 8, 8, 8, 8, torch.float32),
    (2, 5, 4, 11, 9, torch.bool),
    (32, 8, 8, 13, 17, torch.bool),
    (4, 6, 9, 4, 5, torch.float16),
    (2, 1, 1, 6, 7, torch.uint8),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["standard", "authors"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}_{}x{}_to_{}x{}_{}".format(*c[:5], str(c[5])[6:]))
def test_matches_reference(backend, form, case, device):
    k, h, w, H, W, tdt = case
    seed = fresh_seed()
    pred, target = make_inputs(k, h, w, H, W, seed, device, target_dtype=tdt)
    check(pred, target, backend, form=form, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0, 3])
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.0])
def test_alpha_gamma(backend, gamma, alpha, device):
    seed = fresh_seed()
    pred, target = make_inputs(3, 5, 6, 12, 10, seed, device)
    check(pred, target, backend, alpha=alpha, gamma=gamma, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float32, torch.bfloat16, torch.float64])
def test_target_dtypes_agree(backend, target_dtype, device):
    seed = fresh_seed()
    pred, target = make_inputs(2, 4, 6, 9, 14, seed, device)
    ab = torch.randn(2, dtype=torch.float64).tolist()
    want = check(pred, target, backend, seed=seed, ab=ab)
    got = check(pred, target.to(target_dtype), backend, seed=seed, ab=ab)
    for a, b in zip(want, got):
        assert torch.equal(a, b), f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["standard", "authors"])
def test_half_precision_logits(backend, dtype, form, device):
    seed = fresh_seed()
    pred, target = make_inputs(3, 6, 5, 15, 11, seed, device, pred_dtype=dtype)
    check(pred, target, backend, form=form, seed=seed)  # the reference reads the same half values


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_logits_stay_finite(backend, device):
    seed = fresh_seed()
    pred, target = make_inputs(3, 4, 4, 10, 10, seed, device)
    # |x| in [18, 30]: σ(x) rounds to 1 in float32 (so 1 − σ must not be formed by cancellation),
    # not yet in the float64 reference
    g = torch.Generator().manual_seed(seed)
    mag = 18.0 + 12.0 * torch.rand(pred.shape, generator=g).to(device)
    pred = (torch.where(pred.detach() >= 0, mag, -mag)).requires_grad_(True)
    check(pred, target, backend, seed=seed)
    check(pred, target, backend, form="authors", seed=seed)
    check(pred, target, backend, gamma=0.5, seed=seed)  # q^(γ-1) would be infinite where q = 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["standard", "authors"])
def test_agrees_with_reference_backend_and_forward_is_deterministic(backend, form, device):
    seed = fresh_seed()
    pred, target = make_inputs(5, 7, 6, 20, 23, seed, device)  # 460 pixels: a ragged last block
    f1, d1 = focal_dice_loss(pred, target, focal_form=form, backend=backend)
    f2, d2 = focal_dice_loss(pred, target, focal_form=form, backend=backend)
    assert torch.equal(f1, f2) and torch.equal(d1, d2)  # no atomics in the forward
    f3, d3 = focal_dice_loss(pred, target, focal_form=form, backend="reference")
    torch.testing.assert_close(f1, f3, rtol=2e-5, atol=0)
    torch.testing.assert_close(d1, d3, rtol=2e-5, atol=0)
    (g1,) = torch.autograd.grad(f1 + d1, pred)
    (g3,) = torch.autograd.grad(f3 + d3, pred)
    assert rel_err(g1, g3.double()) <= BWD_TOL[torch.float32], f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_used_and_no_grad_input(backend, device):
    seed = fresh_seed()
    pred, target = make_inputs(2, 5, 5, 9, 9, seed, device)
    focal, dice = focal_dice_loss(pred, target, backend=backend)
    (g_focal,) = torch.autograd.grad(focal, pred)
    leaf = pred.detach().double().requires_grad_(True)
    focal_ref, _ = reference(leaf, target)
    (g_ref,) = torch.autograd.grad(focal_ref, leaf)
    assert rel_err(g_focal, g_ref) <= BWD_TOL[torch.float32], f"seed={seed}"
    focal, dice = focal_dice_loss(pred.detach(), target, backend=backend)
    assert not focal.requires_grad and not dice.requires_grad


def test_torch_backend_chunks(monkeypatch, device):
    seed = fresh_seed()
    pred, target = make_inputs(7, 5, 6, 11, 13, seed, device)
    ab = torch.randn(2, dtype=torch.float64).tolist()
    whole = check(pred, target, "torch", seed=seed, ab=ab)
    sizes = []
    real = focal_dice_mod._upsample

    def spy(chunk, size):
        sizes.append(chunk.shape[0])
        return real(chunk, size)

    monkeypatch.setattr(focal_dice_mod, "_upsample", spy)
    monkeypatch.setattr(focal_dice_mod, "CHUNK_BYTES", 4 * 11 * 13 * 3)  # 3 masks per chunk: 3, 3, 1
    chunked = check(pred, target, "torch", seed=seed, ab=ab)
    assert sizes == [3, 3, 1] * 2  # forward, then the backward's recompute: never more than a chunk
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "pred, target, exc, match",
    [
        (torch.zeros(0, 4, 4), torch.zeros(0, 8, 8), ValueError, "K = 0"),
        (torch.zeros(4, 4), torch.zeros(1, 8, 8), ValueError, "3-D"),
        (torch.zeros(1, 4, 4), torch.zeros(8, 8), ValueError, "3-D"),
        (torch.zeros(2, 4, 4), torch.zeros(3, 8, 8), ValueError, "2 masks but target has 3"),
        (torch.zeros(2, 4, 4, dtype=torch.float64), torch.zeros(2, 8, 8), TypeError, "pred.float"),
        (torch.zeros(2, 4, 4, dtype=torch.int64), torch.zeros(2, 8, 8), TypeError, "float32"),
        (torch.zeros(2, 4, 4), torch.zeros(2, 8, 8, dtype=torch.int64), TypeError, "target.bool"),
        (torch.zeros(2, 4, 4), torch.full((2, 8, 8), 0.5), ValueError, "only 0 and 1"),
        (torch.zeros(2, 4, 4), torch.full((2, 8, 8), 2, dtype=torch.uint8), ValueError, "only 0 and 1"),
        (torch.zeros(2, 0, 4), torch.zeros(2, 8, 8), ValueError, "empty spatial"),
        (torch.zeros(2, 4, 4), torch.zeros(2, 8, 0), ValueError, "empty spatial"),
        ([[[0.0]]], torch.zeros(1, 8, 8), TypeError, "torch.Tensor"),
    ],
)
def test_input_validation(pred, target, exc, match):
    with pytest.raises(exc, match=match):
        focal_dice_loss(pred, target)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"focal_form": "author"}, "focal_form"),
        ({"focal_form": "authors", "gamma": 1.5}, "only gamma=2"),
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"alpha": 1.5}, "alpha"),
        ({"backend": "cuda"}, "focal_dice_loss: backend"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        focal_dice_loss(torch.zeros(2, 4, 4), torch.zeros(2, 8, 8), **kwargs)


def test_magnet_reexports_the_op():
    """magnet.losses is a thin re-export of ops.focal_dice (the op's dispatch lives in ops)."""
    assert losses.focal_dice_loss is focal_dice_mod.focal_dice_loss is focal_dice_loss
    assert losses.CHUNK_BYTES == focal_dice_mod.CHUNK_BYTES and losses.FOCAL_FORMS == focal_dice_mod.FOCAL_FORMS
    assert tuple(focal_dice_mod.BACKEND_REGISTRY) == focal_dice_mod.BACKENDS == ("triton", "torch", "reference")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_backend_errors_name_the_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="^focal_dice_loss: backend 'triton' runs on CUDA tensors"):
        focal_dice_loss(torch.zeros(2, 4, 4), torch.zeros(2, 8, 8), backend="triton")
