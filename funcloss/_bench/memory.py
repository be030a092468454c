"""``python -m funcloss bench memory``: linear_cross_entropy against cross_entropy(linear(...)).

Also against torch's own ``F.linear_cross_entropy`` where this torch has it (2.13 and later):
its unchunked default, and its chunked path (``options=LinearCrossEntropyOptions()``), next to
funcloss given the same options.

At N=8192, hidden=512, C=32000 (float32), the unchunked path holds the (N, C) logits and their
gradient (1 GiB each); funcloss's chunked path holds one chunk at a time. On the CPU each side
runs a forward and backward in its own fresh process and the peak RSS growth during the call is
reported; on CUDA, the growth of the caching allocator's peak allocation. Then the median time
ratio over interleaved rounds (in one process). The last rows repeat the comparison under
``torch.autocast``, under ``torch.func.grad``, and compiled with ``torch.compile`` (each
compiled side's memory measured on its second call: the first compiles).
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from .rss import cuda_peak_extra_bytes, sync

_SIZES = (8192, 512, 32000)
_BASE = "cross_entropy(linear(...))"
# The same two under torch.autocast (bfloat16; float16 on a GPU without bfloat16), compared
# with each other: mixed precision is how large vocabularies are trained.
_AMP_BASE = "autocast: cross_entropy(linear)"
_AMP_OURS = "autocast: funcloss"
# The same two under torch.func.grad (a functional training step), compared with each other.
_FUNC_BASE = "func.grad: cross_entropy(linear)"
_FUNC_OURS = "func.grad: funcloss"
# The same two compiled with torch.compile, compared with each other (memory of a second call:
# the first compiles).
_COMPILE_BASE = "compile: cross_entropy(linear)"
_COMPILE_OURS = "compile: funcloss"


def _methods(device: str) -> dict[str, Callable[[], object]]:
    import torch.nn.functional as F

    import funcloss as fl

    n, h, c = _SIZES
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device, requires_grad=True)
    w = (torch.randn(c, h, device=device) * 0.02).requires_grad_(True)
    y = torch.randint(0, c, (n,), device=device)
    methods: dict[str, Callable[[], object]] = {
        "funcloss linear_cross_entropy": lambda: torch.autograd.grad(fl.linear_cross_entropy(x, w, y), (x, w)),
        _BASE: lambda: torch.autograd.grad(F.cross_entropy(F.linear(x, w), y), (x, w)),
    }
    if hasattr(F, "linear_cross_entropy"):
        theirs = F.linear_cross_entropy
        methods["torch linear_cross_entropy"] = lambda: torch.autograd.grad(theirs(x, w, y), (x, w))
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        # torch's own chunked path (opted into with options), and funcloss given the same options.
        options = torch.nn.LinearCrossEntropyOptions()
        methods["torch, options=default"] = lambda: torch.autograd.grad(theirs(x, w, y, options=options), (x, w))
        methods["funcloss, options=default"] = lambda: torch.autograd.grad(
            fl.linear_cross_entropy(x, w, y, options=options), (x, w)
        )
    half = torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16

    def under_autocast(loss: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def step() -> object:
            with torch.autocast(torch.device(device).type, dtype=half):
                return torch.autograd.grad(loss(), (x, w))

        return step

    methods[_AMP_BASE] = under_autocast(lambda: F.cross_entropy(F.linear(x, w), y))
    methods[_AMP_OURS] = under_autocast(lambda: fl.linear_cross_entropy(x, w, y))
    import torch.func as tf

    xd, wd = x.detach(), w.detach()
    methods[_FUNC_BASE] = lambda: tf.grad(lambda x, w: F.cross_entropy(F.linear(x, w), y), argnums=(0, 1))(xd, wd)
    methods[_FUNC_OURS] = lambda: tf.grad(lambda x, w: fl.linear_cross_entropy(x, w, y), argnums=(0, 1))(xd, wd)
    compiled_base = torch.compile(lambda x, w: F.cross_entropy(F.linear(x, w), y), fullgraph=True)
    compiled_ours = torch.compile(lambda x, w: fl.linear_cross_entropy(x, w, y), fullgraph=True)
    methods[_COMPILE_BASE] = lambda: torch.autograd.grad(compiled_base(x, w), (x, w))
    methods[_COMPILE_OURS] = lambda: torch.autograd.grad(compiled_ours(x, w), (x, w))
    return methods


def _base(label: str) -> str:
    if label.startswith("autocast"):
        return _AMP_BASE
    if label.startswith("compile"):
        return _COMPILE_BASE
    return _FUNC_BASE if label.startswith("func.grad") else _BASE


_SCRIPT = """
import sys
from funcloss._bench.memory import _methods
from funcloss._bench.rss import peak_extra_bytes
fn = _methods("cpu")[sys.argv[1]]
if sys.argv[1].startswith("compile"):
    fn()  # compiles; the second call is measured
print(peak_extra_bytes(fn))
"""


def _peak(method: str) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, method], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def run(rounds: int = 5, device: str = "cpu") -> int:
    n, h, c = _SIZES
    print(
        f"funcloss bench memory on {device} (torch {torch.__version__}): "
        f"N={n}, hidden={h}, C={c}, float32, forward+backward"
    )
    methods = _methods(device)
    peaks = {}
    for i, (label, fn) in enumerate(methods.items()):
        # Each CPU measurement is a fresh process running one step: the whole run takes
        # minutes, so say where it is (on stderr: stdout is the table).
        print(f"\r  peak memory {i + 1}/{len(methods)}: {label:<40}", end="", file=sys.stderr, flush=True)
        peaks[label] = cuda_peak_extra_bytes(fn) / 2**20 if device.startswith("cuda") else _peak(label)
    print(f"\r  warming up{'':<60}", end="", file=sys.stderr, flush=True)
    for fn in methods.values():
        fn()
    bases = {label: _base(label) for label in methods}
    ratios: dict[str, list[float]] = {label: [] for label in methods}
    for r in range(rounds):
        print(f"\r  timing round {r + 1}/{rounds}{'':<50}", end="", file=sys.stderr, flush=True)
        order = list(methods)
        random.shuffle(order)
        t = {}
        for label in order:
            sync(device)
            start = time.perf_counter()
            methods[label]()
            sync(device)
            t[label] = time.perf_counter() - start
        for label in methods:
            ratios[label].append(t[label] / t[bases[label]])
    print(file=sys.stderr)
    print(
        f"  ratios to {_BASE} (the autocast rows: to {_AMP_BASE}; the func.grad rows: to {_FUNC_BASE}; "
        f"the compile rows: to {_COMPILE_BASE}); time: median of {rounds} interleaved rounds"
    )
    print(f"  {'method':<32} {'peak extra MiB':>14} {'memory ratio':>12} {'time ratio':>10}")
    for label in methods:
        mem = peaks[label] / peaks[bases[label]]
        print(f"  {label:<32} {peaks[label]:>14.0f} {mem:>12.2f} {statistics.median(ratios[label]):>10.2f}")
    return 0
