"""Threads × workers decided once from the cores (``plan_parallelism``), ``--version``'s report, and the
``label`` command's defaults in a real subprocess (no torch DataLoader warning, labels written).

No timings here: the speed goals live in ``benchmarks/bench_cli_threads.py`` (``benchmarks/LABEL.md``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast.cli_common import CLIError, add_parallel_arguments, parallelism
from seg4diff_fast.utils.parallel import Parallelism, available_cores, plan_parallelism

TORCH_WARNING = "This DataLoader will create"


@pytest.fixture
def no_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TRITON_INTERPRET")}
    env["PYTHONWARNINGS"] = "default"  # a warning torch issues would show, once per place
    return env


def test_defaults_never_exceed_the_cores(no_omp):
    for cores in (1, 2, 3, 4, 8, 16, 64, 256):
        for threads in (None, 1, 2, cores - 1, cores, cores + 3):
            if threads is not None and threads < 1:
                continue
            for uses in (True, False):
                p = plan_parallelism(threads, None, uses_workers=uses, cores=cores)
                assert p.threads >= 1 and p.workers >= 0
                assert p.threads + p.workers <= max(cores, threads or 0), (cores, threads, uses, p)
                if threads is not None:
                    assert p.threads == threads
                if not uses:
                    assert p.workers == 0
    assert plan_parallelism(cores=2) == Parallelism(threads=2, workers=0)  # 2 cores: no loader process
    assert plan_parallelism(cores=1) == Parallelism(threads=1, workers=0)
    assert plan_parallelism(cores=16) == Parallelism(threads=12, workers=4)
    assert plan_parallelism(cores=64).workers == 4
    assert plan_parallelism().threads + plan_parallelism().workers <= available_cores()


def test_explicit_values_win(no_omp, monkeypatch):
    assert plan_parallelism(3, 5, cores=2) == Parallelism(3, 5)
    assert plan_parallelism(None, 1, cores=2) == Parallelism(1, 1)
    assert plan_parallelism(1, None, cores=8) == Parallelism(1, 2)
    assert plan_parallelism(4, 3, uses_workers=False, cores=8) == Parallelism(4, 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the usual way to ask for one thread is kept
    assert plan_parallelism(cores=2) == Parallelism(1, 0)
    assert plan_parallelism(2, cores=2).threads == 2  # --threads beats the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert plan_parallelism(cores=2) == Parallelism(2, 0)


def test_busy_cores_take_threads_away(no_omp):
    """Threads fill only the cores idle now: another process's busy loop costs a thread, never the last one."""
    assert plan_parallelism(cores=2, idle=2.0) == Parallelism(2, 0)
    assert plan_parallelism(cores=2, idle=1.6) == Parallelism(2, 0)
    assert plan_parallelism(cores=2, idle=0.9) == Parallelism(1, 0)
    assert plan_parallelism(cores=2, idle=0.0) == Parallelism(1, 0)
    assert plan_parallelism(cores=16, idle=8.0) == Parallelism(4, 4)
    assert plan_parallelism(cores=16, idle=16.0) == Parallelism(12, 4)
    assert plan_parallelism(2, cores=2, idle=0.0) == Parallelism(2, 0)  # explicit wins
    assert plan_parallelism(cores=2, idle=0.0).idle == 0.0
    from seg4diff_fast.utils.parallel import idle_cores

    idle = idle_cores(0.05)
    assert idle is None or 0.0 <= idle <= available_cores()
    measured = plan_parallelism()
    assert 1 <= measured.threads <= available_cores() and (measured.idle is None) == (idle is None)


@pytest.mark.parametrize("threads,workers,flag", [(0, None, "--threads"), (-2, None, "--threads"),
                                                  (None, -1, "--workers"), ("many", None, "--threads"),
                                                  (1.5, None, "--threads"), (None, True, "--workers")])
def test_bad_values_are_one_clear_error(threads, workers, flag):
    with pytest.raises(ValueError) as e:
        plan_parallelism(threads, workers, cores=4)
    msg = str(e.value)
    assert flag in msg and "\n" not in msg
    p = argparse.ArgumentParser()
    add_parallel_arguments(p)
    args = p.parse_args([])
    args.threads, args.workers = threads, workers
    with pytest.raises(CLIError) as e:
        parallelism(args)
    assert flag in str(e.value)


def test_parallelism_applies_threads_to_torch(no_omp):
    import torch

    p = argparse.ArgumentParser()
    add_parallel_arguments(p, workers=False)
    before = torch.get_num_threads()
    try:
        par = parallelism(p.parse_args(["--threads", "1"]), uses_workers=False)
        assert par == Parallelism(1, 0) and torch.get_num_threads() == 1
        assert not hasattr(p.parse_args([]), "workers")
    finally:
        torch.set_num_threads(before)


def test_version_lists_backends_and_extension():
    r = subprocess.run([sys.executable, "-m", "seg4diff_fast.cli", "--version"], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("seg4diff-fast ")
    for word in ("triton", "torch:", "reference:", "seg4diff_fast._C:", "cores"):
        assert word in out, out
    triton_line = next(line for line in out.splitlines() if line.strip().startswith("triton"))
    assert "not installed" in triton_line or "runs" in triton_line  # installed: can it run here, and how
    from seg4diff_fast.ops.upsample_argmax import has_cpp_extension

    assert ("_C: built" in out) == has_cpp_extension()


def test_label_defaults_in_a_subprocess(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = np.full((24 + 4 * i, 32, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        arr[4:12, 6:20] = (220, 40, 40)
        Image.fromarray(arr).save(images / f"im{i}.jpg")
    out = tmp_path / "labels"
    r = subprocess.run([sys.executable, "-m", "seg4diff_fast.cli", "label", "--images", str(images), "--classes",
                        "red circle,blue square,background", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert TORCH_WARNING not in r.stderr, r.stderr
    assert "6 labeled" in r.stdout
    for i in range(6):
        lab = np.array(Image.open(out / f"im{i}.png"))
        assert lab.shape == (24 + 4 * i, 32) and lab.max() < 3


def test_too_many_workers_warn_once_not_torch_twice(monkeypatch, capsys, recwarn):
    """Explicit workers beyond the cores are kept (explicit wins), with one line of ours instead of torch's
    warning issued twice (by the DataLoader and by its iterator)."""
    import torch

    import seg4diff_fast.label.runner as runner

    monkeypatch.setattr(runner, "available_cores", lambda: 1)
    monkeypatch.setattr("torch._utils.cpu_count", lambda: 1)  # what torch's own check reads
    it = runner._loader(list(range(4)), [[0, 1], [2, 3]], 2, torch.device("cpu"), True)  # starts the workers
    assert it._num_workers == 2
    del it
    err = capsys.readouterr().err
    assert err.count("2 loader workers on 1 cores") == 1
    assert not [w for w in recwarn if TORCH_WARNING in str(w.message)]
    with pytest.warns(UserWarning, match=TORCH_WARNING):  # what the runner keeps away: torch's own check
        torch.utils.data.DataLoader(list(range(4)), num_workers=2)


def test_label_images_default_workers_follow_the_plan(tmp_path, monkeypatch):
    import seg4diff_fast.label.runner as runner
    import seg4diff_fast.utils.parallel as parallel
    from seg4diff_fast import Seg4DiffSegmenter, label_images
    from seg4diff_fast.testing import tiny_sd3_pipeline

    seen = []
    real = runner._loader
    monkeypatch.setattr(runner, "_loader", lambda ds, b, workers, dev, warn: seen.append(workers) or
                        real(ds, b, workers, dev, warn))
    monkeypatch.setattr(parallel, "available_cores", lambda: 2)  # read by default_workers
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    seg = Seg4DiffSegmenter(tiny_sd3_pipeline(num_layers=2, t5=False), layer=1, resolution=32)
    label_images(str(tmp_path), "cat,sky", str(tmp_path / "out"), segmenter=seg, progress=False)
    assert seen == [0]  # 2 cores: decoding in the main process, not 4 competing workers
