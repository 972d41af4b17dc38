"""``seg4diff-fast demo``: zero-shot vs MAGNET on held-out ShapesWorld scenes, the pictures, the tables, the
core-op check, the palette, the bundled scenes, the argument errors."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_fast import cli, demo
from seg4diff_fast.evaluation.metrics import MeanIoU
from seg4diff_fast.segment import Seg4DiffSegmenter
from seg4diff_fast.shapes import CLASSES, COLORS, EXPERT_LAYER, ShapesWorld, load_shapes_pipeline
from seg4diff_fast.shapes.demo_data import (
    CLASS_COLOURS,
    DEMO_DIR,
    NUM_DEMO_SCENES,
    PALETTE_MIN_DELTA_E,
    heldout_demo_scenes,
    load_demo_scenes,
    make_demo_images,
)
from seg4diff_fast.shapes.shipped import MAGNET_LORA_DIR
from seg4diff_fast.utils.palette import ciede2000, min_pairwise_delta_e, srgb_to_lab

N_SCENES = 5  # the first 4 carry heat maps, the 5th does not


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def console_script() -> list[str]:
    """The installed ``seg4diff-fast`` console script (the entry point a user runs), else ``python -m``."""
    exe = os.path.join(os.path.dirname(sys.executable), "seg4diff-fast")
    return [exe] if os.path.isfile(exe) else [sys.executable, "-m", "seg4diff_fast.cli"]


def run_console(runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """``seg4diff-fast demo ARGS`` for every ARGS, in subprocesses started at once (each pays the imports)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*console_script(), "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for args in runs]
    out = []
    for args, p in zip(runs, procs):
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    return out


def run_demo(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", *argv])
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> str:
    """A LoRA on every block of the shipped model with random (non-zero) B matrices: it must change the maps."""
    from seg4diff_fast.magnet.lora import add_magnet_lora, save_magnet_lora

    out = tmp_path_factory.mktemp("lora")
    pipe = load_shapes_pipeline()
    add_magnet_lora(pipe.transformer, rank=4)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_magnet_lora(str(out), pipe.transformer, config={"layer": EXPERT_LAYER, "rank": 4, "max_steps": 0})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, lora_dir):
    """One run of the real console script on N_SCENES scenes with the random LoRA: (exit status, console output,
    OUT, demo.json)."""
    out = tmp_path_factory.mktemp("demo")
    (p,) = run_console([["--out", str(out), "--scenes", str(N_SCENES), "--lora", lora_dir]])
    assert p.returncode == 0, p.stderr
    record = json.loads((out / "demo.json").read_text())
    return p.returncode, p.stdout, out, record


def test_demo_runs_and_writes_everything(demo_run, lora_dir):
    rc, text, out, record = demo_run
    assert rc == 0
    assert "core op" in text and "OK" in text and "per-block mIoU" in text
    assert f"{N_SCENES} held-out scenes" in text and "README.md" in text and "--scenes 200" in text
    assert f"open {out / 'index.html'}" in text
    scenes = heldout_demo_scenes(N_SCENES)
    assert record["sides"] == ["zero-shot", "magnet"] and record["lora"] == os.path.abspath(lora_dir)
    assert record["magnet"]["path"] == os.path.abspath(lora_dir) and record["magnet"]["source"] == "--lora"
    assert record["magnet"]["config"]["rank"] == 4
    assert [s["name"] for s in record["scenes"]] == [d.name for d in scenes]
    assert record["scenes_source"]["n"] == N_SCENES and record["scenes_source"]["seeds"] == [0, N_SCENES - 1]
    for i, (d, s) in enumerate(zip(scenes, record["scenes"])):
        path = out / s["picture"]
        assert s["picture"] == f"{d.name}.png" and s["heat_maps"] == (i < demo.HEAT_SCENES)
        assert path.stat().st_size < 200_000
        with Image.open(path) as im:
            h, w = d.scene.label_map.shape
            n_heat = len(d.scene.classes) if s["heat_maps"] else 0
            assert im.size == demo.picture_size(h, w, 2, n_heat, len(d.scene.classes))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["picture"] for s in record["scenes"]] + ["demo.json", "demo.md", "index.html"])  # no temporary files
    md = (out / "demo.md").read_text()
    assert "| block | A zero-shot | A MAGNET | B zero-shot | B MAGNET |" in md and f"| {EXPERT_LAYER} * |" in md
    n_layers = record["num_layers"]
    assert record["layers"] == list(range(n_layers)) and record["layer"] == EXPERT_LAYER
    for side in record["sides"]:
        m = record["miou"][side]
        assert m["n_B"] == N_SCENES and m["n_A"] == sum(len(d.scene.object_classes) >= 2 for d in scenes)
        for p in ("A", "B"):
            assert len(m[p]) == n_layers and all(0 <= x <= 100 for x in m[p])
    core = record["core_op"]
    assert core["ok"] is True and core["shape"]["N"] == demo.N_IMG + demo.N_TXT
    assert core["max_abs_diff"]["maps"] <= core["tolerance"]["maps"]


def _seg(lora: str | None, layer: int) -> Seg4DiffSegmenter:
    pipe = load_shapes_pipeline()
    if lora is not None:
        from seg4diff_fast.magnet.lora import load_magnet_lora

        load_magnet_lora(pipe, lora)
    return Seg4DiffSegmenter(pipe, layer=layer, resolution=32, seed=0, batch_size=N_SCENES)


def _scene_scores(pred: np.ndarray, gt: np.ndarray, k: int) -> tuple[float, float]:
    """Pixel accuracy and mIoU (over the classes in either map), written out by hand, float64."""
    ious = []
    for c in range(k):
        inter = np.logical_and(pred == c, gt == c).sum()
        union = np.logical_or(pred == c, gt == c).sum()
        if union:
            ious.append(inter / union)
    return float((pred == gt).mean() * 100.0), float(np.mean(ious) * 100.0)


@pytest.mark.parametrize("side,layer", [("zero-shot", EXPERT_LAYER), ("magnet", EXPERT_LAYER), ("zero-shot", 4)])
def test_json_numbers_equal_an_independent_recomputation(demo_run, lora_dir, side, layer):
    """Each side's per-block mIoU (both protocols) and per-scene scores, from a fresh pipeline (the LoRA loaded
    into it for MAGNET), a single-layer segmenter on the whole batch, MeanIoU and a hand-written scene score."""
    _, _, _, record = demo_run
    scenes = [d.scene for d in heldout_demo_scenes(N_SCENES)]
    with one_thread():
        seg = _seg(lora_dir if side == "magnet" else None, layer)
        for proto in ("A", "B"):
            sc = [s for s in scenes if proto == "B" or len(s.object_classes) >= 2]
            names = [s.classes if proto == "B" else s.object_classes for s in sc]
            meter = MeanIoU(len(CLASSES))
            for s, cls, r in zip(sc, names, seg([s.image for s in sc], classes=names)):
                gt = s.global_label_map()
                if proto == "A":
                    gt = np.where(s.label_map == 0, 255, gt)
                meter.update(np.array([CLASSES.index(c) for c in cls])[r.label_map], gt)
                if proto == "B" and layer == EXPERT_LAYER:
                    rec = next(x for x in record["scenes"] if x["caption"] == s.caption)
                    acc, miou = _scene_scores(r.label_map, s.label_map, len(cls))
                    assert rec["scores"][side]["pixel_accuracy"] == pytest.approx(acc, abs=1e-9)
                    assert rec["scores"][side]["miou"] == pytest.approx(miou, abs=1e-9)
                    assert rec["pixels_wrong"][side] == int((r.label_map != s.label_map).sum())
            assert record["miou"][side][proto][layer] == pytest.approx(meter.compute()["mIoU"], abs=1e-9)


def test_the_sides_differ_when_a_lora_is_loaded(demo_run):
    _, _, _, record = demo_run
    zs, mg = record["miou"]["zero-shot"], record["miou"]["magnet"]
    assert zs["B"] != mg["B"] and zs["A"] != mg["A"]
    assert any(s["scores"]["zero-shot"] != s["scores"]["magnet"] for s in record["scenes"])
    assert zs["A_baseline"] == mg["A_baseline"] and zs["B_baseline"] == mg["B_baseline"]  # same scenes, same draws


def test_pictures_show_the_recorded_predictions(demo_run, lora_dir):
    """Read scene 0's picture back: the error panel's magenta cells are the recorded wrong pixels, and undoing
    the blend in the prediction panel gives, cell by cell, the class the segmenter predicts (the palette
    colours stay recoverable after blending)."""
    _, _, out, record = demo_run
    # the demo's batch (all its scenes, protocol B), so that no near-tie can fall otherwise than in the demo
    batch = [x.scene for x in heldout_demo_scenes(N_SCENES)]
    s = batch[0]
    h, w = s.label_map.shape
    with Image.open(out / record["scenes"][0]["picture"]) as im:
        pic = np.asarray(im.convert("RGB"), dtype=np.float64)
    n_heat = len(s.classes)
    assert pic.shape[:2] == demo.picture_size(h, w, 2, n_heat, len(s.classes))[::-1]
    p = w * demo.SCALE
    colours = np.array([CLASS_COLOURS[c] for c in s.classes], dtype=np.float64)
    grey = np.asarray(s.image.convert("L"), dtype=np.float64)
    under = 255.0 - (1.0 - demo.FADE) * (255.0 - grey)
    centre = (np.arange(h) * demo.SCALE + demo.SCALE // 2)[:, None], (np.arange(w) * demo.SCALE + demo.SCALE // 2)
    with one_thread():
        for row, (side, lora) in enumerate((("zero-shot", None), ("magnet", lora_dir))):
            pred = _seg(lora, EXPERT_LAYER)([x.image for x in batch], classes=[x.classes for x in batch])[0].label_map
            y0 = demo.HEADER_H + demo.TITLE_H + row * (h * demo.SCALE + demo.CAPTION_H)
            x_pred, x_err = demo.LABEL_W + 2 * (p + demo.GAP), demo.LABEL_W + 3 * (p + demo.GAP)
            err = pic[y0:y0 + h * demo.SCALE, x_err:x_err + p][centre]
            magenta = np.all(err == np.array(demo.ERROR_RGB), axis=-1)
            assert magenta.sum() == record["scenes"][0]["pixels_wrong"][side]
            assert np.array_equal(magenta, pred != s.label_map)
            panel = pic[y0:y0 + h * demo.SCALE, x_pred:x_pred + p][centre]
            unblended = (panel - (1.0 - demo.ALPHA) * under[..., None]) / demo.ALPHA
            nearest = np.argmin(((unblended[:, :, None] - colours[None, None]) ** 2).sum(-1), axis=-1)
            assert np.array_equal(nearest, pred)


def test_html_references_only_files_that_exist(demo_run):
    _, _, out, record = demo_run
    page = (out / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and "http" not in page.lower().replace("http-equiv", "") and "url(" not in page
    for ref in refs:
        assert not os.path.isabs(ref) and "//" not in ref and ".." not in ref, ref
        assert (out / ref).is_file(), ref
    pictures = [s["picture"] for s in record["scenes"]]
    assert sorted(r for r in refs if r.endswith(".png")) == sorted(pictures)
    for s in record["scenes"]:  # every picture has its caption: name, caption, both sides' scores
        cap = re.search(rf'<figure id="{s["name"]}">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)
        assert s["caption"] in cap and "zero-shot: pixel accuracy" in cap and "MAGNET: pixel accuracy" in cap


def test_no_magnet_shows_zero_shot_only(tmp_path):
    rc, text = run_demo(["--out", str(tmp_path), "--scenes", "1", "--no-magnet"])
    assert rc == 0 and "no MAGNET side: --no-magnet" in text.splitlines()[0]
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["sides"] == ["zero-shot"] and record["magnet"] is None and record["lora"] is None
    assert "| block | A zero-shot | B zero-shot |" in (tmp_path / "demo.md").read_text()
    d = heldout_demo_scenes(1)[0]
    with Image.open(tmp_path / "scene_00.png") as im:
        assert im.size == demo.picture_size(32, 32, 1, len(d.scene.classes), len(d.scene.classes))


def test_the_default_magnet_side_is_the_shipped_lora(tmp_path):
    """Without --lora the MAGNET side is seg4diff_fast/shapes/magnet_lora (package data)."""
    assert os.path.isfile(os.path.join(MAGNET_LORA_DIR, "pytorch_lora_weights.safetensors")), MAGNET_LORA_DIR
    rc, text = run_demo(["--out", str(tmp_path), "--scenes", "1"])
    assert rc == 0
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["sides"] == ["zero-shot", "magnet"] and record["magnet"]["source"] == "shipped"
    assert record["lora"] == os.path.abspath(MAGNET_LORA_DIR)


# ----------------------------------------------------------------------------------------------
# the palette
#: sRGB → CIELAB (D65) of a few colours, published values (Lindbloom's calculator).
LAB_REFERENCE = [((255, 0, 0), (53.2408, 80.0925, 67.2032)), ((0, 255, 0), (87.7347, -86.1827, 83.1793)),
                 ((0, 0, 255), (32.2970, 79.1875, -107.8602)), ((255, 255, 255), (100.0, 0.0, 0.0)),
                 ((128, 128, 128), (53.5850, 0.0, 0.0)), ((0, 0, 0), (0.0, 0.0, 0.0))]
#: CIEDE2000 test pairs of Sharma, Wu & Dalal (2005), with their published differences.
CIEDE2000_REFERENCE = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
                       ((50, 0, 0), (50, -1, 2), 2.3669),
                       ((50, 2.49, -0.001), (50, -2.49, 0.0009), 7.1792),
                       ((50, 2.5, 0), (73, 25, -18), 27.1492),
                       ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
                       ((22.7233, 20.0904, -46.694), (23.0331, 14.973, -42.5619), 2.0373),
                       ((2.0776, 0.0795, -1.135), (0.9033, -0.0636, -0.5514), 0.9082)]


def test_colour_distance_against_published_values():
    for rgb, lab in LAB_REFERENCE:
        assert srgb_to_lab(rgb) == pytest.approx(lab, abs=2e-3)
    for a, b, de in CIEDE2000_REFERENCE:
        assert float(ciede2000(a, b)) == pytest.approx(de, abs=1e-4)
        assert float(ciede2000(b, a)) == pytest.approx(de, abs=1e-4)


def test_every_pair_of_classes_is_told_apart_at_a_glance():
    """Any two classes can share a scene (1–3 objects of any colours and shapes, plus background): every pair
    of the 13 colours is ≥ PALETTE_MIN_DELTA_E apart (CIEDE2000); background is neutral grey; each object class
    keeps its colour word's hue (nearest of the world's four) and circle / square / triangle go light → dark."""
    assert tuple(CLASS_COLOURS) == CLASSES
    lab = {c: srgb_to_lab(rgb) for c, rgb in CLASS_COLOURS.items()}
    assert PALETTE_MIN_DELTA_E >= 20.0
    for a, b in itertools.combinations(CLASSES, 2):
        assert float(ciede2000(lab[a], lab[b])) >= PALETTE_MIN_DELTA_E, (a, b)
    assert min_pairwise_delta_e(list(CLASS_COLOURS.values()))[0] >= PALETTE_MIN_DELTA_E
    assert np.hypot(*lab["background"][1:]) < 1.0  # a* = b* = 0: no hue
    hue = {c: np.degrees(np.arctan2(v[2], v[1])) % 360 for c, v in lab.items()}
    world_hue = {w: float(np.degrees(np.arctan2(*srgb_to_lab(rgb)[[2, 1]])) % 360) for w, rgb in COLORS.items()}
    for c in CLASSES[1:]:
        dist = {w: min(abs(hue[c] - h), 360 - abs(hue[c] - h)) for w, h in world_hue.items()}
        assert min(dist, key=dist.get) == c.split()[0], c
    for colour in COLORS:
        ls = [lab[f"{colour} {shape}"][0] for shape in ("circle", "square", "triangle")]
        assert ls == sorted(ls, reverse=True), colour


def test_class_colours_stay_apart_as_drawn():
    """Blended over the faded grey image (any grey level an image pixel can have), every pair of class colours is
    still ≥ 17.5 CIEDE2000 apart, the blend written out here in float64."""
    colours = np.array([CLASS_COLOURS[c] for c in CLASSES], dtype=np.float64)
    for g in range(0, 256, 5):
        under = 255.0 - (1.0 - demo.FADE) * (255.0 - g)
        drawn = np.rint(demo.ALPHA * colours + (1.0 - demo.ALPHA) * under)
        lab = srgb_to_lab(drawn)
        d = ciede2000(lab[:, None], lab[None, :])[np.triu_indices(len(CLASSES), 1)]
        assert d.min() >= 17.5, g


# ----------------------------------------------------------------------------------------------
# scenes
def test_the_demo_scenes_are_the_first_of_the_readme_held_out_set():
    from seg4diff_fast.shapes.train import TRAIN_SEED_OFFSET, heldout_scenes

    demo_scenes, ref = heldout_demo_scenes(12), heldout_scenes(12, 32)
    assert [d.seed for d in demo_scenes] == list(range(12)) and TRAIN_SEED_OFFSET >= 10**6
    for d, r in zip(demo_scenes, ref):
        assert d.scene.caption == r.caption and d.scene.classes == r.classes
        assert np.array_equal(d.scene.label_map, r.label_map)
        assert np.array_equal(np.asarray(d.scene.image), np.asarray(r.image))
    assert any(len(d.scene.object_classes) == 1 for d in demo_scenes)  # every scene, no selection


def test_bundled_scenes_equal_the_generator(tmp_path):
    """The 8 shipped files (the web app's scenes) are exactly what make_demo_images writes."""
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
    assert len(scenes) == NUM_DEMO_SCENES
    assert [d.seed for d in scenes] == sorted({d.seed for d in scenes}) and scenes[-1].seed < 10**6
    for d in scenes:
        assert 2 <= len(d.scene.object_classes) <= 3
        assert d.scene.caption.endswith("on background") and d.scene.classes[0] == "background"
        world = ShapesWorld(d.seed, 32).sample()
        assert np.array_equal(world.label_map, d.scene.label_map) and world.caption == d.scene.caption


# ----------------------------------------------------------------------------------------------
# failures
def test_demo_fails_when_the_core_op_disagrees(tmp_path, monkeypatch):
    """Exit 1 when the backends disagree (a forced failure on one scene, so the test stays quick)."""
    real = demo.check_core_op
    monkeypatch.setattr(demo, "check_core_op", lambda seed=0: {**real(seed), "ok": False})
    rc, text = run_demo(["--out", str(tmp_path), "--scenes", "1", "--no-magnet"])
    assert rc == 1 and "FAIL" in text
    assert json.loads((tmp_path / "demo.json").read_text())["ok"] is False


@pytest.mark.parametrize("argv,message", [
    (["--scenes", "0"], "--scenes 0: give a number of scenes from 1 to"),
    (["--scenes", "-3"], "--scenes -3: give a number of scenes from 1 to"),
    (["--scenes", str(demo.MAX_SCENES + 1)], "give a number of scenes from 1 to"),
    (["--lora", "/nonexistent/lora"], "--lora /nonexistent/lora: no such file or folder"),
    (["--lora", DEMO_DIR, "--no-magnet"], "--lora and --no-magnet contradict each other"),
    (["--lora", DEMO_DIR], "--lora " + DEMO_DIR + ":"),  # a folder without LoRA weights
    (["--layer", "99"], "out of range"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
    """Refused before any work: one line on stderr, no header, no core-op check, nothing written."""
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), *argv]) == 2
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip() and not x.startswith(("[transformers]", "Loading"))]
    assert len(lines) == 1 and lines[0].startswith("seg4diff-fast demo: error: ") and message in lines[0], lines
    assert captured.out == "" and not out.exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--out", str(blocker)]) == 2
    assert "a file is in the way" in capsys.readouterr().err and blocker.read_text() == "x"


def test_the_console_script_refuses_a_bad_argument_with_exit_2(tmp_path):
    """The real entry point, in subprocesses: argparse's type check and the demo's own check both exit 2."""
    cases = [(["--scenes", "many"], "invalid int value"), (["--scenes", "0"], "--scenes 0: give a number")]
    runs = run_console([["--out", str(tmp_path / f"o{i}"), *args] for i, (args, _) in enumerate(cases)])
    for i, (p, (_, message)) in enumerate(zip(runs, cases)):
        lines = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("[transformers]")]
        assert p.returncode == 2 and message in lines[-1] and p.stdout == "", p.stderr
        assert not (tmp_path / f"o{i}").exists()
