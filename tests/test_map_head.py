"""Reading maps through a MAGNET conv head: the authors' evaluation arrangement (convs over the (pixels × tokens)
array, no residual) and the trained one (each map's grid, residual) against a float64 numpy reference; the
segmenter applies the head to token maps before the class means; the head file round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fresh_seed

from seg4diff_fast import Seg4DiffSegmenter
from seg4diff_fast.magnet import MapHead, load_magnet_head
from seg4diff_fast.magnet.lora import HEAD_FILE
from seg4diff_fast.testing import tiny_sd3_pipeline


def _conv3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Cin, H, W) → (Cout, H, W): 3×3 cross-correlation with zero padding 1, in float64 loops over taps."""
    cin, h, wd = x.shape
    pad = np.zeros((cin, h + 2, wd + 2))
    pad[:, 1:-1, 1:-1] = x
    out = np.broadcast_to(b[:, None, None], (w.shape[0], h, wd)).copy()
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oc,chw->ohw", w[:, :, dy, dx], pad[:, dy:dy + h, dx:dx + wd])
    return out


def _net(head: MapHead, grid: np.ndarray) -> np.ndarray:
    convs = [m for m in head.net if isinstance(m, torch.nn.Conv2d)]
    x = grid[None].astype(np.float64)
    for i, c in enumerate(convs):
        x = _conv3(x, c.weight.detach().double().numpy(), c.bias.detach().double().numpy())
        if i < len(convs) - 1:
            x = np.maximum(x, 0)
    return x[0]


@pytest.mark.parametrize("shape", [(7, 5, 6), (3, 8, 8)])
def test_head_readings_match_float64_reference(shape):
    torch.manual_seed(fresh_seed())
    head = MapHead(width=8, zero_init=False).double()
    maps = torch.randn(*shape, dtype=torch.float64)
    t, h, w = shape
    paper = head.reader("paper")(maps).numpy()
    ref = _net(head, maps.reshape(t, h * w).T.numpy()).T.reshape(t, h, w)  # (pixels × tokens), no residual
    np.testing.assert_allclose(paper, ref, rtol=1e-10, atol=1e-12)
    trained = head.reader("corrected")(maps).numpy()
    ref = np.stack([m + _net(head, m) for m in maps.numpy()])  # each map's own grid, residual
    np.testing.assert_allclose(trained, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="protocol"):
        head.reader("other")


def test_segmenter_applies_the_head_to_token_maps_before_class_means():
    seed = fresh_seed()
    pipe = tiny_sd3_pipeline(t5=False)
    images = [torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(seed))]
    classes = ["cat", "red car", "sky"]
    plain = Seg4DiffSegmenter(pipe, layer=[1, 2], resolution=32)
    squared = Seg4DiffSegmenter(pipe, layer=[1, 2], resolution=32, map_head=lambda m: m.double().square().float())
    res = squared(images, classes)[0]
    reader = plain.reader
    tensors, _ = reader.prepare(images)
    chunk = plain.plan(classes)[0]
    maps = reader.read(reader.latents(tensors), reader.encode_text([chunk.prompt]), [1, 2])[0].double()  # (L, T, h, w)
    want = torch.stack([maps[:, list(p)].square().mean(1) for p in chunk.positions], 1).mean(0)  # square, then mean
    torch.testing.assert_close(res.scores.double(), want, rtol=1e-5, atol=1e-9, msg=f"seed {seed}")
    # the unsupervised path never reads through the head (as the authors' unsupervised model)
    a, b = plain.unsupervised(images[0]), squared.unsupervised(images[0])
    assert a.groups == b.groups and torch.equal(a.segments, b.segments)


def test_head_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(fresh_seed())
    head = MapHead(width=16, zero_init=False)
    assert load_magnet_head(str(tmp_path)) is None  # a run without a head
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / HEAD_FILE))
    loaded = load_magnet_head(str(tmp_path))
    x = torch.randn(4, 6, 6)
    assert torch.equal(loaded.reader("paper")(x), head.reader("paper")(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_polarity_names_a_head_that_inverts_its_input():
    """MapHead.polarity: +1 for the identity (zero-initialised), negative for a head whose convs compute −2x
    (x + conv(x) = −x), as a head that met the mask loss with inverted raw maps does."""
    import torch

    from seg4diff_fast.magnet.head import MapHead

    assert MapHead().polarity() == 1.0
    head = MapHead(width=1)
    with torch.no_grad():
        for conv in head.net[::2]:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
        head.net[-1].weight[0, 0, 1, 1] = -2.0  # relu(relu(x)) = x on the bump (x >= 0): x − 2x = −x
    assert head.polarity() == -1.0


@pytest.mark.parametrize("lift, warned", [({"A": 11.6, "B": 41.6}, False), ({"A": -15.4, "B": 3.0}, True),
                                          (None, True), ({"A": None, "B": 2.0}, False)])
def test_magnet_command_reports_an_inverted_head_by_what_the_raw_maps_did(lift, warned, capsys):
    """`seg4diff-fast magnet` after a run whose head has negative polarity: where its held-out check measured
    the raw maps better on every protocol it scored, one note on stdout and no warning; where they got worse, or
    nothing was measured (not ShapesWorld data, --no-heldout), the warning on stderr with its advice."""
    from seg4diff_fast.cli_magnet import _report_inverted_head

    summary = {"head_polarity": -0.7723}
    if lift is not None:
        summary["heldout"] = {"lift": lift}
    _report_inverted_head(summary)
    out, err = capsys.readouterr()
    assert ("warning" in err and "--no-conv-head" in err and "-0.772" in err) == warned, err
    assert ("note:" in out and "-0.772" in out) == (not warned), out
