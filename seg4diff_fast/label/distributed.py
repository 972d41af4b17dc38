"""Several processes labeling one image set: rank/world from torch.distributed's environment, the
deterministic split, barriers.

``torchrun`` and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; with ``WORLD_SIZE`` > 1 :func:`setup` joins the process group (``nccl`` when the process
labels on CUDA, ``gloo`` on the CPU) unless one is already initialised. Barriers and the small
reductions of the summary go through a ``gloo`` group in every case (they carry CPU tensors, and a rank
that finishes early may wait long for the others: the group's timeout is generous).

The split (:func:`shard_batches`): the sorted input list is cut into consecutive batches of
``batch_size`` (the same cut whatever the number of processes) and batch ``b`` belongs to rank
``b % world_size``. A batch's images are always computed together, so an image's result does not depend on
the number of processes, and a resumed run recomputes exactly the batches of the first.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DistContext", "setup", "shard_batches", "env_world"]

BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment (0, 1, 0 when unset).

    Example:
        >>> import os
        >>> env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
        >>> env_world()
        (0, 1, 0)
        >>> os.environ.update(env)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


@dataclass
class DistContext:
    """This process's place: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    _cpu_group: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._cpu_group)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes."""
        return self._reduce(values, "sum")

    def max(self, values: list[float]) -> list[float]:
        """Element-wise max over processes."""
        return self._reduce(values, "max")

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self._cpu_group)
        return t.tolist()

    def close(self) -> None:
        """Leave the process group if :func:`setup` joined it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def setup(device: str | None = None) -> DistContext:
    """Join the process group described by the environment (or the one already initialised).

    Args:
        device: the device type this process computes on ("cuda" → nccl default group, else gloo).

    Example:
        >>> ctx = setup("cpu")   # no WORLD_SIZE in the environment: alone
        >>> ctx.rank, ctx.world_size
        (0, 1)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        owns = False
    else:
        rank, world, local = env_world()
        owns = world > 1
        if owns:
            backend = "nccl" if str(device or "").startswith("cuda") else "gloo"
            kwargs: dict[str, Any] = {"backend": backend, "timeout": BARRIER_TIMEOUT}
            if backend == "nccl":
                torch.cuda.set_device(local)
                kwargs["device_id"] = torch.device("cuda", local)
            dist.init_process_group(**kwargs)
    ctx = DistContext(rank, world, local, owns)
    if world > 1:
        ctx._cpu_group = (None if dist.get_backend() == "gloo"
                          else dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT))
    return ctx


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches of indices into the sorted list of ``n`` inputs.

    Example:
        >>> shard_batches(7, 2)
        [[0, 1], [2, 3], [4, 5], [6]]
        >>> shard_batches(7, 2, rank=1, world_size=2)
        [[2, 3], [6]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return batches[rank::world_size]
