"""How many CPU threads and worker processes a run uses: decided once, from the cores this process may use.

torch's intra-op threads and DataLoader worker processes share the same cores; together they must not
exceed them, or every thread spins waiting for the others (measured on a loaded 2-core machine: ``label``
6× slower, ``magnet`` 8× slower than with one thread). :func:`plan_parallelism` splits the budget:
workers first (at most ``cores − 1``, so the main process keeps one core), then torch threads on what is
left. DataLoader workers run torch with one thread each (PyTorch sets that in every worker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Parallelism", "available_cores", "plan_parallelism"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Parallelism:
    """torch threads in the main process and DataLoader worker processes."""

    threads: int
    workers: int

    def apply(self) -> Parallelism:
        """Set torch's intra-op threads (the process-wide setting); returns self."""
        import torch

        torch.set_num_threads(self.threads)
        return self


def plan_parallelism(threads: int | None = None, workers: int | None = None, *, uses_workers: bool = True,
                     cores: int | None = None) -> Parallelism:
    """Threads × workers within the cores: explicit values are kept (and validated), the rest fill the budget.

    Default workers: none on ≤ 2 cores (decoding in the main process is cheaper than a process that competes
    for the only other core), else ``min(4, cores // 4)``; default threads: the cores the workers leave.

    Example:
        >>> plan_parallelism(cores=2)
        Parallelism(threads=2, workers=0)
        >>> plan_parallelism(cores=16)
        Parallelism(threads=12, workers=4)
        >>> plan_parallelism(workers=1, cores=2)
        Parallelism(threads=1, workers=1)
        >>> plan_parallelism(threads=3, uses_workers=False, cores=8)
        Parallelism(threads=3, workers=0)
    """
    cores = available_cores() if cores is None else int(cores)
    if threads is not None and int(threads) < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if workers is not None and int(workers) < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if not uses_workers:
        w = 0
    elif workers is not None:
        w = int(workers)
    else:
        w = 0 if cores <= 2 else min(4, cores // 4)
    t = int(threads) if threads is not None else max(1, cores - w)
    return Parallelism(threads=t, workers=w)
