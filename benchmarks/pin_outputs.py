"""Pin the package's outputs on the embedded ShapesWorld model (and the tiny offline SD3 pipelines), to prove
a refactor bit-identical.

    python benchmarks/pin_outputs.py --out before.pt          # compute everything, torch.save one dict
    python benchmarks/pin_outputs.py --compare before.pt after.pt   # per key: identical or the max |diff|

Only public API is used (``Seg4DiffSegmenter``, ``seg4diff_fast.shapes``, ``seg4diff_fast.testing``,
``label_images``, ``seg4diff_fast.eval``, ``seg4diff_fast.shapes.train.evaluate_grounding``, the
``seg4diff-fast demo`` command, ``seg4diff_fast.magnet``). CPU, one thread, every section seeded on entry.
Each section runs in its own try/except: a failure is recorded under ``<section>/__error__`` (so a renamed
API shows up as a difference, not a crash) and printed loudly. Values that legitimately change between runs
(timings, temporary paths, library versions, the model folder's path) are left out; PNG outputs are pinned
as decoded arrays (plus mode and size), not as raw bytes.

``--compare`` exits 1 if any key differs, is missing on one side, or holds a recorded exception.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

N_SCENES = 6
TMP_ROOT: str | None = None  # replaced by "<TMP>" in recorded exception texts
ERRORS: list[str] = []


# ------------------------------------------------------------------------------------------------------------
# helpers
def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _scrub(text: str) -> str:
    if TMP_ROOT:
        text = text.replace(TMP_ROOT, "<TMP>")
    return text


def tmpdir(name: str) -> str:
    d = os.path.join(TMP_ROOT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def to_value(x: Any) -> Any:
    """Make a value picklable and comparable: tensors detached on the CPU, tuples as lists, dataclass-like
    results as dicts by the caller."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {str(k): to_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_value(v) for v in x]
    return x


_MISSING = "<attribute missing>"


def seg_result(r: Any) -> dict[str, Any]:
    """A SegmentationResult's fields (a renamed field records as missing)."""
    return {f: to_value(getattr(r, f, _MISSING)) for f in ("label_map", "scores", "confidence", "classes", "prompts",
                                                            "layers")}


def unsup_result(r: Any) -> dict[str, Any]:
    out = {f: to_value(getattr(r, f, _MISSING)) for f in ("label_map", "segments", "groups", "layers")}
    out["num_segments"] = to_value(getattr(r, "num_segments", _MISSING))
    return out


def png_record(path: str) -> dict[str, Any]:
    from PIL import Image

    with Image.open(path) as im:
        rec = {"mode": im.mode, "size": list(im.size), "array": np.array(im)}
        if im.mode == "P":
            rec["palette"] = np.array(im.getpalette() or [], dtype=np.int64)
    return rec


def folder_pngs(folder: str) -> dict[str, Any]:
    """Every PNG under ``folder`` (relative path → decoded record), and the sorted file list."""
    files = []
    for dp, dns, fns in os.walk(folder):
        dns.sort()
        for f in sorted(fns):
            files.append(os.path.relpath(os.path.join(dp, f), folder))
    out: dict[str, Any] = {"files": sorted(files)}
    for rel in sorted(files):
        if rel.endswith(".png"):
            out["png/" + rel] = png_record(os.path.join(folder, rel))
    return out


def shapes_pipe():
    from seg4diff_fast.shapes import load_pipeline

    return load_pipeline()


def shapes_segmenter(pipe, **kw):
    from seg4diff_fast import Seg4DiffSegmenter
    from seg4diff_fast.shapes import EXPERT_LAYER, SIZE, T5_LENGTH

    kw.setdefault("layer", EXPERT_LAYER)
    return Seg4DiffSegmenter(pipe, resolution=SIZE, t5_length=T5_LENGTH, **kw)


def scenes(seeds) -> list[Any]:
    from seg4diff_fast.shapes import ShapesWorld

    return [ShapesWorld(int(s)).sample() for s in seeds]


# ------------------------------------------------------------------------------------------------------------
# sections: each returns a (nested) dict of values
def sec_env() -> dict[str, Any]:
    from seg4diff_fast.ops.upsample_argmax import has_cpp_extension

    return {"cpp_extension": bool(has_cpp_extension()), "torch_threads": torch.get_num_threads()}


def sec_scenes() -> dict[str, Any]:
    out = {}
    for i, s in enumerate(scenes(range(N_SCENES))):
        out[f"scene{i}"] = {"image": np.array(s.image), "classes": list(s.classes), "caption": s.caption,
                            "label_map": s.label_map}
    return out


def sec_shapes_segment() -> dict[str, Any]:
    from seg4diff_fast import Seg4DiffSegmenter
    from seg4diff_fast.shapes import EXPERT_LAYER, SIZE

    pipe = shapes_pipe()
    sc = scenes(range(N_SCENES))
    out: dict[str, Any] = {}
    seg = shapes_segmenter(pipe)
    out["timestep"], out["sigma"] = float(seg.timestep), float(seg.sigma)
    # batched (default batch_size 4: two batches), each scene its own class list (background included)
    res = seg([s.image for s in sc], classes=[list(s.classes) for s in sc])
    out["batched"] = {f"scene{i}": seg_result(r) for i, r in enumerate(res)}
    # one image alone, object classes only
    out["single_objects"] = seg_result(seg(sc[0].image, classes=list(sc[0].object_classes)))
    # the model's defaults (layer / resolution / t5_length read from the model)
    seg_d = Seg4DiffSegmenter(pipe)
    out["defaults"] = {"layers": list(seg_d.layers), "resolution": seg_d.resolution, "t5_length": seg_d.t5_length,
                       "scene1": seg_result(seg_d(sc[1].image, classes=list(sc[1].classes)))}
    # per layer over every block, 3 scenes
    n_layers = seg.num_layers
    res = seg([s.image for s in sc[:3]], classes=[list(s.classes) for s in sc[:3]], per_layer=True,
              layers=list(range(n_layers)))
    out["per_layer"] = {f"scene{i}": {f"layer{k}": seg_result(v) for k, v in sorted(r.items())}
                        for i, r in enumerate(res)}
    # several layers averaged
    seg_multi = shapes_segmenter(pipe, layer=[EXPERT_LAYER, 3])
    out["layers_mean"] = seg_result(seg_multi(sc[2].image, classes=list(sc[2].classes)))
    # chunked vocabulary: every world class, a few content tokens per prompt
    from seg4diff_fast.shapes import CLASSES

    vocab = list(CLASSES)
    for merge in ("image-mass", "none"):
        segc = shapes_segmenter(pipe, max_prompt_tokens=3, chunk_merge=merge)
        res = segc([s.image for s in sc[:3]], classes=vocab)
        out[f"chunked_{merge}"] = {f"scene{i}": seg_result(r) for i, r in enumerate(res)}
    segc = shapes_segmenter(pipe, max_prompt_tokens=3)
    out["chunked_default_merge"] = {"scene0": seg_result(segc(sc[0].image, classes=vocab))}
    # unsupervised, 3 scenes (+ per layer for one)
    res = seg.unsupervised([s.image for s in sc[:3]])
    out["unsupervised"] = {f"scene{i}": unsup_result(r) for i, r in enumerate(res)}
    r = seg.unsupervised(sc[3].image, per_layer=True, layers=list(range(n_layers)))
    out["unsupervised_per_layer"] = {f"layer{k}": unsup_result(v) for k, v in sorted(r.items())}
    # other capture modes and head reductions
    for name, kw in (("logits", {"mode": "logits"}), ("sel_probs", {"mode": "sel_probs"}),
                     ("head_max", {"head_reduce": "max"})):
        s2 = shapes_segmenter(pipe, **kw)
        res = s2([s.image for s in sc[:2]], classes=[list(s.classes) for s in sc[:2]])
        out[name] = {f"scene{i}": seg_result(r) for i, r in enumerate(res)}
    # another seed / noise level, no early exit, batch size 1, non-square input of another size
    s3 = shapes_segmenter(pipe, seed=7, noise_step=4, early_exit=False, batch_size=1)
    img = sc[4].image.resize((48, 40))
    out["seed7_noise4_noexit"] = seg_result(s3(img, classes=list(sc[4].classes)))
    out["size"] = SIZE
    return out


def sec_tiny_sd3() -> dict[str, Any]:
    from seg4diff_fast import Seg4DiffSegmenter
    from seg4diff_fast.testing import tiny_sd3_pipeline

    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(1234)
    images = [torch.rand(3, 40, 50, generator=gen), torch.rand(3, 32, 32, generator=gen),
              torch.rand(3, 24, 36, generator=gen)]
    classes = ["cat", "sofa", "grass", "sky"]
    seed_all(0)
    pipe = tiny_sd3_pipeline(t5=False)
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=32)
    out["no_t5"] = {f"img{i}": seg_result(r) for i, r in enumerate(seg(images, classes=classes))}
    out["no_t5_unsup"] = {f"img{i}": unsup_result(r) for i, r in enumerate(seg.unsupervised(images[:2]))}
    seg2 = Seg4DiffSegmenter(pipe, layer=[0, 1, 2], resolution=32)
    r = seg2(images[0], classes=classes, per_layer=True)
    out["no_t5_per_layer"] = {f"layer{k}": seg_result(v) for k, v in sorted(r.items())}
    seed_all(0)
    pipe5 = tiny_sd3_pipeline(t5=True)
    seg5 = Seg4DiffSegmenter(pipe5, layer=1, resolution=32, use_t5=True, t5_length=16)
    out["t5"] = {f"img{i}": seg_result(r) for i, r in enumerate(seg5(images, classes=classes))}
    seg5z = Seg4DiffSegmenter(pipe5, layer=1, resolution=32)
    out["t5_pipe_zero_t5"] = {f"img{i}": seg_result(r) for i, r in enumerate(seg5z(images[:2], classes=classes))}
    return out


def sec_label() -> dict[str, Any]:
    from seg4diff_fast import label_images

    sc = scenes(range(N_SCENES))
    src = tmpdir("label_in")
    os.makedirs(os.path.join(src, "sub"))
    for i, s in enumerate(sc):
        rel = f"sub/scene_{i:02d}.png" if i % 2 else f"scene_{i:02d}.png"
        img = s.image if i != 5 else s.image.resize((40, 28))
        img.save(os.path.join(src, rel))
    classes = ["background", "red circle", "blue square", "green triangle", "yellow circle", "red square"]
    out: dict[str, Any] = {}
    pipe = shapes_pipe()
    runs = (("plain", {}, {"batch_size": 4}), ("chunked", {"max_prompt_tokens": 3}, {"batch_size": 2}))
    for name, seg_kw, run_kw in runs:
        seg = shapes_segmenter(pipe, **seg_kw)
        dst = tmpdir(f"label_out_{name}")
        summary = label_images(src, classes, dst, segmenter=seg, workers=0, confidence=True, coco=True,
                               progress=False, **run_kw)
        rec: dict[str, Any] = {"summary": {k: getattr(summary, k, _MISSING)
                                           for k in ("images", "labeled", "skipped", "errors")}}
        rec.update(folder_pngs(dst))
        for fname in ("coco.json", "labels.json"):
            p = os.path.join(dst, fname)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    d = json.load(f)
                for k in ("versions", "model", "date", "date_created", "time", "seconds"):
                    d.pop(k, None)
                if isinstance(d.get("info"), dict):
                    for k in ("date_created", "year"):
                        d["info"].pop(k, None)
                rec[fname] = to_value(d)
        p = os.path.join(dst, "errors.jsonl")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                rec["errors.jsonl"] = _scrub(f.read())
        out[name] = rec
    return out


def sec_eval_layers() -> dict[str, Any]:
    from seg4diff_fast.eval.layers import attention_block_mass

    try:  # the ShapesWorld grounding sweep moved to shapes.grounding (issue 11)
        from seg4diff_fast.shapes.grounding import layer_sweep
    except ImportError:
        from seg4diff_fast.eval.layers import layer_sweep

    pipe = shapes_pipe()
    sc = scenes(range(100, 108))
    out = {"mass": to_value(attention_block_mass(pipe, [s.image for s in sc], [s.caption for s in sc]))}
    out["mass_one_prompt"] = to_value(attention_block_mass(pipe, [s.image for s in sc[:3]], "red circle on background"))
    out["sweep"] = to_value(layer_sweep(pipe, sc))
    out["sweep_mean_only"] = to_value(layer_sweep(pipe, sc, per_head=False, layers=[0, 1, 2], batch_size=3))
    return out


def sec_grounding() -> dict[str, Any]:
    from seg4diff_fast.shapes import SIZE, T5_LENGTH
    from seg4diff_fast.shapes.train import evaluate_grounding

    pipe = shapes_pipe()
    return to_value(evaluate_grounding(pipe, scenes(range(20)), SIZE, T5_LENGTH))


def sec_eval_runner() -> dict[str, Any]:
    from PIL import Image

    from seg4diff_fast.eval import SegDataset, evaluate
    from seg4diff_fast.shapes import CLASSES

    root = tmpdir("eval_ds")
    img_dir, lab_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    os.makedirs(img_dir)
    os.makedirs(lab_dir)
    for i, s in enumerate(scenes(range(200, 206))):
        s.image.save(os.path.join(img_dir, f"s{i:02d}.png"))
        gt = s.global_label_map().astype(np.uint8)
        if i == 3:
            gt[:4, :4] = 255  # some ignored pixels
        Image.fromarray(gt, "L").save(os.path.join(lab_dir, f"s{i:02d}.png"))
    ds = SegDataset(img_dir, lab_dir, list(CLASSES), background=0, name="shapes-folder")
    ds_nobg = SegDataset(img_dir, lab_dir, list(CLASSES), name="shapes-folder-nobg")
    pipe = shapes_pipe()
    seg = shapes_segmenter(pipe)
    out = {
        "open_vocab": evaluate(seg, ds, progress=False),
        "open_vocab_all_classes": evaluate(seg, ds, gt_only=False, progress=False, batch_size=2),
        "open_vocab_sweep": evaluate(seg, ds, layers="all", progress=False),
        "open_vocab_nobg": evaluate(seg, ds_nobg, progress=False, limit=4),
        "unsupervised": evaluate(seg, ds, protocol="unsupervised", progress=False),
        "unsupervised_sweep": evaluate(seg, ds, protocol="unsupervised", layers="all", progress=False),
        "unsupervised_thr": evaluate(seg, ds, protocol="unsupervised", threshold=0.3, power=2.0, progress=False),
    }
    return to_value(out)


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """The ``seg4diff-fast`` console script's entry point, in this process (stdout captured)."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "seg4diff-fast"]
    if eps:
        main = eps[0].load()
    else:  # not installed: the module the README names
        from seg4diff_fast.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return int(rc or 0), buf.getvalue()


def sec_demo() -> dict[str, Any]:
    out_dir = tmpdir("demo_out")
    rc, _ = _run_cli(["demo", "--out", out_dir])
    out: dict[str, Any] = {"rc": rc}
    with open(os.path.join(out_dir, "demo.json"), encoding="utf-8") as f:
        rec = json.load(f)
    for k in ("seconds", "scenes_dir", "model_path", "version", "torch", "machine"):
        rec.pop(k, None)
    if isinstance(rec.get("core_op"), dict):
        rec["core_op"].pop("seconds", None)
    out["demo.json"] = to_value(rec)
    md = os.path.join(out_dir, "demo.md")
    if os.path.isfile(md):
        with open(md, encoding="utf-8") as f:
            out["demo.md"] = _scrub(f.read())
    out.update(folder_pngs(out_dir))
    return out


class _MatchedShapes(torch.utils.data.Dataset):
    """ShapesWorld scenes as "matched" (SA-1B-style) MAGNET samples: the caption as prompt, the object masks
    (and the background's) without names."""

    def __init__(self, n: int, seed: int = 1_000_000):
        self.n, self.seed = n, seed
        self.size = 32

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from seg4diff_fast.magnet import MagnetSample
        from seg4diff_fast.shapes import ShapesWorld

        s = ShapesWorld(self.seed + int(i)).sample()
        masks = np.stack([s.label_map == 0] + [np.asarray(m, bool) for m in s.masks])
        return MagnetSample(s.image, s.caption + ".", masks, None, f"matched:{self.seed + int(i)}")


def _magnet_run(name: str, data: Any, **cfg_kw) -> dict[str, Any]:
    from safetensors.torch import load_file

    from seg4diff_fast.magnet import MagnetConfig, train_magnet
    from seg4diff_fast.shapes import SIZE

    seed_all(0)
    pipe = shapes_pipe()
    kw = {"layer": 2, "rank": 4, "max_steps": 4, "batch_size": 2, "resolution": SIZE, "num_workers": 0, "lr": 3e-3,
          "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "seed": 0}
    kw.update(cfg_kw)
    cfg = MagnetConfig(**kw)
    out_dir = tmpdir(f"magnet_{name}")
    steps: list[Any] = []
    summary = train_magnet(pipe, data, cfg, out_dir, progress=False,
                           on_step=lambda s, losses: steps.append([int(s), to_value(dict(losses))]))
    rec: dict[str, Any] = {k: to_value(summary.get(k, _MISSING)) for k in ("steps", "resumed_from", "final", "totals",
                                                                            "skipped")}
    cfg_out = dict(summary.get("config", {}))
    rec["config"] = to_value(cfg_out)
    rec["on_step"] = steps
    log_lines = []
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            for k in ("time", "steps_per_s", "seconds"):
                d.pop(k, None)
            log_lines.append(d)
    rec["log"] = to_value(log_lines)
    files = sorted(f for f in os.listdir(out_dir))
    rec["files"] = files
    for f in files:
        p = os.path.join(out_dir, f)
        if f.endswith(".safetensors"):
            rec[f] = {k: v.clone() for k, v in sorted(load_file(p).items())}
        elif f.endswith(".json") and f != "summary.json":
            with open(p, encoding="utf-8") as fh:
                rec[f] = to_value(json.load(fh))
        elif f.endswith(".pt"):  # the last checkpoint: LoRA, head, optimizer and scheduler state, step
            state = torch.load(p, map_location="cpu", weights_only=False)
            rec[f] = to_value({k: state[k] for k in ("step", "lora", "head", "optimizer", "scheduler", "config")
                               if k in state})
    # the saved LoRA in a fresh stock pipeline, segmenting at the trained block
    try:
        seed_all(0)
        pipe2 = shapes_pipe()
        pipe2.load_lora_weights(out_dir)
        seg = shapes_segmenter(pipe2, layer=cfg.layer)
        sc = scenes(range(2))
        res = seg([s.image for s in sc], classes=[list(s.classes) for s in sc])
        rec["reloaded_segment"] = {f"scene{i}": seg_result(r) for i, r in enumerate(res)}
    except Exception as e:  # noqa: BLE001
        rec["reloaded_segment"] = _error_text(e)
        _warn(f"magnet/{name}/reloaded_segment", e)
    return rec


def sec_magnet() -> dict[str, Any]:
    from seg4diff_fast.magnet import ShapesMagnetData

    out: dict[str, Any] = {}
    runs = (
        ("direct_conv_head", lambda: ShapesMagnetData(n=16), {}),
        ("direct_background_no_head", lambda: ShapesMagnetData(n=16, include_background=True), {"conv_head": False}),
        ("matched", lambda: _MatchedShapes(12), {}),
        ("matched_mean_accum", lambda: _MatchedShapes(12), {"head_reduce": "mean", "grad_accum": 2, "max_steps": 2,
                                                            "conv_head": False}),
    )
    for name, make, kw in runs:
        try:
            out[name] = _magnet_run(name, make(), **kw)
        except Exception as e:  # noqa: BLE001
            out[name] = {"__error__": _error_text(e)}
            _warn(f"magnet/{name}", e)
    # the first run again in this process: training must repeat itself exactly
    try:
        again = _magnet_run("direct_conv_head_again", ShapesMagnetData(n=16))
        first: dict[str, Any] = {}
        second: dict[str, Any] = {}
        flatten("", out.get("direct_conv_head", {}), first)
        flatten("", again, second)
        out["repeat_in_process_differs"] = sorted(
            k for k in set(first) | set(second) if k not in first or k not in second or not equal(first[k], second[k]))
    except Exception as e:  # noqa: BLE001
        out["repeat_in_process_differs"] = _error_text(e)
        _warn("magnet/repeat", e)
    return out


SECTIONS = [
    ("env", sec_env),
    ("scenes", sec_scenes),
    ("shapes_segment", sec_shapes_segment),
    ("tiny_sd3", sec_tiny_sd3),
    ("label", sec_label),
    ("eval_layers", sec_eval_layers),
    ("grounding", sec_grounding),
    ("eval_runner", sec_eval_runner),
    ("demo", sec_demo),
    ("magnet", sec_magnet),
]


# ------------------------------------------------------------------------------------------------------------
# running
def _error_text(e: BaseException) -> str:
    return "EXCEPTION " + _scrub(f"{type(e).__name__}: {e}")


def _warn(where: str, e: BaseException) -> None:
    msg = f"{where}: {type(e).__name__}: {e}"
    ERRORS.append(msg)
    bar = "!" * 100
    print(f"\n{bar}\n!!! SECTION FAILED: {_scrub(msg)}\n{bar}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    print(bar + "\n", file=sys.stderr)


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        if not value:
            out[prefix] = {}
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, out)
    else:
        out[prefix] = value


def run_all(path: str, only: list[str] | None) -> int:
    global TMP_ROOT
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    try:
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    try:
        import seg4diff_fast

        pkg_file = os.path.abspath(seg4diff_fast.__file__)
    except Exception as e:  # noqa: BLE001  (every section then records its own failure)
        _warn("import seg4diff_fast", e)
        pkg_file = None
    print(f"seg4diff_fast from {pkg_file and os.path.dirname(pkg_file)}", file=sys.stderr)
    TMP_ROOT = tempfile.mkdtemp(prefix="pin_outputs_")
    results: dict[str, Any] = {}
    times = {}
    t_all = time.perf_counter()
    try:
        for name, fn in SECTIONS:
            if only and name not in only:
                continue
            seed_all(0)
            t0 = time.perf_counter()
            try:
                value = fn()
            except Exception as e:  # noqa: BLE001
                value = {"__error__": _error_text(e)}
                _warn(name, e)
            times[name] = time.perf_counter() - t0
            print(f"[{name}] {times[name]:.1f} s", file=sys.stderr)
            flatten(name, to_value(value), results)
    finally:
        shutil.rmtree(TMP_ROOT, ignore_errors=True)
    # every seg4diff_fast module must come from the tree under test (an editable install's finder can serve a
    # submodule, e.g. seg4diff_fast.kernels, from another checkout when PYTHONPATH points at a copy)
    root = os.path.dirname(os.path.dirname(pkg_file)) if pkg_file else ""
    foreign = sorted(f"{m} ({getattr(mod, '__file__', None)})" for m, mod in list(sys.modules.items())
                     if pkg_file and m.startswith("seg4diff_fast") and getattr(mod, "__file__", None)
                     and not os.path.abspath(mod.__file__).startswith(root + os.sep))
    if foreign:
        print(f"!!! WARNING: modules loaded from outside {root}: {foreign}", file=sys.stderr)
    torch.save(results, path)
    total = time.perf_counter() - t_all
    print(f"wrote {len(results)} keys to {path} in {total:.1f} s", file=sys.stderr)
    if ERRORS:
        print(f"!!! {len(ERRORS)} section(s) FAILED:", file=sys.stderr)
        for e in ERRORS:
            print(f"!!!   {_scrub(e)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------------------
# comparing
def _max_abs_diff(a: Any, b: Any) -> float | None:
    try:
        ta = torch.as_tensor(np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64))
        tb = torch.as_tensor(np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64))
        if ta.shape != tb.shape:
            return None
        if ta.numel() == 0:
            return 0.0
        d = (ta - tb).abs()
        both_nan = torch.isnan(ta) & torch.isnan(tb)
        d = torch.where(both_nan, torch.zeros_like(d), d)
        return float(d.max())
    except Exception:  # noqa: BLE001
        return None


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(torch.equal(a, b) or ((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return False
    return bool(a == b)


def _short(x: Any) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__}{tuple(x.shape)} {x.dtype}"
    s = repr(x)
    return s if len(s) <= 160 else s[:157] + "..."


def _has_error(x: Any) -> bool:
    return isinstance(x, str) and x.startswith("EXCEPTION ")


def compare(path_a: str, path_b: str, quiet: bool) -> int:
    a = torch.load(path_a, map_location="cpu", weights_only=False)
    b = torch.load(path_b, map_location="cpu", weights_only=False)
    keys = list(a) + [k for k in b if k not in a]
    n_same = n_diff = n_err = 0
    # keys on one side only, grouped by their first two path parts (a failed section loses all of its keys)
    groups: dict[tuple[str, str], list[str]] = {}
    for k in keys:
        if (k in a) != (k in b) and not _has_error(a.get(k, b.get(k))):
            groups.setdefault(("/".join(k.split("/")[:2]), path_a if k in a else path_b), []).append(k)
    for (prefix, where), ks in groups.items():
        n_diff += len(ks)
        if len(ks) <= 3:
            for k in ks:
                print(f"DIFF     {k}: only in {where}")
        else:
            print(f"DIFF     {prefix}/...: {len(ks)} keys only in {where} (e.g. {ks[0]})")
    for k in keys:
        if k not in a or k not in b:
            v = a[k] if k in a else b[k]
            if _has_error(v):
                n_err += 1
                print(f"ERROR    {k}: only in {path_a if k in a else path_b}: {_short(v)}")
            continue
        va, vb = a[k], b[k]
        if _has_error(va) or _has_error(vb):
            n_err += 1
            print(f"ERROR    {k}: A={_short(va)} | B={_short(vb)}")
            continue
        if equal(va, vb):
            n_same += 1
            if not quiet:
                print(f"same     {k}")
            continue
        n_diff += 1
        d = _max_abs_diff(va, vb)
        if isinstance(va, str) and isinstance(vb, str):
            i = next((j for j, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
            print(f"DIFF     {k}: strings differ at char {i}: A ...{va[max(0, i - 30):i + 50]!r} | "
                  f"B ...{vb[max(0, i - 30):i + 50]!r}")
        elif d is not None:
            print(f"DIFF     {k}: max abs diff {d:.3g}  (A {_short(va)}, B {_short(vb)})")
        else:
            print(f"DIFF     {k}: A={_short(va)} | B={_short(vb)}")
    print(f"\n{n_same} keys bit-identical, {n_diff} differ, {n_err} hold a recorded exception "
          f"({len(keys)} keys: {len(a)} in A, {len(b)} in B)")
    return 1 if (n_diff or n_err) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="compute the outputs and torch.save them to this file")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files (exit 1 on a difference)")
    p.add_argument("--only", nargs="*", help=f"sections to run (default all: {[n for n, _ in SECTIONS]})")
    p.add_argument("--quiet", action="store_true", help="--compare: print only the differing keys")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare, quiet=args.quiet)
    return run_all(args.out, args.only)


if __name__ == "__main__":
    raise SystemExit(main())
