"""Small helpers shared by the tests, benchmarks and commands."""

from .memory import peak_memory
from .parallel import Parallelism, available_cores, plan_parallelism

__all__ = ["Parallelism", "available_cores", "peak_memory", "plan_parallelism"]
