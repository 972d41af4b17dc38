"""Running the real ``seg4diff-fast`` entry point in subprocesses, shared by the CLI sweep tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_subprocesses(runs: list[tuple[list[str], str]], env_extra: dict[str, str] | None = None) -> list:
    """``python -m seg4diff_fast.cli ARGS`` for every (args, cwd), all started at once (each pays the imports);
    (rc, stdout, stderr) in order."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    procs = [subprocess.Popen([sys.executable, "-m", "seg4diff_fast.cli", *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, cwd in runs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append((p.returncode, stdout, stderr))
    return out


def error_lines(stderr: str) -> list[str]:
    """stderr without library chatter (transformers' notes about optional image backends)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
