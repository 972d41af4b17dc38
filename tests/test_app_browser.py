"""``seg4diff-fast app`` (issue #15) in a real browser: headless Chromium from the system's packages
(``/usr/bin/chromium``, never downloaded at run time) driven by Playwright's Python API, against a server started
here on 127.0.0.1 (its own free port, always closed).

The pixels checked are the ones the browser decoded: the label-map ``<img>`` is drawn onto a canvas in the page
and read back, its colours mapped to class indices and compared with ``Seg4DiffSegmenter`` called alone. Every
request the page makes must stay on the local server (anything else is aborted and fails the test).

Set ``SEG4DIFF_APP_SCREENSHOT=PATH`` to also save the result page there (``docs/app_screenshot.png`` was made so).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from seg4diff_fast.app import logic
from seg4diff_fast.segment import Seg4DiffSegmenter
from seg4diff_fast.shapes.demo_data import DEMO_DIR

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
#: Needed on a closed network: no GPU, no QUIC, nothing fetched in the background.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000

if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no system Chromium at {CHROMIUM} (Debian: apt-get install chromium); the browser tests need it",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'seg4diff-fast[app]')")
pytest.importorskip("gradio", reason="gradio is not installed (pip install 'seg4diff-fast[app]')")

#: Draw an <img> onto a canvas and read its RGBA pixels back (what the browser decoded).
READ_IMG = """(sel) => {
  const img = document.querySelector(sel);
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  return {w: c.width, h: c.height, data: Array.from(ctx.getImageData(0, 0, c.width, c.height).data)};
}"""
IMG_READY = """(sel) => { const i = document.querySelector(sel);
  return i !== null && i.complete && i.naturalWidth > 0; }"""


@pytest.fixture(scope="module")
def model(one_thread):
    from seg4diff_fast.app.logic import AppModel
    from seg4diff_fast.models import load_pipeline, quiet_loading

    quiet_loading()
    return AppModel(load_pipeline(None, "float32", "cpu"))


@pytest.fixture(scope="module")
def server(model):
    from seg4diff_fast.app import ui

    with ui.serve(model, timeout=120) as (_demo, url):
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; ``page.outside`` lists the requests it tried outside the local server."""
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    outside: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith((server, "data:", "blob:")):
            r.continue_()
        else:
            outside.append(url)
            r.abort()

    pg.route("**/*", route)
    pg.goto(server)
    pg.wait_for_selector("#segment-button")
    pg.outside = outside
    try:
        yield pg
    finally:
        context.close()


def _labels_in_page(pg, selector: str, classes: list[str]) -> np.ndarray:
    pg.wait_for_function(IMG_READY, arg=selector)
    d = pg.evaluate(READ_IMG, selector)
    rgba = np.asarray(d["data"], dtype=np.uint8).reshape(d["h"], d["w"], 4)
    assert (rgba[..., 3] == 255).all()
    return logic.labels_from_rgb(rgba[..., :3], logic.palette(len(classes)))


def _segment_and_check(pg, model, scene) -> None:
    pg.click("#segment-button")
    # the downloads are the last output: when they are there, the request is done
    pg.wait_for_function("() => (document.querySelector('#downloads')?.innerText ?? '').includes('_labels')")
    pg.wait_for_selector("#label-map img")
    got = _labels_in_page(pg, "#label-map img", scene.classes)
    want = Seg4DiffSegmenter(model.pipe, layer=model.expert_layer, seed=0)(scene.image, scene.classes).label_map
    assert got.shape == want.shape and (got >= 0).all()
    assert np.array_equal(got, want)
    # the legend with the pixel shares, and the overlay (upscaled, legend below)
    shares = pg.inner_text("#shares")
    for j, name in enumerate(scene.classes):
        assert name in shares and f"{100 * float((want == j).mean()):.1f} %" in shares
    pg.wait_for_function(IMG_READY, arg="#overlay img")
    assert pg.evaluate("() => document.querySelector('#overlay img').naturalWidth") >= logic.DISPLAY_MIN
    assert pg.locator("#heatmaps img").count() >= len(scene.classes)


def test_upload_type_segment(page, model, tmp_path):
    scene = logic.scene_by_name("scene_00")
    page.set_input_files("#input-image input[type=file]", os.path.join(DEMO_DIR, "scene_00.png"))
    page.wait_for_selector("#input-image img")
    page.fill("#classes textarea", ", ".join(scene.classes))
    page.get_by_text("every word is in the model's vocabulary").wait_for()
    _segment_and_check(page, model, scene)
    shot = tmp_path / "app_segment.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("SEG4DIFF_APP_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
    assert page.outside == []


def test_pick_a_bundled_scene(page, model):
    scene = logic.scene_by_name("scene_03")
    page.click("#scene-picker input")
    page.get_by_role("option", name=scene.title).click()
    page.wait_for_function("() => document.querySelector('#classes textarea').value.length > 0")
    assert page.input_value("#classes textarea") == ", ".join(scene.classes)
    page.wait_for_selector("#input-image img")
    _segment_and_check(page, model, scene)
    assert page.outside == []


def test_errors_show_in_the_page_and_it_keeps_working(page, model, tmp_path):
    page.click("#segment-button")  # nothing at all
    page.get_by_text("no image: upload one").first.wait_for()
    scene = logic.scene_by_name("scene_01")
    page.set_input_files("#input-image input[type=file]", os.path.join(DEMO_DIR, "scene_01.png"))
    page.wait_for_selector("#input-image img")
    page.click("#segment-button")  # no classes
    page.get_by_text("no classes: type the class names").first.wait_for()
    page.screenshot(path=str(tmp_path / "app_error.png"))
    assert page.get_by_text("Traceback").count() == 0
    page.fill("#classes textarea", "background, red cat")  # an unknown word is flagged as you type
    page.get_by_text("not in the model's vocabulary").first.wait_for()
    page.fill("#classes textarea", ", ".join(scene.classes))
    _segment_and_check(page, model, scene)
    assert page.outside == []
