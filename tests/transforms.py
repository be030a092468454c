"""Each torch.func transform applied to a loss, and the torch-side oracle for the same quantity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.func as tf
from torch import Tensor

from funcloss._bench.cases import Example

from .harness import mapped, quiet_call, slice_example

TRANSFORMS = ["grad", "vmap", "vmap_grad", "jvp", "jacfwd", "jacrev", "hessian", "compile"]


def _positional(
    fn: Callable[..., Tensor], ex: Example, wrt: tuple[int, ...]
) -> tuple[Callable[..., Tensor], list[Any]]:
    """``fn`` as a function of the arguments at ``wrt`` only, the others fixed."""
    fixed = list(ex.args)

    def f(*xs: Tensor) -> Tensor:
        args = list(fixed)
        for i, x in zip(wrt, xs):
            args[i] = x
        return quiet_call(fn, *args, **ex.kwargs)

    return f, [ex.args[i] for i in wrt]


def torch_grads(
    fn: Callable[..., Tensor], args: list[Any], kwargs: dict[str, Any], wrt: tuple[int, ...]
) -> tuple[Tensor, ...]:
    args = [a.detach().clone().requires_grad_(True) if i in wrt else a for i, a in enumerate(args)]
    out = quiet_call(fn, *args, **kwargs)
    return torch.autograd.grad(out, [args[i] for i in wrt], allow_unused=True, materialize_grads=True)


def ours_transform(name: str, fn: Callable[..., Tensor], ex: Example) -> Any:
    wrt = ex.diff
    if name == "grad":
        f, xs = _positional(fn, ex, wrt)
        return tf.grad(f, argnums=tuple(range(len(xs))))(*xs)
    if name == "vmap":
        flat, args, dims = mapped(fn, ex)
        return tf.vmap(flat, in_dims=dims)(*args)
    if name == "vmap_grad":
        flat, args, dims = mapped(fn, ex)
        return tf.vmap(tf.grad(flat, argnums=0), in_dims=dims)(*args)
    if name == "jvp":
        f, xs = _positional(fn, ex, wrt)
        tangents = tuple(tangent_like(x) for x in xs)
        return tf.jvp(f, tuple(xs), tangents)[1]
    if name in ("jacfwd", "jacrev"):
        f, xs = _positional(fn, ex, wrt[:1])
        jac = tf.jacfwd if name == "jacfwd" else tf.jacrev
        return jac(f)(*xs)
    if name == "hessian":
        f, xs = _positional(fn, ex, wrt[:1])
        return tf.hessian(f)(*xs)
    if name == "compile":
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        args = [a.detach().clone().requires_grad_(True) if i in wrt else a for i, a in enumerate(ex.args)]
        out = compiled(*args, **ex.kwargs)
        grads = torch.autograd.grad(out, [args[i] for i in wrt], allow_unused=True, materialize_grads=True)
        return (out.detach(), *grads)
    raise ValueError(name)


def tangent_like(x: Tensor) -> Tensor:
    n = x.numel()
    return torch.linspace(-1.0, 2.0, n, dtype=x.dtype, device=x.device).reshape(x.shape)


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
        f, xs = _positional(fn, ex, wrt[:1])
        return autograd_jacobian(f, xs[0])
    if name == "hessian":
        f, xs = _positional(fn, ex, wrt[:1])
        if "hessian" not in torch_breaks:
            return autograd_hessian(f, xs[0])
        return finite_difference_hessian(f, xs[0])
    if name == "compile":
        args = [a.detach().clone().requires_grad_(True) if i in wrt else a for i, a in enumerate(ex.args)]
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
