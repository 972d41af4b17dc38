"""The "torch" backend: torch's own fused SDPA (which returns its logsumexp) plus a recompute of the
selected columns. The backward is torch's fused SDPA backward for the same kernel when only ``out`` has a
gradient (``backward_path``), and an exact row-chunked backward when the map has one (torch's kernels
cannot take it). Nothing of size N² is ever allocated: the forward's extra memory is one (B, R, n_sel)
score block; the chunked backward's is a few (B, H, rows-chunk, N) blocks of about q's size
(``_rows_per_chunk``).

Math (per head, s = q kᵀ·scale, P = softmax(s), lse = log Σ_j exp s_ij):
  probs map    M_ic = exp(s_i,c − lse_i)           logits map  M_ic = s_i,c
  sel_probs    M_ic = softmax_c(s_i,c)  over the selected columns only
Backward with G = dL/dM (per head: G/H for the head mean):
  dS_ij = P_ij (dP_ij − D_i) + T_ij,   D_i = dO_i·O_i (+ Σ_c M_ic G_ic for probs),
  T at the selected columns: probs P·G, logits G, sel_probs M(G − Σ_c M G); zero elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture_spec import CaptureSpec
from .maps import gather_cols, head_maps

MIN_CHUNK_BYTES = 1 << 20  # the chunked paths' float32 working blocks are about the size of q, at least this
CAPTURE_ROWS = 1024  # captured rows per score block in the forward


# Output allocator (tests replace it with a NaN-filling one so unwritten elements show up).
empty_output = torch.empty


def _rows_per_chunk(q: torch.Tensor, total: int) -> int:
    """Query rows per block so that one (B, H, rows, N) float32 block is about the size of q."""
    b, h, n, _ = q.shape
    budget = max(q.numel() * q.element_size(), MIN_CHUNK_BYTES)
    return max(1, min(total, budget // (b * h * n * 4)))


def chunked_sdpa_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention and logsumexp by blocks of query rows (any device, any dtype)."""
    b, h, n, _ = q.shape
    out = empty_output(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = empty_output((b, h, n), dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    step = _rows_per_chunk(q, n)
    for a in range(0, n, step):
        s = torch.matmul(q[:, :, a : a + step].float(), kf.transpose(-1, -2)).mul_(scale)
        lse[:, :, a : a + step] = torch.logsumexp(s, dim=-1)
        s.sub_(lse[:, :, a : a + step, None]).exp_()
        out[:, :, a : a + step] = torch.matmul(s, vf).to(q.dtype)
    return out, lse


# The kernel that produced out and lse in the forward. A backward with no map gradient is plain attention's
# backward, so it goes to that kernel's own fused backward (``backward_path``); the chunked path is for the
# map's gradient, which torch's kernels cannot take, and for forwards that had to fall back to chunks.
FWD_CPU_FLASH = "cpu_flash"  # aten._scaled_dot_product_flash_attention_for_cpu
FWD_CUDA_FLASH = "cuda_flash"  # aten._scaled_dot_product_flash_attention (fp16 / bf16)
FWD_CUDA_EFFICIENT = "cuda_efficient"  # aten._scaled_dot_product_efficient_attention (fp32, or flash refused)
FWD_CHUNKED = "chunked"  # chunked_sdpa_with_lse: no fused kernel took the call
BWD_CHUNKED = "chunked"  # chunked_backward: the exact row-chunked backward (the map's gradient needs it)


@dataclass(frozen=True)
class FusedForward:
    """Which fused kernel ran and what its backward needs besides (q, k, v, out, lse)."""

    kernel: str
    aux: tuple = ()  # the kernel's own outputs its backward takes (sequence info, rng state, raw lse)


def forward_kernels(device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The fused kernels tried, in order, before the chunked fallback."""
    if device_type == "cpu":
        return (FWD_CPU_FLASH,)
    if device_type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            return (FWD_CUDA_FLASH, FWD_CUDA_EFFICIENT)
        return (FWD_CUDA_EFFICIENT,)
    return ()


def backward_path(forward_kernel: str, map_grad: bool) -> str:
    """Where a backward goes: the forward kernel's fused backward when only ``out`` has a gradient, the
    chunked backward when the map has one (or the forward itself was chunked)."""
    if map_grad or forward_kernel == FWD_CHUNKED:
        return BWD_CHUNKED
    return forward_kernel


def _run_fused_forward(kernel: str, q, k, v, scale: float):
    n = q.shape[2]
    if kernel == FWD_CPU_FLASH:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale
        )
        return out, lse, ()
    if kernel == FWD_CUDA_FLASH:
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, rng_state, unused)
    if kernel == FWD_CUDA_EFFICIENT:
        out, lse_raw, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale
        )
        return out, lse_raw[..., :n], (lse_raw, seed, offset)  # its lse is padded past N
    raise ValueError(kernel)


def fused_sdpa_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor, FusedForward]:
    """out, the float32 logsumexp (B, H, N) and which kernel made them: torch's fused attention where one
    takes the call (head size, arch), else the exact chunked path."""
    for kernel in forward_kernels(q.device.type, q.dtype):
        try:
            out, lse, aux = _run_fused_forward(kernel, q, k, v, scale)
            return out, lse.float(), FusedForward(kernel, aux)
        except RuntimeError:  # unsupported head size / arch: the next kernel, then the chunked path
            continue
    out, lse = chunked_sdpa_with_lse(q, k, v, scale)
    return out, lse, FusedForward(FWD_CHUNKED)


def sdpa_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused attention kernel, keeping the float32 logsumexp it computes anyway."""
    out, lse, _ = fused_sdpa_with_lse(q, k, v, scale)
    return out, lse


def fused_sdpa_backward(fused: FusedForward, dout, q, k, v, out, lse, scale: float):
    """dq, dk, dv of plain attention by the backward kernel that belongs to the forward's kernel."""
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if fused.kernel == FWD_CPU_FLASH:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=None, scale=scale
        )
    if fused.kernel == FWD_CUDA_FLASH:
        cum_q, cum_k, max_q, max_k, rng_state, unused = fused.aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, rng_state, unused, scale=scale
        )
    if fused.kernel == FWD_CUDA_EFFICIENT:
        lse_raw, seed, offset = fused.aux
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse_raw, seed, offset, 0.0, [True, True, True, False], False, scale=scale
        )
        return dq, dk, dv
    raise ValueError(f"no fused backward for forward kernel {fused.kernel!r}")


def capture_maps(q, k, lse, spec: CaptureSpec, scale: float) -> torch.Tensor:
    """Maps for rows [r0, r1) and the selected columns from the stored logsumexp, one head at a time.

    Working memory is one (B, rows-chunk, n_sel) float32 score block (at most ``CAPTURE_ROWS`` rows),
    turned into the map in place and added into the output.
    """
    b, h, _, _ = q.shape
    out = empty_output(spec.maps_shape(b, h), dtype=torch.float32, device=q.device)
    for i in range(h):
        kc = gather_cols(k[:, i : i + 1], spec.cols)[:, 0].float().transpose(-1, -2)  # (B, D, n_sel)
        for a in range(spec.r0, spec.r1, CAPTURE_ROWS):
            e = min(a + CAPTURE_ROWS, spec.r1)
            dst = out[..., a - spec.r0 : e - spec.r0, :]
            s = torch.matmul(q[:, i, a:e].float(), kc).mul_(scale)
            m = head_maps(s, lse[:, i, a:e], spec, inplace=True)
            if spec.head_reduce == "none":
                dst[:, i] = m
            elif i == 0:
                dst.copy_(m)
            elif spec.head_reduce == "mean":
                dst.add_(m)
            else:
                torch.maximum(dst, m, out=dst)
    if spec.head_reduce == "mean":
        out.div_(h)
    return out


def column_grad(s_sel, lse_rows, g_heads, spec: CaptureSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dS at the selected columns (T) and, for "probs", the row term Σ_c M_ic G_ic folded into D_i."""
    g_heads = g_heads.masked_fill((spec.cols < 0)[:, None, None, :], 0.0)
    if spec.mode == "logits":
        return g_heads, None
    m = head_maps(s_sel, lse_rows, spec)
    if spec.mode == "probs":
        t = m * g_heads
        return t, t.sum(-1)
    return m * (g_heads - (m * g_heads).sum(-1, keepdim=True)), None


def chunked_backward(q, k, v, out, lse, dout, dmaps, spec: CaptureSpec | None, scale: float):
    """Exact gradients of (out, maps) by blocks of query rows, recomputing P from the logsumexp."""
    b, h, n, _ = q.shape
    kf, vf = k.float(), v.float()
    dq = empty_output(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dout = torch.zeros_like(out, dtype=torch.float32) if dout is None else dout.float()
    delta = (dout * out.float()).sum(-1)  # D_i = dO_i·O_i, (B, H, N)
    if dmaps is not None:
        g = dmaps.float()
        g_all = g.unsqueeze(1).expand(b, h, -1, -1) / h if spec.head_reduce == "mean" else g
        kc = gather_cols(kf, spec.cols)
        idx_cols = spec.cols.clamp(min=0)[:, None, None, :]
    step = _rows_per_chunk(q, n)
    for a in range(0, n, step):
        e = min(a + step, n)
        qa = q[:, :, a:e].float()
        s = torch.matmul(qa, kf.transpose(-1, -2)).mul_(scale)
        p = s.sub_(lse[:, :, a:e, None]).exp_()  # P, in place of s
        d_a = delta[:, :, a:e]
        cap = None
        if dmaps is not None and a < spec.r1 and e > spec.r0:
            c0, c1 = max(a, spec.r0), min(e, spec.r1)
            s_sel = torch.matmul(q[:, :, c0:c1].float(), kc.transpose(-1, -2)).mul_(scale)
            t, row_term = column_grad(s_sel, lse[:, :, c0:c1], g_all[:, :, c0 - spec.r0 : c1 - spec.r0], spec)
            if row_term is not None:
                d_a = d_a.clone()
                d_a[:, :, c0 - a : c1 - a] += row_term
            cap = (c0 - a, c1 - a, t)
        dv += torch.matmul(p.transpose(-1, -2), dout[:, :, a:e])
        ds = torch.matmul(dout[:, :, a:e], vf.transpose(-1, -2)).sub_(d_a[..., None]).mul_(p)
        if cap is not None:
            lo, hi, t = cap
            ds[:, :, lo:hi].scatter_add_(-1, idx_cols.expand(b, h, hi - lo, -1), t)
        dq[:, :, a:e] = torch.matmul(ds, kf).mul_(scale)
        dk += torch.matmul(ds.transpose(-1, -2), qa).mul_(scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TorchJointAttention(torch.autograd.Function):
    """Forward: fused SDPA + logsumexp + recomputed columns. Backward (``backward_path``): the forward
    kernel's own fused backward when only ``out`` has a gradient (CPU flash, CUDA flash / efficient), else
    the exact row-chunked backward."""

    @staticmethod
    def forward(ctx, q, k, v, cols, r0, r1, mode, head_reduce, scale):
        spec = CaptureSpec(cols=cols, r0=r0, r1=r1, mode=mode, head_reduce=head_reduce)
        out, lse, fused = fused_sdpa_with_lse(q, k, v, scale)
        maps = capture_maps(q, k, lse, spec, scale)
        ctx.save_for_backward(q, k, v, out, lse, cols)
        ctx.meta = (r0, r1, mode, head_reduce, scale)
        ctx.fused = fused
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return out, maps, lse

    @staticmethod
    def backward(ctx, dout, dmaps, _dlse):
        q, k, v, out, lse, cols = ctx.saved_tensors
        r0, r1, mode, head_reduce, scale = ctx.meta
        spec = CaptureSpec(cols=cols, r0=r0, r1=r1, mode=mode, head_reduce=head_reduce)
        if dmaps is not None and head_reduce == "max":
            raise RuntimeError(
                "joint_attention: head_reduce='max' has no gradient; train through head_reduce='mean' or 'none'"
            )
        if dmaps is None and dout is None:
            return (None,) * 9
        if backward_path(ctx.fused.kernel, dmaps is not None) == BWD_CHUNKED:
            dq, dk, dv = chunked_backward(q, k, v, out, lse, dout, dmaps, spec, scale)
        else:
            dq, dk, dv = fused_sdpa_backward(ctx.fused, dout, q, k, v, out, lse, scale)
        return dq, dk, dv, None, None, None, None, None, None


def torch_joint_attention(q, k, v, spec: CaptureSpec | None, scale: float, deterministic: bool = False):
    """Backend "torch". ``deterministic`` is accepted for the backends' common signature (always so)."""
    if spec is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return out, None
    out, maps, _ = TorchJointAttention.apply(
        q, k, v, spec.cols, spec.r0, spec.r1, spec.mode, spec.head_reduce, scale
    )
    return out, maps
