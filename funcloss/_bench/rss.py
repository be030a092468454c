"""Peak memory of one call: resident memory sampled from /proc while it runs (Linux), or
the CUDA caching allocator's peak; and the device synchronisation the timers need.

``ru_maxrss`` is a process-lifetime high-water mark, usually set by the imports, so it cannot
see a call's own peak; sampling the current RSS every half millisecond can.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

_PAGE = 4096


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_extra_bytes(fn: Callable[[], object], interval: float = 0.0005) -> int:
    """How far RSS rose above its starting level while ``fn()`` ran, counting what it returned
    (as the CUDA allocator's peak does): the result is held until the last sample is taken.

    A sample can miss a peak that lasts less than ``interval`` or falls in a stretch where a
    kernel holds the GIL; holding the result makes the end state, at least, always seen."""
    start = current_rss()
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, current_rss())
            if done.wait(interval):
                return

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    result: object = None
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    peak = max(peak, current_rss())
    del result
    return max(0, peak - start)


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
