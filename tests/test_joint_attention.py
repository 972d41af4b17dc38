"""joint_attention against a float64 reference written from the definition, for every backend.

On a machine without CUDA the Triton backend runs in Triton's interpreter on CPU tensors at small
shapes; with CUDA the same tests run natively and the full SD3/Flux shapes are added.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import HAS_CUDA

from seg4diff_fast import joint_attention
from seg4diff_fast.ops.joint_attention import (
    BACKEND_REGISTRY,
    CaptureSpec,
    resolve_backend,
    triton_available,
)
from seg4diff_fast.ops.reference import reference_joint_attention
from seg4diff_fast.ops.torch_attention import torch_joint_attention
from seg4diff_fast.ops.upsample_argmax import upsample_argmax

BACKENDS = ["triton", "torch", "reference"]
MODES = ["probs", "logits", "sel_probs"]
REDUCES = ["mean", "max", "none"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |error| / max |reference|, forward values and gradients
FWD_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
BWD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}

# (text length, capture-column case). Image-token counts are ragged on purpose (no block divides them).
COL_CASES = ["one", "clip77", "t154", "per_batch"]
N_IMG = 45


def text_len(case: str) -> int:
    return {"one": 77, "clip77": 77, "t154": 154, "per_batch": 24}[case]


def make_cols(case: str, batch: int, text0: int) -> torch.Tensor:
    """Capture columns for a text block starting at joint index text0."""
    if case == "one":
        return torch.tensor([text0 + 3])
    if case in ("clip77", "t154"):
        return torch.arange(text0, text0 + text_len(case))
    # per batch element, with -1 padding and a repeated column
    cols = torch.full((batch, 12), -1, dtype=torch.long)
    for b in range(batch):
        n = 12 - 3 * b if b < 3 else 5
        cols[b, :n] = text0 + torch.randperm(text_len(case))[:n]
    cols[0, 1] = cols[0, 0]
    return cols


def attention_ref(q, k, v, cols, rows, mode, head_reduce, scale):
    """The definition, in float64: per batch element and head, slices of the full softmax."""
    q, k, v = (t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v))
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    if cols is None:
        return (q, k, v), out, None
    r0, r1 = rows
    per_batch = []
    for b in range(q.shape[0]):
        c = cols[b] if cols.dim() == 2 else cols
        valid = c >= 0
        cc = c.clamp(min=0)
        sb = s[b, :, r0:r1][:, :, cc]
        if mode == "probs":
            m = p[b, :, r0:r1][:, :, cc]
        elif mode == "logits":
            m = sb
        else:
            m = torch.softmax(sb.masked_fill(~valid, -math.inf), dim=-1)
        per_batch.append(torch.where(valid, m, torch.zeros_like(m)))
    maps = torch.stack(per_batch)
    if head_reduce == "mean":
        maps = maps.mean(1)
    elif head_reduce == "max":
        maps = maps.amax(1)
    return (q, k, v), out, maps


def make_inputs(batch, heads, n, d, dtype, layout, device):
    def one():
        shape = (batch, heads, n, d) if layout == "bhnd" else (batch, n, heads, d)
        t = torch.randn(shape, device=device, dtype=torch.float32) * 1.5
        t = t.to(dtype)
        return (t if layout == "bhnd" else t.transpose(1, 2)).requires_grad_()

    return one(), one(), one()


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    assert torch.isfinite(actual).all(), "non-finite values (an element was left unwritten?)"
    return ((actual.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def layout_case(order: str, case: str, batch: int):
    """Token order: SD3 is [image; text] (capture rows first), Flux is [text; image]."""
    n_txt = text_len(case)
    n = N_IMG + n_txt
    if order == "image_first":
        rows, text0 = (0, N_IMG), N_IMG
    else:
        rows, text0 = (n_txt, n), 0
    return n, rows, make_cols(case, batch, text0)


SECONDARY = list(itertools.product([64, 128], ["bhnd", "bnhd"], ["image_first", "text_first"], COL_CASES))
PRIMARY = list(itertools.product(MODES, REDUCES, DTYPES))
# every (mode, reduce, dtype) runs; the secondary axes are spread over them (7 is coprime to 32)
CASES = [(*p, *SECONDARY[(i * 7) % len(SECONDARY)]) for i, p in enumerate(PRIMARY)]


def _skip_unavailable(backend: str, device: torch.device) -> None:
    if backend == "reference" and device.type == "cuda":
        return
    if backend == "triton":
        pytest.importorskip("triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,head_reduce,dtype,d,layout,order,case", CASES)
def test_forward_and_backward(backend, mode, head_reduce, dtype, d, layout, order, case, device, poison_outputs):
    _skip_unavailable(backend, device)
    batch, heads = 2, 3
    n, rows, cols = layout_case(order, case, batch)
    q, k, v = make_inputs(batch, heads, n, d, dtype, layout, device)
    cols = cols.to(device)
    scale = d**-0.5
    out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, mode=mode,
                                head_reduce=head_reduce, backend=backend)
    leaves, out_ref, maps_ref = attention_ref(q, k, v, cols, rows, mode, head_reduce, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert maps.dtype == torch.float32 and maps.shape == maps_ref.shape
    assert rel_err(out, out_ref) <= FWD_TOL[dtype]
    assert rel_err(maps, maps_ref) <= FWD_TOL[dtype]
    pad = (cols if cols.dim() == 2 else cols[None]) < 0
    if pad.any():  # padded columns come back as exactly 0
        pad_idx = pad[:, None, :] if head_reduce != "none" else pad[:, None, None, :]
        assert (maps.masked_select(pad_idx.expand_as(maps)) == 0).all()

    w_out = torch.randn(out.shape, device=device, dtype=torch.float64)
    w_map = torch.randn(maps.shape, device=device, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + (maps.double() * w_map).sum()
    if head_reduce == "max" and backend != "reference":
        with pytest.raises(RuntimeError, match="head_reduce='max' has no gradient"):
            torch.autograd.grad(loss, (q, k, v))
        return
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = (out_ref * w_out).sum() + (maps_ref * w_map).sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype
        assert rel_err(g, g_ref) <= BWD_TOL[dtype], f"d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_no_capture(backend, dtype, d, device, poison_outputs):
    _skip_unavailable(backend, device)
    q, k, v = make_inputs(2, 2, 93, d, dtype, "bnhd", device)
    out, maps = joint_attention(q, k, v, backend=backend)
    assert maps is None
    leaves, out_ref, _ = attention_ref(q, k, v, None, None, None, None, d**-0.5)
    assert rel_err(out, out_ref) <= FWD_TOL[dtype]
    w = torch.randn(out.shape, device=device, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((out_ref * w).sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= BWD_TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_gradient_of_maps_alone(backend, mode, device):
    """MAGNET's case: the loss reads only the captured map, out is unused."""
    _skip_unavailable(backend, device)
    n, rows, cols = layout_case("image_first", "clip77", 1)
    q, k, v = make_inputs(1, 2, n, 64, torch.float32, "bnhd", device)
    _, maps = joint_attention(q, k, v, capture_cols=cols.to(device), capture_rows=rows, mode=mode, backend=backend)
    leaves, _, maps_ref = attention_ref(q, k, v, cols.to(device), rows, mode, "mean", 64**-0.5)
    w = torch.randn(maps.shape, device=device, dtype=torch.float64)
    grads = torch.autograd.grad((maps.double() * w).sum(), (q, k, v), allow_unused=True)
    grads_ref = torch.autograd.grad((maps_ref * w).sum(), leaves, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None or g_ref.abs().max() == 0:  # dv: the map does not depend on v
            assert g is None or g.abs().max() == 0
        else:
            assert rel_err(g, g_ref) <= BWD_TOL[torch.float32]


def test_triton_deterministic_mode(device):
    pytest.importorskip("triton")
    n, rows, cols = layout_case("image_first", "clip77", 2)
    q, k, v = make_inputs(2, 4, n, 64, torch.float16, "bhnd", device)
    cols = cols.to(device)
    runs = [
        joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, backend="triton", deterministic=True)[1]
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    _, _, ref = attention_ref(q, k, v, cols, rows, "probs", "mean", 64**-0.5)
    assert rel_err(runs[0], ref) <= FWD_TOL[torch.float16]
    atomic = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, backend="triton")[1]
    assert rel_err(atomic, runs[0].double()) <= 1e-5


FULL_SHAPES = [  # (name, B, H, n_img, n_txt, D, order, n_sel)
    ("sd3_1024", 1, 24, 4096, 154, 64, "image_first", 154),
    ("sd3_1024_t5", 2, 24, 4096, 333, 64, "image_first", 77),
    ("flux_1024", 1, 24, 4096, 512, 128, "text_first", 512),
]


@pytest.mark.skipif(not HAS_CUDA, reason="full SD3/Flux shapes run natively on CUDA only")
@pytest.mark.parametrize("name,batch,heads,n_img,n_txt,d,order,n_sel", FULL_SHAPES)
@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_full_shapes_cuda(name, batch, heads, n_img, n_txt, d, order, n_sel, mode, poison_outputs):
    device = torch.device("cuda")
    n = n_img + n_txt
    rows, text0 = ((0, n_img), n_img) if order == "image_first" else ((n_txt, n), 0)
    cols = torch.arange(text0, text0 + n_sel, device=device)
    q, k, v = make_inputs(batch, heads, n, d, torch.bfloat16, "bnhd", device)
    out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, mode=mode, backend="triton")
    leaves, out_ref, maps_ref = attention_ref(q, k, v, cols, rows, mode, "mean", d**-0.5)
    assert rel_err(out, out_ref) <= FWD_TOL[torch.bfloat16]
    assert rel_err(maps, maps_ref) <= FWD_TOL[torch.bfloat16]
    w_out = torch.randn(out.shape, device=device, dtype=torch.float64)
    w_map = torch.randn(maps.shape, device=device, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w_out).sum() + (maps.double() * w_map).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((out_ref * w_out).sum() + (maps_ref * w_map).sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= BWD_TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# Bad input and backend selection
# ---------------------------------------------------------------------------------------------


def _qkv(n=20, d=16, dtype=torch.float32):
    return [torch.randn(1, 2, n, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"capture_cols": torch.tensor([25])}, ValueError, r"\[0, N=20\)"),
        ({"capture_cols": torch.tensor([-2])}, ValueError, "-1 as padding"),
        ({"capture_cols": torch.tensor([1.0])}, TypeError, "integer tensor"),
        ({"capture_cols": torch.zeros(3, 2, dtype=torch.long)}, ValueError, r"\(B=1, n_sel\)"),
        ({"capture_cols": torch.zeros(513, dtype=torch.long)}, ValueError, "between 1 and 512"),
        ({"capture_cols": torch.tensor([1]), "capture_rows": (5, 5)}, ValueError, "non-empty half-open"),
        ({"capture_cols": torch.tensor([1]), "capture_rows": (0, 21)}, ValueError, "inside"),
        ({"mode": "softmax"}, ValueError, "mode="),
        ({"head_reduce": "sum"}, ValueError, "head_reduce="),
        ({"backend": "cuda"}, ValueError, "backend="),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        joint_attention(*_qkv(), **kwargs)


def test_bad_tensors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"4-D \(B, H, N, D\)"):
        joint_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        joint_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        joint_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="share"):
        joint_attention(q, k[:, :, :10], v)


def test_triton_head_size_error():
    pytest.importorskip("triton")
    q, k, v = _qkv(d=48)
    with pytest.raises(ValueError, match="head size 48"):
        joint_attention(q, k, v, backend="triton")


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("SEG4DIFF_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv("SEG4DIFF_BACKEND", "reference")
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("torch", cpu) == "torch"  # the argument wins over the environment
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        resolve_backend("triton", cpu)


def test_backend_errors_name_the_op(monkeypatch):
    """resolve_backend's messages name the op that asked; the default is joint_attention's."""
    monkeypatch.delenv("SEG4DIFF_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"^joint_attention: backend='cuda' is not one of \('triton', 'torch', 'ref"):
        resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="^focal_dice_loss: backend='cuda'"):
        resolve_backend("cuda", cpu, op="focal_dice_loss")
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="^joint_attention: backend 'triton' runs on CUDA tensors"):
            resolve_backend("triton", cpu)
        with pytest.raises(RuntimeError, match="^upsample_argmax: backend 'triton' runs on CUDA tensors"):
            upsample_argmax(torch.zeros(2, 4, 4), (8, 8), backend="triton")


def test_dispatch_goes_through_the_registry(monkeypatch):
    """joint_attention calls BACKEND_REGISTRY[name] with (q, k, v, spec, scale, deterministic=...)."""
    assert BACKEND_REGISTRY.names() == tuple(BACKENDS) == ("triton", "torch", "reference")
    assert BACKEND_REGISTRY["torch"] is torch_joint_attention
    assert BACKEND_REGISTRY["reference"] is reference_joint_attention
    calls = []

    def fake(q, k, v, spec, scale, deterministic=False):
        calls.append((spec, scale, deterministic))
        return q, None

    monkeypatch.setitem(BACKEND_REGISTRY, "torch", fake)
    q, k, v = _qkv()
    joint_attention(q, k, v, capture_cols=torch.tensor([1]), scale=0.5, backend="torch", deterministic=True)
    ((spec, scale, det),) = calls
    assert isinstance(spec, CaptureSpec) and scale == 0.5 and det is True


def test_public_names_stay_importable():
    """The names importable before the ops/ split still are, from the same modules."""
    from seg4diff_fast.ops import capture_spec, maps
    from seg4diff_fast.ops.joint_attention import (  # noqa: F401
        HEAD_REDUCES,
        MAX_SELECTED,
        MODES,
        joint_attention,
        triton_available,
    )
    from seg4diff_fast.ops.reference import gather_cols, head_maps, reduce_heads
    from seg4diff_fast.ops.torch_attention import torch_joint_attention as tja

    assert tja is torch_joint_attention and CaptureSpec is capture_spec.CaptureSpec
    assert (MODES, HEAD_REDUCES, MAX_SELECTED) == (capture_spec.MODES, capture_spec.HEAD_REDUCES, 512)
    assert (gather_cols, head_maps, reduce_heads) == (maps.gather_cols, maps.head_maps, maps.reduce_heads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_torch_backend_in_many_ragged_chunks(mode, head_reduce, monkeypatch, poison_outputs):
    """The torch backend's row chunking (forward capture and backward) with chunks that do not divide N."""
    import seg4diff_fast.ops.torch_attention as torch_mod

    monkeypatch.setattr(torch_mod, "CAPTURE_ROWS", 7)
    monkeypatch.setattr(torch_mod, "MIN_CHUNK_BYTES", 1)  # → blocks of about q's size: a few rows each
    batch, heads, d = 2, 3, 64
    n, rows, cols = layout_case("text_first", "per_batch", batch)
    q, k, v = make_inputs(batch, heads, n, d, torch.float32, "bnhd", torch.device("cpu"))
    step = torch_mod._rows_per_chunk(q, n)  # D rows at float32: two blocks, the second ragged
    assert step < n and n % step != 0
    out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, mode=mode,
                                head_reduce=head_reduce, backend="torch")
    leaves, out_ref, maps_ref = attention_ref(q, k, v, cols, rows, mode, head_reduce, d**-0.5)
    assert rel_err(out, out_ref) <= FWD_TOL[torch.float32]
    assert rel_err(maps, maps_ref) <= FWD_TOL[torch.float32]
    w_out = torch.randn(out.shape, dtype=torch.float64)
    w_map = torch.randn(maps.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w_out).sum() + (maps.double() * w_map).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((out_ref * w_out).sum() + (maps_ref * w_map).sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= BWD_TOL[torch.float32]


def test_autotune_pruning_keeps_a_config_for_every_dtype_and_head_size(monkeypatch):
    """The CUDA autotune lists (not used by the interpreter), pruned per kernel, dtype and head size: every case
    keeps at least one candidate, only candidates of its own list, and on tensor cores (fp16 / bf16) only tiles of
    at least 64 rows (wgmma; 32-row tiles fall back to mma.sync). Which tiles spill is checked on the compiled
    code by tests/test_compile_check.py."""
    import seg4diff_fast.kernels.joint_attention as kernel_mod

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cases = {"fwd": ("fwd", {"MAPS": None}, {}), "dkdv": ("bwd", {"DK": None}, {}),
             "dkdv_cap": ("bwd", {"DK": None}, {"CAP_GRAD": True}), "dq": ("bwd", {}, {})}
    for kernel, (kind, names, extra) in cases.items():
        configs = kernel_mod._configs(kind)
        assert len(configs) > 1
        for dtype in DTYPES:
            for d in (64, 128):
                q = torch.empty(0, dtype=dtype)
                kept = kernel_mod.prune_configs(configs, {"Q": q, **names}, HEAD_DIM=d, **extra)
                assert kept and all(c in configs for c in kept), (kernel, dtype, d)
                tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
                operands = "fp32" if dtype == torch.float32 else "tc"
                assert tiles == set(kernel_mod._TILES[(kernel, operands, d)]), (kernel, dtype, d)
                if operands == "tc":
                    assert min(t[0] for t in tiles) >= 64, (kernel, dtype, d, tiles)


def _ops_import_graph() -> dict[str, set[str]]:
    """ops/'s modules → the ops/ modules each imports, at module level or lazily inside functions."""
    import ast
    import pathlib

    import seg4diff_fast.ops as ops_pkg

    root = pathlib.Path(ops_pkg.__file__).parent
    mods = {p.stem for p in root.glob("*.py")}
    edges = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((root / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ... / from . import x
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seg4diff_fast.ops."):
                names = [node.module.split(".")[2]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[2] for a in node.names if a.name.startswith("seg4diff_fast.ops.")]
            else:
                continue
            edges[m] |= {n for n in names if n in mods and n != m}
    return edges


def test_ops_import_graph_is_acyclic():
    edges = _ops_import_graph()
    assert edges["capture_spec"] == set() and edges["backends"] == set()
    assert "joint_attention" not in edges["reference"] | edges["torch_attention"]
    done: set[str] = set()

    def visit(m, path):
        assert m not in path, "import cycle in seg4diff_fast/ops: " + " -> ".join([*path, m])
        if m not in done:
            for n in sorted(edges[m]):
                visit(n, [*path, m])
            done.add(m)

    for m in sorted(edges):
        visit(m, [])


# ---------------------------------------------------------------------------------------------
# Triton kernel paths: contiguous vs gathered columns, maps-only backward, atomic vs deterministic dq,
# ragged column counts
# ---------------------------------------------------------------------------------------------


def _triton_call(q, k, v, cols, rows, mode, head_reduce, contiguous, deterministic=False):
    """The Triton backend with the column layout forced (bypasses make_capture_spec's detection)."""
    from seg4diff_fast.kernels.joint_attention import triton_joint_attention

    cols2 = (cols if cols.dim() == 2 else cols[None].expand(q.shape[0], -1)).to(q.device, torch.int64).contiguous()
    spec = CaptureSpec(cols=cols2, r0=rows[0], r1=rows[1], mode=mode, head_reduce=head_reduce, contiguous=contiguous)
    return triton_joint_attention(q, k, v, spec, q.shape[-1] ** -0.5, deterministic=deterministic)


def test_contiguous_columns_are_detected():
    from seg4diff_fast.ops.joint_attention import make_capture_spec

    def spec(cols, batch=2):
        return make_capture_spec(cols, None, "probs", "mean", batch, 100, torch.device("cpu"))

    assert spec(torch.arange(40, 77)).contiguous
    assert spec(torch.tensor([5])).contiguous
    assert spec(torch.stack([torch.arange(3, 10), torch.arange(50, 57)])).contiguous  # a start per batch element
    assert not spec(torch.tensor([40, 41, 43])).contiguous  # a gap
    assert not spec(torch.tensor([41, 40, 42])).contiguous  # out of order
    assert not spec(torch.tensor([40, 41, 41])).contiguous  # a repeat
    assert not spec(torch.tensor([[40, 41, -1], [40, 41, 42]])).contiguous  # padding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_reduce,dtype", [("mean", torch.float32), ("none", torch.bfloat16)])
def test_triton_contiguous_and_gathered_columns_agree(mode, head_reduce, dtype, device, poison_outputs):
    """The same columns given as a run (block loads, keys found by range) and as gathered indices (index
    loads, keys found in the sorted columns): identical maps and gradients, both equal to the reference."""
    pytest.importorskip("triton")
    batch, heads, d, n_txt = 2, 2, 32, 40
    n = N_IMG + n_txt
    rows, cols = (0, N_IMG), torch.arange(N_IMG + 3, N_IMG + 3 + 33)  # 33 columns: a ragged tile count
    q, k, v = make_inputs(batch, heads, n, d, dtype, "bnhd", device)
    w_out = torch.randn((batch, heads, n, d), device=device, dtype=torch.float64)
    results, w_map = [], None
    for contiguous in (True, False):
        out, maps = _triton_call(q, k, v, cols, rows, mode, head_reduce, contiguous, deterministic=True)
        w_map = torch.randn(maps.shape, device=device, dtype=torch.float64) if w_map is None else w_map
        loss = (out.double() * w_out).sum() + (maps.double() * w_map).sum()
        results.append((maps, *torch.autograd.grad(loss, (q, k, v))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    leaves, out_ref, maps_ref = attention_ref(q, k, v, cols.to(device), rows, mode, head_reduce, d**-0.5)
    assert rel_err(results[0][0], maps_ref) <= FWD_TOL[dtype]
    grads_ref = torch.autograd.grad((out_ref * w_out).sum() + (maps_ref * w_map).sum(), leaves)
    for g, g_ref in zip(results[0][1:], grads_ref):
        assert rel_err(g, g_ref) <= BWD_TOL[dtype]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_reduce,case", [("mean", "clip77"), ("none", "per_batch")])
def test_triton_maps_only_backward(mode, head_reduce, case, device, poison_outputs):
    """A loss on the maps alone (dO is None: no dense pass for logits / sel_probs, no dv) equals the full
    backward given dO = 0, and the float64 reference; dv is exactly 0."""
    pytest.importorskip("triton")
    batch, heads, d = 2, 2, 32
    n, rows, cols = layout_case("text_first", case, batch)
    cols = cols.to(device)
    q, k, v = make_inputs(batch, heads, n, d, torch.float32, "bhnd", device)
    w = torch.randn(maps_shape := (batch, *((heads,) if head_reduce == "none" else ()), rows[1] - rows[0],
                                   cols.shape[-1]), device=device, dtype=torch.float64)
    out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, mode=mode, head_reduce=head_reduce,
                                backend="triton")
    assert maps.shape == maps_shape
    only_maps = torch.autograd.grad((maps.double() * w).sum(), (q, k, v))
    out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, mode=mode, head_reduce=head_reduce,
                                backend="triton")
    with_zero_do = torch.autograd.grad((maps.double() * w).sum() + (out * 0).sum(), (q, k, v))
    assert torch.equal(only_maps[2], torch.zeros_like(v))
    leaves, _, maps_ref = attention_ref(q, k, v, cols, rows, mode, head_reduce, d**-0.5)
    grads_ref = torch.autograd.grad((maps_ref * w).sum(), leaves, allow_unused=True)
    for name, a, b, ref in zip("qkv", only_maps, with_zero_do, grads_ref):
        if name == "v":
            assert b.abs().max() == 0
            continue
        assert rel_err(a, ref) <= BWD_TOL[torch.float32], f"d{name}"
        assert rel_err(a, b.double()) <= 1e-5, f"d{name}"


@pytest.mark.parametrize("mode,case", [("probs", "clip77"), ("logits", "per_batch"), ("sel_probs", "t154")])
def test_triton_atomic_dq_matches_deterministic(mode, case, device, poison_outputs):
    """dq accumulated by float32 atomics inside the dk/dv kernel (5 GEMMs) against the separate dq kernel
    (7 GEMMs, deterministic): equal within float32 rounding; dk and dv come from the same kernel."""
    pytest.importorskip("triton")
    batch, heads, d = 2, 2, 32
    n, rows, cols = layout_case("image_first", case, batch)
    cols = cols.to(device)
    q, k, v = make_inputs(batch, heads, n, d, torch.float32, "bnhd", device)
    w_out = torch.randn((batch, heads, n, d), device=device, dtype=torch.float64)
    grads, w_map = [], None
    for deterministic in (False, True):
        out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, mode=mode, backend="triton",
                                    deterministic=deterministic)
        w_map = torch.randn(maps.shape, device=device, dtype=torch.float64) if w_map is None else w_map
        grads.append(torch.autograd.grad((out.double() * w_out).sum() + (maps.double() * w_map).sum(), (q, k, v)))
    for name, a, b in zip("qkv", *grads):
        assert rel_err(a, b.double()) <= 1e-5, f"d{name}"
    leaves, out_ref, maps_ref = attention_ref(q, k, v, cols, rows, mode, "mean", d**-0.5)
    grads_ref = torch.autograd.grad((out_ref * w_out).sum() + (maps_ref * w_map).sum(), leaves)
    for name, a, ref in zip("qkv", grads[0], grads_ref):
        assert rel_err(a, ref) <= BWD_TOL[torch.float32], f"d{name}"


RAGGED_SEL = [1, 31, 33, 77, 154]
# every (mode, reduce, dtype); the column count and the column layout (a run, or gathered with a repeat and
# padding) cycle over them
RAGGED_CASES = [(*p, RAGGED_SEL[i % len(RAGGED_SEL)], i % 2 == 1) for i, p in enumerate(PRIMARY)]


@pytest.mark.parametrize("mode,head_reduce,dtype,n_sel,gathered", RAGGED_CASES)
def test_triton_ragged_columns(mode, head_reduce, dtype, n_sel, gathered, device, poison_outputs):
    """Ragged N (no block divides it) and ragged column counts, forward and backward against float64."""
    pytest.importorskip("triton")
    batch, heads, d, n_img = 2, 2, 16, 37
    n_txt = max(n_sel, 2) + 3
    n = n_img + n_txt
    rows = (0, n_img)
    if gathered:  # a shuffled subset of the text, a repeated column, and padding in batch element 1
        cols = torch.stack([n_img + torch.randperm(n_txt)[:n_sel] for _ in range(batch)])
        if n_sel > 1:
            cols[0, -1] = cols[0, 0]
            cols[1, n_sel // 2:] = -1
    else:
        cols = torch.arange(n_img + 2, n_img + 2 + n_sel)
    cols = cols.to(device)
    q, k, v = make_inputs(batch, heads, n, d, dtype, "bnhd", device)
    out, maps = joint_attention(q, k, v, capture_cols=cols, capture_rows=rows, mode=mode, head_reduce=head_reduce,
                                backend="triton")
    leaves, out_ref, maps_ref = attention_ref(q, k, v, cols, rows, mode, head_reduce, d**-0.5)
    assert rel_err(out, out_ref) <= FWD_TOL[dtype]
    assert rel_err(maps, maps_ref) <= FWD_TOL[dtype]
    if head_reduce == "max":
        return  # no gradient (test_forward_and_backward checks the error)
    w_out = torch.randn(out.shape, device=device, dtype=torch.float64)
    w_map = torch.randn(maps.shape, device=device, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w_out).sum() + (maps.double() * w_map).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((out_ref * w_out).sum() + (maps_ref * w_map).sum(), leaves)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_err(g, g_ref) <= BWD_TOL[dtype], f"d{name}"


def test_triton_scale_must_be_positive():
    pytest.importorskip("triton")
    q, k, v = _qkv(d=16)
    with pytest.raises(ValueError, match="scale must be positive"):
        joint_attention(q, k, v, scale=-0.25, backend="triton")
