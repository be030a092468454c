"""An eager fast path for large reduced l1, mse, huber, smooth_l1 and both BCEs.

On large inputs these losses are bound by memory traffic: every intermediate of a composition
of primitives is a full pass over memory, where torch's fused kernels make one. For the
``"mean"``/``"sum"`` reductions the forward runs over cache-sized chunks of the flattened
inputs, reusing two scratch buffers and reducing each chunk through dot products and norms (no
full-size temporary is allocated: on a machine where fresh large allocations fault in their
pages, that costs more than the arithmetic). The backward writes the derivative in place into
the gradient it returns, recomputing it from ``input`` and ``target``; when the backward itself
is differentiated (``create_graph=True``) it uses differentiable primitives instead, so a
second derivative in eager mode (a gradient penalty, ``torch.autograd.functional.hessian``)
stays exact. Under torch.func transforms and
torch.compile the losses use their plain composition instead (see `use_fused`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import has_tangent, is_eager

Kind = Literal["l1", "mse", "huber"]

# Below this many elements the composition is as fast and has less call overhead.
_MIN_ELEMENTS = 1 << 16


def use_fused(input: Tensor, target: Tensor, reduction: str) -> bool:
    return (
        reduction != "none"
        and input.numel() >= _MIN_ELEMENTS
        and input.shape == target.shape
        and input.dtype == target.dtype
        and input.dtype in (torch.float32, torch.float64)
        and is_eager()
        and not has_tangent(input, target)
    )


# Elements per chunk of the forward on the CPU: two float32 scratch buffers of this size stay in
# cache. Accelerators take the whole input as one chunk (their allocators cache, and every chunk
# is more kernel launches).
_CHUNK = 1 << 18


def _chunked(total: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], input: Tensor, target: Tensor) -> Tensor:
    """``sum_k total(input_k, target_k, scratch_1, scratch_2)`` over chunks of the flattened
    inputs; the scratch buffers are reused from chunk to chunk."""
    x, y = input.reshape(-1), target.reshape(-1)
    n = x.numel()
    size = min(n, _CHUNK) if x.device.type == "cpu" else n
    scratch = torch.empty(2, size, dtype=x.dtype, device=x.device)
    if size == n:
        return total(x, y, scratch[0], scratch[1])
    parts = []
    for start in range(0, n, size):
        k = min(size, n - start)
        parts.append(total(x[start : start + k], y[start : start + k], scratch[0, :k], scratch[1, :k]))
    result: Tensor = torch.stack(parts).sum()
    return result


# The Functions here run in eager mode only, so they take the classic ``forward(ctx, ...)``
# form: ``apply`` then skips the signature binding that a ``setup_context`` Function pays on
# every call (about 30 us).


class _DifferenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, target: Tensor, kind: Kind, delta: float, factor: float) -> Tensor:
        ctx.save_for_backward(input, target)
        ctx.kind, ctx.delta, ctx.factor = kind, delta, factor

        def chunk_total(x: Tensor, y: Tensor, d: Tensor, c: Tensor) -> Tensor:
            torch.sub(x, y, out=d)
            if kind == "mse":
                return torch.dot(d, d)
            if kind == "l1":
                norm: Tensor = torch.linalg.vector_norm(d, ord=1)
                return norm
            torch.clamp(d, -delta, delta, out=c)  # huber(d) = c (d - c / 2)
            return torch.dot(c, d) - 0.5 * torch.dot(c, c)

        return _chunked(chunk_total, input, target) * factor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        input, target = ctx.saved_tensors
        d = input - target
        if torch.is_grad_enabled():  # create_graph: the backward is differentiated, stay out of place
            if ctx.kind == "mse":
                dx = d * (grad * (2.0 * ctx.factor))
            elif ctx.kind == "l1":
                dx = d.sign() * (grad * ctx.factor)
            else:
                dx = F.hardtanh(d, -ctx.delta, ctx.delta) * (grad * ctx.factor)
        elif ctx.kind == "mse":
            dx = d.mul_(grad * (2.0 * ctx.factor))
        elif ctx.kind == "l1":
            dx = d.sign_().mul_(grad * ctx.factor)
        else:
            dx = d.clamp_(-ctx.delta, ctx.delta).mul_(grad * ctx.factor)
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (dx if need_x else None), (-dx if need_y else None), None, None, None


def fused_difference_loss(
    input: Tensor, target: Tensor, kind: Kind, reduction: str, *, delta: float = 1.0, scale: float = 1.0
) -> Tensor:
    """``reduce(loss(input - target))`` for l1 / mse / huber (``delta``), times ``scale``."""
    factor = scale / input.numel() if reduction == "mean" else scale
    out: Tensor = _DifferenceLoss.apply(input, target, kind, delta, factor)  # type: ignore[no-untyped-call]
    return out


class _PairTotal(torch.autograd.Function):
    """A reduced loss of ``(input, target)`` times a constant ``factor``; each subclass's
    ``forward`` computes its total after `keep` and its ``backward`` recomputes the derivative."""

    @staticmethod
    def keep(ctx: Any, input: Tensor, target: Tensor, factor: float) -> None:
        ctx.save_for_backward(input, target)
        ctx.factor = factor


class _LogitsBCE(_PairTotal):
    """``sum(softplus(x) - y x)``, the unweighted BCE-with-logits total."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, target: Tensor, factor: float) -> Tensor:
        _PairTotal.keep(ctx, input, target, factor)

        def chunk_total(x: Tensor, y: Tensor, sp: Tensor, _: Tensor) -> Tensor:
            torch.nn.functional.softplus(x, out=sp)  # type: ignore[call-arg]
            return sp.sum() - torch.dot(x, y)

        return _chunked(chunk_total, input, target) * factor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        input, target = ctx.saved_tensors
        scale = grad * ctx.factor
        dx = dy = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():
                dx = (torch.sigmoid(input) - target) * scale
            else:
                dx = torch.sigmoid(input).sub_(target).mul_(scale)
        if ctx.needs_input_grad[1]:
            dy = input * -scale
        return dx, dy, None


class _ProbabilityBCE(_PairTotal):
    """``-sum(y log p + (1 - y) log(1 - p))`` for p strictly inside (1e-12, 1 - 1e-12), where
    torch's clamps cannot act; the backward is ``(p - y) / (p (1 - p))``."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, target: Tensor, factor: float) -> Tensor:
        _PairTotal.keep(ctx, input, target, factor)

        def chunk_total(p: Tensor, y: Tensor, log_q: Tensor, log_p: Tensor) -> Tensor:
            # y log p + (1 - y) log q = log q + y (log p - log q)
            torch.log1p(torch.neg(p, out=log_q), out=log_q)
            torch.log(p, out=log_p)
            return log_q.sum() + torch.dot(y, log_p.sub_(log_q))

        return -_chunked(chunk_total, input, target) * factor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        p, y = ctx.saved_tensors
        scale = grad * ctx.factor
        dp = (p - y) / (p * (1 - p)) * scale if ctx.needs_input_grad[0] else None
        dy = (torch.log1p(-p) - torch.log(p)) * scale if ctx.needs_input_grad[1] else None
        return dp, dy, None


def _total(function: type[_PairTotal], input: Tensor, target: Tensor, reduction: str) -> Tensor:
    factor = 1.0 / input.numel() if reduction == "mean" else 1.0
    out: Tensor = function.apply(input, target, factor)  # type: ignore[no-untyped-call]
    return out


def fused_logits_bce(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Mean or sum of ``softplus(x) - y x`` (= BCE with logits, no weights)."""
    return _total(_LogitsBCE, input, target, reduction)


def fused_probability_bce(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Mean or sum of BCE on probabilities known to lie strictly inside (1e-12, 1 - 1e-12)."""
    return _total(_ProbabilityBCE, input, target, reduction)
