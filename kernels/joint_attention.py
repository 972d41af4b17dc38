"""Fused joint attention with image→text map capture (Triton), forward and backward.

Per (batch b, head h), with s = q kᵀ·scale over all N keys (worked in log2 units: s₂ = s·log2 e):

Forward (one program per BLOCK_M query rows):
  * flash-style online softmax over the key blocks → O and lse (stored, natural log, float32);
  * then, if the row block meets the captured rows [R0, R1), the selected columns' scores are
    recomputed from the q block still in registers and k gathered at the selected columns:
      probs      M = exp(s − lse)             (softmax over all N keys)
      logits     M = s                        (raw scaled score)
      sel_probs  M = softmax over the selected columns (two passes over the column blocks)
    and reduced over heads into the float32 map: atomic add of M/H (mean), atomic max (max), or a
    plain store into a per-head buffer (head_reduce "none", and the deterministic mean).
  Nothing of size N² exists; the only extra state is lse (B·H·N floats).

Backward (P recomputed from lse, as in the Triton fused-attention tutorial), with G_h = dL/dM for head
h (G/H for the head mean):
  dS_ij = P_ij (dP_ij − D_i) + T_ij,  dP = dO vᵀ,
  D_i = dO_i·O_i  (+ Σ_c M_ic G_ic for probs; this row term is what the map adds to the softmax Jacobian)
  T_ic at the selected columns: probs P·G, logits G, sel_probs M (G − Σ_c' M G); zero elsewhere.
  Kernels: _bwd_preprocess (D, and for sel_probs the selected-column logsumexp and Σ M G per row),
  _bwd_dkdv (dense part, loops over query blocks), _bwd_dq (dense part + T·k_sel),
  _bwd_dk_sel (Tᵀ·q for the selected columns, added into dk by a scatter-add, which also handles
  repeated columns).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Named compile-time constants. A @triton.jit function may only read globals that are tl.constexpr
# instances; the launchers pass their plain int values (``.value``) as the kernels' constexpr arguments.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): scores and logsumexp are kept in log2 units in the kernels

# MODE: what the captured map M holds (s = q kᵀ·scale, lse = log Σ_j exp s_ij over all N keys)
MODE_PROBS = tl.constexpr(0)  # M = exp(s − lse): softmax over all N keys (the paper's maps)
MODE_LOGITS = tl.constexpr(1)  # M = s: the raw scaled score (MAGNET)
MODE_SEL_PROBS = tl.constexpr(2)  # M = softmax of s over the selected columns only
MODE_IDS = {"probs": MODE_PROBS.value, "logits": MODE_LOGITS.value, "sel_probs": MODE_SEL_PROBS.value}

# REDUCE: how the forward combines the heads' maps
REDUCE_SUM = tl.constexpr(0)  # atomic add of M/H into one (B, R, n_sel) map: the head mean
REDUCE_MAX = tl.constexpr(1)  # atomic max into one (B, R, n_sel) map (starts at -inf)
REDUCE_STORE = tl.constexpr(2)  # plain store into a per-head (B, H, R, n_sel) buffer ("none", deterministic mean)

# Output allocator (tests replace it with a NaN-filling one so unwritten elements show up).
empty_output = torch.empty


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(kind: str) -> list[triton.Config]:
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if kind == "fwd":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 64, 4, 3),
                (128, 64, 8, 3),
                (128, 128, 8, 3),
                (128, 32, 4, 4),
                (64, 64, 4, 4),
                (64, 128, 4, 3),
            ]
        ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 64, 4, 4), (128, 128, 8, 2)]
    ]


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles that cannot pay off before compiling them: float32 operands (no tensor-core bf16/fp16
    path, twice the registers) keep only tiles of at most 64×64, and head size 128 drops 128×128 tiles,
    which spill. At least one config always remains."""
    q = named_args.get("Q")
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
    fp32 = q is not None and q.dtype == torch.float32

    def fits(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if fp32:
            return bm <= 64 and bn <= 64
        return not (head_dim >= 128 and bm * bn > 128 * 64)

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _block_c(n_sel: int) -> int:
    return 16 if _interpreting() else min(64, max(16, triton.next_power_of_2(n_sel)))


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; PREC "upcast" works around the interpreter's broken bf16 dot."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _load_sel_keys(K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, offs_c, offs_d, NSEL):
    """k gathered at the selected columns of this block: (BLOCK_C, D), the column ids and validity."""
    cidx = tl.load(COLS + c_base + offs_c * stride_cc, mask=offs_c < NSEL, other=-1)
    valid = cidx >= 0  # -1 marks a padded column: it loads k = 0 and its map is 0
    safe = tl.where(valid, cidx, 0).to(tl.int64)
    kc = tl.load(K + k_base + safe[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 mask=valid[:, None], other=0.0)
    return kc, valid


@triton.jit
def _sel_softmax_stats(q, K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, NSEL, qk_scale2,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HEAD_DIM: tl.constexpr,
                       PREC: tl.constexpr):
    """Running max and sum (log2 units) of exp2(s₂) over the valid selected columns.

    Online log-sum-exp: m' = max(m, max_c s₂), l' = l·2^(m − m') + Σ_c 2^(s₂ − m'); returns m + log2 l,
    the selected-column logsumexp (log2 units) that MODE_SEL_PROBS normalises by."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, NSEL, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        kc, valid = _load_sel_keys(K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, offs_c, offs_d,
                                   NSEL)
        s2 = _mma(q, tl.trans(kc), PREC) * qk_scale2
        s2 = tl.where(valid[None, :], s2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_sum = l_sum * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), 1)
        m = m_new
    # log2-sum-exp2 of the selected scores; rows with no valid column get +inf (maps then read 0)
    return tl.where(l_sum > 0, m + tl.log2(l_sum), float("inf"))


@triton.jit
def _sel_map(q, kc, valid, lse2_row, lsel2_row, qk_scale2, scale, MODE: tl.constexpr, PREC: tl.constexpr):
    """The captured value M for one (rows × selected-columns) tile; padded columns give 0."""
    qk = _mma(q, tl.trans(kc), PREC)
    if MODE == MODE_PROBS:  # exp(s − lse) = 2^(s₂ − lse₂)
        val = tl.exp2(qk * qk_scale2 - lse2_row[:, None])
    elif MODE == MODE_LOGITS:  # s
        val = qk * scale
    else:  # MODE_SEL_PROBS: 2^(s₂ − lsel₂), lsel₂ the selected columns' logsumexp
        val = tl.exp2(qk * qk_scale2 - lsel2_row[:, None])
    return tl.where(valid[None, :], val, 0.0)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, N, qk_scale2,
              m_i, l_i, acc,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online softmax: rescale the running (max, sum, acc) and add the block.

    m' = max(m, max_j s₂), α = 2^(m − m'), P = 2^(s₂ − m'): l' = l·α + Σ_j P, acc' = acc·α + P v."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASK:
        col_ok = offs_n < N
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        s2 = tl.where(col_ok[None, :], _mma(q, tl.trans(k), PREC) * qk_scale2, float("-inf"))
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        s2 = _mma(q, tl.trans(k), PREC) * qk_scale2
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    p = tl.exp2(s2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.autotune(configs=_configs("fwd"), key=["N", "HEAD_DIM", "CAPTURE", "MODE", "REDUCE"], restore_value=["MAPS"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, COLS, MAPS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_cb, stride_cc,
    stride_mb, stride_mh, stride_mr, stride_mc,
    H, N, R0, R1, NSEL, qk_scale2, scale, map_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    CAPTURE: tl.constexpr, MODE: tl.constexpr, REDUCE: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (BLOCK_M query rows, batch·head): O = softmax(s) v and lse by the online softmax
    (``_fwd_step``), then, for the rows inside [R0, R1), the map M at the selected columns (``_sel_map``),
    combined over heads as REDUCE says (MAPS' head stride is 0 for REDUCE_SUM / REDUCE_MAX)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = b * stride_qb + h * stride_qh
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no masks
        m_i, l_i, acc = _fwd_step(q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, N,
                                  qk_scale2, m_i, l_i, acc, BLOCK_N, HEAD_DIM, False, PREC)
    if n_full < N:  # the ragged tail
        m_i, l_i, acc = _fwd_step(q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, n_full, N,
                                  qk_scale2, m_i, l_i, acc, BLOCK_N, HEAD_DIM, True, PREC)
    acc = acc / l_i[:, None]
    lse2 = m_i + tl.log2(l_i)  # logsumexp in log2 units; stored in natural-log units (÷ log2 e)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse2 / LOG2E, mask=row_ok)

    if CAPTURE:
        row_lo = pid_m * BLOCK_M
        if (row_lo < R1) & (row_lo + BLOCK_M > R0):
            cap_rows = (offs_m >= R0) & (offs_m < R1)
            c_base = b * stride_cb
            lsel2 = lse2
            if MODE == MODE_SEL_PROBS:  # first pass over the columns: their logsumexp
                lsel2 = _sel_softmax_stats(q, K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, NSEL,
                                           qk_scale2, BLOCK_M, BLOCK_C, HEAD_DIM, PREC)
            m_base = b * stride_mb + h * stride_mh
            for c0 in range(0, NSEL, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                kc, valid = _load_sel_keys(K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, offs_c, offs_d,
                                           NSEL)
                val = _sel_map(q, kc, valid, lse2, lsel2, qk_scale2, scale, MODE, PREC)
                ptrs = MAPS + m_base + (offs_m - R0)[:, None] * stride_mr + offs_c[None, :] * stride_mc
                msk = cap_rows[:, None] & (offs_c[None, :] < NSEL)
                if REDUCE == REDUCE_SUM:  # map_scale = 1/H: the head mean
                    tl.atomic_add(ptrs, val * map_scale, mask=msk, sem="relaxed")
                elif REDUCE == REDUCE_MAX:
                    tl.atomic_max(ptrs, val, mask=msk, sem="relaxed")
                else:  # REDUCE_STORE
                    tl.store(ptrs, val, mask=msk)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(
    Q, K, O, DO, LSE, COLS, G, DELTA, LSEL, HSEL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_cb, stride_cc,
    stride_gb, stride_gh, stride_gr, stride_gc,
    H, N, R0, R1, NSEL, qk_scale2, scale, g_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    CAP_GRAD: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
):
    """D_i = dO_i·O_i (+ Σ_c M G for probs); for sel_probs also the selected logsumexp and Σ_c M G."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if CAP_GRAD:
        row_lo = pid_m * BLOCK_M
        if (row_lo < R1) & (row_lo + BLOCK_M > R0) & (MODE != MODE_LOGITS):  # logits: no row term
            cap_rows = (offs_m >= R0) & (offs_m < R1)
            k_base = b * stride_kb + h * stride_kh
            c_base = b * stride_cb
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0) * LOG2E
            lsel2 = lse2
            if MODE == MODE_SEL_PROBS:
                lsel2 = _sel_softmax_stats(q, K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, NSEL,
                                           qk_scale2, BLOCK_M, BLOCK_C, HEAD_DIM, PREC)
            mg = tl.zeros([BLOCK_M], tl.float32)  # Σ_c M_ic G_ic
            for c0 in range(0, NSEL, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                kc, valid = _load_sel_keys(K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, offs_c, offs_d,
                                           NSEL)
                val = _sel_map(q, kc, valid, lse2, lsel2, qk_scale2, scale, MODE, PREC)
                g = tl.load(G + b * stride_gb + h * stride_gh + (offs_m - R0)[:, None] * stride_gr
                            + offs_c[None, :] * stride_gc,
                            mask=cap_rows[:, None] & (offs_c[None, :] < NSEL), other=0.0) * g_scale
                mg += tl.sum(val * g, 1)
            if MODE == MODE_PROBS:  # folded into D_i
                delta += tl.where(cap_rows, mg, 0.0)
            else:  # MODE_SEL_PROBS: kept per row for T = M (G − Σ_c M G)
                cap_idx = pid_bh.to(tl.int64) * (R1 - R0) + (offs_m - R0)
                tl.store(LSEL + cap_idx, lsel2, mask=cap_rows)
                tl.store(HSEL + cap_idx, mg, mask=cap_rows)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=row_ok)


@triton.jit
def _sel_grad(q, kc, valid, g, lse2_row, lsel2_row, hsel_row, qk_scale2, scale,
              MODE: tl.constexpr, PREC: tl.constexpr):
    """T, the map's direct contribution to dS at the selected columns of one tile."""
    if MODE == MODE_LOGITS:  # dM/ds = 1
        t = g
    else:
        val = _sel_map(q, kc, valid, lse2_row, lsel2_row, qk_scale2, scale, MODE, PREC)
        if MODE == MODE_PROBS:  # T = P·G (the −P·Σ M G part is in D_i)
            t = val * g
        else:  # MODE_SEL_PROBS: T = M (G − Σ_c M G)
            t = val * (g - hsel_row[:, None])
    return tl.where(valid[None, :], t, 0.0)


@triton.autotune(configs=_configs("bwd"), key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N, qk_scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """One program per key block: dv = Σ Pᵀ dO, dk = scale Σ dSᵀ q over every query block."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_base = b * stride_qb + h * stride_qh
    do_base = b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        # transposed tile (keys × rows): Pᵀ = exp2(k qᵀ·scale₂ − lse₂)
        # rows past N read lse = +inf, so their P is 0; columns past N are never stored
        pt = tl.exp2(_mma(k, tl.trans(q), PREC) * qk_scale2 - lse2[None, :])
        dv += _mma(pt.to(do.dtype), do, PREC)
        dpt = _mma(v, tl.trans(do), PREC)
        dst = pt * (dpt - delta[None, :])  # dSᵀ = Pᵀ (dPᵀ − D)
        dk += _mma(dst.to(q.dtype), q, PREC)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.autotune(configs=_configs("bwd"), key=["N", "HEAD_DIM", "CAP_GRAD", "MODE"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, COLS, G, LSEL, HSEL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_cb, stride_cc,
    stride_gb, stride_gh, stride_gr, stride_gc,
    H, N, R0, R1, NSEL, qk_scale2, scale, g_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    CAP_GRAD: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
):
    """One program per query block: dq = scale (Σ_j dS_ij k_j + Σ_c T_ic k_sel,c)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    row_base = pid_bh.to(tl.int64) * N
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        k = tl.load(K + k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None], other=0.0)
        # columns past N load k = v = 0, so they add dS·k = 0 to dq; rows past N are never stored
        p = tl.exp2(_mma(q, tl.trans(k), PREC) * qk_scale2 - lse2[:, None])
        dp = _mma(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])  # dS = P (dP − D)
        dq += _mma(ds.to(k.dtype), k, PREC)
    if CAP_GRAD:
        row_lo = pid_m * BLOCK_M
        if (row_lo < R1) & (row_lo + BLOCK_M > R0):
            cap_rows = (offs_m >= R0) & (offs_m < R1)
            cap_idx = pid_bh.to(tl.int64) * (R1 - R0) + (offs_m - R0)
            lsel2 = lse2
            hsel = delta
            if MODE == MODE_SEL_PROBS:  # the preprocess pass's per-row lsel₂ and Σ_c M G
                lsel2 = tl.load(LSEL + cap_idx, mask=cap_rows, other=0.0)
                hsel = tl.load(HSEL + cap_idx, mask=cap_rows, other=0.0)
            c_base = b * stride_cb
            for c0 in range(0, NSEL, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                kc, valid = _load_sel_keys(K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, offs_c, offs_d,
                                           NSEL)
                g = tl.load(G + b * stride_gb + h * stride_gh + (offs_m - R0)[:, None] * stride_gr
                            + offs_c[None, :] * stride_gc,
                            mask=cap_rows[:, None] & (offs_c[None, :] < NSEL), other=0.0) * g_scale
                t = _sel_grad(q, kc, valid, g, lse2, lsel2, hsel, qk_scale2, scale, MODE, PREC)
                dq += _mma(t.to(kc.dtype), kc, PREC)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dk_sel(
    Q, K, LSE, COLS, G, LSEL, HSEL, DKSEL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_cb, stride_cc,
    stride_gb, stride_gh, stride_gr, stride_gc,
    H, N, R0, R1, NSEL, qk_scale2, scale, g_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    MODE: tl.constexpr, PREC: tl.constexpr,
):
    """One program per block of selected columns: dk_sel,c = scale Σ_i T_ic q_i over the captured rows."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    kc, valid = _load_sel_keys(K, b * stride_kb + h * stride_kh, stride_kn, stride_kd, COLS, b * stride_cb, stride_cc,
                               offs_c, offs_d, NSEL)
    acc = tl.zeros([BLOCK_C, HEAD_DIM], tl.float32)
    q_base = b * stride_qb + h * stride_qh
    for start_m in range(R0, R1, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        cap_rows = offs_m < R1
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=cap_rows[:, None], other=0.0)
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=cap_rows, other=0.0) * LOG2E
        cap_idx = pid_bh.to(tl.int64) * (R1 - R0) + (offs_m - R0)
        lsel2 = lse2
        hsel = lse2
        if MODE == MODE_SEL_PROBS:
            lsel2 = tl.load(LSEL + cap_idx, mask=cap_rows, other=0.0)
            hsel = tl.load(HSEL + cap_idx, mask=cap_rows, other=0.0)
        g = tl.load(G + b * stride_gb + h * stride_gh + (offs_m - R0)[:, None] * stride_gr
                    + offs_c[None, :] * stride_gc,
                    mask=cap_rows[:, None] & (offs_c[None, :] < NSEL), other=0.0) * g_scale
        t = _sel_grad(q, kc, valid, g, lse2, lsel2, hsel, qk_scale2, scale, MODE, PREC)
        t = tl.where(cap_rows[:, None], t, 0.0)
        acc += _mma(tl.trans(t).to(q.dtype), q, PREC)
    ptrs = DKSEL + pid_bh.to(tl.int64) * NSEL * HEAD_DIM + offs_c[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ptrs, acc * scale, mask=(offs_c < NSEL)[:, None])


# ----------------------------------------------------------------------------------------------
# Launcher and autograd
# ----------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor | None, n: int = 4) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"  # triton's CPU interpreter mis-multiplies bfloat16 tiles
    return "ieee" if dtype == torch.float32 else "tf32"


def check_head_dim(head_dim: int) -> None:
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(
            f"joint_attention (triton): head size {head_dim} is not supported; use one of 16, 32, 64, 128, "
            "256, or backend='torch'"
        )


def _forward(q, k, v, cols, r0, r1, mode, head_reduce, scale, deterministic):
    """Launch the forward kernel: returns out (q's layout and dtype), lse (B, H, N) float32, maps."""
    b, h, n, d = q.shape
    check_head_dim(d)
    out = empty_output(q.shape, dtype=q.dtype, device=q.device)
    if q.stride(3) == 1 and q.stride(1) == d and q.stride(2) == h * d and h > 1:  # diffusers' (B, N, H, D)
        out = empty_output((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = empty_output((b, h, n), dtype=torch.float32, device=q.device)
    capture = cols is not None
    maps = None
    reduce = REDUCE_STORE.value
    n_sel = 0
    if capture:
        n_sel = cols.shape[1]
        rows = r1 - r0
        if head_reduce == "none" or (deterministic and head_reduce == "mean"):
            maps = empty_output((b, h, rows, n_sel), dtype=torch.float32, device=q.device)
        elif head_reduce == "mean":
            maps = torch.zeros((b, rows, n_sel), dtype=torch.float32, device=q.device)
            reduce = REDUCE_SUM.value
        else:
            maps = torch.full((b, rows, n_sel), float("-inf"), dtype=torch.float32, device=q.device)
            reduce = REDUCE_MAX.value
    map_strides = (0,) * 4
    if capture:  # reduced maps: the head stride is 0, every head adds into the same (B, R, n_sel) map
        map_strides = (maps.stride(0), maps.stride(1) if reduce == REDUCE_STORE.value else 0, *maps.stride()[-2:])

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), b * h)

    _attn_fwd[grid](
        q, k, v, out, lse, cols if capture else lse, maps if capture else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *(_strides(cols, 2) if capture else (0, 0)), *map_strides,
        h, n, r0, r1, n_sel, scale * LOG2E.value, scale, 1.0 / h,
        HEAD_DIM=d, BLOCK_C=_block_c(max(n_sel, 1)), CAPTURE=capture, MODE=MODE_IDS[mode], REDUCE=reduce,
        PREC=_precision(q.dtype),
    )
    if capture and reduce == REDUCE_STORE.value and head_reduce == "mean":
        maps = maps.sum(1).div_(h)  # deterministic: a fixed-order reduction of the per-head buffer
    return out, lse, maps


def _backward(q, k, v, out, lse, dout, cols, r0, r1, mode, head_reduce, scale, dmaps):
    b, h, n, d = q.shape
    prec = _precision(q.dtype)
    cap_grad = dmaps is not None
    if dout is None:
        dout = torch.zeros_like(out)
    bm_pre = 16 if _interpreting() else 64
    delta = empty_output((b, h, n), dtype=torch.float32, device=q.device)
    n_sel = cols.shape[1] if cap_grad else 0
    block_c = _block_c(max(n_sel, 1))
    if cap_grad:
        g = dmaps.float()
        g_strides = (g.stride(0), 0, *g.stride()[-2:]) if head_reduce == "mean" else tuple(g.stride())
        g_scale = 1.0 / h if head_reduce == "mean" else 1.0
        lsel = torch.zeros((b, h, r1 - r0), dtype=torch.float32, device=q.device)
        hsel = torch.zeros_like(lsel)
        cols_arg, c_strides = cols, tuple(cols.stride())
    else:
        g, g_strides, g_scale, lsel, hsel, cols_arg, c_strides = lse, (0,) * 4, 0.0, lse, lse, lse, (0, 0)
    common_sel = (h, n, r0, r1, n_sel, scale * LOG2E.value, scale, g_scale)
    _bwd_preprocess[(triton.cdiv(n, bm_pre), b * h)](
        q, k, out, dout, lse, cols_arg, g, delta, lsel, hsel,
        *q.stride(), *k.stride(), *out.stride(), *dout.stride(), *c_strides, *g_strides,
        *common_sel, HEAD_DIM=d, BLOCK_M=bm_pre, BLOCK_C=block_c, CAP_GRAD=cap_grad,
        MODE=MODE_IDS[mode], PREC=prec,
    )
    dq = empty_output(q.shape, dtype=q.dtype, device=q.device)
    dk = empty_output(k.shape, dtype=torch.float32 if cap_grad else k.dtype, device=q.device)
    dv = empty_output(v.shape, dtype=v.dtype, device=q.device)
    _bwd_dkdv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)](
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        h, n, scale * LOG2E.value, scale, HEAD_DIM=d, PREC=prec,
    )
    _bwd_dq[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)](
        q, k, v, dout, lse, delta, dq, cols_arg, g, lsel, hsel,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *c_strides, *g_strides,
        *common_sel, HEAD_DIM=d, BLOCK_C=block_c, CAP_GRAD=cap_grad, MODE=MODE_IDS[mode], PREC=prec,
    )
    if cap_grad:
        dk_sel = empty_output((b, h, n_sel, d), dtype=torch.float32, device=q.device)
        bm_sel = 16 if _interpreting() else 64
        _bwd_dk_sel[(triton.cdiv(n_sel, block_c), b * h)](
            q, k, lse, cols, g, lsel, hsel, dk_sel,
            *q.stride(), *k.stride(), *c_strides, *g_strides,
            *common_sel, HEAD_DIM=d, BLOCK_M=bm_sel, BLOCK_C=block_c, MODE=MODE_IDS[mode], PREC=prec,
        )
        idx = cols.clamp(min=0)[:, None, :, None].expand(b, h, n_sel, d)
        dk = dk.scatter_add_(2, idx, dk_sel).to(k.dtype)  # padded columns carry T = 0
    return dq, dk, dv


class JointAttentionFunction(torch.autograd.Function):
    """(out, maps, lse) = fused joint attention; backward recomputes P from lse."""

    @staticmethod
    def forward(ctx, q, k, v, cols, r0, r1, mode, head_reduce, scale, deterministic):
        out, lse, maps = _forward(q, k, v, cols, r0, r1, mode, head_reduce, scale, deterministic)
        ctx.save_for_backward(q, k, v, out, lse, cols)
        ctx.meta = (r0, r1, mode, head_reduce, scale)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return out, maps, lse

    @staticmethod
    def backward(ctx, dout, dmaps, _dlse):
        q, k, v, out, lse, cols = ctx.saved_tensors
        r0, r1, mode, head_reduce, scale = ctx.meta
        if dmaps is not None and head_reduce == "max":
            raise RuntimeError(
                "joint_attention: head_reduce='max' has no gradient; train through head_reduce='mean' or 'none'"
            )
        if dout is None and dmaps is None:
            return (None,) * 10
        dq, dk, dv = _backward(q, k, v, out, lse, dout, cols, r0, r1, mode, head_reduce, scale, dmaps)
        return dq, dk, dv, None, None, None, None, None, None, None


def triton_joint_attention(q, k, v, spec, scale: float, deterministic: bool = False):
    """Launcher used by ``seg4diff_fast.joint_attention`` (backend "triton"); spec may be None."""
    if spec is None:
        out, _, _ = JointAttentionFunction.apply(q, k, v, None, 0, 1, "probs", "mean", scale, deterministic)
        return out, None
    out, maps, _ = JointAttentionFunction.apply(
        q, k, v, spec.cols, spec.r0, spec.r1, spec.mode, spec.head_reduce, scale, deterministic
    )
    return out, maps


__all__ = ["JointAttentionFunction", "triton_joint_attention", "check_head_dim"]
