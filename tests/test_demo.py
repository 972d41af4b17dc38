"""``seg4diff-fast demo``: the bundled ShapesWorld scenes, the overlays, the per-block mIoU, the core-op check."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_fast import cli, demo
from seg4diff_fast.evaluation.metrics import MeanIoU
from seg4diff_fast.segment import Seg4DiffSegmenter
from seg4diff_fast.shapes import CLASSES, EXPERT_LAYER, load_shapes_pipeline
from seg4diff_fast.shapes.demo_data import DEMO_DIR, NUM_DEMO_SCENES, load_demo_scenes, make_demo_images


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One run of the demo: (exit status, console output, OUT folder, demo.json)."""
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--out", str(out)])
    record = json.loads((out / "demo.json").read_text())
    return rc, buf.getvalue(), out, record


def test_demo_runs_and_writes_everything(demo_run):
    rc, text, out, record = demo_run
    assert rc == 0
    assert "OK" in text and "per-block mIoU" in text
    scenes = load_demo_scenes()
    assert len(scenes) == NUM_DEMO_SCENES == len(record["scenes"])
    for d, s in zip(scenes, record["scenes"]):
        path = out / f"{d.name}_overlay.png"
        assert s["overlay"] == path.name
        with Image.open(path) as im:
            h, w = d.scene.label_map.shape
            assert im.size == demo.strip_size(h, w) == (3 * w * demo.SCALE + 2 * demo.GAP,
                                                        demo.TITLE_H + h * demo.SCALE + demo.LEGEND_H)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{d.name}_overlay.png" for d in scenes] + ["demo.json", "demo.md"])  # no temporary files left
    md = (out / "demo.md").read_text()
    assert "| block |" in md and f"| {EXPERT_LAYER} * |" in md
    n_layers = record["num_layers"]
    assert record["layers"] == list(range(n_layers)) and record["layer"] == EXPERT_LAYER
    for p in ("A", "B"):
        assert len(record["miou"][p]) == n_layers
        assert all(0 <= x <= 100 for x in record["miou"][p])
    assert record["miou"]["n_B"] == len(scenes)
    assert record["miou"]["n_A"] == sum(len(d.scene.object_classes) >= 2 for d in scenes)
    core = record["core_op"]
    assert core["ok"] is True and core["shape"]["N"] == demo.N_IMG + demo.N_TXT
    assert core["max_abs_diff"]["maps"] <= core["tolerance"]["maps"]


@pytest.mark.parametrize("layer", [1, EXPERT_LAYER])
def test_json_miou_matches_independent_recomputation(demo_run, layer):
    """One block's mIoU, both protocols, from a single-layer segmenter on the whole batch + MeanIoU."""
    _, _, _, record = demo_run
    scenes = [d.scene for d in load_demo_scenes()]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seg = Seg4DiffSegmenter(load_shapes_pipeline(), layer=layer, resolution=32, seed=0, batch_size=len(scenes))
        for proto in ("A", "B"):
            sc = [s for s in scenes if proto == "B" or len(s.object_classes) >= 2]
            names = [s.classes if proto == "B" else s.object_classes for s in sc]
            meter = MeanIoU(len(CLASSES))
            for s, cls, r in zip(sc, names, seg([s.image for s in sc], classes=names)):
                gt = s.global_label_map()
                if proto == "A":
                    gt = np.where(s.label_map == 0, 255, gt)
                meter.update(np.array([CLASSES.index(c) for c in cls])[r.label_map], gt)
            assert record["miou"][proto][layer] == pytest.approx(meter.compute()["mIoU"], abs=1e-9)
    finally:
        torch.set_num_threads(n)


def test_bundled_scenes_equal_the_generator(tmp_path):
    """The shipped files are exactly what make_demo_images writes (pixels, labels, JSON)."""
    make_demo_images(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(f for f in os.listdir(DEMO_DIR) if not f.startswith("."))
    for name in sorted(os.listdir(tmp_path)):
        if name.endswith(".json"):
            with open(tmp_path / name) as a, open(os.path.join(DEMO_DIR, name)) as b:
                assert json.load(a) == json.load(b), name
        else:
            with Image.open(tmp_path / name) as a, Image.open(os.path.join(DEMO_DIR, name)) as b:
                assert a.mode == b.mode and a.size == b.size, name
                assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_bundled_scenes_are_held_out_with_two_or_three_objects():
    scenes = load_demo_scenes()
    assert [d.seed for d in scenes] == sorted({d.seed for d in scenes}) and scenes[-1].seed < 10**6
    for d in scenes:
        assert 2 <= len(d.scene.object_classes) <= 3
        assert d.scene.caption.endswith("on background") and d.scene.classes[0] == "background"


def test_demo_fails_when_the_core_op_disagrees(tmp_path, monkeypatch):
    """Exit 1 when the backends disagree (a forced failure on one bundled scene, so the test stays quick)."""
    import seg4diff_fast.shapes.demo_data as demo_data

    real = demo.check_core_op
    monkeypatch.setattr(demo, "check_core_op", lambda seed=0: {**real(seed), "ok": False})
    monkeypatch.setattr(demo_data, "load_demo_scenes", lambda folder=DEMO_DIR: load_demo_scenes(folder)[:1])
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "demo.json").read_text())["ok"] is False


def test_demo_rejects_a_layer_out_of_range(tmp_path, capsys):
    """Refused before any work: no header, no core-op check, nothing written."""
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), "--layer", "99"]) == 2
    captured = capsys.readouterr()
    assert "out of range" in captured.err and captured.out == ""
    assert not out.exists()
