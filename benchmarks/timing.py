"""Timing one call for the micro-benchmarks (benchmarks/attention_upcast.py, matmul_ceiling.py)."""

from __future__ import annotations

import time
from typing import Callable


def seconds(f: Callable[[], object], repeats: int = 10) -> float:
    """Mean wall time of `f()` over `repeats` calls, after one warm-up call (kernel selection, packing)."""
    f()
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats
