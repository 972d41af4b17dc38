"""``magnet`` and ``eval`` as users run them (issue #14): every bad argument is one line and a non-zero exit with
nothing written, outputs keep the permissions a plain write gives and record their model, ``magnet`` ends with
the trained layer's held-out mIoU before and after."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from _cli_run import cli_subprocesses, error_lines
from PIL import Image

from seg4diff_fast import cli
from seg4diff_fast.utils.files import atomic_torch_save, atomic_write, write_json
from seg4diff_fast.utils.provenance import model_record
from seg4diff_fast.utils.version import __version__


def _folder_dataset(root) -> list[str]:
    """A two-image ``--dataset folder`` (images, labels, classes.json)."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "img")
    os.makedirs(root / "lab")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lab = np.zeros((24, 24), np.uint8)
        lab[:, 12:] = 1
        Image.fromarray(lab).save(root / "lab" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps(["cat", "dog"]))
    return ["--dataset", "folder", "--images", str(root / "img"), "--labels", str(root / "lab"),
            "--classes", str(root / "classes.json")]


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path):
    """The real entry point: a CUDA request without CUDA, a model that does not exist, a layer the model lacks —
    exit 2, one line naming the problem, no traceback, no output folder or file."""
    data = _folder_dataset(tmp_path / "ds")
    work = tmp_path / "work"
    work.mkdir()
    runs = [
        (["magnet", "--data", "shapes:4", "--out", "m_cuda", "--device", "cuda"], "--device cuda"),
        (["eval", *data, "--out", "e_cuda/r.json", "--device", "cuda"], "--device cuda"),
        (["magnet", "--data", "shapes:4", "--out", "m_model", "--model", "/nonexistent"], "--model /nonexistent"),
        (["magnet", "--data", "shapes:4", "--out", "m_layer", "--layer", "9"], "layer 9"),
    ]
    # CUDA_VISIBLE_DEVICES="" makes a CUDA build behave as a machine without a GPU, so the test runs anywhere
    results = cli_subprocesses([(args, str(work)) for args, _ in runs], {"CUDA_VISIBLE_DEVICES": ""})
    for (args, what), (rc, stdout, stderr) in zip(runs, results):
        lines = error_lines(stderr)
        assert rc == 2, (args, stderr)
        assert "Traceback" not in stderr and len(lines) == 1, (args, stderr)
        assert lines[0].startswith(f"seg4diff-fast {args[0]}: error: ") and what in lines[0], (args, lines)
        assert stdout == ""
    assert "use --device cpu" in error_lines(results[0][2])[0]
    assert "valid layers are 0..5" in error_lines(results[3][2])[0]
    assert os.listdir(work) == []  # no output folder, no results file


def test_eval_missing_model_is_one_line(tmp_path, capsys):
    """eval's --model goes through the same load_model as magnet's (tested through the entry point above)."""
    data = _folder_dataset(tmp_path / "ds")
    out = tmp_path / "e" / "r.json"
    assert cli.main(["eval", *data, "--out", str(out), "--model", str(tmp_path / "nonexistent")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"seg4diff-fast eval: error: --model {tmp_path / 'nonexistent'}")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("missing", ["accelerate", "peft"])
def test_magnet_without_the_train_extras_names_the_extra(missing, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ModuleNotFoundError
    out = tmp_path / "run"
    assert cli.main(["magnet", "--data", "shapes:4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"({missing} is missing)" in err[0] and "pip install 'seg4diff-fast[train]'" in err[0]
    assert not out.exists()


def test_magnet_argument_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    for args, what in ((["--threads", "0"], "--threads"), (["--workers", "-1"], "--workers"),
                       (["--max-steps", "0"], "max_steps"), (["--heldout-scenes", "0"], "--heldout-scenes"),
                       (["--data", "coco:/nonexistent"], "does not exist")):
        assert cli.main(["magnet", "--data", "shapes:4", "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], (args, err)
        assert not out.exists()
    (tmp_path / "file").write_text("x")
    assert cli.main(["magnet", "--data", "shapes:4", "--out", str(tmp_path / "file")]) == 2
    assert "a file is in the way" in capsys.readouterr().err


def test_warmup_warning():
    from seg4diff_fast.cli_magnet import warmup_warning

    assert warmup_warning(3000, 500) is None and warmup_warning(10, 0) is None
    w = warmup_warning(100, 500)
    assert "\n" not in w and "20 %" in w and "--warmup-steps 10" in w


def _modes(folder) -> dict[str, int]:
    return {f: os.stat(os.path.join(folder, f)).st_mode & 0o777 for f in os.listdir(folder)}


@pytest.fixture
def umask():
    """Set the umask for a test; restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_keep_plain_write_permissions(mask, umask, tmp_path):
    umask(mask)
    atomic_write(str(tmp_path / "a.bin"), b"x")
    atomic_write(str(tmp_path / "b.bin"), lambda f: f.write(b"y"))
    write_json(str(tmp_path / "c.json"), {"a": 1})
    atomic_torch_save({"a": 1}, str(tmp_path / "d.pt"))
    with open(tmp_path / "plain.txt", "w") as f:  # what the files must match
        f.write("z")
    assert set(_modes(tmp_path).values()) == {0o666 & ~mask}
    # replacing a file keeps its mode, as writing into it would
    os.chmod(tmp_path / "a.bin", 0o640)
    atomic_write(str(tmp_path / "a.bin"), b"xx")
    assert _modes(tmp_path)["a.bin"] == 0o640 and open(tmp_path / "a.bin", "rb").read() == b"xx"


def test_magnet_outputs_keep_plain_write_permissions(umask, tmp_path, one_thread):
    from seg4diff_fast.magnet import MagnetConfig, ShapesMagnetData, train_magnet
    from seg4diff_fast.testing import tiny_sd3_pipeline

    cfg = MagnetConfig(layer=1, rank=2, max_steps=2, batch_size=1, warmup_steps=0, resolution=32,
                       checkpoint_every=1, protocol="corrected")
    for mask in (0o022, 0o077):
        umask(mask)
        out = str(tmp_path / f"run{mask:o}")
        summary = train_magnet(tiny_sd3_pipeline(t5=False), ShapesMagnetData(4), cfg, out, progress=False)
        modes = _modes(out)
        assert {"pytorch_lora_weights.safetensors", "magnet_head.safetensors", "magnet_config.json", "log.jsonl",
                "summary.json", "checkpoint.pt"} <= set(modes)
        assert set(modes.values()) == {0o666 & ~mask}, {k: oct(v) for k, v in modes.items()}
    # a pipeline built in memory: no path, no hash; the family, layer, protocol and version are recorded
    assert summary["provenance"] == {"model": None, "family": "sd3", "diffusers_version": None,
                                     "model_index_sha256": None, "revision": None, "package_version": __version__,
                                     "data": ShapesMagnetData(4).describe()}
    assert (summary["layer"], summary["protocol"], summary["config"]["num_workers"]) == (1, "corrected", 0)
    saved = json.load(open(os.path.join(out, "magnet_config.json")))
    assert saved["provenance"] == summary["provenance"] and saved["layer"] == 1
    MagnetConfig.from_dict(saved)  # the config still reads back


def test_model_record(tmp_path, monkeypatch):
    import hashlib

    import huggingface_hub.constants

    from seg4diff_fast.models import default_model_path
    from seg4diff_fast.reader import family_of
    from seg4diff_fast.testing import tiny_flux2_pipeline, tiny_flux_pipeline, tiny_qwenimage_pipeline

    for make in (tiny_flux_pipeline, tiny_flux2_pipeline, tiny_qwenimage_pipeline):
        pipe = make()
        assert model_record(pipe, None)["family"] == family_of(pipe).name
    # a local folder: absolute path, diffusers version and hash of model_index.json
    folder = tmp_path / "m"
    folder.mkdir()
    index = json.dumps({"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.99.0"}).encode()
    (folder / "model_index.json").write_bytes(index)
    monkeypatch.chdir(tmp_path)
    r = model_record(None, "m")
    assert r["model"] == str(folder) and r["diffusers_version"] == "0.99.0" and r["revision"] is None
    assert r["model_index_sha256"] == hashlib.sha256(index).hexdigest()[:12] and r["package_version"] == __version__

    class Loaded:  # the default model: recorded by the path diffusers loaded it from
        config = {"_name_or_path": default_model_path()}

    r = model_record(Loaded(), None)
    assert r["model"] == default_model_path() and r["model_index_sha256"] and r["diffusers_version"]
    # a hub id in the local cache: its snapshot's revision and hash
    snap = tmp_path / "hub" / "models--org--model" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_bytes(index)
    (tmp_path / "hub" / "models--org--model" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--model" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = model_record(None, "org/model")
    assert r["model"] == "org/model" and r["revision"] == "ab" * 20 and r["diffusers_version"] == "0.99.0"
    assert model_record(None, "org/other")["revision"] is None  # not cached: nothing more is known


def test_eval_records_the_model_and_reads_a_lora(tmp_path, one_thread):
    from seg4diff_fast.magnet.lora import add_magnet_lora, save_magnet_lora
    from seg4diff_fast.testing import tiny_sd3_pipeline

    model = str(tmp_path / "tiny")
    pipe = tiny_sd3_pipeline(num_layers=3, t5=False)
    pipe.save_pretrained(model)
    add_magnet_lora(pipe.transformer, rank=2)
    lora = save_magnet_lora(str(tmp_path / "lora"), pipe.transformer)
    data = _folder_dataset(tmp_path / "ds")
    out = str(tmp_path / "r.json")
    assert cli.main(["eval", *data, "--model", model, "--lora", lora, "--layers", "1", "--resolution", "32",
                     "--threads", "1", "--no-progress", "--out", out]) == 0
    result = json.load(open(out))
    rec = result["provenance"]
    assert result["model"] == rec["model"] == model and rec["family"] == "sd3" and rec["lora"] == lora
    assert rec["model_index_sha256"] and rec["package_version"] == __version__ and result["layer"] == 1
    assert result["settings"]["protocol"] == "paper" and result["settings"]["lora"] == lora


def test_magnet_cli_reports_heldout_miou(umask, tmp_path, capsys, one_thread):
    """The embedded model, one step: the trained layer's held-out mIoU before and after (the saved LoRA in a
    fresh pipeline) printed and in summary.json; a warm-up longer than the run warned about in one line; every
    file with the umask's permissions; the model, layer, protocol and version recorded."""
    from seg4diff_fast.models import default_model_path

    umask(0o027)
    out = tmp_path / "run"
    assert cli.main(["magnet", "--data", "shapes:8", "--layer", "2", "--max-steps", "1", "--batch-size", "2",
                     "--warmup-steps", "5", "--rank", "2", "--heldout-scenes", "4", "--threads", "1",
                     "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--warmup-steps 5" in warnings[0]
    assert "held-out mIoU of layer 2 on 4 ShapesWorld scenes" in captured.out
    summary = json.load(open(out / "summary.json"))
    held = summary["heldout"]
    assert held["layer"] == 2 and held["scenes"] == 4 and held["resolution"] == 32
    for when in ("before", "after"):
        assert 0 <= held[when]["B"] <= 100 and held[when]["n_B"] == 4
    assert held["lift"]["B"] == pytest.approx(held["after"]["B"] - held["before"]["B"], abs=0.02)
    assert summary["model"] == summary["provenance"]["model"] == default_model_path()
    assert (summary["layer"], summary["protocol"], summary["package_version"]) == (2, "corrected", __version__)
    assert set(_modes(out).values()) == {0o640}

    # --no-heldout skips it
    out2 = tmp_path / "run2"
    assert cli.main(["magnet", "--data", "shapes:4", "--layer", "2", "--max-steps", "1", "--batch-size", "1",
                     "--warmup-steps", "0", "--rank", "2", "--no-heldout", "--threads", "1", "--no-progress",
                     "--out", str(out2)]) == 0
    assert "held-out" not in capsys.readouterr().out and "heldout" not in json.load(open(out2 / "summary.json"))


def test_magnet_settings_come_from_the_models_recipe(tmp_path, one_thread):
    """A bare ``magnet --data shapes`` on the embedded model trains with the model's own recipe (its
    shapes_config.json "magnet" block: lr, batch, the conv head, the LoRA's modules, the background class and the
    share of same-colour scenes); what the user gives wins;
    a warm-up from the recipe is scaled to a run shorter than it (no warning), and the data is recorded."""
    from seg4diff_fast.magnet.recipe import model_recipe
    from seg4diff_fast.models import default_model_path

    recipe = model_recipe(default_model_path())
    out = tmp_path / "bare"
    assert cli.main(["magnet", "--data", "shapes:4", "--max-steps", "2", "--rank", "2", "--no-heldout",
                     "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    cfg = json.load(open(out / "magnet_config.json"))
    assert (cfg["lr"], cfg["batch_size"], cfg["conv_head"]) == (recipe["lr"], recipe["batch_size"], recipe["conv_head"])
    assert (cfg["protocol"], recipe["include_background"]) == (recipe["protocol"], True)
    assert cfg["max_steps"] == 2 and cfg["warmup_steps"] == 0 and cfg["layer"] == 1
    attn = ["to_q", "to_k", "to_v", "to_out.0"]  # the family's, resolved in the record
    for key, default in (("target_modules", attn), ("lambda_focal", 0.1), ("lambda_dice", 0.2), ("alpha", 16.0)):
        assert cfg[key] == recipe.get(key, default), key
    assert cfg["rank"] == 2  # given
    assert (out / "magnet_head.safetensors").exists() == recipe["conv_head"]
    assert "background class" in cfg["provenance"]["data"]
    if recipe.get("same_colour"):
        assert f"{100 * recipe['same_colour']:g} % same-colour scenes" in cfg["provenance"]["data"]

    out2 = tmp_path / "given"
    assert cli.main(["magnet", "--data", "shapes:4", "--max-steps", "1", "--batch-size", "1", "--lr", "1e-3",
                     "--paper", "--no-conv-head", "--no-background", "--rank", "2", "--no-heldout", "--threads", "1",
                     "--target-modules", "to_q, to_k", "--lambda-dice", "0.5", "--alpha", "4", "--same-colour", "1",
                     "--no-progress", "--out", str(out2)]) == 0
    cfg2 = json.load(open(out2 / "magnet_config.json"))
    assert (cfg2["lr"], cfg2["batch_size"], cfg2["conv_head"], cfg2["protocol"]) == (1e-3, 1, False, "paper")
    assert (cfg2["target_modules"], cfg2["lambda_dice"], cfg2["alpha"]) == (["to_q", "to_k"], 0.5, 4.0)
    assert "100 % same-colour scenes" in cfg2["provenance"]["data"]
    from safetensors import safe_open

    with safe_open(str(out2 / "pytorch_lora_weights.safetensors"), "pt") as f:
        trained = {k.split(".attn.")[1].split(".lora")[0] for k in f.keys()}
    assert trained == {"to_q", "to_k"}
    assert not (out2 / "magnet_head.safetensors").exists() and "background" not in cfg2["provenance"]["data"]


def test_magnet_without_a_recipe_keeps_the_authors_settings(tmp_path):
    """A model folder without a recipe: the authors' SD3 settings (MagnetConfig's defaults)."""
    from seg4diff_fast.magnet import MagnetConfig
    from seg4diff_fast.magnet.recipe import model_recipe
    from seg4diff_fast.testing import tiny_sd3_pipeline

    folder = tmp_path / "tiny"
    tiny_sd3_pipeline(t5=False).save_pretrained(folder)
    assert model_recipe(str(folder)) == {}
    (folder / "shapes_config.json").write_text(json.dumps({"magnet": {"lr": 1e-3, "learning_rate": 2}}))
    with pytest.raises(ValueError, match="learning_rate"):
        model_recipe(str(folder))
    d = MagnetConfig()
    assert (d.lr, d.warmup_steps, d.max_steps, d.batch_size, d.conv_head) == (1e-4, 500, 3000, 8, True)


def test_background_option_is_for_shapes_only(tmp_path, capsys):
    (tmp_path / "coco").mkdir()
    assert cli.main(["magnet", "--data", f"coco:{tmp_path / 'coco'}", "--no-background", "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--background" in err[0] and not (tmp_path / "o").exists()


def test_same_colour_option_is_for_shapes_only_and_modules_are_named(tmp_path, capsys):
    (tmp_path / "coco").mkdir()
    assert cli.main(["magnet", "--data", f"coco:{tmp_path / 'coco'}", "--same-colour", "0.5", "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--same-colour" in err[0] and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["magnet", "--data", "shapes", "--target-modules", " , ", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "module name" in capsys.readouterr().err and not (tmp_path / "o").exists()
