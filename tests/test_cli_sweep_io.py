"""``segment``, ``label``, ``demo`` and ``layers`` as users run them (issue #14): every bad argument is one line,
exit 2 and nothing written (the real entry point, in subprocesses run side by side); class names checked
against the model's tokenizer; every output records its model; overlays with a legend; ``label``'s exit
status; ``--lora``, ``--threads`` and progress on every command."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _cli_run import cli_subprocesses, error_lines
from PIL import Image

from seg4diff_fast import cli
from seg4diff_fast.shapes import ShapesWorld
from seg4diff_fast.shapes.shipped import default_model_path
from seg4diff_fast.shapes.world import WORDS
from seg4diff_fast.testing import tiny_sd3_pipeline
from seg4diff_fast.utils.version import __version__


def _scene_image(path, seed: int = 0, size: int = 32) -> str:
    ShapesWorld(seed, size).sample().image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    path = str(tmp_path_factory.mktemp("tiny_sd3"))
    tiny_sd3_pipeline(num_layers=3, t5=False).save_pretrained(path)
    return path


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path):
    """The real entry point: a CUDA request on a torch without CUDA, a model that does not exist, a layer the
    model lacks, a class named twice — exit 2, one line naming the problem, no traceback, no header, nothing
    written (not even the output folder)."""
    image = _scene_image(tmp_path / "scene.png")
    work = tmp_path / "work"
    work.mkdir()
    runs = [
        (["segment", image, "--classes", "red circle,background", "--out", "s", "--device", "cuda"],
         "--device cuda"),
        (["label", "--images", image, "--classes", "red circle,background", "--out", "l", "--device", "cuda"],
         "--device cuda"),
        (["demo", "--model", "/nonexistent", "--out", "d"], "--model /nonexistent"),
        (["demo", "--layer", "99", "--out", "d2"], "out of range"),
        (["label", "--images", image, "--classes", "red circle, background,red circle", "--out", "l2"],
         '"red circle" is given twice (classes 1 and 3)'),
    ]
    results = cli_subprocesses([(args, str(work)) for args, _ in runs], {"CUDA_VISIBLE_DEVICES": ""})
    for (args, what), (rc, stdout, stderr) in zip(runs, results):
        lines = error_lines(stderr)
        assert rc == 2, (args, stderr)
        assert "Traceback" not in stderr and len(lines) == 1, (args, stderr)
        assert lines[0].startswith(f"seg4diff-fast {args[0]}: error: ") and what in lines[0], (args, lines)
        assert stdout == "", (args, stdout)  # the demo says nothing (no header, no core-op check) before refusing
    assert "use --device cpu" in error_lines(results[0][2])[0]
    assert os.listdir(work) == []


def test_unknown_words_warn_and_strict_refuses(tmp_path, capsys, one_thread):
    """The embedded model reads "cat" as c·a·t: a warning that lists the words it knows (ShapesWorld's), and
    --strict refuses; its own words pass silently; a repeated name is an error."""
    image = _scene_image(tmp_path / "astronaut.png")
    assert cli.main(["segment", image, "--classes", "person,cat,cup", "--out", str(tmp_path / "o1")]) == 0
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("seg4diff-fast segment: warning:"), err
    assert '"cat" (read as c a t)' in err[0] and '"cup" (read as c u p)' in err[0]
    assert f"the words it knows: {', '.join(sorted(WORDS))}" in err[0]

    out = tmp_path / "o2"
    assert cli.main(["segment", image, "--classes", "person,cat,cup", "--out", str(out), "--strict"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("seg4diff-fast segment: error: --strict:") and '"cat"' in err[0]
    assert not out.exists()

    assert cli.main(["segment", image, "--classes", "red circle,background", "--out", str(tmp_path / "o3"),
                     "--strict"]) == 0
    assert error_lines(capsys.readouterr().err) == []

    assert cli.main(["segment", image, "--classes", "red,blue,red", "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and '"red" is given twice (classes 1 and 3)' in err[0] and not out.exists()


def test_segment_records_the_model_and_draws_a_legend(tmp_path, capsys, one_thread):
    image = _scene_image(tmp_path / "s.png", seed=3)
    out = tmp_path / "out"
    try:
        assert cli.main(["segment", image, "--classes", "background,red circle,blue square,green triangle",
                         "--out", str(out), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    info = json.loads((out / "s.json").read_text())
    assert info["model"] == os.path.abspath(default_model_path())  # never null: the embedded model's path
    assert info["layer"] == 1 and info["protocol"] == "paper" and info["package_version"] == __version__
    assert info["lora"] is None and info["overlay_scale"] == 8
    prov = info["provenance"]
    assert prov["model"] == info["model"] and prov["family"] == "sd3" and prov["diffusers_version"]
    assert len(prov["model_index_sha256"]) == 12

    labels = np.array(Image.open(out / "s_labels.png"))
    overlay = np.array(Image.open(out / "s_overlay.png").convert("RGB"))
    assert overlay.shape[1] == 256 and overlay.shape[0] > 256  # 32 px upscaled ×8, the legend below
    blocks = overlay[:256].reshape(32, 8, 32, 8, 3).astype(int)  # nearest: each pixel became one 8×8 block
    assert (blocks == blocks[:, :1, :, :1]).all()
    legend = overlay[256:].reshape(-1, 3)
    for c in np.unique(labels):  # a swatch of every class present
        assert (legend == info["colours"][info["classes"][c]]).all(1).any()
    assert f"{info['classes'][int(labels[0, 0])]}" in capsys.readouterr().out


def test_segment_names_both_files_of_a_stem_collision(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _scene_image(tmp_path / "a" / "x.png"), _scene_image(tmp_path / "b" / "x.jpg")
    out = tmp_path / "out"
    assert cli.main(["segment", first, second, "--classes", "red,blue", "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and first in err[0] and second in err[0] and "'x'" in err[0]
    assert not out.exists()


def test_label_exit_status_records_and_formats(model_dir, tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(2):
        _scene_image(root / f"s{i}.png", seed=i)
    (root / "broken.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "out"
    argv = ["label", "--images", str(root), "--classes", "cat,sky", "--out", str(out), "--model", model_dir,
            "--layer", "1", "--resolution", "32", "--no-progress", "--workers", "0", "--threads", "1"]
    assert cli.main(argv) == 1  # done, but one input failed
    captured = capsys.readouterr()
    assert "2 labeled" in captured.out and "1 errors" in captured.out
    err = error_lines(captured.err)
    assert len(err) == 1 and err[0].startswith("seg4diff-fast label: error: 1 of 3 inputs could not be read")
    assert os.path.join(str(out), "errors.jsonl") in err[0] and "--allow-failures" in err[0]
    info = json.loads((out / "labels.json").read_text())
    assert info["model"] == model_dir and info["lora"] is None and info["layer"] == 1
    assert info["protocol"] == "paper" and info["package_version"] == __version__
    assert info["provenance"]["model"] == model_dir and info["formats"] == ["png"]
    assert cli.main([*argv, "--resume", "--allow-failures"]) == 0
    capsys.readouterr()

    bad = tmp_path / "bad"
    for extra, what in ((["--format", "png,tiff"], "--format 'tiff': use png, coco or yolo-seg"),
                        (["--format", "yolo-seg", "--yolo-tolerance", "-1"], "--yolo-tolerance must be >= 0"),
                        (["--threads", "0"], "--threads must be >= 1")):
        assert cli.main([*argv[:6], str(bad), *argv[7:], *extra]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and what in err[0], err
        assert not bad.exists()


def test_lora_progress_and_records_on_every_command(tmp_path, capsys, monkeypatch, one_thread):
    """A MAGNET LoRA (nonzero, so it changes the maps) on the embedded model: segment, label, layers and demo
    load it and record it; layers shows its progress."""
    from seg4diff_fast.magnet.lora import add_magnet_lora, save_magnet_lora
    from seg4diff_fast.shapes import load_shapes_pipeline

    pipe = load_shapes_pipeline(device="cpu")
    params = add_magnet_lora(pipe.transformer, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    lora = save_magnet_lora(str(tmp_path / "lora"), pipe.transformer)
    image = _scene_image(tmp_path / "s.png", seed=5)
    classes = "background,red circle,blue square,yellow triangle"

    outs = {}
    for name, extra in (("plain", []), ("lora", ["--lora", lora])):
        outs[name] = tmp_path / f"seg_{name}"
        assert cli.main(["segment", image, "--classes", classes, "--out", str(outs[name]), *extra]) == 0
    plain, tuned = (json.loads((outs[k] / "s.json").read_text()) for k in ("plain", "lora"))
    assert tuned["lora"] == tuned["provenance"]["lora"] == os.path.abspath(lora) and plain["lora"] is None
    assert tuned["mean_confidence"] != plain["mean_confidence"]  # the LoRA is in the model that ran

    out = tmp_path / "label"
    assert cli.main(["label", "--images", image, "--classes", classes, "--out", str(out), "--lora", lora,
                     "--no-progress"]) == 0
    info = json.loads((out / "labels.json").read_text())
    assert info["lora"] == os.path.abspath(lora) and info["model"] == os.path.abspath(default_model_path())

    capsys.readouterr()
    out = tmp_path / "layers"
    assert cli.main(["layers", "--scenes", "3", "--mass-scenes", "2", "--no-plot", "--out", str(out),
                     "--lora", lora, "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "attention mass" in err and "2/2" in err and "grounding sweep" in err and "3/3" in err
    data = json.loads((out / "layers.json").read_text())
    assert data["lora"] == os.path.abspath(lora) and data["model"] == os.path.abspath(default_model_path())
    assert data["layer"] == 1 and data["package_version"] == __version__ and data["protocol"] == "paper"

    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--lora", lora, "--scenes", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"with the embedded ShapesWorld pipeline with the LoRA {os.path.abspath(lora)} (cpu, float32)" in header
    record = json.loads((out / "demo.json").read_text())
    assert record["model"] == os.path.abspath(default_model_path()) and record["lora"] == os.path.abspath(lora)
    assert record["protocol"] == "paper" and record["package_version"] == __version__
