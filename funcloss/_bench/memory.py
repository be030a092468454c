"""``python -m funcloss bench memory``: linear_cross_entropy against cross_entropy(linear(...)).

At N=8192, hidden=512, C=32000 (float32), the unchunked path holds the (N, C) logits and their
gradient (1 GiB each); funcloss's chunked path holds one chunk at a time. Each side runs a
forward and backward in its own fresh process; reported: peak RSS growth during the call, and
the median time ratio over interleaved rounds (in one process).
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import time

import torch

_SCRIPT = """
import sys, torch
import torch.nn.functional as F
import funcloss as fl
from funcloss._bench.rss import peak_extra_bytes
n, h, c = 8192, 512, 32000
torch.manual_seed(0)
x = torch.randn(n, h, requires_grad=True)
w = (torch.randn(c, h) * 0.02).requires_grad_(True)
y = torch.randint(0, c, (n,))
if sys.argv[1] == "funcloss":
    step = lambda: torch.autograd.grad(fl.linear_cross_entropy(x, w, y), (x, w))
else:
    step = lambda: torch.autograd.grad(F.cross_entropy(F.linear(x, w), y), (x, w))
print(peak_extra_bytes(step))
"""


def _peak(which: str) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, which], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def run(rounds: int = 5) -> int:
    import torch.nn.functional as F

    import funcloss as fl

    print(f"funcloss bench memory (torch {torch.__version__}): N=8192, hidden=512, C=32000, float32, forward+backward")
    ours_mb, theirs_mb = _peak("funcloss"), _peak("torch")
    torch.manual_seed(0)
    x = torch.randn(8192, 512, requires_grad=True)
    w = (torch.randn(32000, 512) * 0.02).requires_grad_(True)
    y = torch.randint(0, 32000, (8192,))

    def ours() -> None:
        torch.autograd.grad(fl.linear_cross_entropy(x, w, y), (x, w))

    def theirs() -> None:
        torch.autograd.grad(F.cross_entropy(F.linear(x, w), y), (x, w))

    ours()
    theirs()
    ratios = []
    for _ in range(rounds):
        pair = [("ours", ours), ("theirs", theirs)]
        random.shuffle(pair)
        t = {}
        for label, fn in pair:
            start = time.perf_counter()
            fn()
            t[label] = time.perf_counter() - start
        ratios.append(t["ours"] / t["theirs"])
    print(
        f"  peak extra memory: funcloss {ours_mb:.0f} MiB, cross_entropy(linear(...)) {theirs_mb:.0f} MiB, "
        f"ratio {ours_mb / theirs_mb:.2f}"
    )
    median = statistics.median(ratios)
    print(f"  time ratio funcloss / unchunked: {median:.2f} (median of {rounds} interleaved rounds)")
    return 0
