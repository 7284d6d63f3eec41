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


def train_images_per_second(model: torch.nn.Module, x: torch.Tensor, repeats: int, device: str) -> float:
    """Images/s of a full train step (forward, cross-entropy, backward, AdamW) on the batch ``x``."""
    target = torch.randint(0, model.num_classes, (x.shape[0],), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    model.train()
    return x.shape[0] / median_seconds(step, repeats, device=device)


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Median wall time of each ``fn()`` (after one warm-up call each), the candidates taking turns in every round,
    so a shared machine's load drifts over all of them alike rather than favouring whichever ran in a quiet spell."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
