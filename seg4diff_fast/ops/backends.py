"""Backend choice and dispatch shared by the ops: a registry per op (name → implementation) and the rule
that picks a name.

Each op module owns one :class:`BackendRegistry` (like diffusers' attention-dispatch registry) and
registers its implementations in it; the op resolves the requested backend with
:meth:`BackendRegistry.resolve` (or :func:`resolve_backend`) and calls ``registry[name](...)``, with no
if-chains. Implementations that need an optional package (Triton) are registered as small loaders that
import it on first call.

The choice: the ``backend`` argument, else the ``SEG4DIFF_BACKEND`` environment variable, else the best
available (``"triton"`` on CUDA when triton imports, ``"torch"`` otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["BACKENDS", "BackendRegistry", "interpreting", "resolve_backend", "triton_available"]

BACKENDS = ("triton", "torch", "reference")  # joint_attention's and focal_dice_loss's backends, in this order


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(
    backend: str | None,
    device: torch.device,
    op: str = "joint_attention",
    choices: tuple[str, ...] = BACKENDS,
) -> str:
    """The backend that will run: the argument, else ``SEG4DIFF_BACKEND``, else the best available.

    ``op`` names the op in error messages; ``choices`` are the names it accepts.
    """
    requested = backend or os.environ.get("SEG4DIFF_BACKEND") or None
    if requested is None:
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if requested not in choices:
        raise ValueError(f"{op}: backend={requested!r} is not one of {choices} (or None for auto)")
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise RuntimeError(
                f"{op}: backend 'triton' runs on CUDA tensors (got {device.type}); set "
                "TRITON_INTERPRET=1 before importing seg4diff_fast to run it on the CPU interpreter, "
                "or use backend='torch'"
            )
    return requested


class BackendRegistry(dict):
    """The implementations of one op: a dict backend name → function, in registration order.

    Example:
        >>> import torch
        >>> double = BackendRegistry("double")
        >>> @double.register("torch")
        ... def _torch(x):
        ...     return 2 * x
        >>> name = double.resolve("torch", torch.device("cpu"))
        >>> double[name](torch.ones(2)).tolist()
        [2.0, 2.0]
    """

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``fn`` becomes backend ``name`` of this op (returned unchanged)."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self:
                raise ValueError(f"{self.op}: backend {name!r} is registered twice")
            self[name] = fn
            return fn

        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self)

    def resolve(self, backend: str | None, device: torch.device) -> str:
        """:func:`resolve_backend` with this op's name and backends."""
        return resolve_backend(backend, device, op=self.op, choices=self.names())

    def __repr__(self) -> str:
        return f"BackendRegistry({self.op!r}, {list(self)})"
