"""Fused joint attention with image→text map capture (Triton), forward and backward.

Per (batch b, head h), with s = q kᵀ·scale over all N keys (scale > 0), worked in log2 units: the kernels
take maxima on the raw qk and fold scale₂ = scale·log2 e into one FMA per score (qk·scale₂ − m).

Forward, ``_attn_fwd`` (one program per BLOCK_M query rows; every key block, the ragged last one included,
runs in one pipelined loop, only the last masks its scores):
  * flash-style online softmax → O and lse (stored, natural log, float32);
  * then, if the row block meets the captured rows [R0, R1), the selected columns' scores are
    recomputed from the q block still in registers and k at the selected columns (CONTIG: one run
    cols[b, 0] + [0, n_sel), block loads; else gathered, each index block loaded once, the next block's
    keys prefetched), BLOCK_C = 32 or 64 columns a tile (whichever pads less):
      probs      M = exp(s − lse)             (softmax over all N keys)
      logits     M = s                        (raw scaled score)
      sel_probs  M = softmax over the selected columns (two passes over the column blocks)
    and reduced over heads into the float32 map (padded to whole column tiles, so writes are 16-byte
    vectors): atomic add of M/H (mean), atomic max (max; one integer max on the bits for M ≥ 0), or a plain
    store into a per-head buffer (head_reduce "none", and the deterministic mean).
  Nothing of size N² exists; the only extra state is lse (B·H·N floats).

Backward (P recomputed from lse, as in the Triton fused-attention tutorial), with G_h = dL/dM for head
h (G/H for the head mean):
  dS_ij = P_ij (dP_ij − D_i) + T_ij,  dP = dO vᵀ,
  D_i = dO_i·O_i  (+ Σ_c M_ic G_ic for probs; this row term is what the map adds to the softmax Jacobian)
  T_ic at the selected columns: probs P·G, logits G, sel_probs M (G − Σ_c' M G); zero elsewhere
  (repeated columns: their T add up on the one key).
  Kernels:
  * ``_bwd_preprocess``: D, and for sel_probs the selected-column logsumexp and Σ_c M G per captured row
    (q against the selected keys: R·n_sel·D work);
  * ``_bwd_dkdv`` (one program per key block): a dense loop over every query block, dv = Σ Pᵀ dO,
    dk = scale Σ dSᵀ q, and by default dq += dS k by float32 atomics — 5 GEMMs per tile (q kᵀ, Pᵀ dO,
    v dOᵀ, dSᵀ q, dS k), as FA2/FA3; then a map loop over the captured query blocks, only in key blocks that
    hold selected keys (found once per block: a range when CONTIG, else a search of the sorted columns):
    dk += Tᵀ q (and dq += T k), recomputing q kᵀ for probs / sel_probs. No float32 dk, no scatter;
    repeated columns add their G on the one key;
  * ``_bwd_dq`` (deterministic=True only): dq per query block without atomics, 3 more GEMMs (q kᵀ, dO vᵀ,
    dS k) + T·k at the selected columns — 7 GEMMs per tile in all;
  * a loss on the maps alone (dO None): no dv (it is 0) and no dP GEMM; for logits and sel_probs T is the
    whole of dS, so only the map loop runs; probs keeps the dense −P·D term (3 GEMMs per tile with
    atomics: q kᵀ, dSᵀ q, dS k).
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

# Every launch compiles with FP fusion on (see _launch_options): each score costs one FMA.
FP_FUSION = True

# Output allocator (tests replace it with a NaN-filling one so unwritten elements show up).
empty_output = torch.empty


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Autotune candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel, operand class and head size
# (16 and 32 use the 64 row). Chosen on sm_90a with benchmarks/compile_check.py --ptx (ptxas -v): in fp16 /
# bf16 every one runs its GEMMs on wgmma (M tiles of at least 64 rows: no mma.sync fallback), fits 227 KiB
# of shared memory and spills 0 bytes (two exceptions, stated below); tests/test_compile_check.py checks
# D = 64 / 128. Dropped:
# fwd 128×64/4 warps at D = 128 (spills in the capture modes), 64×128/4 warps and 128×32/4 warps (255
# registers, one mode away from spilling); dk/dv 128-row tiles (spill: 5 GEMMs' tiles live at once) and any
# 32-row tile (mma.sync); D = 256 three-stage tiles (over the shared memory). D = 256's dk/dv with the dq
# atomics spills at every tile that fits (≈ 640 B at 64×64/8 warps/1 stage, the least), and so does D = 128's
# with the map's gradient (≈ 90 B at 64×64/8 warps, 2 stages; 16 warps cap registers at 128: more): kept, stated.
# float32 ("ieee" dots on the FMA units, no tensor cores) spills at every tile tried; the listed ones spilled
# least at D = 64 (≈ 170–650 B against 4–30 KB for the 64×64/4-warp tiles before).
_TILES = {
    ("fwd", "tc", 64): [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "tc", 128): [(128, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 3)],
    ("fwd", "tc", 256): [(64, 64, 8, 2), (128, 32, 8, 2)],
    ("dkdv", "tc", 64): [(64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 3)],
    ("dkdv", "tc", 128): [(64, 64, 8, 2), (64, 64, 8, 3)],
    ("dkdv", "tc", 256): [(64, 64, 8, 1)],
    ("dkdv_cap", "tc", 64): [(64, 64, 8, 3)],  # with the map's gradient (CAP_GRAD): its T tiles live too
    ("dkdv_cap", "tc", 128): [(64, 64, 8, 2)],
    ("dkdv_cap", "tc", 256): [(64, 64, 8, 1)],
    ("dq", "tc", 64): [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)],
    ("dq", "tc", 128): [(64, 64, 4, 3), (128, 64, 8, 3)],
    ("dq", "tc", 256): [(64, 32, 4, 2)],
    ("fwd", "fp32", 64): [(64, 64, 8, 2), (32, 32, 4, 2)],
    ("dkdv", "fp32", 64): [(64, 64, 8, 2), (32, 32, 4, 2)],
    ("dq", "fp32", 64): [(64, 64, 8, 2), (32, 32, 4, 2)],
}
_TILES[("dkdv_cap", "fp32", 64)] = _TILES[("dkdv", "fp32", 64)]
for _kernel in ("fwd", "dkdv", "dkdv_cap", "dq"):  # float32 at larger heads: the smallest tiles, fewer stages
    _TILES[(_kernel, "fp32", 128)] = [(32, 32, 4, 2)]
    _TILES[(_kernel, "fp32", 256)] = [(32, 32, 4, 1)]


def _tile_config(tile: tuple[int, int, int, int]) -> triton.Config:
    bm, bn, w, s = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _configs(kind: str) -> list[triton.Config]:
    """Every candidate of a launch family ("fwd", or "bwd" for dk/dv and dq); prune_configs keeps the
    ones of the kernel, dtype and head size at hand."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    kernels = ("fwd",) if kind == "fwd" else ("dkdv", "dkdv_cap", "dq")
    tiles = sorted({t for (k, _, _), ts in _TILES.items() if k in kernels for t in ts}, reverse=True)
    return [_tile_config(t) for t in tiles]


def prune_configs(configs, named_args, **kwargs):
    """Keep the candidates listed for this kernel (told apart by their arguments: MAPS → forward, DK → dk/dv,
    with or without the map's gradient, else dq), operand class (fp16 / bf16 on tensor cores, or float32)
    and head size (see ``_TILES``); only what the autotuner knows is used. A list with none of them (the
    interpreter's) is kept as it is."""
    q = named_args.get("Q")
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
    kernel = "fwd" if "MAPS" in named_args else ("dkdv" if "DK" in named_args else "dq")
    if kernel == "dkdv" and kwargs.get("CAP_GRAD", False):
        kernel = "dkdv_cap"
    operands = "fp32" if q is not None and q.dtype == torch.float32 else "tc"
    wanted = set(_TILES[(kernel, operands, max(64, head_dim))])
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
    return kept or list(configs)


def _block_c(n_sel: int) -> int:
    """Column tile of the capture loops: 64 when that pads no more columns than 32 would, else 32 (ragged
    counts: 77 → 96 columns, not 128; 154 → 160; 333 → 352), 16 for at most 16 columns. The interpreter
    uses the same rule, so the tests run the tiles the GPU runs."""
    if n_sel <= 16:
        return 16
    pad32, pad64 = triton.cdiv(n_sel, 32) * 32, triton.cdiv(n_sel, 64) * 64
    return 64 if pad64 == pad32 else 32


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
def _sel_cols(COLS, c_base, stride_cc, c_first, offs_c, NSEL, CONTIG: tl.constexpr):
    """Key indices (int64) of the selected entries offs_c and their validity.

    CONTIG: the batch element's columns are c_first + [0, NSEL), no index load; else the indices are
    loaded (-1 marks a padded entry: it loads k = 0 and its map is 0)."""
    if CONTIG:
        valid = offs_c < NSEL
        cidx = c_first + offs_c
    else:
        cidx = tl.load(COLS + c_base + offs_c * stride_cc, mask=offs_c < NSEL, other=-1)
        valid = cidx >= 0
        cidx = tl.where(valid, cidx, 0)
    return cidx.to(tl.int64), valid


@triton.jit
def _load_sel_keys(K, k_base, stride_kn, stride_kd, cidx, valid, offs_d):
    """k at the selected columns: (BLOCK_C, D), rows of invalid entries are 0."""
    return tl.load(K + k_base + cidx[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=valid[:, None],
                   other=0.0)


@triton.jit
def _first_col(COLS, c_base, CONTIG: tl.constexpr):
    """The batch element's first selected column (the start of its range when CONTIG), else 0."""
    if CONTIG:
        return tl.load(COLS + c_base).to(tl.int64)
    return tl.zeros([], tl.int64)


@triton.jit
def _sel_softmax_stats(q, K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, c_first, NSEL, qk_scale2,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HEAD_DIM: tl.constexpr,
                       CONTIG: tl.constexpr, PREC: tl.constexpr):
    """Selected-column logsumexp (log2 units) that MODE_SEL_PROBS normalises by.

    Online log-sum-exp on the raw scores (scale > 0, so the max commutes with the scale):
    m' = max(m, max_c qk·scale₂), l' = l·2^(m − m') + Σ_c 2^(qk·scale₂ − m'); returns m + log2 l.
    The next block's keys are loaded before this block's scores are used (prefetch)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    cidx, valid = _sel_cols(COLS, c_base, stride_cc, c_first, offs_c, NSEL, CONTIG)
    kc = _load_sel_keys(K, k_base, stride_kn, stride_kd, cidx, valid, offs_d)
    for c0 in range(0, NSEL, BLOCK_C):
        cidx_n, valid_n = _sel_cols(COLS, c_base, stride_cc, c_first, c0 + BLOCK_C + offs_c, NSEL, CONTIG)
        kc_n = _load_sel_keys(K, k_base, stride_kn, stride_kd, cidx_n, valid_n, offs_d)
        qk = tl.where(valid[None, :], _mma(q, tl.trans(kc), PREC), float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_sum = l_sum * tl.exp2(m - m_safe) + tl.sum(tl.exp2(qk * qk_scale2 - m_safe[:, None]), 1)
        m = m_new
        kc, valid = kc_n, valid_n
    # rows with no valid column get +inf (their maps then read 0)
    return tl.where(l_sum > 0, m + tl.log2(l_sum), float("inf"))


@triton.jit
def _sel_map(q, kc, valid, lse2_row, lsel2_row, qk_scale2, scale, MODE: tl.constexpr, PREC: tl.constexpr):
    """The captured value M for one (rows × selected-columns) tile; padded columns give 0."""
    qk = _mma(q, tl.trans(kc), PREC)
    if MODE == MODE_PROBS:  # exp(s − lse) = 2^(qk·scale₂ − lse₂): one FMA, one ex2
        val = tl.exp2(qk * qk_scale2 - lse2_row[:, None])
    elif MODE == MODE_LOGITS:  # s
        val = qk * scale
    else:  # MODE_SEL_PROBS: 2^(qk·scale₂ − lsel₂), lsel₂ the selected columns' logsumexp
        val = tl.exp2(qk * qk_scale2 - lsel2_row[:, None])
    return tl.where(valid[None, :], val, 0.0)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, N, qk_scale2,
              m_i, l_i, acc,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online softmax: rescale the running (max, sum, acc) and add the block.

    The max is taken on the raw scores qk = q kᵀ (scale₂ = scale·log2 e > 0 commutes with it), so each score
    costs one FMA: m' = max(m, scale₂·max_j qk), P = 2^(qk·scale₂ − m'), α = 2^(m − m'),
    l' = l·α + Σ_j P, acc' = acc·α + P v. Key rows past N load 0; only the ragged last block masks its
    scores to −inf (a uniform branch, so every block stays in the one pipelined loop)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    k = tl.load(K + k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=col_ok[:, None],
                other=0.0)
    v = tl.load(V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=col_ok[:, None],
                other=0.0)
    qk = _mma(q, tl.trans(k), PREC)
    if start_n + BLOCK_N > N:  # the ragged last block only
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
    p = tl.exp2(qk * qk_scale2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.autotune(configs=_configs("fwd"), key=["N", "HEAD_DIM", "CAPTURE", "MODE", "REDUCE", "CONTIG"],
                 restore_value=["MAPS"], prune_configs_by={"early_config_prune": prune_configs})
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
    CAPTURE: tl.constexpr, MODE: tl.constexpr, REDUCE: tl.constexpr, CONTIG: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (BLOCK_M query rows, batch·head): O = softmax(s) v and lse by the online softmax
    (``_fwd_step``), then, for the rows inside [R0, R1), the map M at the selected columns (``_sel_map``),
    combined over heads as REDUCE says (MAPS' head stride is 0 for REDUCE_SUM / REDUCE_MAX).

    MAPS has a whole number of BLOCK_C columns (the launcher pads it), so map writes mask rows only and
    go out as 16-byte vector reductions/stores; padded entries hold 0. CONTIG: the selected columns are
    COLS[b, 0] + [0, NSEL) (block loads, no index gather); otherwise each column block's indices are
    loaded once and the next block's keys are gathered before this block is used (prefetch)."""
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
    for start_n in range(0, N, BLOCK_N):
        m_i, l_i, acc = _fwd_step(q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, N,
                                  qk_scale2, m_i, l_i, acc, BLOCK_N, HEAD_DIM, PREC)
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
            c_first = _first_col(COLS, c_base, CONTIG)
            lsel2 = lse2
            if MODE == MODE_SEL_PROBS:  # first pass over the columns: their logsumexp
                lsel2 = _sel_softmax_stats(q, K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, c_first,
                                           NSEL, qk_scale2, BLOCK_M, BLOCK_C, HEAD_DIM, CONTIG, PREC)
            map_rows = b * stride_mb + h * stride_mh + (offs_m - R0)[:, None] * stride_mr  # offsets
            offs_c = tl.arange(0, BLOCK_C)
            cidx, valid = _sel_cols(COLS, c_base, stride_cc, c_first, offs_c, NSEL, CONTIG)
            kc = _load_sel_keys(K, k_base, stride_kn, stride_kd, cidx, valid, offs_d)
            for c0 in range(0, NSEL, BLOCK_C):
                cidx_n, valid_n = _sel_cols(COLS, c_base, stride_cc, c_first, c0 + BLOCK_C + offs_c, NSEL, CONTIG)
                kc_n = _load_sel_keys(K, k_base, stride_kn, stride_kd, cidx_n, valid_n, offs_d)  # prefetch
                val = _sel_map(q, kc, valid, lse2, lsel2, qk_scale2, scale, MODE, PREC)
                map_offs = map_rows + (c0 + offs_c)[None, :] * stride_mc
                ptrs = MAPS + map_offs
                if REDUCE == REDUCE_SUM:  # map_scale = 1/H: the head mean
                    tl.atomic_add(ptrs, val * map_scale, mask=cap_rows[:, None], sem="relaxed")
                elif REDUCE == REDUCE_MAX:
                    if MODE == MODE_LOGITS:  # signed values: triton's float max (two integer atomics)
                        tl.atomic_max(ptrs, val, mask=cap_rows[:, None], sem="relaxed")
                    else:  # M ≥ 0 and MAPS starts at +0: the bits order like int32s, one integer max
                        iptrs = MAPS.to(tl.pointer_type(tl.int32)) + map_offs
                        tl.atomic_max(iptrs, val.to(tl.int32, bitcast=True), mask=cap_rows[:, None], sem="relaxed")
                else:  # REDUCE_STORE
                    tl.store(ptrs, val, mask=cap_rows[:, None])
                kc, valid = kc_n, valid_n


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
    CAP_GRAD: tl.constexpr, MODE: tl.constexpr, CONTIG: tl.constexpr, HAS_DO: tl.constexpr, PREC: tl.constexpr,
):
    """D_i = dO_i·O_i (0 without dO) (+ Σ_c M G for probs); for sel_probs also the selected logsumexp and
    Σ_c M G per captured row (recomputed from q and the selected keys: R × n_sel × D work, not N²)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    delta = tl.zeros([BLOCK_M], tl.float32)
    if HAS_DO:
        o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                     + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if CAP_GRAD:
        row_lo = pid_m * BLOCK_M
        if (row_lo < R1) & (row_lo + BLOCK_M > R0) & (MODE != MODE_LOGITS):  # logits: no row term
            cap_rows = (offs_m >= R0) & (offs_m < R1)
            k_base = b * stride_kb + h * stride_kh
            c_base = b * stride_cb
            c_first = _first_col(COLS, c_base, CONTIG)
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0) * LOG2E
            lsel2 = lse2
            if MODE == MODE_SEL_PROBS:
                lsel2 = _sel_softmax_stats(q, K, k_base, stride_kn, stride_kd, COLS, c_base, stride_cc, c_first,
                                           NSEL, qk_scale2, BLOCK_M, BLOCK_C, HEAD_DIM, CONTIG, PREC)
            g_rows = G + b * stride_gb + h * stride_gh + (offs_m - R0)[:, None] * stride_gr
            mg = tl.zeros([BLOCK_M], tl.float32)  # Σ_c M_ic G_ic
            for c0 in range(0, NSEL, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cidx, valid = _sel_cols(COLS, c_base, stride_cc, c_first, offs_c, NSEL, CONTIG)
                kc = _load_sel_keys(K, k_base, stride_kn, stride_kd, cidx, valid, offs_d)
                val = _sel_map(q, kc, valid, lse2, lsel2, qk_scale2, scale, MODE, PREC)
                g = tl.load(g_rows + offs_c[None, :] * stride_gc, mask=cap_rows[:, None] & valid[None, :],
                            other=0.0) * g_scale
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
    """T, the map's direct contribution to dS, on one (rows × selected entries) tile."""
    if MODE == MODE_LOGITS:  # dM/ds = 1
        t = g
    else:
        val = _sel_map(q, kc, valid, lse2_row, lsel2_row, qk_scale2, scale, MODE, PREC)
        if MODE == MODE_PROBS:  # T = P·G (the −P·Σ M G part is in D_i)
            t = val * g
        else:  # MODE_SEL_PROBS: T = M (G − Σ_c M G)
            t = val * (g - hsel_row[:, None])
    return tl.where(valid[None, :], t, 0.0)


@triton.jit
def _block_keys(SCOLS, s_base, offs_n, n0, NSEL, c_first, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                CONTIG: tl.constexpr):
    """Which selected entries land on each key j of the block [n0, n0 + BLOCK_N), found once per block:
    (first_j, n_j, max_j n_j). CONTIG: the entry of key j is j − c_first (n_j = 1 inside the run).
    Gathered: SCOLS holds each batch element's columns sorted (padding, -1, first), so key j's entries are
    the run [first_j, first_j + n_j) of sorted positions, first_j = #{entries < j}; repeated columns
    give n_j > 1."""
    if CONTIG:  # recomputed where needed from c_first (nothing kept in registers across the loop)
        first = tl.zeros([BLOCK_N], tl.int32)
        mult = tl.zeros([BLOCK_N], tl.int32)
        max_mult = ((c_first < n0 + BLOCK_N) & (c_first + NSEL > n0)).to(tl.int32)
    else:
        first = tl.zeros([BLOCK_N], tl.int32)
        mult = tl.zeros([BLOCK_N], tl.int32)
        for c0 in range(0, NSEL, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            sc = tl.load(SCOLS + s_base + offs, mask=offs < NSEL, other=2**62)  # past the end: after every key
            first += tl.sum((sc[None, :] < offs_n[:, None]).to(tl.int32), 1)
            mult += tl.sum((sc[None, :] == offs_n[:, None]).to(tl.int32), 1)
        max_mult = tl.max(mult, 0)
    return first, mult, max_mult


@triton.jit
def _key_map_grad(offs_n, offs_m, cap_rows, g_base, stride_gr, stride_gc, g_scale, PERM, s_base, c_first, NSEL,
                  key_first, key_mult, max_mult, R0, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  CONTIG: tl.constexpr):
    """Gkᵀ on one (keys × rows) tile: Gk_jr = Σ_{c: col_c = j} G_rc (repeated columns sum; 0 off the
    selected keys and captured rows), read with one column index per key, no product: CONTIG j − c_first;
    gathered PERM[first_j + t], the t-th entry of key j in the sorted columns, for t < n_j."""
    g_rows = g_base + (offs_m - R0)[None, :] * stride_gr
    if CONTIG:
        kin = (offs_n >= c_first) & (offs_n < c_first + NSEL)
        gk = tl.load(g_rows + (offs_n - c_first)[:, None] * stride_gc, mask=kin[:, None] & cap_rows[None, :],
                     other=0.0)
    else:
        gk = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for t in range(0, max_mult):
            has = key_mult > t
            col = tl.load(PERM + s_base + key_first + t, mask=has, other=0)
            gk += tl.load(g_rows + col[:, None] * stride_gc, mask=has[:, None] & cap_rows[None, :], other=0.0)
    return gk * g_scale


@triton.autotune(configs=_configs("bwd"),
                 key=["N", "HEAD_DIM", "CAP_GRAD", "MODE", "CONTIG", "HAS_DO", "DENSE", "ATOMIC_DQ"],
                 reset_to_zero=["DQ"], prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, COLS, SCOLS, PERM, G, LSEL, HSEL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_cb, stride_cc,
    stride_gb, stride_gh, stride_gr, stride_gc,
    H, N, R0, R1, NSEL, qk_scale2, scale, g_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    CAP_GRAD: tl.constexpr, MODE: tl.constexpr, CONTIG: tl.constexpr, HAS_DO: tl.constexpr,
    DENSE: tl.constexpr, ATOMIC_DQ: tl.constexpr, PREC: tl.constexpr,
):
    """One program per key block (keys × rows tiles, P recomputed from lse), two loops over query blocks:

    * dense (every query block): dSᵀ = Pᵀ (dPᵀ − D), dv += Pᵀ dO, dk += dSᵀ q, and with ATOMIC_DQ
      dq += dS k by float32 atomics into DQ: 5 GEMMs a tile (q kᵀ, Pᵀ dO, v dOᵀ, dSᵀ q, dS k). Without dO
      (probs' maps only): dSᵀ = −Pᵀ D, no dv, no dP GEMM.
    * map (the captured query blocks, only in key blocks that hold selected keys): Tᵀ, with G read per key
      (``_key_map_grad``); dk += Tᵀ q and with ATOMIC_DQ dq += T k; probs and sel_probs recompute q kᵀ
      (2–3 GEMMs on these few tiles). Kept out of the dense loop, whose registers it would otherwise push
      into spills. dk needs no float32 buffer, scatter or extra kernel.

    DENSE False (no dO, and a map that reads only the selected columns: logits, sel_probs): only the map
    loop runs, and dv is not written (the launcher returns zeros)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)
    if HAS_DO:
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_base = b * stride_qb + h * stride_qh
    do_base = b * stride_dob + h * stride_doh
    dq_base = b * stride_dqb + h * stride_dqh
    row_base = pid_bh.to(tl.int64) * N
    cap_base = pid_bh.to(tl.int64) * (R1 - R0)
    g_base = G + b * stride_gb + h * stride_gh
    s_base = b * NSEL  # SCOLS / PERM rows (contiguous (B, NSEL))
    has_sel = False
    c_first = tl.zeros([], tl.int64)
    key_first = tl.zeros([BLOCK_N], tl.int32)
    key_mult = tl.zeros([BLOCK_N], tl.int32)
    max_mult = tl.zeros([], tl.int32)
    if CAP_GRAD:  # which of this block's keys are selected, once per block
        c_first = _first_col(COLS, b * stride_cb, CONTIG)
        key_first, key_mult, max_mult = _block_keys(SCOLS, s_base, offs_n, n0, NSEL, c_first, BLOCK_N, BLOCK_C,
                                                    CONTIG)
        has_sel = max_mult > 0
    dq_cols = DQ + dq_base + offs_d[None, :] * stride_dqd
    if DENSE:  # dSᵀ = Pᵀ (dPᵀ − D) over every query block
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None], other=0.0)
            # rows past N read lse = +inf, so their P is 0; keys past N are never stored
            lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            pt = tl.exp2(_mma(k, tl.trans(q), PREC) * qk_scale2 - lse2[None, :])  # Pᵀ: one FMA, one ex2 a score
            if HAS_DO:
                do = tl.load(DO + do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                             mask=row_ok[:, None], other=0.0)
                dv += _mma(pt.to(do.dtype), do, PREC)
                dst = pt * (_mma(v, tl.trans(do), PREC) - delta[None, :])
            else:
                dst = -pt * delta[None, :]
            dst = dst.to(q.dtype)
            dk += _mma(dst, q, PREC)
            if ATOMIC_DQ:  # dq_i += Σ_j dS_ij k_j (scaled by the launcher)
                tl.atomic_add(dq_cols + offs_m[:, None] * stride_dqn, _mma(tl.trans(dst), k, PREC),
                              mask=row_ok[:, None], sem="relaxed")
    if CAP_GRAD:  # Tᵀ: only the captured query blocks, only if this key block holds selected keys
        lo = (R0 // BLOCK_M) * BLOCK_M
        for start_m in range(lo, tl.where(has_sel, R1, lo), BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            cap_rows = (offs_m >= R0) & (offs_m < R1)
            q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None], other=0.0)
            gk = _key_map_grad(offs_n, offs_m, cap_rows, g_base, stride_gr, stride_gc, g_scale, PERM, s_base,
                               c_first, NSEL, key_first, key_mult, max_mult, R0, BLOCK_N, BLOCK_M, CONTIG)
            if MODE == MODE_PROBS:  # T = P·Gk
                lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
                tt = tl.exp2(_mma(k, tl.trans(q), PREC) * qk_scale2 - lse2[None, :]) * gk
            elif MODE == MODE_LOGITS:  # T = Gk
                tt = gk
            else:  # T = M (Gk − n_j Σ_c M G), M = 2^(qk·scale₂ − lsel₂)
                lsel2 = tl.load(LSEL + cap_base + (offs_m - R0), mask=cap_rows, other=float("inf"))
                hsel = tl.load(HSEL + cap_base + (offs_m - R0), mask=cap_rows, other=0.0)
                mt = tl.exp2(_mma(k, tl.trans(q), PREC) * qk_scale2 - lsel2[None, :])
                if CONTIG:
                    n_j = ((offs_n >= c_first) & (offs_n < c_first + NSEL)).to(tl.float32)
                else:
                    n_j = key_mult.to(tl.float32)
                tt = tl.where(cap_rows[None, :] & (n_j > 0)[:, None], mt * (gk - n_j[:, None] * hsel[None, :]), 0.0)
            tt = tt.to(q.dtype)
            dk += _mma(tt, q, PREC)
            if ATOMIC_DQ:  # the deterministic path's dq kernel adds its own T·k_sel
                tl.atomic_add(dq_cols + offs_m[:, None] * stride_dqn, _mma(tl.trans(tt), k, PREC),
                              mask=row_ok[:, None], sem="relaxed")
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    if HAS_DO:
        tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.autotune(configs=_configs("bwd"), key=["N", "HEAD_DIM", "CAP_GRAD", "MODE", "CONTIG", "HAS_DO", "DENSE"],
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
    CAP_GRAD: tl.constexpr, MODE: tl.constexpr, CONTIG: tl.constexpr, HAS_DO: tl.constexpr,
    DENSE: tl.constexpr, PREC: tl.constexpr,
):
    """The deterministic path's dq (no atomics): one program per query block,
    dq = scale (Σ_j dS_ij k_j + Σ_c T_ic k_sel,c): 3 GEMMs per dense tile (q kᵀ, dO vᵀ, dS k), then the
    selected entries (their scores recomputed, T·k_sel; repeated columns each add their own T)."""
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
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if DENSE:
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        if HAS_DO:
            do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                         + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            k = tl.load(K + k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None], other=0.0)
            # keys past N load k = 0 (and v = 0), so they add dS·k = 0 to dq; rows past N are never stored
            p = tl.exp2(_mma(q, tl.trans(k), PREC) * qk_scale2 - lse2[:, None])
            if HAS_DO:
                v = tl.load(V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=col_ok[:, None], other=0.0)
                ds = p * (_mma(do, tl.trans(v), PREC) - delta[:, None])  # dS = P (dP − D)
            else:
                ds = -p * delta[:, None]
            dq += _mma(ds.to(k.dtype), k, PREC)
    if CAP_GRAD:
        row_lo = pid_m * BLOCK_M
        if (row_lo < R1) & (row_lo + BLOCK_M > R0):
            cap_rows = (offs_m >= R0) & (offs_m < R1)
            cap_idx = pid_bh.to(tl.int64) * (R1 - R0) + (offs_m - R0)
            lsel2 = lse2
            hsel = lse2
            if MODE == MODE_SEL_PROBS:  # the preprocess pass's per-row lsel₂ and Σ_c M G
                lsel2 = tl.load(LSEL + cap_idx, mask=cap_rows, other=float("inf"))  # M = 0 off the captured rows
                hsel = tl.load(HSEL + cap_idx, mask=cap_rows, other=0.0)
            c_base = b * stride_cb
            c_first = _first_col(COLS, c_base, CONTIG)
            g_rows = G + b * stride_gb + h * stride_gh + (offs_m - R0)[:, None] * stride_gr
            for c0 in range(0, NSEL, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cidx, valid = _sel_cols(COLS, c_base, stride_cc, c_first, offs_c, NSEL, CONTIG)
                kc = _load_sel_keys(K, k_base, stride_kn, stride_kd, cidx, valid, offs_d)
                g = tl.load(g_rows + offs_c[None, :] * stride_gc, mask=cap_rows[:, None] & valid[None, :],
                            other=0.0) * g_scale
                t = _sel_grad(q, kc, valid, g, lse2, lsel2, hsel, qk_scale2, scale, MODE, PREC)
                dq += _mma(t.to(kc.dtype), kc, PREC)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


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


def check_scale(scale: float) -> None:
    if not scale > 0:
        raise ValueError(
            f"joint_attention (triton): scale must be positive, got {scale}; the kernels take the running max on "
            "the raw scores q·k (then scale and max commute); use backend='torch' for other scales"
        )


def _launch_options() -> dict:
    """Compile options every launch passes. FP fusion on: the softmax is written so that each score costs one
    FMA (qk·scale₂ − m, and the same for P in the backward); fusion is also the more accurate choice (one
    rounding instead of two) and what Triton ≤ 3.9 compiled by default; set explicitly because 3.10 flips
    the default to off."""
    return {"enable_fp_fusion": FP_FUSION}


def _forward(q, k, v, cols, r0, r1, mode, head_reduce, scale, deterministic, contiguous):
    """Launch the forward kernel: returns out (q's layout and dtype), lse (B, H, N) float32, maps."""
    b, h, n, d = q.shape
    check_head_dim(d)
    check_scale(scale)
    out = empty_output(q.shape, dtype=q.dtype, device=q.device)
    if q.stride(3) == 1 and q.stride(1) == d and q.stride(2) == h * d and h > 1:  # diffusers' (B, N, H, D)
        out = empty_output((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = empty_output((b, h, n), dtype=torch.float32, device=q.device)
    capture = cols is not None
    maps = None
    reduce = REDUCE_STORE.value
    n_sel = cols.shape[1] if capture else 0
    block_c = _block_c(max(n_sel, 1))
    if capture:
        # a whole number of column tiles, so map writes need no column mask (16-byte vector reductions);
        # the padding columns are cut off below
        n_pad = triton.cdiv(n_sel, block_c) * block_c
        rows = r1 - r0
        if head_reduce == "none" or (deterministic and head_reduce == "mean"):
            maps = empty_output((b, h, rows, n_pad), dtype=torch.float32, device=q.device)
        elif head_reduce == "mean":
            maps = torch.zeros((b, rows, n_pad), dtype=torch.float32, device=q.device)
            reduce = REDUCE_SUM.value
        else:  # max: probs and sel_probs are ≥ 0 (an integer max on the bits from +0); logits from −inf
            start = float("-inf") if mode == "logits" else 0.0
            maps = torch.full((b, rows, n_pad), start, dtype=torch.float32, device=q.device)
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
        HEAD_DIM=d, BLOCK_C=block_c, CAPTURE=capture, MODE=MODE_IDS[mode], REDUCE=reduce,
        CONTIG=bool(contiguous and capture), PREC=_precision(q.dtype), **_launch_options(),
    )
    if capture:
        if reduce == REDUCE_STORE.value and head_reduce == "mean":
            maps = maps.sum(1).div_(h)  # deterministic: a fixed-order reduction of the per-head buffer
        if maps.shape[-1] != n_sel:
            maps = maps[..., :n_sel].contiguous()
    return out, lse, maps


def _backward(q, k, v, out, lse, dout, cols, r0, r1, mode, head_reduce, scale, dmaps, contiguous, deterministic):
    """dq, dk, dv. Default: one dk/dv kernel that also adds dq by float32 atomics (5 GEMMs per tile);
    deterministic: dk/dv (4 GEMMs) and a separate dq kernel (3), no atomics. The map gradient's T goes to dk
    in the dk/dv kernel's map loop; without dO only what is nonzero runs (see ``_bwd_dkdv``)."""
    b, h, n, d = q.shape
    prec = _precision(q.dtype)
    cap_grad = dmaps is not None
    has_do = dout is not None
    dense = has_do or (cap_grad and mode == "probs")  # probs' row term −P·Σ M G touches every key
    contig = bool(contiguous and cap_grad)
    if not has_do:
        dout = out  # never read (HAS_DO False); any tensor with out's strides
    bm_pre = 16 if _interpreting() else 64
    n_sel = cols.shape[1] if cap_grad else 0
    block_c = _block_c(max(n_sel, 1))
    if cap_grad:
        g = dmaps.float()
        g_strides = (g.stride(0), 0, *g.stride()[-2:]) if head_reduce == "mean" else tuple(g.stride())
        g_scale = 1.0 / h if head_reduce == "mean" else 1.0
        lsel = torch.zeros((b, h, r1 - r0), dtype=torch.float32, device=q.device)
        hsel = torch.zeros_like(lsel)
        cols_arg, c_strides = cols, tuple(cols.stride())
        if contig:
            scols = perm = cols
        else:  # the dk/dv kernel finds each key block's entries in the sorted columns
            scols, perm = torch.sort(cols, dim=1)
            scols, perm = scols.contiguous(), perm.contiguous()
    else:
        g, g_strides, g_scale, lsel, hsel, cols_arg, c_strides = lse, (0,) * 4, 0.0, lse, lse, lse, (0, 0)
        scols = perm = lse
    common_sel = (h, n, r0, r1, n_sel, scale * LOG2E.value, scale, g_scale)
    flags = dict(CAP_GRAD=cap_grad, MODE=MODE_IDS[mode], CONTIG=contig, HAS_DO=has_do, PREC=prec)
    delta = empty_output((b, h, n), dtype=torch.float32, device=q.device)
    if dense or mode == "sel_probs":  # D (and lsel, Σ M G); logits without dO needs neither
        _bwd_preprocess[(triton.cdiv(n, bm_pre), b * h)](
            q, k, out, dout, lse, cols_arg, g, delta, lsel, hsel,
            *q.stride(), *k.stride(), *out.stride(), *dout.stride(), *c_strides, *g_strides,
            *common_sel, HEAD_DIM=d, BLOCK_M=bm_pre, BLOCK_C=block_c, **flags, **_launch_options(),
        )
    atomic_dq = not deterministic
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else None
    dk = empty_output(k.shape, dtype=k.dtype, device=q.device)
    dv = empty_output(v.shape, dtype=v.dtype, device=q.device) if has_do else torch.zeros_like(v)
    dq_arg = dq32 if atomic_dq else delta.new_zeros(1)  # never written when deterministic
    _bwd_dkdv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)](
        q, k, v, dout, lse, delta, dk, dv, dq_arg, cols_arg, scols, perm, g, lsel, hsel,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        *(dq32.stride() if atomic_dq else (0,) * 4), *c_strides, *g_strides,
        *common_sel, HEAD_DIM=d, BLOCK_C=block_c, DENSE=dense, ATOMIC_DQ=atomic_dq, **flags, **_launch_options(),
    )
    if atomic_dq:
        dq = dq32.mul_(scale).to(q.dtype)
    else:
        dq = empty_output(q.shape, dtype=q.dtype, device=q.device)
        _bwd_dq[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)](
            q, k, v, dout, lse, delta, dq, cols_arg, g, lsel, hsel,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *c_strides, *g_strides,
            *common_sel, HEAD_DIM=d, BLOCK_C=block_c, DENSE=dense, **flags, **_launch_options(),
        )
    return dq, dk, dv


class JointAttentionFunction(torch.autograd.Function):
    """(out, maps, lse) = fused joint attention; backward recomputes P from lse."""

    @staticmethod
    def forward(ctx, q, k, v, cols, r0, r1, mode, head_reduce, scale, deterministic, contiguous=False):
        out, lse, maps = _forward(q, k, v, cols, r0, r1, mode, head_reduce, scale, deterministic, contiguous)
        ctx.save_for_backward(q, k, v, out, lse, cols)
        ctx.meta = (r0, r1, mode, head_reduce, scale, contiguous, deterministic)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return out, maps, lse

    @staticmethod
    def backward(ctx, dout, dmaps, _dlse):
        q, k, v, out, lse, cols = ctx.saved_tensors
        r0, r1, mode, head_reduce, scale, contiguous, deterministic = ctx.meta
        if dmaps is not None and head_reduce == "max":
            raise RuntimeError(
                "joint_attention: head_reduce='max' has no gradient; train through head_reduce='mean' or 'none'"
            )
        if dout is None and dmaps is None:
            return (None,) * 11
        dq, dk, dv = _backward(q, k, v, out, lse, dout, cols, r0, r1, mode, head_reduce, scale, dmaps, contiguous,
                               deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def triton_joint_attention(q, k, v, spec, scale: float, deterministic: bool = False):
    """Launcher used by ``seg4diff_fast.joint_attention`` (backend "triton"); spec may be None.

    ``deterministic`` reduces the map's heads in a fixed order and computes dq without atomics."""
    if spec is None:
        out, _, _ = JointAttentionFunction.apply(q, k, v, None, 0, 1, "probs", "mean", scale, deterministic, False)
        return out, None
    out, maps, _ = JointAttentionFunction.apply(
        q, k, v, spec.cols, spec.r0, spec.r1, spec.mode, spec.head_reduce, scale, deterministic, spec.contiguous
    )
    return out, maps


__all__ = ["JointAttentionFunction", "triton_joint_attention", "check_head_dim", "check_scale"]
