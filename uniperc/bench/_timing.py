"""Wall-clock timing shared by the benchmarks: warm-up, then the median of repeated runs."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, device: str = "cpu") -> float:
    """Median wall time of ``fn()``; synchronises CUDA so asynchronous kernels are counted."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
