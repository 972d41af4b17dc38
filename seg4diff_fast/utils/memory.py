"""Peak memory allocated by torch while a function runs, on CUDA and on the CPU.

CUDA has allocator statistics (``torch.cuda.max_memory_allocated``); the CPU allocator keeps none, so
on the CPU the function runs under ``torch.profiler`` with ``profile_memory=True`` and the peak is
read from the profiler's ``[memory]`` records (one per allocation, +bytes, and per free, -bytes),
replayed in time order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

__all__ = ["peak_memory"]


def peak_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``.

    ``peak_bytes`` is the highest number of bytes allocated by torch on ``device`` while ``fn`` ran,
    above the level when it started: tensors that exist before the call are not counted, tensors
    ``fn`` allocates and frees again are (at their high-water mark), and the result's own tensors are.
    Only torch's allocator is seen (not the Python heap, not oneDNN/MKL scratch outside it).

    - CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus
      ``memory_allocated`` before the call, with a device synchronization on both sides.
      Caching-allocator reuse does not hide anything: these count allocated, not reserved, bytes.
    - CPU: ``fn`` runs under ``torch.profiler.profile(profile_memory=True)``; the ``[memory]`` events
      of ``profiler.kineto_results`` (their ``nbytes`` is +size at allocation and -size at free) are
      summed in time order and the running maximum is the peak. The profiler cannot see frees of
      blocks allocated before it started (torch warns "Memory block of unknown size..."), so when
      ``fn`` frees older tensors the CPU figure is an upper bound (CUDA's counts the room they make); the
      running level is clamped at the start level so that holds even when an earlier profiler session
      recorded the older block's size.
      Profiling adds some run time, so time ``fn`` separately. The first CPU call sets
      ``KINETO_LOG_LEVEL=6`` (unless set) to keep the profiler from printing to stderr.

    Not re-entrant on the CPU (one torch profiler at a time).

    Example:
        >>> import torch
        >>> from seg4diff_fast.utils import peak_memory
        >>> def work():
        ...     for _ in range(10):
        ...         tmp = torch.ones(10 * 2**20, dtype=torch.uint8)  # 10 MiB ...
        ...         del tmp  # ... freed each turn
        ...     return torch.zeros(2**20, dtype=torch.uint8)  # 1 MiB, kept
        >>> result, peak = peak_memory(work, "cpu")
        >>> round(peak / 2**20)  # one 10 MiB temporary at a time; the result comes after the last is freed
        10
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return _peak_cuda(fn, dev)
    if dev.type == "cpu":
        return _peak_cpu(fn)
    raise ValueError(f"peak_memory: device type {dev.type!r} is not supported (cpu or cuda)")


def _peak_cuda(fn: Callable[[], T], dev: torch.device) -> tuple[T, int]:
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    return result, max(0, int(peak))


def _memory_records(prof: torch.profiler.profile) -> list[tuple[int, int]]:
    """(time_ns, signed bytes) of every CPU allocation/free the profiler saw, in time order."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        raise RuntimeError(
            "peak_memory: this torch's profiler exposes no kineto_results; CPU peak memory is unavailable"
        )
    cpu = torch.profiler.DeviceType.CPU
    records = [
        (ev.start_ns(), int(ev.nbytes()))
        for ev in results.events()
        if ev.name() == "[memory]" and ev.device_type() == cpu
    ]
    records.sort(key=lambda r: r[0])  # stable: same-timestamp records keep the recording order
    return records


def _peak_cpu(fn: Callable[[], T]) -> tuple[T, int]:
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto prints profiler_start/stop lines otherwise
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    level = peak = 0
    for _, nbytes in _memory_records(prof):
        # Frees of blocks allocated before the profiler started are dropped by torch, unless an earlier profiler
        # session in this process saw that block allocated: then they arrive with their size and would take the
        # level below the start. Clamping at the start level keeps the figure the documented upper bound
        # either way (the room such frees make is not counted), whatever ran before in the process.
        level = max(0, level + nbytes)
        peak = max(peak, level)
    return result, peak
