"""Apply a torch.func transform (or torch.compile) to a loss on an `Example`.

Shared by ``python -m funcloss check`` (which tries it on funcloss and on torch) and the tests
(which compare funcloss's result with torch's eager reference).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.func as tf
from torch import Tensor

from .cases import Example

TRANSFORMS = ["grad", "vmap", "vmap_grad", "jvp", "jacfwd", "jacrev", "hessian", "compile", "compile_dyn"]


def quiet_call(fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """Call ``fn`` with the expected warnings (kl_div 'mean', size mismatch) muted."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduction.*'mean' divides.*")
        warnings.filterwarnings("ignore", message=".*that is different to the input size.*")
        return fn(*args, **kwargs)


def _call(fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    return fn(*args, **kwargs)


def tangent_like(x: Tensor) -> Tensor:
    """A fixed, non-uniform direction of ``x``'s shape."""
    return torch.linspace(-1.0, 2.0, x.numel(), dtype=x.dtype, device=x.device).reshape(x.shape)


def positional(fn: Callable[..., Tensor], ex: Example, wrt: tuple[int, ...]) -> tuple[Callable[..., Tensor], list[Any]]:
    """``fn`` as a function of the arguments at ``wrt`` only, the others fixed."""
    fixed = list(ex.args)

    def f(*xs: Tensor) -> Tensor:
        args = list(fixed)
        for i, x in zip(wrt, xs):
            args[i] = x
        return quiet_call(fn, *args, **ex.kwargs)

    return f, [ex.args[i] for i in wrt]


def mapped(
    fn: Callable[..., Tensor], ex: Example, *, quiet: bool = True
) -> tuple[Callable[..., Tensor], list[Any], tuple[int | None, ...]]:
    """``fn`` as a function of positional args only (tensor kwargs moved to the end), for vmap;
    with ``quiet``, each call mutes the expected warnings (the benchmark mutes them once around
    the whole run instead, so no call pays for it)."""
    if ex.in_dims is None:
        raise ValueError("this example has no batch dimension to map over")
    names = [k for k, v in ex.kwargs.items() if isinstance(v, Tensor)]
    rest = {k: v for k, v in ex.kwargs.items() if k not in names}
    n = len(ex.args)

    def flat(*xs: Any) -> Tensor:
        call = quiet_call if quiet else _call
        return call(fn, *xs[:n], **dict(zip(names, xs[n:])), **rest)

    dims = tuple(ex.in_dims) + tuple(ex.kw_dims.get(k) for k in names)
    return flat, list(ex.args) + [ex.kwargs[k] for k in names], dims


def with_grad(args: tuple[Any, ...] | list[Any], wrt: tuple[int, ...]) -> list[Any]:
    return [a.detach().clone().requires_grad_(True) if i in wrt else a for i, a in enumerate(args)]


def apply(name: str, fn: Callable[..., Tensor], ex: Example) -> Any:
    """Run transform ``name`` of ``fn`` on ``ex``; the result's structure depends on ``name``.

    grad, jvp: w.r.t. every differentiable argument; jacfwd, jacrev, hessian: w.r.t. the first;
    vmap, vmap_grad: over ``ex.in_dims``; compile (static shapes) and compile_dyn (dynamic
    shapes): ``(value, *grads)`` of the compiled loss.
    """
    wrt = ex.diff
    if name == "grad":
        f, xs = positional(fn, ex, wrt)
        return tf.grad(f, argnums=tuple(range(len(xs))))(*xs)
    if name == "vmap":
        flat, args, dims = mapped(fn, ex)
        return tf.vmap(flat, in_dims=dims)(*args)
    if name == "vmap_grad":
        flat, args, dims = mapped(fn, ex)
        return tf.vmap(tf.grad(flat, argnums=0), in_dims=dims)(*args)
    if name == "jvp":
        f, xs = positional(fn, ex, wrt)
        return tf.jvp(f, tuple(xs), tuple(tangent_like(x) for x in xs))[1]
    if name in ("jacfwd", "jacrev"):
        f, xs = positional(fn, ex, wrt[:1])
        return (tf.jacfwd if name == "jacfwd" else tf.jacrev)(f)(*xs)
    if name == "hessian":
        f, xs = positional(fn, ex, wrt[:1])
        return tf.hessian(f)(*xs)
    if name in ("compile", "compile_dyn"):
        # compile_dyn: dynamic shapes, and integer arguments (blank, margin p, ...) as symbols.
        compiled = torch.compile(fn, fullgraph=True, dynamic=name == "compile_dyn")
        args = with_grad(ex.args, wrt)
        out = compiled(*args, **ex.kwargs)
        grads = torch.autograd.grad(out, [args[i] for i in wrt], allow_unused=True, materialize_grads=True)
        return (out.detach(), *grads)
    raise ValueError(f"apply(...): expected one of {TRANSFORMS}, got {name!r}.")
