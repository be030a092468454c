"""Peak memory of one call: resident memory sampled from /proc while it runs (Linux), or
the CUDA caching allocator's peak; and the device synchronisation the timers need.

``ru_maxrss`` is a process-lifetime high-water mark, usually set by the imports, so it cannot
see a call's own peak; sampling the current RSS every half millisecond can.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

_PAGE = 4096


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_extra_bytes(fn: Callable[[], object], interval: float = 0.0005) -> int:
    """How far RSS rose above its starting level while ``fn()`` ran."""
    start = current_rss()
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, current_rss())
            time.sleep(interval)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(0, max(peak, current_rss()) - start)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """How far the CUDA allocator's peak rose above its starting level during a second call of
    ``fn`` (the first warms up caches and lazy initialisation)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
