"""How many CPU threads and worker processes a run uses: decided once, from the cores this process may use.

torch's intra-op threads and DataLoader worker processes share the cores with each other and with whatever
else runs on the machine; when they outnumber the free cores, torch's OpenMP threads spin at every barrier
waiting for a thread that is not running (``benchmarks/LABEL.md``, 2 cores with 2 other busy processes:
``label`` with 2 threads and 4 workers 2–4× slower than with 1 thread and none, ``eval`` with 2 threads 7×
and ``magnet`` 2–10× slower than with 1; on the quiet machine 2 threads are 1.1–1.4× faster than 1).
:func:`plan_parallelism` splits the budget:

- workers (:func:`default_workers`): none on ≤ 2 cores (decoding in the main process is cheaper than a
  process that competes for the only other core), else ``min(4, cores // 4)``, and never more than the
  cores explicit ``threads`` leave;
- torch threads: ``OMP_NUM_THREADS`` when it is set; else the cores that are idle now (:func:`idle_cores`,
  /proc/stat over 0.1 s) less the workers, at least 1 and at most the cores less the workers. On a quiet
  2-core machine that is 2; when other work keeps the cores busy, 1.

Explicit values always win. DataLoader workers run torch with one thread each (PyTorch sets that in every
worker). Every command decides this once, at its start, through :func:`seg4diff_fast.cli_common.parallelism`;
the library's default workers (``label_images(workers=None)``, ``MagnetConfig(num_workers=None)``) follow
:func:`default_workers`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

__all__ = ["Parallelism", "available_cores", "default_workers", "env_threads", "idle_cores", "plan_parallelism"]

#: the most DataLoader workers a default plan starts
MAX_DEFAULT_WORKERS = 4
#: seconds over which :func:`idle_cores` watches the cores
IDLE_WINDOW_S = 0.1


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive int, or None when it is unset or not a positive int."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    try:
        n = int(text.split(",")[0]) if text else 0  # OpenMP allows a nesting list "4,2": the outer level
    except ValueError:
        return None
    return n if n >= 1 else None


def _cpu_times(cpus: set[int] | None) -> dict[str, tuple[int, int]]:
    """Per CPU of ``cpus`` (None: all): (idle + iowait ticks, total ticks) from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not (line.startswith("cpu") and line[3:4].isdigit()):
                continue
            parts = line.split()
            if cpus is not None and int(parts[0][3:]) not in cpus:
                continue
            ticks = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
            out[parts[0]] = (ticks[3] + ticks[4], sum(ticks))
    return out


def idle_cores(window: float = IDLE_WINDOW_S) -> float | None:
    """How many of this process's cores were idle over the next ``window`` seconds (it sleeps meanwhile), from
    /proc/stat; None where that cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    try:
        before = _cpu_times(cpus)
        time.sleep(window)
        after = _cpu_times(cpus)
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for cpu, (i1, t1) in after.items():
        i0, t0 = before.get(cpu, (i1, t1))
        if t1 > t0:
            idle += min(1.0, max(0.0, (i1 - i0) / (t1 - t0)))
        else:  # no tick counted in the window (a clock of 100 Hz): no news, count it free
            idle += 1.0
    return idle if after else None


def default_workers(cores: int | None = None, threads: int | None = None) -> int:
    """DataLoader workers when none are asked for: 0 on ≤ 2 cores, else ``min(4, cores // 4)``, within the
    cores an explicit ``threads`` leaves."""
    cores = available_cores() if cores is None else cores
    w = 0 if cores <= 2 else min(MAX_DEFAULT_WORKERS, cores // 4)
    return w if threads is None else min(w, max(0, cores - threads))


@dataclass(frozen=True)
class Parallelism:
    """torch threads in the main process and DataLoader worker processes (``idle``: the idle cores measured
    when the threads were chosen from them, else None)."""

    threads: int
    workers: int
    idle: float | None = field(default=None, compare=False)

    def apply(self) -> Parallelism:
        """Set torch's intra-op threads (the process-wide setting); returns self."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self

    def line(self) -> str:
        """``"2 torch threads, 0 loader workers"`` (plus the idle cores when they were measured)."""
        text = (f"{self.threads} torch thread{'s' * (self.threads != 1)}, {self.workers} loader "
                f"worker{'s' * (self.workers != 1)}")
        return text if self.idle is None else f"{text} ({self.idle:.1f} of {available_cores()} cores idle)"


def _count(value: object, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    bad = ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(value, bool):
        raise bad
    try:
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise bad from None
    if not isinstance(value, str) and n != value:  # 1.5
        raise bad
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def plan_parallelism(threads: int | None = None, workers: int | None = None, *, uses_workers: bool = True,
                     cores: int | None = None, idle: float | None = None) -> Parallelism:
    """Threads × workers within the cores: explicit values are kept (and validated), the rest fill the budget.

    Args:
        threads: torch threads (None: ``OMP_NUM_THREADS`` if set, else the idle cores less the workers, within
            ``[1, cores − workers]``).
        workers: DataLoader worker processes (None: :func:`default_workers`).
        uses_workers: False for commands without a DataLoader (workers is then 0 whatever is given).
        cores: the core budget (None: :func:`available_cores`).
        idle: the idle cores (None: measured by :func:`idle_cores` when ``cores`` is None and the threads
            are to be chosen; with ``cores`` given, all of them).

    Raises:
        ValueError: ``threads`` < 1 or ``workers`` < 0 (or not integers); the message names ``--threads`` /
            ``--workers``.

    Example:
        >>> plan_parallelism(cores=2).workers
        0
        >>> plan_parallelism(threads=12, cores=16)
        Parallelism(threads=12, workers=4, idle=None)
        >>> plan_parallelism(threads=15, cores=16).workers
        1
        >>> plan_parallelism(threads=1, workers=1, cores=2).threads
        1
        >>> plan_parallelism(threads=3, uses_workers=False, cores=8).workers
        0
    """
    measure = cores is None
    cores = available_cores() if cores is None else _count(cores, "cores", 1)
    t = _count(threads, "--threads", 1)
    w = _count(workers, "--workers", 0)
    if not uses_workers:
        w = 0
    elif w is None:
        w = default_workers(cores, t)
    if t is not None:
        return Parallelism(t, w)
    t = env_threads()
    if t is not None:
        return Parallelism(t, w)
    if idle is None and measure:
        idle = idle_cores()
    most = max(1, cores - w)
    if idle is None:
        return Parallelism(most, w)
    return Parallelism(max(1, min(most, round(idle) - w)), w, idle=round(float(idle), 2))
