"""An interactive web demo in the browser (Gradio), serving one model:

- Segment: an image (upload one, or pick a bundled ShapesWorld scene) and class names (the model's vocabulary
  as suggestions; words it does not know flagged) → the overlay with a legend, one raw heat map per class,
  the confidence map, per-class pixel shares; the label PNG and the JSON to download;
- Unsupervised: the KL-merged segments of the empty prompt's token maps, the threshold as a slider;
- Generate: a prompt → the image, and each word's map at a chosen block, averaged over the steps or per step;
- Layers: the attention mass (I2I / I2T / T2I / T2T) and the grounding of every block for an image and classes.

One request runs on the model at a time (a queue); bad input gets a message in the page. Needs the [app]
extra: pip install 'seg4diff-fast[app]'.

Example:
    seg4diff-fast app                                  # the embedded ShapesWorld model, http://127.0.0.1:7860
    seg4diff-fast app --model stabilityai/stable-diffusion-3-medium-diffusers --port 8080
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_common import CLIError, add_model_arguments, fail

HELP = "interactive web demo (Gradio): segment, unsupervised segments, word maps during generation, layer charts"

EXTRA_MISSING = ("the app needs the [app] extra ({name} is not installed): pip install 'seg4diff-fast[app]'")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")


def check_extra() -> None:
    """Raise :class:`CLIError` when the [app] extra (gradio) is missing."""
    import importlib.util

    for name in ("gradio",):
        if importlib.util.find_spec(name) is None:
            raise CLIError(EXTRA_MISSING.format(name=name))


def run(args: argparse.Namespace) -> int:
    """Serve the app until interrupted; 2 on a usage error (missing extra, bad model, port in use)."""
    if not 0 < int(args.port) < 65536:
        return fail("app", f"--port {args.port}: give a port in 1..65535")
    try:
        check_extra()
    except CLIError as e:
        return fail("app", str(e))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from .app import ui
        from .app.logic import AppModel
    except ImportError as e:
        return fail("app", EXTRA_MISSING.format(name=e.name or "a dependency"))
    print(f"seg4diff-fast app: loading {args.model or 'the embedded ShapesWorld pipeline'} ...", file=sys.stderr)
    try:
        model = AppModel.from_args(args)
    except CLIError as e:
        return fail("app", str(e))
    demo = ui.build_app(model)
    print(f"seg4diff-fast app: {model.describe().replace('**', '')}", file=sys.stderr)
    print(f"seg4diff-fast app: serving on http://{args.host}:{args.port}/ (Ctrl+C stops it)", file=sys.stderr)
    _stop_on_sigterm()
    try:
        ui.launch(demo, args.host, args.port, block=True)
    except OSError as e:
        return fail("app", f"cannot listen on {args.host}:{args.port} ({e}); pass another --port")
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, ``kill``) stops the server as Ctrl+C does: closed cleanly, exit 0."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    """``python -m seg4diff_fast.cli_app [options]``: the same as ``seg4diff-fast app``."""
    p = argparse.ArgumentParser(prog="seg4diff-fast app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
