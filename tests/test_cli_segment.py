"""``seg4diff-fast segment``: three files per image, written atomically; one error line and nothing
written for bad inputs; the default model's clear error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast import Seg4DiffSegmenter, cli
from seg4diff_fast.models import ModelNotAvailableError, default_model_path, load_pipeline
from seg4diff_fast.testing import tiny_sd3_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    path = str(tmp_path_factory.mktemp("tiny_sd3"))
    tiny_sd3_pipeline(num_layers=3, t5=False).save_pretrained(path)
    return path


def _images(tmp_path, rng, n=2):
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (int(rng.integers(16, 40)), int(rng.integers(16, 40)), 3), dtype=np.uint8)
        p = str(tmp_path / f"photo{i}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_segment_writes_three_files(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    paths = _images(tmp_path, rng)
    gray = str(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(gray)
    paths.append(gray)
    out = str(tmp_path / "out")
    argv = ["segment", *paths, "--classes", "cat, sofa,grass", "--model", model_dir, "--out", out,
            "--layer", "1", "--resolution", "32"]
    assert cli.main(argv) == 0
    seg = Seg4DiffSegmenter(load_pipeline(model_dir), layer=1, resolution=32)
    assert sorted(os.listdir(out)) == sorted(
        f"{s}{suffix}" for s in ("photo0", "photo1", "gray") for suffix in ("_labels.png", "_overlay.png", ".json"))
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        image = Image.open(path)
        labels = Image.open(os.path.join(out, f"{stem}_labels.png"))
        assert labels.mode == "P" and labels.size == image.size
        expected = seg(image, ["cat", "sofa", "grass"]).label_map
        np.testing.assert_array_equal(np.asarray(labels), expected)
        overlay = Image.open(os.path.join(out, f"{stem}_overlay.png"))
        k = -(-256 // min(image.size))  # small images are upscaled to a 256 px short side; the legend goes below
        assert overlay.mode == "RGB" and overlay.width == image.width * k and overlay.height > image.height * k
        info = json.load(open(os.path.join(out, f"{stem}.json")))
        assert info["classes"] == ["cat", "sofa", "grass"] and info["layer"] == 1 and info["model"] == model_dir
        ids, counts = np.unique(expected, return_counts=True)
        assert {v["id"]: v["pixels"] for v in info["present"].values()} == dict(zip(ids.tolist(), counts.tolist()))
    assert "photo0:" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["unreadable", "empty-classes", "blank-class", "no-tokens", "layer", "no-model"])
def test_segment_bad_inputs_write_nothing(model_dir, tmp_path, capsys, problem, request):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    paths = _images(tmp_path, rng)
    out = str(tmp_path / "out")
    classes, model, layer = "cat,dog", ["--model", model_dir], "1"
    if problem == "unreadable":
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"not an image")
        paths.append(str(bad))
    elif problem == "empty-classes":
        classes = " , "
    elif problem == "blank-class":
        classes = "cat,,dog"
    elif problem == "no-tokens":
        classes = "cat,™"
    elif problem == "layer":
        layer = "3"
    else:
        request.getfixturevalue("no_embedded_model")
        model = []
    rc = cli.main(["segment", *paths, "--classes", classes, *model, "--out", out, "--layer", layer,
                   "--resolution", "32"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seg4diff-fast segment: error:"), err
    assert not os.path.exists(out) or os.listdir(out) == []


def test_default_model_is_embedded_and_its_absence_is_a_clear_error(monkeypatch, tmp_path):
    path = default_model_path()
    assert os.path.isfile(os.path.join(path, "model_index.json"))
    import seg4diff_fast.shapes.shipped as shipped

    monkeypatch.setattr(shipped, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="pass --model PATH"):
        default_model_path()
    with pytest.raises(ModelNotAvailableError):
        load_pipeline(None)


def test_failed_write_leaves_no_partial_file(model_dir, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    paths = _images(tmp_path, rng, n=1)
    out = str(tmp_path / "out")
    original = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        if self.mode == "RGB":  # the overlay (the label PNG is a palette image); the writer gives a file object
            assert hasattr(fp, "write")
            fp.write(b"\x89PNG half")  # a partial file, then the failure
            raise OSError("disk full")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    assert cli.main(["segment", *paths, "--classes", "cat,dog", "--model", model_dir, "--out", out, "--layer", "1",
                     "--resolution", "32"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert os.listdir(out) == ["photo0_labels.png"]  # complete files only; no overlay, no temporary


def test_missing_arguments_one_line(capsys):
    for argv in (["segment"], ["segment", "x.png"], ["segment", "x.png", "--classes", "cat"], ["eval"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0]
