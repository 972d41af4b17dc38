"""``seg4diff-fast app`` (issue #15), API level: the app's logic called directly, and the page's endpoints through
``gradio_client`` against a server started here on 127.0.0.1 (its own free port, always closed).

Everything runs on the embedded ShapesWorld pipeline on the CPU; the label maps the app returns must equal
``Seg4DiffSegmenter`` called alone with the same model, block, noise step and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast.app import logic
from seg4diff_fast.app.logic import AppInputError, AppModel
from seg4diff_fast.segment import Seg4DiffSegmenter
from seg4diff_fast.shapes import CLASSES
from seg4diff_fast.shapes.demo_data import DEMO_DIR

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def model(one_thread) -> AppModel:
    from seg4diff_fast.models import load_pipeline, quiet_loading

    quiet_loading()
    return AppModel(load_pipeline(None, "float32", "cpu"))


@pytest.fixture(scope="module")
def scenes():
    return logic.bundled_scenes()


def _png_header(path, width: int, height: int) -> str:
    """A PNG whose header says ``width`` × ``height`` (its data is not that big: never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return str(path)


def _corrupt(path) -> str:
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image at all" * 4)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# logic, no server
@pytest.mark.parametrize("scene, layer, noise_step, seed", [(0, None, None, 0), (3, 3, 5, 7)])
def test_segment_equals_the_segmenter(model, scenes, scene, layer, noise_step, seed):
    s = scenes[scene]
    view = logic.segment(model, s.image, ", ".join(s.classes), layer, noise_step, seed)
    ref = Seg4DiffSegmenter(model.pipe, layer=model.expert_layer if layer is None else layer,
                            noise_step=8 if noise_step is None else noise_step, seed=seed)(s.image, s.classes)
    assert np.array_equal(view.label_map, ref.label_map)
    np.testing.assert_allclose(view.result.scores.numpy(), ref.scores.numpy(), rtol=0, atol=0)
    # the colour image decodes back to the labels; the downloads hold the same
    assert np.array_equal(logic.labels_from_rgb(view.labels_rgb, view.colours), ref.label_map)
    assert view.classes == s.classes and len(view.heatmaps) == len(s.classes)
    assert abs(sum(v["share"] for v in view.shares.values()) - 1.0) < 1e-9
    assert view.overlay.shape[1] >= logic.DISPLAY_MIN and view.overlay.dtype == np.uint8
    assert view.info["layer"] == (model.expert_layer if layer is None else layer) and view.info["seed"] == seed
    assert view.info["noise_step"] == (8 if noise_step is None else noise_step)


def test_segment_files_and_report(model, scenes, tmp_path):
    s = scenes[1]
    view = logic.segment(model, s.image, s.classes)
    png, js = logic.save_segment_files(view, str(tmp_path), "scene")
    assert np.array_equal(np.asarray(Image.open(png)), view.label_map)
    info = json.loads(open(js).read())
    assert info["classes"] == s.classes and info["prompts"] == view.info["prompts"]
    html = logic.shares_html(view)
    assert all(c in html for c in s.classes)


def test_vocabulary_and_unknown_words(model):
    vocab = model.vocabulary
    assert vocab[:13] == list(CLASSES)
    assert {"circle", "red", "background"} <= set(vocab)
    report = logic.token_report(model.tokenizer, ["red cat", "blue square"])
    flagged = logic.unknown_words(report)
    assert [w["word"] for w in flagged] == ["cat"] and len(flagged[0]["pieces"]) > 1
    text = logic.token_report_markdown(report)
    assert "cat" in text and "⚠" in text
    view = logic.segment(model, logic.bundled_scenes()[0].image, "red cat, background")
    assert view.info["unknown_words"] == ["cat"]


def test_bad_inputs_are_readable_errors(model, scenes, tmp_path):
    s = scenes[0]
    cases = [
        ((None, "a"), "no image"),
        ((_corrupt(tmp_path / "bad.png"), "a"), "cannot read bad.png"),
        ((_png_header(tmp_path / "huge.png", 10_000, 10_000), "a"), "10000×10000"),
        ((s.image, ""), "no classes"),
        ((s.image, " , ,"), "no classes"),
        ((s.image, "red circle, Red circle"), "given twice"),
    ]
    for (image, classes), message in cases:
        with pytest.raises(AppInputError, match=message):
            logic.segment(model, image, classes)
    with pytest.raises(AppInputError, match="out of range"):
        logic.segment(model, s.image, s.classes, layer=model.num_layers)
    with pytest.raises(AppInputError, match="out of range"):
        logic.segment(model, s.image, s.classes, noise_step=0)
    with pytest.raises(AppInputError, match="whole number"):
        logic.segment(model, s.image, s.classes, seed=1.5)
    with pytest.raises(AppInputError, match="positive"):
        logic.unsupervised(model, s.image, threshold=0)
    with pytest.raises(AppInputError, match="no prompt"):
        logic.generate(model, "  ")
    with pytest.raises(AppInputError, match="steps"):
        logic.generate(model, "red circle", steps=0)


def test_unsupervised_equals_the_segmenter(model, scenes):
    s = scenes[2]
    view = logic.unsupervised(model, s.image, threshold=0.05)
    ref = Seg4DiffSegmenter(model.pipe, layer=model.expert_layer).unsupervised(s.image, threshold=0.05)
    assert np.array_equal(view.label_map, ref.label_map)
    assert [g for g in ref.groups] == [v for v in view.result.groups]
    assert len(view.segments) == ref.num_segments and abs(sum(x["share"] for x in view.segments) - 1) < 1e-9
    coarser = logic.unsupervised(model, s.image, threshold=2.0)
    assert len(coarser.segments) <= len(view.segments)


def test_generate_captures_each_word_at_each_step(model):
    import torch

    from seg4diff_fast import disable_fast_capture, enable_fast_capture

    prompt = "red circle and blue square on background"
    gen = logic.generate(model, prompt, steps=3, seed=5, guidance=4.0, layer=2)
    assert gen.image.shape == (32, 32, 3) and gen.words == ["red", "circle", "and", "blue", "square", "on",
                                                           "background"]
    assert gen.maps.shape == (3, 7, 16, 16)
    # the same as capturing by hand
    cap = enable_fast_capture(model.pipe, layers=[2], keep_steps=True)
    try:
        with torch.no_grad():
            img = model.pipe(prompt=prompt, num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
                             max_sequence_length=0, generator=torch.Generator("cpu").manual_seed(5)).images[0]
        ref = cap.word_maps(prompt)
    finally:
        disable_fast_capture(model.pipe)
    assert np.array_equal(np.asarray(img), gen.image)
    np.testing.assert_allclose(gen.maps[:, 3], ref["blue"][:, 0, 0].numpy(), atol=1e-6)
    mean = logic.word_map_view(gen)
    per_step = logic.word_map_view(gen, 2)
    assert [c.split(" ")[0] for c, _ in mean] == gen.words and "step 2/3" in per_step[0][0]
    with pytest.raises(AppInputError, match="out of range"):
        logic.word_map_view(gen, 4)
    state = logic.generation_to_state(gen)
    assert logic.generation_from_state(state).words == gen.words


def test_layer_analysis(model, scenes):
    s = scenes[0]
    view = logic.layer_analysis(model, s.image, s.classes)
    n = model.num_layers
    assert [r["block"] for r in view.rows] == list(range(n)) and view.has_truth
    for r in view.rows:
        assert abs(r["I2I"] + r["I2T"] - 100) < 1e-2 and abs(r["T2I"] + r["T2T"] - 100) < 1e-2
    assert view.rows[model.expert_layer]["agreement"] == 100.0
    ref = Seg4DiffSegmenter(model.pipe, layer=list(range(n)))(s.image, s.classes, per_layer=True)
    for b in range(n):
        acc = 100 * float((ref[b].label_map == s.label_map).mean())
        assert abs(view.rows[b]["accuracy"] - acc) < 1e-2
    # an image that is no known scene: no mIoU, agreement and confidence only
    other = logic.layer_analysis(model, np.asarray(s.image)[:, ::-1].copy(), s.classes)
    assert not other.has_truth and "mIoU" not in other.rows[0]


def test_scenes_and_ground_truth(scenes):
    assert len(scenes) == 8
    s = logic.scene_by_name("scene_02")
    assert logic.ground_truth_for(s.image, s.classes) is not None
    shuffled = s.classes[::-1]
    truth = logic.ground_truth_for(s.image, shuffled)
    assert np.array_equal(np.asarray(shuffled)[truth], np.asarray(s.classes)[s.label_map])
    drawn = logic.shapes_scene(1_000_003)
    assert logic.ground_truth_for(drawn.image, drawn.classes) is None
    assert np.array_equal(logic.ground_truth_for(drawn.image, drawn.classes, [drawn]), drawn.label_map)
    with pytest.raises(AppInputError, match="no bundled scene"):
        logic.scene_by_name("scene_99")


def test_a_lora_that_does_not_fit_keeps_the_model(model, scenes, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from safetensors.torch import save_file

    bad = tmp_path / "other_model.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 999),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(999, 4)}, str(bad))
    pipe = model.pipe
    with pytest.raises(AppInputError, match="to_q"):
        model.load_lora(str(bad))
    with pytest.raises(AppInputError, match="no LoRA at"):
        model.load_lora(str(tmp_path / "missing"))
    assert model.pipe is pipe and model.lora is None
    s = scenes[0]
    assert logic.segment(model, s.image, s.classes).label_map.shape == (32, 32)


def test_cli_app_messages(monkeypatch, capsys):
    import importlib.util

    from seg4diff_fast import cli_app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert cli_app.main([]) == 2
    err = capsys.readouterr().err
    assert "pip install 'seg4diff-fast[app]'" in err and "gradio" in err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert cli_app.main(["--model", "/no/such/model/folder"]) == 2
    assert "--model /no/such/model/folder" in capsys.readouterr().err
    assert cli_app.main(["--port", "0"]) == 2


def test_cli_registers_the_app_command():
    from seg4diff_fast import cli

    if "app" not in cli.COMMANDS:
        pytest.skip("seg4diff_fast/cli.py does not list the app command yet (COMMANDS['app'])")
    assert cli.COMMANDS["app"] == "seg4diff_fast.cli_app"
    parser = cli.build_parser()
    args = parser.parse_args(["app", "--port", "9999", "--host", "127.0.0.1"])
    assert args.port == 9999 and args._run.__module__ == "seg4diff_fast.cli_app"


# ----------------------------------------------------------------------------------------------------
# through a server
@pytest.fixture(scope="module")
def server(model):
    pytest.importorskip("gradio")
    from seg4diff_fast.app import ui

    with ui.serve(model, timeout=120) as (demo, url):
        yield demo, url
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with socket.socket() as s:  # closed: nobody listens on the port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not os.path.exists(demo.seg4diff_workdir)


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(server[1], verbose=False, download_files=str(tmp_path_factory.mktemp("client")))


def _scene_file(i: int) -> str:
    return os.path.join(DEMO_DIR, f"scene_{i:02d}.png")


def test_server_is_local_and_quiet(server):
    demo, url = server
    assert url.startswith("http://127.0.0.1:")
    assert demo.analytics_enabled is False and not demo.share
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    model_fns = [f for f in demo.fns.values() if f.api_name in ("segment", "unsupervised", "generate", "layers",
                                                                 "load_lora")]
    assert len(model_fns) == 5
    assert all(f.concurrency_limit == 1 and f.concurrency_id == "model" for f in model_fns)  # one request at a time
    assert {f.api_name for f in demo.fns.values() if f.tracks_progress} >= {"segment", "generate", "layers"}


def test_client_segment_equals_the_segmenter(model, client, scenes):
    from gradio_client import handle_file

    s = scenes[4]
    out = client.predict(handle_file(_scene_file(4)), ", ".join(s.classes), 3, 6, 11, 0.5, api_name="/segment")
    overlay, label_rgb, confidence, shares, heatmaps, files, tokens = out
    ref = Seg4DiffSegmenter(model.pipe, layer=3, noise_step=6, seed=11)(s.image, s.classes)
    png, js = sorted(files, key=lambda p: not p.endswith("_labels.png"))
    assert os.path.basename(png) == "scene_04_labels.png"
    assert np.array_equal(np.asarray(Image.open(png)), ref.label_map)
    colours = logic.palette(len(s.classes))
    assert np.array_equal(logic.labels_from_rgb(np.asarray(Image.open(label_rgb).convert("RGB")), colours),
                          ref.label_map)
    info = json.loads(open(js).read())
    assert info["layer"] == 3 and info["noise_step"] == 6 and info["seed"] == 11 and info["classes"] == s.classes
    assert [h["caption"] for h in heatmaps] == s.classes
    assert all(c in shares for c in s.classes) and "vocabulary" in tokens
    assert Image.open(overlay).size[0] >= logic.DISPLAY_MIN


def test_client_errors_are_messages_and_the_server_keeps_serving(client, scenes, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    s = scenes[0]
    bad = [
        ((handle_file(_scene_file(0)), "", 1, 8, 0, 0.5), "no classes"),
        ((None, "red circle", 1, 8, 0, 0.5), "no image"),
        ((handle_file(_corrupt(tmp_path / "broken.png")), "red circle", 1, 8, 0, 0.5), "cannot read"),
        ((handle_file(_png_header(tmp_path / "huge.png", 10_000, 10_000)), "red circle", 1, 8, 0, 0.5),
         "megapixels"),
    ]
    for args, message in bad:
        with pytest.raises(AppError, match=message) as info:
            client.predict(*args, api_name="/segment")
        assert "Traceback" not in str(info.value)
    with pytest.raises(AppError, match="no LoRA at"):
        client.predict(str(tmp_path / "nothing_here"), api_name="/load_lora")
    out = client.predict(handle_file(_scene_file(0)), ", ".join(s.classes), 1, 8, 0, 0.5, api_name="/segment")
    png = next(p for p in out[5] if p.endswith("_labels.png"))
    assert np.asarray(Image.open(png)).shape == (32, 32)


def test_client_other_tabs(client, scenes):
    from gradio_client import handle_file

    image, classes = client.predict("scene_05", api_name="/pick_scene")
    assert classes == ", ".join(scenes[5].classes)
    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")), np.asarray(scenes[5].image))
    overlay, summary, table = client.predict(handle_file(_scene_file(5)), 0.1, 1, 8, 0, api_name="/unsupervised")
    assert "segment" in summary and len(table["data"]) >= 1
    img, gallery, step, info = client.predict("blue circle on background", 2, 0, 4.0, 1, "per step",
                                              api_name="/generate")
    assert Image.open(img).size == (32, 32) and len(gallery) == 4 and "step 2/2" in gallery[0]["caption"]
    mass, grounding, table, maps, note = client.predict(handle_file(_scene_file(5)), classes, 8, 0,
                                                        api_name="/layers")
    assert len(table["data"]) == 6 and len(maps) == 6 and "mIoU" in note
    assert {row[1] for row in mass["data"]} == {"I2I", "I2T", "T2I", "T2T"}
    assert "✓" in client.predict("background, red circle", api_name="/check_classes")
    assert "cat" in client.predict("background, red cat", api_name="/check_classes")


def test_parse_args_namespace_defaults():
    from seg4diff_fast import cli_app

    p = argparse.ArgumentParser()
    cli_app.add_arguments(p)
    args = p.parse_args([])
    assert (args.host, args.port, args.model, args.lora, args.dtype) == ("127.0.0.1", 7860, None, None, "auto")
