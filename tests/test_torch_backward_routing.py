"""The "torch" backend's backward routing: torch's fused SDPA backward when only ``out`` has a gradient,
the exact row-chunked backward when the map has one (or when the forward itself fell back to chunks).

Which path runs is decided by ``torch_attention.backward_path`` from the kernel the forward used; these
tests check the table, that autograd follows it (spies on both paths), and the gradients against an
independent float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, fresh_seed

import seg4diff_fast.ops.torch_attention as ta
from seg4diff_fast import joint_attention


def _ref(q, k, v, cols, rows, scale):
    """float64 attention and the head-mean probs map, straight from the full softmax."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    qd, kd, vd = leaves
    p = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1)
    out = p @ vd
    maps = p[:, :, rows[0] : rows[1]][..., cols].mean(1)
    return leaves, out, maps


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def _inputs(device, dtype=torch.float32, b=2, h=3, n=75, d=32):
    gen = torch.Generator().manual_seed(fresh_seed())
    # diffusers' (B, N, H, D) layout viewed as (B, H, N, D)
    return [torch.randn(b, n, h, d, generator=gen).to(device=device, dtype=dtype).transpose(1, 2).requires_grad_(True)
            for _ in range(3)]


class _Spy:
    def __init__(self, monkeypatch, name):
        self.calls = []
        orig = getattr(ta, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return orig(*args, **kwargs)

        monkeypatch.setattr(ta, name, spy)


def test_forward_kernel_order():
    assert ta.forward_kernels("cpu", torch.float32) == (ta.FWD_CPU_FLASH,)
    assert ta.forward_kernels("cuda", torch.bfloat16) == (ta.FWD_CUDA_FLASH, ta.FWD_CUDA_EFFICIENT)
    assert ta.forward_kernels("cuda", torch.float16) == (ta.FWD_CUDA_FLASH, ta.FWD_CUDA_EFFICIENT)
    assert ta.forward_kernels("cuda", torch.float32) == (ta.FWD_CUDA_EFFICIENT,)
    assert ta.forward_kernels("mps", torch.float32) == ()


@pytest.mark.parametrize("kernel", [ta.FWD_CPU_FLASH, ta.FWD_CUDA_FLASH, ta.FWD_CUDA_EFFICIENT, ta.FWD_CHUNKED])
def test_backward_path_table(kernel):
    # out-only gradient: the forward kernel's own fused backward (none exists for the chunked forward)
    assert ta.backward_path(kernel, map_grad=False) == (ta.BWD_CHUNKED if kernel == ta.FWD_CHUNKED else kernel)
    # the map's gradient: always the chunked backward, which folds it into dS
    assert ta.backward_path(kernel, map_grad=True) == ta.BWD_CHUNKED


@pytest.mark.parametrize("loss_on", ["out", "maps", "both"])
def test_autograd_follows_the_routing_cpu(loss_on, monkeypatch, poison_outputs):
    fused, chunked = _Spy(monkeypatch, "fused_sdpa_backward"), _Spy(monkeypatch, "chunked_backward")
    q, k, v = _inputs("cpu")
    cols, rows = torch.arange(60, 75), (0, 60)
    out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, backend="torch")
    leaves, out_ref, maps_ref = _ref(q, k, v, cols, rows, 32**-0.5)
    w_out, w_map = torch.randn(out.shape, dtype=torch.float64), torch.randn(maps.shape, dtype=torch.float64)
    loss = {"out": (out.double() * w_out).sum(), "maps": (maps.double() * w_map).sum()}
    loss_ref = {"out": (out_ref * w_out).sum(), "maps": (maps_ref * w_map).sum()}
    parts = ["out", "maps"] if loss_on == "both" else [loss_on]
    grads = torch.autograd.grad(sum(loss[p] for p in parts), (q, k, v), allow_unused=True)
    grads_ref = torch.autograd.grad(sum(loss_ref[p] for p in parts), leaves, allow_unused=True)
    if loss_on == "out":
        assert len(fused.calls) == 1 and not chunked.calls
        assert fused.calls[0][0].kernel == ta.FWD_CPU_FLASH
    else:
        assert len(chunked.calls) == 1 and not fused.calls
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:  # the map does not depend on v
            assert g is None or g.abs().max() == 0
        else:
            assert _rel(g, g_ref) <= 1e-5


def test_chunked_forward_falls_back_to_the_chunked_backward(monkeypatch, poison_outputs):
    """When no fused kernel takes the forward (here: all refuse), the out-only backward is chunked too."""
    def refuse(kernel, *args, **kwargs):
        raise RuntimeError(f"{kernel} refuses this call")

    monkeypatch.setattr(ta, "_run_fused_forward", refuse)
    fused, chunked = _Spy(monkeypatch, "fused_sdpa_backward"), _Spy(monkeypatch, "chunked_backward")
    q, k, v = _inputs("cpu", n=50)
    cols, rows = torch.tensor([3, 40, 49]), (0, 40)
    out, _ = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, backend="torch")
    leaves, out_ref, _ = _ref(q, k, v, cols, rows, 32**-0.5)
    w = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((out_ref * w).sum(), leaves)
    assert len(chunked.calls) == 1 and not fused.calls
    for g, g_ref in zip(grads, grads_ref):
        assert _rel(g, g_ref) <= 1e-5


@pytest.mark.parametrize("kernels,used", [((ta.FWD_CUDA_FLASH, ta.FWD_CUDA_EFFICIENT), ta.FWD_CUDA_FLASH),
                                          ((ta.FWD_CUDA_FLASH, ta.FWD_CUDA_EFFICIENT), ta.FWD_CUDA_EFFICIENT),
                                          ((ta.FWD_CUDA_EFFICIENT,), ta.FWD_CUDA_EFFICIENT)])
def test_cuda_kernels_route_to_their_own_backward(kernels, used, monkeypatch, poison_outputs):
    """The CUDA order on CPU tensors: stand-in kernels (the CPU one underneath) record which ran; the out-only
    backward must reach fused_sdpa_backward with the kernel the forward used, after a refused one if any."""
    tried, backward_kernels = [], []
    real_forward, real_backward = ta._run_fused_forward, ta.fused_sdpa_backward

    def fake_forward(kernel, q, k, v, scale):
        tried.append(kernel)
        if kernel != used:
            raise RuntimeError("refused")
        out, lse, _ = real_forward(ta.FWD_CPU_FLASH, q, k, v, scale)
        return out, lse, ("aux of", kernel)

    def fake_backward(fused, *args):
        backward_kernels.append(fused)
        return real_backward(ta.FusedForward(ta.FWD_CPU_FLASH), *args)

    monkeypatch.setattr(ta, "forward_kernels", lambda device_type, dtype: kernels)
    monkeypatch.setattr(ta, "_run_fused_forward", fake_forward)
    monkeypatch.setattr(ta, "fused_sdpa_backward", fake_backward)
    chunked = _Spy(monkeypatch, "chunked_backward")
    q, k, v = _inputs("cpu")
    out, _ = joint_attention(q, k, v, capture_cols=torch.arange(60, 75), capture_rows=(0, 60), backend="torch")
    out.backward(torch.randn_like(out))
    assert tried == list(kernels[: kernels.index(used) + 1])
    assert backward_kernels == [ta.FusedForward(used, ("aux of", used))] and not chunked.calls


@pytest.mark.skipif(not HAS_CUDA, reason="torch's CUDA flash / efficient kernels need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_backward_numerics_cuda(dtype, monkeypatch, poison_outputs):
    fused = _Spy(monkeypatch, "fused_sdpa_backward")
    q, k, v = _inputs("cuda", dtype, b=2, h=4, n=333, d=64)
    cols, rows = torch.arange(300, 333, device="cuda"), (0, 300)
    out, _ = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, backend="torch")
    leaves, out_ref, _ = _ref(q, k, v, cols, rows, 64**-0.5)
    w = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((out_ref * w).sum(), leaves)
    expected = ta.FWD_CUDA_EFFICIENT if dtype == torch.float32 else ta.FWD_CUDA_FLASH
    assert [c[0].kernel for c in fused.calls] == [expected]
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for g, g_ref in zip(grads, grads_ref):
        assert _rel(g, g_ref) <= tol


@pytest.mark.parametrize("dtype,kernel", [(torch.bfloat16, ta.FWD_CUDA_FLASH), (torch.float16, ta.FWD_CUDA_FLASH),
                                          (torch.float32, ta.FWD_CUDA_EFFICIENT)])
def test_cuda_fused_calls_bind_on_meta_tensors(dtype, kernel):
    """The CUDA forward / backward op calls (arity, argument order, the aux each backward takes) run through
    torch's meta kernels: shapes and dtypes come out right without a GPU."""
    q, k, v = (torch.empty(2, 77, 3, 64, dtype=dtype, device="meta").transpose(1, 2) for _ in range(3))
    out, lse, aux = ta._run_fused_forward(kernel, q, k, v, 0.125)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, 3, 77)
    dq, dk, dv = ta.fused_sdpa_backward(ta.FusedForward(kernel, aux), torch.empty_like(out), q, k, v, out,
                                        lse.float(), 0.125)
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
