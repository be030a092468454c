"""Calling a loss on an `Example` and differentiating it, the same way for funcloss and torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from funcloss._bench.cases import Example
from funcloss._bench.transforms import quiet_call as quiet_call

from .registry import Tolerance


def cotangent(out: Tensor) -> Tensor:
    """A fixed, non-uniform cotangent, so every output element's gradient counts differently."""
    n = out.numel()
    return torch.linspace(0.5, 1.5, n, dtype=out.dtype, device=out.device).reshape(out.shape) if n else out


def with_grad(ex: Example) -> list[Any]:
    return [a.detach().clone().requires_grad_(True) if i in ex.diff else a for i, a in enumerate(ex.args)]


def value_and_grads(fn: Callable[..., Tensor], ex: Example) -> tuple[Tensor, list[Tensor | None]]:
    args = with_grad(ex)
    out = quiet_call(fn, *args, **ex.kwargs)
    diff_args = [args[i] for i in ex.diff]
    if out.numel() == 0 or not out.requires_grad:
        return out.detach(), [None for _ in diff_args]
    grads = torch.autograd.grad((out * cotangent(out)).sum(), diff_args, allow_unused=True)
    return out.detach(), list(grads)


def assert_close(ours: Tensor | None, theirs: Tensor | None, tol: Tolerance, what: str) -> None:
    if ours is None or theirs is None:
        if ours is not None:
            assert torch.all(ours == 0), f"{what}: torch has no gradient, funcloss's is non-zero"
        if theirs is not None:
            assert torch.all(theirs == 0), f"{what}: funcloss has no gradient, torch's is non-zero"
        return
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != torch's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != torch's {theirs.dtype}"
    torch.testing.assert_close(ours, theirs, rtol=tol.rtol, atol=tol.atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def slice_example(ex: Example, i: int) -> tuple[list[Any], dict[str, Any]]:
    """The ``i``-th example of a batched `Example`, for a loop oracle."""
    assert ex.in_dims is not None
    args = [a.select(d, i) if d is not None else a for a, d in zip(ex.args, ex.in_dims)]
    kwargs = {k: (v[i] if ex.kw_dims.get(k) == 0 and isinstance(v, Tensor) else v) for k, v in ex.kwargs.items()}
    return args, kwargs
