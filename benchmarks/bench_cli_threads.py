"""CPU threads × loader workers: `label`, `eval --layers all` and `magnet` on a quiet and a loaded machine.

Each command runs in a fresh process on the embedded ShapesWorld pipeline, once per setting, ``--repeats``
times; settings are (torch threads, loader workers): threads through ``OMP_NUM_THREADS`` (torch reads it at
start; the planned default honours it too), workers through ``--workers``, so that the same settings run on
this tree and on an old one (``--tree /tmp/head``, e.g. ``git worktree add /tmp/head HEAD``). The ``before``
setting is the old behaviour (torch's default threads = the cores; ``label`` with 4 workers), ``default``
runs the tree's command with no thread or worker option at all, ``plan`` applies
``plan_parallelism()`` first (what every command does once it calls ``cli_common.parallelism``; the JSON
records the threads, workers and idle cores it chose).

- ``label``: ``--images`` ShapesWorld scenes (JPEG, ``--size``²), classes "red circle,blue square,yellow
  triangle,background"; time = the labeling's own seconds from its summary line (after loading);
- ``eval``: the same scenes as a ``--dataset folder`` (13 ShapesWorld classes), ``--layers all``; time =
  the evaluation loop (images / the progress bar's final rate);
- ``magnet``: ``--data shapes --max-steps 40``; time = training (its "N steps in X s" line), plus its final
  loss.

Start-up (imports, model loading) is left out of the times (``wall_s`` has the whole process): on a busy
machine it varies more than the work measured.

``--load N`` runs N busy loops (``python -c 'while True: pass'``, this script's children, killed at the
end) for the whole measurement: a machine whose cores are all taken by other work.

    python benchmarks/bench_cli_threads.py                              # -> out/bench/cli_threads_cpu.json
    python benchmarks/bench_cli_threads.py --load 2 --save              # -> benchmarks/results/cli_threads_cpu.json
    python benchmarks/bench_cli_threads.py --commands label --tree /tmp/head

Results are merged into the JSON under ``"quiet"`` / ``"loaded-N"`` (and the tree's label), so quiet and
loaded runs of both trees add up to one file. Without ``--save`` they go to ``out/bench/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRATCH = os.path.join(ROOT, "out", "bench")  # git-ignored (/out/)
LABEL_CLASSES = "red circle,blue square,yellow triangle,background"

# name -> (threads or None for torch's default, workers or None for the command's default[, extra environment])
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}  # OpenMP threads sleep instead of spinning while they wait
SETTINGS = {
    "label": {"before": ("cores", 4), "default": (None, None), "plan": (None, "plan"), "2t-0w": (2, 0),
              "1t-0w": (1, 0), "1t-1w": (1, 1), "2t-0w-passive": (2, 0, PASSIVE)},
    "eval": {"default": (None, None), "plan": (None, "plan"), "2t": (2, None), "1t": (1, None),
             "2t-passive": (2, None, PASSIVE)},
    "magnet": {"default": (None, None), "plan": (None, "plan"), "2t": (2, None), "1t": (1, None),
               "2t-passive": (2, None, PASSIVE)},
}
# "plan": what a command does once it calls seg4diff_fast.cli_common.parallelism(args) (the new default), run on
# a tree whose commands may not call it yet: plan_parallelism() applied, its workers passed on
PLAN = """import sys
from seg4diff_fast import cli
from seg4diff_fast.utils.parallel import plan_parallelism
name = sys.argv[1]
p = plan_parallelism(uses_workers=name != "eval").apply()
print("PLAN", p.threads, p.workers, p.idle, file=sys.stderr)
sys.exit(cli.main(sys.argv[1:] + (["--workers", str(p.workers)] if name != "eval" else [])))
"""


TIMED = {"label": "labeling (its summary line)", "eval": "the evaluation loop (its progress bar's rate)",
         "magnet": "training (its 'N steps in X s' line)"}


def make_scenes(folder: str, n: int, size: int) -> tuple[str, str, str]:
    """ShapesWorld scenes: images/NAME.jpg, labels/NAME.png (ids into CLASSES), classes.json."""
    import numpy as np
    from PIL import Image

    from seg4diff_fast.shapes import CLASSES, ShapesWorld

    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    world = ShapesWorld(0, size=size)
    for i, scene in enumerate(world.samples(n)):
        scene.image.save(os.path.join(images, f"scene{i:03d}.jpg"), quality=95)
        Image.fromarray(scene.global_label_map().astype(np.uint8)).save(os.path.join(labels, f"scene{i:03d}.png"))
    classes = os.path.join(folder, "classes.json")
    with open(classes, "w") as f:
        json.dump(list(CLASSES), f)
    return images, labels, classes


def command(name: str, data: tuple[str, str, str], out: str) -> list[str]:
    images, labels, classes = data
    if name == "label":
        return ["label", "--images", images, "--classes", LABEL_CLASSES, "--out", out, "--no-progress"]
    if name == "eval":
        return ["eval", "--dataset", "folder", "--images", images, "--labels", labels, "--classes", classes,
                "--layers", "all", "--out", os.path.join(out, "results.json")]  # its time: the progress bar's rate
    if name == "magnet":
        return ["magnet", "--data", "shapes", "--max-steps", "40", "--out", out, "--no-progress"]
    raise ValueError(name)


def run_once(tree: str, name: str, setting: tuple, data, tmp: str, cores: int) -> dict:
    threads, workers = setting[:2]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    env.update(setting[2] if len(setting) > 2 else {})
    env["PYTHONPATH"] = tree
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(cores if threads == "cores" else threads)
    out = tempfile.mkdtemp(dir=tmp)
    argv = command(name, data, out)
    run = [sys.executable, "-m", "seg4diff_fast.cli"]
    if workers == "plan":
        run = [sys.executable, "-c", PLAN]
    elif workers is not None:
        argv += ["--workers", str(workers)]
    t0 = time.perf_counter()
    p = subprocess.run([*run, *argv], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} {setting} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    r = {"wall_s": round(wall, 2)}
    if name == "label":
        m = re.search(r"(\d+) labeled.*?([\d.]+) s, ([\d.]+) images/s", p.stdout)  # the rate has more digits
        r["label_s"], r["images_per_s"] = round(int(m.group(1)) / float(m.group(3)), 3), float(m.group(3))
    if name == "eval":  # the bar's last line: "50/50 [00:05<00:00, 9.12img/s]"
        m = re.findall(r"(\d+)/\d+ \[[^\]]*?,\s*([\d.]+)(img/s|s/img)\]", p.stderr)[-1]
        r["eval_s"] = round(int(m[0]) / float(m[1]) if m[2] == "img/s" else int(m[0]) * float(m[1]), 2)
    if name == "magnet":
        m = re.search(r"(\d+) steps in ([\d.]+) s", p.stdout)
        r["train_s"] = float(m.group(2))
        m = re.search(r"final loss ([\d.]+)", p.stdout)
        r["final_loss"] = float(m.group(1)) if m else None
    r["dataloader_warnings"] = p.stderr.count("This DataLoader will create")
    m = re.search(r"PLAN (\d+) (\d+) (\S+)", p.stderr)
    if m:
        r["plan"] = [int(m.group(1)), int(m.group(2)), None if m.group(3) == "None" else float(m.group(3))]
    return r


def start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def tree_label(tree: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.path.basename(tree)
    return rev + ("+changes" if dirty else "")


def bench(args) -> dict:
    sys.path.insert(0, ROOT)
    from seg4diff_fast.utils.parallel import available_cores

    cores = available_cores()
    tree = os.path.abspath(args.tree)
    os.makedirs(SCRATCH, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        data = make_scenes(os.path.join(tmp, "scenes"), args.images, args.size)
        load = start_load(args.load) if args.load else []
        try:
            if load:
                time.sleep(2)
            load1 = os.getloadavg()[0]
            for name in args.commands.split(","):
                wanted = [k for k in (args.settings.split(",") if args.settings else SETTINGS[name])
                          if k in SETTINGS[name]]
                runs: dict[str, list] = {k: [] for k in wanted}
                for _ in range(args.repeats):  # interleaved: a change of the machine's load hits every setting
                    for key in wanted:
                        runs[key].append(run_once(tree, name, SETTINGS[name][key], data, tmp, cores))
                for key in wanted:
                    main_key = {"label": "label_s", "eval": "eval_s", "magnet": "train_s"}[name]
                    times = [r[main_key] for r in runs[key]]
                    row = {"threads": SETTINGS[name][key][0], "workers": SETTINGS[name][key][1],
                           "env": SETTINGS[name][key][2] if len(SETTINGS[name][key]) > 2 else {},
                           "seconds": times, "median_s": round(statistics.median(times), 2),
                           "timed": TIMED[name], "wall_s": [r["wall_s"] for r in runs[key]]}
                    if name == "label":
                        row["images_per_s"] = round(args.images / statistics.median(times), 1)
                    if name == "magnet":
                        row["final_loss"] = [r["final_loss"] for r in runs[key]]
                    row["dataloader_warnings"] = max(r["dataloader_warnings"] for r in runs[key])
                    if "plan" in runs[key][0]:
                        row["plan_threads_workers_idle"] = [r["plan"] for r in runs[key]]
                    results.setdefault(name, {})[key] = row
                    print(json.dumps({"command": name, "setting": key, **row}), flush=True)
            load1_end = os.getloadavg()[0]
        finally:
            stop_load(load)
    return {"cores": cores, "load": args.load, "loadavg_1min": [round(load1, 2), round(load1_end, 2)],
            "results": results}


def decisions(repeats: int = 10) -> dict:
    """What ``plan_parallelism()`` chooses with 0, 1, 2 busy loops running (``repeats`` calls each, 0.3 s apart)."""
    sys.path.insert(0, ROOT)
    from seg4diff_fast.utils.parallel import plan_parallelism

    out = {}
    for n in (0, 1, 2):
        load = start_load(n)
        try:
            time.sleep(1.0)
            plans = []
            for _ in range(repeats):
                plans.append(plan_parallelism())
                time.sleep(0.3)
        finally:
            stop_load(load)
        out[f"busy_loops={n}"] = {"threads": [p.threads for p in plans], "workers": [p.workers for p in plans],
                                  "idle_cores": [p.idle for p in plans]}
        print(n, json.dumps(out[f"busy_loops={n}"]), flush=True)
        time.sleep(1.0)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commands", default="eval,magnet", help="comma list of label, eval, magnet (label: "
                   "bench_label.py --threads-sweep runs it into label_cpu_threads.json)")
    p.add_argument("--settings", help="comma list of setting names to run (default: all of each command's)")
    p.add_argument("--tree", default=ROOT, help="the source tree to run (default: this one)")
    p.add_argument("--tree-name", help="its name in the JSON (default: its commit, +changes if modified)")
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--size", type=int, default=64, help="scene side in pixels (64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load", type=int, default=0, help="busy-loop processes running meanwhile (0: quiet)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/ (tracked) instead of out/bench/")
    p.add_argument("--json", help="output path (default: see --save)")
    p.add_argument("--decisions", action="store_true",
                   help="instead: what plan_parallelism() chooses with 0, 1 and 2 busy loops (JSON key 'decisions')")
    args = p.parse_args(argv)
    path = args.json or os.path.join(HERE, "results" if args.save else SCRATCH, "cli_threads_cpu.json")
    if args.decisions:
        doc = {}
        if os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
        doc["decisions"] = {"at": time.strftime("%Y-%m-%d %H:%M"), "loadavg_1min_before": os.getloadavg()[0],
                            **decisions()}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {path}")
        return doc
    r = bench(args)
    import torch

    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc.update({"torch": torch.__version__, "platform": platform.platform(), "cores": r["cores"],
                "model": "embedded ShapesWorld pipeline", "images": args.images, "size": args.size,
                "settings": {k: {s: list(v) for s, v in d.items()} for k, d in SETTINGS.items()},
                "settings_note": "[threads (OMP_NUM_THREADS; 'cores': their count; null: unset), workers (--workers; "
                                 "null: not given), extra environment]"})
    cond = "quiet" if not args.load else f"loaded-{args.load}"
    entry = doc.setdefault("runs", {}).setdefault(cond, {}).setdefault(
        args.tree_name or tree_label(os.path.abspath(args.tree)), {})
    measured = {"command": "python benchmarks/bench_cli_threads.py " + " ".join(
                    shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
                "loadavg_1min_start_end": r["loadavg_1min"], "at": time.strftime("%Y-%m-%d %H:%M")}
    for name, rows in r["results"].items():
        for row in rows.values():
            row["measured"] = measured  # settings measured together share it (interleaved)
        entry.setdefault(name, {}).update(rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    main()
