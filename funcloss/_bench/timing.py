"""``python -m funcloss bench``: funcloss's time over torch.nn.functional's, measured side by side.

Every figure is a ratio of medians taken in interleaved rounds (the two sides in random order
each round), so a noisy, shared machine slows both alike. Absolute times are not reported.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import torch
import torch.func as tf
from torch import Tensor

from .cases import CASES, Example, LossCase, Sampler
from .rss import sync
from .transforms import mapped, with_grad

# Per loss family, the options that make a "small" (64 elements per row), a "large" (~1M
# elements) and a "vmap" (64 examples of 64) input.
ELEMENTWISE_SIZES: Mapping[str, Mapping[str, Any]] = {
    "small": {"shape": (64,)},
    "large": {"shape": (1024, 1024)},
    "vmap": {"shape": (64, 64)},
    "wide": {"shape": (1024, 64)},
}


def sizes(case: LossCase) -> Mapping[str, Mapping[str, Any]]:
    return case.sizes if case.sizes else ELEMENTWISE_SIZES


def _minor_faults() -> int:
    """Page faults of this process so far that the kernel served without disk I/O (0 where
    the platform does not count them): fresh memory's first touch."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timer(fn: Callable[[], object], device: torch.device, budget: float = 0.02) -> Callable[[], tuple[float, float]]:
    """A function returning seconds and page faults per call of ``fn``, repeating it to fill
    ``budget`` seconds."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    reps = max(1, min(1000, int(budget / once)))

    def measure() -> tuple[float, float]:
        sync(device)
        faults = _minor_faults()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / reps, (_minor_faults() - faults) / reps

    return measure


def ratio(ours: Callable[[], object], theirs: Callable[[], object], device: torch.device, rounds: int) -> float:
    """Median over interleaved rounds of time(ours) / time(theirs)."""
    return ratio_and_faults(ours, theirs, device, rounds)[0]


def ratio_and_faults(
    ours: Callable[[], object], theirs: Callable[[], object], device: torch.device, rounds: int
) -> tuple[float, float, float]:
    """Median over interleaved rounds of time(ours) / time(theirs), and the median page faults
    per call of each side: where a call's time is mostly fresh memory faulting in, the C
    allocator decides the ratio (see the README)."""
    a, b = _timer(ours, device), _timer(theirs, device)
    ratios, faults_a, faults_b = [], [], []
    for _ in range(rounds):
        if random.random() < 0.5:
            (ta, fa), (tb, fb) = a(), b()
        else:
            (tb, fb), (ta, fa) = b(), a()
        ratios.append(ta / tb)
        faults_a.append(fa)
        faults_b.append(fb)
    return statistics.median(ratios), statistics.median(faults_a), statistics.median(faults_b)


def forward_backward(fn: Callable[..., Tensor], ex: Example) -> Callable[[], object]:
    args = with_grad(ex.args, ex.diff)
    inputs = [args[i] for i in ex.diff]

    def step() -> object:
        out = fn(*args, **ex.kwargs)  # warnings are silenced around the whole run, not per call
        return torch.autograd.grad(out.sum(), inputs, allow_unused=True)

    return step


def under_vmap(fn: Callable[..., Tensor], ex: Example, *, grad: bool) -> Callable[[], object]:
    flat, args, dims = mapped(fn, ex, quiet=False)  # run_losses mutes the warnings around the run
    g = tf.vmap(tf.grad(flat) if grad else flat, in_dims=dims)

    def step() -> object:
        return g(*args)

    return step


def _fmt(x: float | None) -> str:
    return "   n/a" if x is None or math.isnan(x) else f"{x:6.2f}"


def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` under ``torch.compile`` (graph breaks allowed: torch's own ``ctc_loss`` and
    ``gaussian_nll_loss`` break the graph), compiled afresh for this one case."""
    torch._dynamo.reset()
    out: Callable[..., Tensor] = torch.compile(fn)
    return out


def run_losses(
    device: str = "cpu",
    *,
    rounds: int = 15,
    names: list[str] | None = None,
    compile: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    # Expected warnings (kl_div's "mean", torch's vmap fallback) are silenced once here: a
    # per-call catch_warnings would add the same few microseconds to both sides of each ratio.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_losses(device, rounds=rounds, names=names, compile=compile, out=out)


def _run_losses(device: str, *, rounds: int, names: list[str] | None, compile: bool, out: TextIO) -> int:
    dev = torch.device(device)
    cases = [CASES[n] for n in names] if names else list(CASES.values())
    width = max(len(c.name) for c in cases)
    print(f"funcloss bench on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)", file=out)
    print("time of funcloss / time of torch.nn.functional, median of interleaved rounds; < 1 is faster", file=out)
    if compile:
        print("compiled: both sides under torch.compile at the large size (the first calls compile)", file=out)
    header = (
        f"{'loss':<{width}}  {'small':>6}  {'large':>6}  {'vmap':>6}  {'vmap(grad)':>10}"
        f"  {'wide':>6}  {'wide(grad)':>10}{'  compiled' if compile else ''}  {'large faults':>12}  torch under vmap"
    )
    print(header, file=out)
    print("-" * len(header), file=out, flush=True)
    large: list[float] = []
    for case in cases:
        cells: list[float | None] = []
        for size in ("small", "large"):
            ex = case.make(Sampler(0, torch.float32, dev), {**case.defaults(), **sizes(case)[size]})
            r, ours_faults, theirs_faults = ratio_and_faults(
                forward_backward(case.ours, ex), forward_backward(case.theirs, ex), dev, rounds
            )
            cells.append(r)
            if size == "large":
                large.append(r)
                faults = f"{ours_faults:.0f}/{theirs_faults:.0f}"
        for size in ("vmap", "wide"):
            ex = case.make(Sampler(0, torch.float32, dev), {**case.defaults(), **sizes(case)[size]})
            for grad in (False, True):
                try:
                    ours, theirs = under_vmap(case.ours, ex, grad=grad), under_vmap(case.theirs, ex, grad=grad)
                    cells.append(ratio(ours, theirs, dev, rounds))
                except Exception:
                    cells.append(None)
        if compile:
            ex = case.make(Sampler(0, torch.float32, dev), {**case.defaults(), **sizes(case)["large"]})
            try:
                ours, theirs = compiled(case.ours), compiled(case.theirs)
                cells.append(ratio(forward_backward(ours, ex), forward_backward(theirs, ex), dev, rounds))
            except Exception:
                cells.append(None)
        extra = f"  {_fmt(cells[6]):>8}" if compile else ""
        note = "loops or fails" if "vmap" in case.torch_breaks else "batched"
        print(
            f"{case.name:<{width}}  {_fmt(cells[0])}  {_fmt(cells[1])}  {_fmt(cells[2])}  {_fmt(cells[3]):>10}"
            f"  {_fmt(cells[4])}  {_fmt(cells[5]):>10}{extra}  {faults:>12}  {note}",
            file=out,
            flush=True,
        )
    gmean = math.exp(sum(math.log(r) for r in large) / len(large))
    print(f"\ngeometric mean at the large size: {gmean:.2f}; worst: {max(large):.2f}", file=out)
    print(
        "large faults: page faults per forward+backward at the large size, funcloss/torch (median of the\n"
        "rounds); where one side faults and the other does not, the ratio measures the C allocator",
        file=out,
    )
    return 0
