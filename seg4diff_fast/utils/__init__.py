"""Small helpers shared by the tests and benchmarks."""

from .memory import peak_memory

__all__ = ["peak_memory"]
