"""Layer analysis: attention-block mass against a materialised float64 reference, the layer sweep against
the segmenter, the report files and the ``layers`` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from seg4diff_fast import cli
from seg4diff_fast.evaluation.layers import SHARES, attention_block_mass, write_layer_report
from seg4diff_fast.evaluation.metrics import MeanIoU
from seg4diff_fast.reader import PipelineReader
from seg4diff_fast.segment import Seg4DiffSegmenter
from seg4diff_fast.shapes.grounding import layer_sweep
from seg4diff_fast.testing import record_stock_attention, tiny_sd3_pipeline, tiny_sd35_pipeline

PROMPTS = ["a cat on a red sofa", "dog", "red car and grass"]


@pytest.fixture(scope="module")
def shapes_pipe(one_thread):
    from seg4diff_fast.shapes import load_shapes_pipeline

    return load_shapes_pipeline()


@pytest.fixture(scope="module")
def scenes():
    from seg4diff_fast.shapes.train import heldout_scenes

    return heldout_scenes(20, 32)


def _reference_mass(pipe, images, prompts) -> np.ndarray:
    """(L, H, 4) from softmax(q kᵀ/√d) materialised in float64 on the stock processors' q, k, with the
    segmenter's own inputs."""
    reader = PipelineReader(pipe, resolution=32)
    tensors, _ = reader.prepare(images)
    latents = reader.latents(tensors)
    text = reader.encode_text(prompts)
    tr = pipe.transformer
    with record_stock_attention(tr) as rec, torch.no_grad():
        tr(hidden_states=latents, timestep=reader.timestep.expand(len(images)), encoder_hidden_states=text.embeds,
           pooled_projections=text.pooled)
    n_img = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    out = []
    for b in range(len(tr.transformer_blocks)):
        (q, k), = rec[f"transformer_blocks.{b}.attn"]
        q, k = q.double(), k.double()
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, N, N)
        img, txt = slice(0, n_img), slice(n_img, None)
        share = [p[:, :, r][..., c].sum(-1).mean(-1) for r, c in ((img, img), (img, txt), (txt, img), (txt, txt))]
        out.append(torch.stack(share, -1).mean(0))  # (H, 4), mean over images
    return torch.stack(out).numpy()


@pytest.mark.parametrize("variant", ["plain", "qk_norm", "sd35"])
def test_mass_matches_float64_reference(variant, one_thread):
    if variant == "plain":
        pipe = tiny_sd3_pipeline(t5=False)
    elif variant == "qk_norm":
        pipe = tiny_sd3_pipeline(t5=False, qk_norm="rms_norm")
    else:  # qk-norm + SD3.5-medium's dual-attention attn2 (left on its stock processor)
        pipe = tiny_sd35_pipeline(t5=False)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 32, 40, generator=g) for _ in PROMPTS]
    got = attention_block_mass(pipe, images, PROMPTS, resolution=32, batch_size=2)  # two batches
    ref = _reference_mass(pipe, images, PROMPTS)
    n_layers, heads = len(pipe.transformer.transformer_blocks), pipe.transformer.config.num_attention_heads
    assert got["mass"].shape == ref.shape == (n_layers, heads, 4)
    np.testing.assert_allclose(got["mass"], ref, rtol=0, atol=1e-5)
    for j, name in enumerate(SHARES):
        np.testing.assert_array_equal(got[name], got["mass"][..., j])
    np.testing.assert_allclose(got["I2I"] + got["I2T"], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["T2I"] + got["T2T"], 1.0, rtol=0, atol=1e-12)
    assert got["n_image_tokens"] == 64 and got["n_text_tokens"] == 154 and got["n_images"] == 3
    # the stock processors are back
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    assert all(isinstance(b.attn.processor, JointAttnProcessor2_0) for b in pipe.transformer.transformer_blocks)


def test_sweep_head_mean_matches_segmenter(shapes_pipe, scenes):
    from seg4diff_fast.shapes import CLASSES

    res = layer_sweep(shapes_pipe, scenes, batch_size=8)
    n_layers = len(shapes_pipe.transformer.transformer_blocks)
    assert res["layers"] == list(range(n_layers)) and res["n_B"] == len(scenes)
    assert np.array(res["A_heads"]).shape == np.array(res["B_heads"]).shape == (n_layers, 4)
    a_scenes = [s for s in scenes if len(s.object_classes) >= 2]
    assert res["n_A"] == len(a_scenes) > 0
    for layer in range(n_layers):  # an independent path: one segmenter per block, its own batching
        seg = Seg4DiffSegmenter(shapes_pipe, layer=layer, resolution=32)
        for proto, sc in (("A", a_scenes), ("B", scenes)):
            names = [s.object_classes if proto == "A" else s.classes for s in sc]
            meter = MeanIoU(len(CLASSES))
            for s, cls, r in zip(sc, names, seg([s.image for s in sc], classes=names)):
                gt = s.global_label_map()
                if proto == "A":
                    gt = np.where(s.label_map == 0, 255, gt)
                meter.update(np.array([CLASSES.index(c) for c in cls])[r.label_map], gt)
            assert res[proto][layer] == round(meter.compute()["mIoU"], 2), (proto, layer)
    # head mean without the per-head capture: the same numbers
    assert layer_sweep(shapes_pipe, scenes, per_head=False, batch_size=16)["A"] == res["A"]


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    i2t, t2t = rng.uniform(size=(3, 2, 1)), rng.uniform(size=(3, 2, 1))
    mass = {"mass": np.concatenate([1 - i2t, i2t, 1 - t2t, t2t], -1), "n_images": 2}
    sweep = {"layers": [0, 1, 2], "num_heads": 2, "n_A": 5, "n_B": 7, "A": [20.0, 50.5, 30.0],
             "B": [10.0, 12.0, 40.25], "A_heads": [[1.0, 2.0]] * 3, "B_heads": [[3.0, 4.0]] * 3,
             "A_baseline": 23.8, "B_baseline": 5.9}
    paths = write_layer_report({"model": "m", "mass": mass, "sweep": sweep}, str(tmp_path))
    assert sorted(paths) == ["json", "md", "png"]
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["md"]).read()
    block_table = md.split("## Per block")[1].split("##")[0]
    rows = [line for line in block_table.splitlines() if line.startswith("| ") and not line.startswith("| block")]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1", "2"]
    assert "50.5" in rows[1] and "40.2" in rows[2]
    data = json.loads(open(paths["json"]).read())
    assert np.array(data["mass"]["mass"]).shape == (3, 2, 4) and data["sweep"]["B"][2] == 40.25
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".s4d-tmp")]


def test_cli_layers(tmp_path, capsys, one_thread):
    out = tmp_path / "rep"
    assert cli.main(["layers", "--scenes", "8", "--mass-scenes", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best block, protocol A" in printed and "best block, protocol B" in printed
    assert {p.name for p in out.iterdir()} == {"layers.json", "layers.md", "layers.png"}
    data = json.loads((out / "layers.json").read_text())
    assert data["sweep"]["n_B"] == 8 and len(data["sweep"]["A"]) == 6
    assert np.array(data["mass"]["mass"]).shape == (6, 4, 4)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    result = {"mass": {"mass": np.full((2, 2, 4), 0.5)}}
    with pytest.raises(ImportError, match=r"pip install seg4diff-fast\[analysis\]"):
        write_layer_report(result, str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing half-written
    assert sorted(write_layer_report(result, str(tmp_path / "r"), plot=False)) == ["json", "md"]


def test_cli_layers_other_model_runs_mass_only(tmp_path, capsys, one_thread):
    tiny_sd3_pipeline(t5=False).save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "rep"
    assert cli.main(["layers", "--model", str(tmp_path / "model"), "--resolution", "32", "--mass-scenes", "2",
                     "--no-plot", "--out", str(out)]) == 0
    assert "not a ShapesWorld model" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"layers.json", "layers.md"}
    data = json.loads((out / "layers.json").read_text())
    assert "sweep" not in data and np.array(data["mass"]["mass"]).shape == (3, 4, 4)
