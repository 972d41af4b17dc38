"""The app's page: the Gradio layout over :mod:`seg4diff_fast.app.logic`.

:func:`build_app` makes the ``gr.Blocks``: a shared input row (image, bundled scene, class names with the
model's vocabulary as suggestions and unknown words flagged, block, noise step, seed) and four tabs:
Segment, Unsupervised, Generate, Layers. Every handler calls one logic function and turns its result into
component values; an :class:`~seg4diff_fast.app.logic.AppInputError` becomes a ``gr.Error`` toast, any other
exception a readable ``gr.Error`` too (its traceback goes to the server log), and the server keeps serving.
Every event that runs the model shares one queue slot (``concurrency_id="model"``, ``concurrency_limit=1``):
one request at a time on the model.

:func:`launch` starts it (no share link, no analytics, no server-side rendering); :func:`serve` is a context
manager that starts it on a free local port and always closes it (tests).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: never phone home

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from . import logic  # noqa: E402
from .logic import AppInputError, AppModel  # noqa: E402

__all__ = ["CSS", "build_app", "free_port", "launch", "serve"]

log = logging.getLogger("seg4diff_fast.app")

CSS = """
.seg4diff-shares td, .seg4diff-shares th { padding: 2px 10px; }
#input-image img, #label-map img, #overlay img, #confidence img, #generated img, #unsup-overlay img,
#heatmaps img, #word-maps img, #layer-maps img { image-rendering: pixelated; }
#input-image img, #label-map img, #generated img { width: 100%; height: 100%; object-fit: contain; }
"""

MODEL_EVENT = {"concurrency_limit": 1, "concurrency_id": "model"}


def _readable_uploads(component: gr.Image) -> gr.Image:
    """Make an image input's unreadable uploads (a corrupt file, a decompression bomb) a readable ``gr.Error``
    instead of an internal error. (Its ``preprocess`` is wrapped on the instance: a subclass of a Gradio
    component would make Gradio write a ``.pyi`` stub next to this module.)"""
    stock = component.preprocess

    @functools.wraps(stock)
    def preprocess(payload: Any) -> Any:
        try:
            return stock(payload)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(f"cannot read {name} as an image ({logic._first_line(e)}); upload a PNG, JPEG or WebP "
                           "file", print_exception=False) from None

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _guard(fn: Any) -> Any:
    """A handler whose failures are readable messages in the page, never a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except AppInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the server must keep serving
            log.exception("seg4diff-fast app: %s failed", fn.__name__)
            raise gr.Error(f"the request failed ({type(e).__name__}: {logic._first_line(e)}); the server is still "
                           "running: check the inputs, or the server log", print_exception=False) from None

    return wrapper


def _progress(progress: Any) -> Any:
    return lambda fraction, desc: progress(fraction, desc=desc)


def build_app(model: AppModel, workdir: str | None = None) -> gr.Blocks:
    """The page for ``model``. ``workdir``: where the downloads are written (default: a new temporary folder,
    removed when the app is closed through :func:`serve`)."""
    workdir = workdir or tempfile.mkdtemp(prefix="seg4diff-app-")
    scenes = logic.bundled_scenes()
    size = model.resolution if model.is_shapes else 32

    # ------------------------------------------------------------------ handlers
    def pick_scene(title: str | None):
        if not title:
            return gr.skip(), gr.skip(), None
        s = logic.scene_by_name(title)
        return np.asarray(s.image), ", ".join(s.classes), s

    def draw_scene(seed: Any):
        s = logic.shapes_scene(seed, size)
        return np.asarray(s.image), ", ".join(s.classes), s, None

    def check_classes(text: str) -> str:
        try:
            names = logic.parse_classes(text)
        except AppInputError:
            return ""
        return logic.token_report_markdown(logic.token_report(model.tokenizer, names))

    def add_word(text: str, word: str | None):
        if not word:
            return gr.skip(), None
        names = [n.strip() for n in (text or "").split(",") if n.strip()]
        if word not in names:
            names.append(word)
        return ", ".join(names), None

    @_guard
    def on_segment(image, classes, layer, noise_step, seed, alpha, progress=gr.Progress()):  # noqa: B008 - Gradio's idiom
        view = logic.segment(model, image, classes, layer, noise_step, seed, alpha, _progress(progress))
        bad = logic.unknown_words(view.tokens)
        if bad:
            gr.Warning("not in the model's vocabulary (read as the mean of their pieces): "
                       + ", ".join(f"{w['word']} ({' · '.join(w['pieces'])})" for w in bad))
        folder = os.path.join(workdir, uuid.uuid4().hex)
        stem = _stem(image)
        png, js = logic.save_segment_files(view, folder, stem)
        return (view.overlay, view.labels_rgb, view.confidence, logic.shares_html(view),
                [(rgb, name) for name, rgb in view.heatmaps], [png, js],
                logic.token_report_markdown(view.tokens))

    @_guard
    def on_unsupervised(image, threshold, layer, noise_step, seed, progress=gr.Progress()):  # noqa: B008 - Gradio's idiom
        view = logic.unsupervised(model, image, threshold, layer, noise_step, seed, _progress(progress))
        rows = [[s["segment"], f"{100 * s['share']:.1f}", s["tokens"], s["positions"], s["kinds"]]
                for s in view.segments]
        summary = (f"**{len(view.segments)} segment(s)** at threshold {view.threshold:g} (symmetric KL between the "
                   "empty prompt's token maps; lower: more segments)")
        return view.overlay, summary, rows

    @_guard
    def on_generate(prompt, steps, seed, guidance, layer, view_mode, progress=gr.Progress()):  # noqa: B008 - Gradio's idiom
        gen = logic.generate(model, prompt, steps, seed, guidance, layer, _progress(progress))
        step = None if view_mode != "per step" else gen.steps
        gallery = [(rgb, cap) for cap, rgb in logic.word_map_view(gen, step)]
        info = (f"{len(gen.words)} words, maps of block {gen.layer} captured at each of {gen.steps} steps "
                f"(seed {gen.seed}, guidance {gen.guidance:g})")
        return (gen.image, gallery, logic.generation_to_state(gen),
                gr.Slider(minimum=1, maximum=max(2, gen.steps), value=gen.steps, step=1, interactive=gen.steps > 1),
                info)

    @_guard
    def on_word_maps(state, view_mode, step):
        gen = logic.generation_from_state(state)
        s = None if view_mode != "per step" else min(int(step or gen.steps), gen.steps)
        return [(rgb, cap) for cap, rgb in logic.word_map_view(gen, s)]

    @_guard
    def on_layers(image, classes, noise_step, seed, truth, progress=gr.Progress()):  # noqa: B008 - Gradio's idiom
        import pandas as pd

        view = logic.layer_analysis(model, image, classes, noise_step, seed, [truth] if truth else [],
                                    _progress(progress))
        width = len(str(len(view.rows) - 1))
        block = {r["block"]: f"{r['block']:0{width}d}" for r in view.rows}  # categories: whole blocks on the axis
        mass = pd.DataFrame([{"block": block[r["block"]], "share": s, "percent": r[s]}
                             for r in view.rows for s in ("I2I", "I2T", "T2I", "T2T")])
        measures = ["mIoU", "accuracy"] if view.has_truth else ["agreement"]
        grounding = pd.DataFrame([{"block": block[r["block"]], "measure": m, "percent": r[m]}
                                  for r in view.rows for m in measures]
                                 + [{"block": block[r["block"]], "measure": "confidence ×100",
                                     "percent": 100 * r["confidence"]} for r in view.rows])
        table = pd.DataFrame(view.rows)
        note = (f"Expert block: {view.expert}. Grounding "
                + ("against the scene's label map (mIoU and pixel accuracy, %)." if view.has_truth else
                   "without a label map: agreement (%) of each block's labels with the expert block's, and the "
                   "mean confidence. Pick a bundled scene for mIoU."))
        return mass, grounding, table, [(rgb, cap) for cap, rgb in view.label_maps], note

    @_guard
    def on_load_lora(path):
        desc = model.load_lora(path)
        gr.Info("LoRA loaded" if (path or "").strip() else "LoRA removed")
        return desc

    # ------------------------------------------------------------------ layout
    with gr.Blocks(title="seg4diff-fast", analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        gr.Markdown("# seg4diff-fast\nZero-shot open-vocabulary segmentation from the joint attention of MM-DiT "
                    "diffusion transformers (Seg4Diff), and the words grounding while an image is generated.")
        with gr.Accordion("Model", open=False):
            model_md = gr.Markdown(model.describe(), elem_id="model-info")
            with gr.Row():
                lora = gr.Textbox(label="LoRA (a path on the server: a `seg4diff-fast magnet` folder, .safetensors "
                                  "or .pth; empty: none)", value=model.lora or "", scale=4, elem_id="lora-path")
                lora_btn = gr.Button("Load", scale=1, elem_id="lora-button")
        truth = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                image = _readable_uploads(gr.Image(
                    label="Image (Segment, Unsupervised, Layers)", type="filepath", image_mode=None, format="png",
                    sources=["upload", "clipboard"], height=300, elem_id="input-image"))
                with gr.Row():
                    scene = gr.Dropdown([(s.title, s.name) for s in scenes], value=None, scale=3,
                                        label="Bundled ShapesWorld scene", elem_id="scene-picker")
                    draw_seed = gr.Number(value=1_000_000, precision=0, label="or ShapesWorld seed", scale=1,
                                          minimum=0)
                    draw_btn = gr.Button("Draw scene", scale=1, size="sm", elem_id="draw-button")
            with gr.Column(scale=3):
                classes = gr.Textbox(label="Classes (comma-separated)", placeholder="background, red circle, ...",
                                     lines=2, elem_id="classes")
                vocab = gr.Dropdown(model.vocabulary, value=None, label="Add a word from the model's vocabulary",
                                    filterable=True, elem_id="vocabulary")
                tokens_md = gr.Markdown(elem_id="token-check")
                with gr.Row():
                    layer = gr.Slider(0, model.num_layers - 1, value=model.expert_layer, step=1,
                                      label=f"Block (expert: {model.expert_layer})", elem_id="layer")
                    noise_step = gr.Slider(1, model.num_inference_steps, value=model.noise_step, step=1,
                                           label=f"Noise step (t = timesteps[-step] of {model.num_inference_steps})",
                                           elem_id="noise-step")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Noise seed", elem_id="seed")

        with gr.Tabs():
            with gr.Tab("Segment", id="segment"):
                with gr.Row():
                    seg_btn = gr.Button("Segment", variant="primary", elem_id="segment-button", scale=3)
                    alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity", scale=1)
                with gr.Row():
                    overlay = gr.Image(label="Overlay", format="png", interactive=False, height=360, elem_id="overlay")
                    label_map = gr.Image(label="Label map (class colours)", format="png", interactive=False,
                                         height=360, elem_id="label-map")
                    confidence = gr.Image(label="Confidence (winning class's share of the scores)", format="png",
                                          interactive=False, height=360, elem_id="confidence")
                shares = gr.HTML(elem_id="shares")
                heatmaps = gr.Gallery(label="Raw image→text map per class (one colour scale)", format="png",
                                      columns=8, height=210, object_fit="contain", fit_columns=False,
                                      elem_id="heatmaps")
                files = gr.File(label="Downloads: label PNG (pixel = class index) and JSON", file_count="multiple",
                                interactive=False, elem_id="downloads")
            with gr.Tab("Unsupervised", id="unsupervised"):
                with gr.Row():
                    threshold = gr.Slider(0.005, 2.0, value=0.1, step=0.005, label="KL threshold", scale=3,
                                          elem_id="threshold")
                    unsup_btn = gr.Button("Find segments", variant="primary", scale=1, elem_id="unsupervised-button")
                with gr.Row():
                    unsup_img = gr.Image(label="Segments", format="png", interactive=False, height=360,
                                         elem_id="unsup-overlay")
                    with gr.Column():
                        unsup_md = gr.Markdown()
                        unsup_table = gr.Dataframe(headers=["segment", "pixels %", "tokens", "positions", "kinds"],
                                                   interactive=False, elem_id="unsup-table")
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", lines=2, scale=4, elem_id="prompt",
                                        value=scenes[0].caption if model.is_shapes and scenes else "")
                    gen_btn = gr.Button("Generate", variant="primary", scale=1, elem_id="generate-button")
                with gr.Row():
                    steps = gr.Slider(1, logic.MAX_STEPS, value=20 if model.is_shapes else 28, step=1, label="Steps")
                    guidance = gr.Slider(0, 15, value=4.0 if model.is_shapes else 7.0, step=0.5, label="Guidance")
                    gen_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                with gr.Row():
                    gen_img = gr.Image(label="Generated image", format="png", interactive=False, height=300,
                                       elem_id="generated")
                    with gr.Column():
                        gen_md = gr.Markdown()
                        view_mode = gr.Radio(["mean over steps", "per step"], value="mean over steps",
                                             label="Word maps")
                        step = gr.Slider(1, 2, value=1, step=1, label="Step", interactive=False, elem_id="step")
                word_maps = gr.Gallery(label="Each word's map (block above)", format="png", columns=8, height=210,
                                       object_fit="contain", fit_columns=False, elem_id="word-maps")
                gen_state = gr.State(None)
            with gr.Tab("Layers", id="layers"):
                layers_btn = gr.Button("Analyse every block", variant="primary", elem_id="layers-button")
                layers_md = gr.Markdown()
                with gr.Row():
                    mass_plot = gr.LinePlot(x="block", y="percent", color="share", label="Attention mass per block "
                                            "(head mean): image rows → image / text keys, text rows → image / text",
                                            y_lim=[0, 100], elem_id="mass-plot")
                    grounding_plot = gr.LinePlot(x="block", y="percent", color="measure", label="Grounding per block",
                                                 y_lim=[0, 100], elem_id="grounding-plot")
                layers_table = gr.Dataframe(interactive=False, elem_id="layers-table")
                layer_maps = gr.Gallery(label="Segmentation at each block", format="png", columns=8, height=210,
                                        object_fit="contain", fit_columns=False, elem_id="layer-maps")

        # -------------------------------------------------------------- events
        scene.input(pick_scene, [scene], [image, classes, truth], api_name="pick_scene")
        draw_btn.click(draw_scene, [draw_seed], [image, classes, truth, scene], api_name="draw_scene")
        classes.change(check_classes, [classes], [tokens_md], api_name="check_classes", show_progress="hidden")
        vocab.input(add_word, [classes, vocab], [classes, vocab], api_name=False, show_progress="hidden")
        seg_btn.click(on_segment, [image, classes, layer, noise_step, seed, alpha],
                      [overlay, label_map, confidence, shares, heatmaps, files, tokens_md], api_name="segment",
                      **MODEL_EVENT)
        unsup_btn.click(on_unsupervised, [image, threshold, layer, noise_step, seed],
                        [unsup_img, unsup_md, unsup_table], api_name="unsupervised", **MODEL_EVENT)
        threshold.release(on_unsupervised, [image, threshold, layer, noise_step, seed],
                          [unsup_img, unsup_md, unsup_table], api_name=False, **MODEL_EVENT)
        gen_btn.click(on_generate, [prompt, steps, gen_seed, guidance, layer, view_mode],
                      [gen_img, word_maps, gen_state, step, gen_md], api_name="generate", **MODEL_EVENT)
        view_mode.change(on_word_maps, [gen_state, view_mode, step], [word_maps], api_name=False)
        step.release(on_word_maps, [gen_state, view_mode, step], [word_maps], api_name=False)
        layers_btn.click(on_layers, [image, classes, noise_step, seed, truth],
                         [mass_plot, grounding_plot, layers_table, layer_maps, layers_md], api_name="layers",
                         **MODEL_EVENT)
        lora_btn.click(on_load_lora, [lora], [model_md], api_name="load_lora", **MODEL_EVENT)
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.seg4diff_workdir = workdir  # type: ignore[attr-defined]
    return demo


def _stem(image: Any) -> str:
    if isinstance(image, str) and image:
        stem = os.path.splitext(os.path.basename(image))[0]
        keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:64]
        return keep or "segmentation"
    return "segmentation"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True,
           quiet: bool = False) -> Any:
    """``demo.launch`` on ``host:port``: no share link, no server-side rendering, no MCP server, uploads up to
    64 MB. ``block=False`` returns once the server answers (``prevent_thread_lock``)."""
    return demo.launch(server_name=host, server_port=int(port), share=False, prevent_thread_lock=not block,
                       quiet=quiet, show_error=False, ssr_mode=False, mcp_server=False, pwa=False,
                       enable_monitoring=False, max_file_size="64mb", css=CSS,
                       allowed_paths=[getattr(demo, "seg4diff_workdir", tempfile.gettempdir())])


@contextlib.contextmanager
def serve(model: AppModel, host: str = "127.0.0.1", port: int | None = None,
          timeout: float = 120.0) -> Iterator[tuple[gr.Blocks, str]]:
    """Start the app for ``model`` on ``host:port`` (default: a free port) and yield ``(demo, url)``; the server
    is closed (and its download folder removed) when the block ends, whatever happens. Raises
    ``TimeoutError`` when it does not come up within ``timeout`` seconds."""
    demo = build_app(model)
    port = free_port(host) if port is None else port
    started: dict[str, Any] = {}

    def start() -> None:
        try:
            launch(demo, host, port, block=False, quiet=True)
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            started["error"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=start, name="seg4diff-app-launch", daemon=True)
    thread.start()
    thread.join(timeout)
    try:
        if thread.is_alive():
            raise TimeoutError(f"the app did not start on {host}:{port} within {timeout:.0f} s")
        if "error" in started:
            raise started["error"]
        log.info("app up on %s:%d in %.1f s", host, port, time.monotonic() - t0)
        yield demo, f"http://{host}:{port}/"
    finally:
        demo.close()
        shutil.rmtree(getattr(demo, "seg4diff_workdir", ""), ignore_errors=True)
