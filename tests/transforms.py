"""Each torch.func transform applied to a loss, and the torch-side oracle for the same quantity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from funcloss._bench.cases import Example
from funcloss._bench.transforms import positional, quiet_call, tangent_like, with_grad

from .harness import slice_example


def torch_grads(
    fn: Callable[..., Tensor], args: list[Any], kwargs: dict[str, Any], wrt: tuple[int, ...]
) -> tuple[Tensor, ...]:
    args = with_grad(args, wrt)
    out = quiet_call(fn, *args, **kwargs)
    return torch.autograd.grad(out, [args[i] for i in wrt], allow_unused=True, materialize_grads=True)


def torch_reference(name: str, fn: Callable[..., Tensor], ex: Example, torch_breaks: frozenset[str]) -> Any:
    """The same quantity from torch's eager loss (a loop or finite differences where torch's
    transform is missing)."""
    wrt = ex.diff
    if name == "grad":
        return torch_grads(fn, list(ex.args), ex.kwargs, wrt)
    if name in ("vmap", "vmap_grad"):
        assert ex.in_dims is not None
        n = next(a.size(d) for a, d in zip(ex.args, ex.in_dims) if d is not None)
        outs = []
        for i in range(n):
            args, kwargs = slice_example(ex, i)
            outs.append(quiet_call(fn, *args, **kwargs) if name == "vmap" else torch_grads(fn, args, kwargs, (0,))[0])
        return torch.stack(outs)
    if name == "jvp":
        grads = torch_grads(fn, list(ex.args), ex.kwargs, wrt)
        return sum((g * tangent_like(ex.args[i])).sum() for g, i in zip(grads, wrt))
    if name in ("jacfwd", "jacrev"):
        f, xs = positional(fn, ex, wrt[:1])
        return autograd_jacobian(f, xs[0])
    if name == "hessian":
        f, xs = positional(fn, ex, wrt[:1])
        if "hessian" not in torch_breaks:
            return autograd_hessian(f, xs[0])
        return finite_difference_hessian(f, xs[0])
    if name in ("compile", "compile_dyn"):
        args = with_grad(ex.args, wrt)
        out = quiet_call(fn, *args, **ex.kwargs)
        grads = torch.autograd.grad(out, [args[i] for i in wrt], allow_unused=True, materialize_grads=True)
        return (out.detach(), *grads)
    raise ValueError(name)


def autograd_jacobian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return cast(Tensor, torch.autograd.functional.jacobian(f, x))  # type: ignore[no-untyped-call]


def autograd_hessian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return cast(Tensor, torch.autograd.functional.hessian(f, x))  # type: ignore[no-untyped-call]


def finite_difference_hessian(f: Callable[[Tensor], Tensor], x: Tensor, h: float = 1e-5) -> Tensor:
    """Central differences of torch's autograd gradient (float64)."""

    def g(z: Tensor) -> Tensor:
        z = z.detach().clone().requires_grad_(True)
        return torch.autograd.grad(f(z), z)[0]

    cols = []
    flat = x.detach().reshape(-1)
    for k in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[k] = h
        cols.append((g((flat + e).reshape(x.shape)) - g((flat - e).reshape(x.shape))) / (2 * h))
    return torch.stack(cols, dim=-1).reshape(x.shape + x.shape)
