"""``seg4diff-fast label`` / ``label_images`` end to end on a tiny SD3 pipeline saved with save_pretrained.

References are independent of the labeling code: the segmenter called on each image alone, byte
comparisons between runs (worker counts, input order, a SIGKILLed-then-resumed run, two processes on
gloo), pycocotools' decoding of the COCO RLEs against the label PNGs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from seg4diff_fast import Seg4DiffSegmenter, cli, label_images
from seg4diff_fast.label import build_coco, png_complete, rle_encode, rle_string
from seg4diff_fast.models import load_pipeline
from seg4diff_fast.testing import WORDS, tiny_sd3_pipeline

LAYER, RES = "1", "32"
CLASSES = "cat,red car,sky,grass,tree"
BAD = ("a/broken.jpg", "empty.png", "a/b/truncated.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("tiny_sd3"))
    tiny_sd3_pipeline(num_layers=3, t5=False, seed=int(np.random.SeedSequence().entropy % 1000)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def segmenter(model_dir):
    return Seg4DiffSegmenter(load_pipeline(model_dir), layer=int(LAYER), resolution=int(RES), seed=0)


def _shape_image(rng, mode="RGB") -> Image.Image:
    h, w = int(rng.integers(16, 48)), int(rng.integers(16, 48))
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        box = [x0, y0, int(rng.integers(x0 + 2, w)), int(rng.integers(y0 + 2, h))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    return im.convert(mode)


def _make_images(root, rng, n_good: int) -> list[str]:
    """n_good readable images in nested folders (one grayscale, one RGBA) + the three BAD files."""
    rels = []
    for i in range(n_good):
        sub = ("", "a", "a/b")[i % 3]
        mode, ext = ("L", "png") if i == 1 else ("RGBA", "png") if i == 2 else ("RGB", ("jpg", "png")[i % 2])
        rel = f"{sub}/img{i:03d}.{ext}".lstrip("/")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        _shape_image(rng, mode).save(os.path.join(root, rel))
        rels.append(rel)
    with open(os.path.join(root, BAD[0]), "wb") as f:
        f.write(b"this is not a JPEG")
    open(os.path.join(root, BAD[1]), "wb").close()
    buf = os.path.join(root, "full.tmp")
    _shape_image(rng).save(buf, format="PNG")
    data = open(buf, "rb").read()
    os.remove(buf)
    with open(os.path.join(root, BAD[2]), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(root, "a", "notes.txt"), "w") as f:
        f.write("not an image")
    return sorted(rels)


def _files(root) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            p = os.path.join(folder, name)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _argv(images, out, model_dir, *extra):
    return ["label", "--images", images, "--classes", CLASSES, "--out", out, "--model", model_dir, "--layer", LAYER,
            "--resolution", RES, "--no-progress", *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("images"))
    rels = _make_images(root, np.random.default_rng(np.random.SeedSequence().entropy), 10)
    return root, rels


@pytest.fixture(scope="module")
def reference(dataset, model_dir, tmp_path_factory):
    """One uninterrupted CLI run: batch 3, 2 workers, confidence, COCO; exit 1, the three bad inputs failed."""
    root, _ = dataset
    out = str(tmp_path_factory.mktemp("ref") / "out")
    assert cli.main(_argv(root, out, model_dir, "--batch-size", "3", "--workers", "2", "--confidence", "--coco")) == 1
    return out


def _assert_labels_match(res, labels: np.ndarray) -> None:
    """Equal to the segmenter's own labels wherever its top two classes are not a float-rounding tie."""
    assert labels.shape == res.label_map.shape
    up = F.interpolate(res.scores.double()[None], labels.shape, mode="bilinear", align_corners=False)[0]
    top2 = up.topk(2, dim=0).values
    clear = (top2[0] - top2[1]).numpy() > 1e-5 * float(up.abs().max())
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(labels[clear], res.label_map[clear])


def test_folder_matches_segmenter_alone(dataset, reference, segmenter, model_dir, capsys):
    import pycocotools.mask as mask_util

    root, rels = dataset
    classes = CLASSES.split(",")
    files = _files(reference)
    expected = {"labels.json", "errors.jsonl", "coco.json"}
    for rel in rels:
        stem = os.path.splitext(rel)[0]
        expected |= {f"{stem}.png", f"{stem}.conf.png"}
    assert set(files) == expected  # nothing for the bad inputs, no temporaries, notes.txt ignored

    for rel in rels:
        stem = os.path.splitext(rel)[0]
        image = Image.open(os.path.join(root, rel))
        res = segmenter(image, classes)
        png = Image.open(os.path.join(reference, stem + ".png"))
        assert png.mode == "P" and png.size == image.size
        _assert_labels_match(res, np.array(png))
        conf = np.array(Image.open(os.path.join(reference, stem + ".conf.png")))
        assert conf.dtype == np.uint8 and conf.shape == res.confidence.shape
        assert np.abs(conf.astype(int) - np.round(res.confidence * 255).astype(int)).max() <= 1

    errors = [json.loads(line) for line in open(os.path.join(reference, "errors.jsonl"))]
    assert [e["image"] for e in errors] == sorted(BAD)
    assert all(e["reason"] and e["path"] == os.path.join(root, e["image"]) for e in errors)

    info = json.load(open(os.path.join(reference, "labels.json")))
    assert info["classes"] == classes and info["model"] == model_dir and info["layer"] == 1
    assert info["seed"] == 0 and info["dtype"] == "float32" and abs(info["timestep"] - segmenter.timestep) < 1e-6
    assert {"seg4diff_fast", "torch", "diffusers"} <= set(info["versions"])

    coco = json.load(open(os.path.join(reference, "coco.json")))
    assert [c["name"] for c in coco["categories"]] == classes
    assert sorted(im["file_name"] for im in coco["images"]) == rels
    by_image = {im["id"]: im for im in coco["images"]}
    seen = {}
    for ann in coco["annotations"]:
        im = by_image[ann["image_id"]]
        labels = np.array(Image.open(os.path.join(reference, os.path.splitext(im["file_name"])[0] + ".png")))
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        decoded = mask_util.decode(rle).astype(bool)
        np.testing.assert_array_equal(decoded, labels == ann["category_id"] - 1)
        assert ann["area"] == int(decoded.sum()) and ann["bbox"] == mask_util.toBbox(rle).astype(int).tolist()
        seen.setdefault(im["file_name"], set()).add(ann["category_id"] - 1)
    for im in coco["images"]:
        labels = np.array(Image.open(os.path.join(reference, os.path.splitext(im["file_name"])[0] + ".png")))
        assert seen[im["file_name"]] == set(np.unique(labels).tolist())


def test_workers_order_and_list_input_give_the_same_bytes(dataset, reference, segmenter, model_dir, tmp_path):
    root, rels = dataset
    paths = [os.path.join(root, r) for r in [*rels, *BAD]]
    random.Random(0).shuffle(paths)
    out = str(tmp_path / "out")
    summary = label_images(paths, CLASSES.split(","), out, segmenter=segmenter, model=model_dir, batch_size=3,
                           workers=0, confidence=True, coco=True, progress=False)
    assert (summary.images, summary.labeled, summary.errors, summary.skipped) == (len(paths), len(rels), 3, 0)
    assert _files(out) == _files(reference)
    # a list file, another batch size: the same labels up to float-rounding ties
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(os.path.relpath(p, tmp_path) for p in paths) + "\n")
    out2 = str(tmp_path / "out2")
    label_images(str(listing), CLASSES.split(","), out2, segmenter=segmenter, batch_size=5, workers=1,
                 progress=False)
    for rel in rels:
        res = segmenter(Image.open(os.path.join(root, rel)), CLASSES.split(","))
        _assert_labels_match(res, np.array(Image.open(os.path.join(out2, os.path.splitext(rel)[0] + ".png"))))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), **extra)
    return env


def _count_labels(out) -> int:
    return sum(1 for _, _, files in os.walk(out) for f in files if f.endswith(".png") and not f.endswith(".conf.png"))


def test_sigkill_then_resume_is_byte_identical(model_dir, tmp_path, capsys):
    root = str(tmp_path / "images")
    rels = _make_images(root, np.random.default_rng(np.random.SeedSequence().entropy), 40)
    args = ("--batch-size", "2", "--workers", "1", "--confidence", "--coco", "--allow-failures")
    ref = str(tmp_path / "ref")
    assert cli.main(_argv(root, ref, model_dir, *args)) == 0
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "seg4diff_fast.label", *_argv(root, out, model_dir, *args)[1:]],
                            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _count_labels(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    done = _count_labels(out)
    assert 3 <= done < len(rels), "the run was not killed part way"
    # a cut file at a final name (not one of ours: ours are renamed whole) and a leftover temporary
    missing = next(r for r in rels if not os.path.exists(os.path.join(out, os.path.splitext(r)[0] + ".png")))
    cut = os.path.join(out, os.path.splitext(missing)[0] + ".png")
    os.makedirs(os.path.dirname(cut), exist_ok=True)
    data = open(os.path.join(ref, os.path.splitext(missing)[0] + ".png"), "rb").read()
    open(cut, "wb").write(data[:-20])
    assert not png_complete(cut)
    open(os.path.join(os.path.dirname(cut), ".x.png.1.0.s4d-tmp"), "wb").write(data[:10])

    capsys.readouterr()
    assert cli.main(_argv(root, out, model_dir, *args, "--resume")) == 0
    line = capsys.readouterr().out
    already = int(line.split(" already done")[0].rsplit(", ", 1)[1])
    assert already >= done - 2  # complete images were skipped (a few may sit in recomputed batches)
    assert _files(out) == _files(ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_gloo_match_one(dataset, reference, model_dir, tmp_path):
    root, _ = dataset
    out = str(tmp_path / "out")
    port = str(_free_port())
    argv = [sys.executable, "-m", "seg4diff_fast.label",
            *_argv(root, out, model_dir, "--batch-size", "3", "--workers", "1", "--confidence", "--coco",
                   "--allow-failures")[1:]]
    procs = [subprocess.Popen(argv, env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                             MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_so, se) in zip(procs, outs):
        assert p.returncode == 0, se.decode()[-3000:]
    assert "labeled" in outs[0][0].decode() and outs[1][0].decode() == ""  # one summary line, from rank 0
    assert _files(out) == _files(reference)


def test_vocabulary_longer_than_one_prompt(segmenter, tmp_path):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    words = [w for w in WORDS if len(w) > 2]
    names = [f"{a} {b}" for a in words for b in words if a != b][:300]  # ~600 tokens: 8+ prompts, uint16 PNGs
    rng.shuffle(names)
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    os.makedirs(tmp_path / "in")
    for i in range(3):
        _shape_image(rng).save(tmp_path / "in" / f"x{i}.png")
    out = str(tmp_path / "out")
    label_images(str(tmp_path / "in"), str(tmp_path / "classes.txt"), out, segmenter=segmenter, batch_size=2,
                 workers=0, progress=False)
    info = json.load(open(os.path.join(out, "labels.json")))
    assert info["classes"] == list(names) and len(info["prompts"]) > 1 and info["label_format"] == "uint16"
    for i in range(3):
        res = segmenter(Image.open(tmp_path / "in" / f"x{i}.png"), list(names))
        assert len(res.prompts) == len(info["prompts"])
        labels = np.array(Image.open(os.path.join(out, f"x{i}.png")))
        assert labels.dtype == np.uint16
        _assert_labels_match(res, labels.astype(np.int64))
    # the first 120 names, still chunked, fit a palette PNG
    out2 = str(tmp_path / "out2")
    label_images(str(tmp_path / "in"), names[:120], out2, segmenter=segmenter, workers=0, progress=False)
    res = segmenter(Image.open(tmp_path / "in" / "x0.png"), names[:120])
    png = Image.open(os.path.join(out2, "x0.png"))
    assert len(res.prompts) > 1 and png.mode == "P"
    _assert_labels_match(res, np.array(png).astype(np.int64))


def test_resume_refuses_another_labeling(dataset, reference, model_dir, tmp_path, capsys):
    root, _ = dataset
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    argv = _argv(root, out, model_dir, "--resume", "--seed", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("seg4diff-fast label: warning:")]
    assert [line for line in warnings if '"tree" (read as t re e)' not in line] == []  # the tiny vocabulary splits it
    err = [line for line in err if line not in warnings]
    assert len(err) == 1 and "seed" in err[0] and err[0].startswith("seg4diff-fast label: error:")
    assert _files(out) == _files(reference)


@pytest.mark.parametrize("problem", ["no-images", "missing-images", "empty-classes", "empty-class-file",
                                     "unwritable-out", "no-model", "collision"])
def test_bad_arguments_one_error_line(dataset, model_dir, tmp_path, capsys, problem, request):
    root, _ = dataset
    images, classes, out, model = root, CLASSES, str(tmp_path / "out"), ["--model", model_dir]
    if problem == "no-images":
        images = str(tmp_path / "empty")
        os.makedirs(images)
        open(os.path.join(images, "readme.txt"), "w").close()
    elif problem == "missing-images":
        images = str(tmp_path / "nowhere")
    elif problem == "empty-classes":
        classes = " , "
    elif problem == "empty-class-file":
        classes = str(tmp_path / "classes.txt")
        open(classes, "w").write("\n  \n")
    elif problem == "unwritable-out":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = str(blocker / "out")  # a folder under a file can never be made (even by root)
    elif problem == "no-model":
        request.getfixturevalue("no_embedded_model")
        model = []
    elif problem == "collision":
        images = str(tmp_path / "dup")
        os.makedirs(images)
        for ext in ("jpg", "png"):
            Image.new("RGB", (8, 8)).save(os.path.join(images, f"same.{ext}"))
    argv = ["label", "--images", images, "--classes", classes, "--out", out, *model, "--no-progress"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seg4diff-fast label: error:"), captured.err
    assert captured.out == ""
    if problem != "unwritable-out":
        assert not os.path.exists(out) or os.listdir(out) == []


def test_rle_matches_pycocotools():
    import pycocotools.mask as mask_util

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        m = rng.random((h, w)) < rng.random()
        m[: int(rng.integers(0, h + 1))] = rng.random() < 0.5
        ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_string(rle_encode(m)) == ref["counts"].decode()


def test_coco_of_label_pngs_skips_missing(tmp_path):
    from seg4diff_fast.label import ImageItem
    from seg4diff_fast.label.outputs import atomic_write, encode_labels

    lab = np.random.default_rng(0).integers(0, 3, (5, 7))
    atomic_write(str(tmp_path / "a" / "x.png"), encode_labels(lab, 3))
    items = [ImageItem("a/x.jpg", "a/x.jpg"), ImageItem("gone.jpg", "gone.jpg")]
    coco = json.load(open(build_coco(str(tmp_path), items, ["p", "q", "r"])))
    assert [im["file_name"] for im in coco["images"]] == ["a/x.jpg"]
    assert sum(a["area"] for a in coco["annotations"]) == lab.size
