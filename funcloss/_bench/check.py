"""``python -m funcloss check``: funcloss against torch.nn.functional on this device.

For each loss: the largest deviation of value and gradients from torch on random inputs, and
which torch.func transforms work for funcloss and for torch's own loss. With ``autocast``,
everything runs inside a ``torch.autocast`` region of the half dtype, on inputs in that dtype
(a model's outputs there), and a loss whose result dtype differs from torch's is a mismatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable
from typing import Any, TextIO

import torch
from torch import Tensor

from .cases import CASES, Example, LossCase, Sampler
from .transforms import TRANSFORMS, apply, quiet_call, with_grad

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}


def _value_and_grads(fn: Callable[..., Tensor], ex: Example) -> tuple[Tensor, list[Tensor]]:
    args = with_grad(ex.args, ex.diff)
    out = quiet_call(fn, *args, **ex.kwargs)
    grads = torch.autograd.grad(out.sum(), [args[i] for i in ex.diff], allow_unused=True, materialize_grads=True)
    return out.detach(), list(grads)


def _refuses(fn: Callable[..., Tensor], ex: Example) -> type[Exception] | None:
    """The class of the exception ``fn`` raises on ``ex``'s value and gradients, if it raises."""
    try:
        _value_and_grads(fn, ex)
    except Exception as e:
        return type(e)
    return None


def deviation(case: LossCase, ex: Example) -> tuple[float, float]:
    """Largest relative-to-scale absolute deviation of value and of gradients from torch
    (infinite when the value's dtype differs)."""
    ours, our_grads = _value_and_grads(case.ours, ex)
    theirs, their_grads = _value_and_grads(case.theirs, ex)
    if ours.dtype != theirs.dtype:
        return float("inf"), float("inf")

    def dev(a: Tensor, b: Tensor) -> float:
        if a.numel() == 0:
            return 0.0
        scale = max(1.0, float(b.double().abs().max()))
        return float((a.double() - b.double()).abs().max()) / scale

    return dev(ours, theirs), max((dev(g, h) for g, h in zip(our_grads, their_grads)), default=0.0)


def status(transform: str, fn: Callable[..., Tensor], ex: Example) -> str:
    """``ok``, ``loop`` (vmap fell back to a per-example loop) or ``fail``."""
    if transform.startswith("compile"):
        torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            apply(transform, fn, ex)
        except Exception:
            return "fail"
    if any("performance drop" in str(w.message) for w in caught):
        return "loop"
    return "ok"


def _example(case: LossCase, opts: dict[str, Any], dtype: torch.dtype, device: str, autocast: bool) -> Example:
    """The case's inputs in ``dtype``; under autocast, built in float32 and only the positional
    tensors (a model's outputs) cast to ``dtype``, keyword tensors (weights) left float32."""
    if not autocast:
        return case.make(Sampler(0, dtype, device), opts)
    ex = case.make(Sampler(0, torch.float32, device), opts)
    args = tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in ex.args)
    return dataclasses.replace(ex, args=args)


def run(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    names: list[str] | None = None,
    compile: bool = False,
    autocast: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Print the report; return 0 if funcloss matched torch and passed every transform."""
    if autocast and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"check(...): expected float16 or bfloat16 with autocast, got {dtype}.")
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)  # type: ignore[attr-defined]
    transforms = [t for t in TRANSFORMS if compile or not t.startswith("compile")]
    tol = TOLERANCE[dtype]
    cases = [CASES[n] for n in names] if names else list(CASES.values())
    width = max(len(c.name) for c in cases)
    region = f", inside torch.autocast({torch.device(device).type!r}, dtype={dtype})" if autocast else ""
    print(f"funcloss check on {device}, {dtype}{region} (torch {torch.__version__})", file=out)
    print("cells: funcloss/torch; ok = works, loop = vmap falls back to a per-example loop", file=out)
    cell = max(10, *(len(t) for t in transforms))
    header = f"{'loss':<{width}}  {'value dev':>9}  {'grad dev':>9}  " + "  ".join(f"{t:<{cell}}" for t in transforms)
    print(header, file=out)
    print("-" * len(header), file=out, flush=True)
    bad = 0
    uncompared: list[str] = []
    refused: list[str] = []
    for case in cases:
        opts: dict[str, Any] = case.defaults()
        ex = _example(case, opts, dtype, device, autocast)
        region_cm = torch.autocast(torch.device(device).type, dtype=dtype) if autocast else contextlib.nullcontext()
        try:
            with region_cm:
                dv, dg = deviation(case, ex)
            devs = f"{dv:>9.1e}  {dg:>9.1e}"
            mismatch = dv > tol or dg > tol
        except Exception as e:  # torch lacks this dtype on this device, or this loss, for instance
            with region_cm:
                ours_refuses, theirs_refuses = _refuses(case.ours, ex), _refuses(case.theirs, ex)
            if ours_refuses is not None and ours_refuses is theirs_refuses:
                # Refused by torch itself (binary_cross_entropy under CUDA autocast): funcloss
                # refusing it with the same exception is the behaviour asked for, not a problem.
                refused.append(f"{case.name}: {ours_refuses.__name__}, as torch")
                print(f"{case.name:<{width}}  {'refused by both, as torch':>20}", file=out, flush=True)
                continue
            uncompared.append(f"{case.name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            devs, mismatch = f"{'n/a':>9}  {'n/a':>9}", False
        cells = []
        for t in transforms:
            tex = ex
            if t in ("jacfwd", "jacrev") and "reduction" in opts:
                tex = _example(case, {**opts, "reduction": "none"}, dtype, device, autocast)
            with torch.autocast(torch.device(device).type, dtype=dtype) if autocast else contextlib.nullcontext():
                ours, theirs = status(t, case.ours, tex), status(t, case.theirs, tex)
            bad += ours != "ok"
            cells.append(f"{ours}/{theirs}")
        bad += mismatch
        row = f"{case.name:<{width}}  {devs}  " + "  ".join(f"{c:<{cell}}" for c in cells)
        print(row + ("  MISMATCH" if mismatch else ""), file=out, flush=True)
    compared = len(cases) - len(uncompared) - len(refused)
    verdict = "all match torch and pass every transform" if not bad else f"{bad} problem" + ("s" * (bad > 1))
    print(f"\n{compared} of {len(cases)} losses compared with torch; {verdict}", file=out)
    if uncompared:
        print("not compared (torch could not run them here):", file=out)
        for line in uncompared:
            print(f"  {line}", file=out)
    if refused:
        print("refused here by torch and by funcloss with the same exception:", file=out)
        for line in refused:
            print(f"  {line}", file=out)
    return 0 if not bad else 1
