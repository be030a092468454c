"""An eager fast path for large reduced l1, mse, huber, smooth_l1 and both BCEs.

On large inputs these losses are bound by memory traffic: every intermediate of a composition
of primitives is a full pass over memory, where torch's fused kernels make one. For the
``"mean"``/``"sum"`` reductions the forward runs over chunks (up to 2^20 elements) of the
flattened inputs, reusing chunk-sized scratch buffers and reducing each chunk through dot
products (no full-size temporary is allocated: on a machine where fresh large allocations
fault in their pages, that costs more than the arithmetic). l1, mse and huber write their
derivative's direction into the gradient buffer during the forward (the total is computed from
it anyway), and the first backward only scales it in place; the BCEs' backward writes the
derivative in place into the gradient it returns, recomputing it from ``input`` and
``target``. When the backward itself is differentiated (``create_graph=True``) it uses
differentiable primitives instead, so a second derivative in eager mode (a gradient penalty,
``torch.autograd.functional.hessian``) stays exact. Under torch.func transforms and
torch.compile the losses use their plain composition instead (see `use_fused`).
"""

from __future__ import annotations

from collections.abc import Iterator
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


# Elements per chunk of the forward on the CPU (scratch buffers of at most 4 MiB in float32).
# Each op over a chunk is one fork and join of the intra-op threads: on a busy shared machine
# each can stall for as long as the op itself, so fewer, larger chunks (one for a 1M-element
# input) measured as fast as cache-sized ones on a quiet machine and far steadier on a busy
# one. Accelerators take the whole input as one chunk (their allocators cache, and every chunk
# is more kernel launches).
_CHUNK = 1 << 20


def _chunks(input: Tensor, target: Tensor, scratch: int) -> Iterator[tuple[slice, Tensor, Tensor, list[Tensor]]]:
    """Chunks of the flattened inputs (one on accelerators): ``(rows, input_k, target_k,
    buffers)``, with ``scratch`` buffers of the chunk's size, reused from chunk to chunk."""
    x, y = input.reshape(-1), target.reshape(-1)
    n = x.numel()
    size = min(n, _CHUNK) if x.device.type == "cpu" else n
    buffers = torch.empty(scratch, size, dtype=x.dtype, device=x.device).unbind(0) if scratch else ()
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        k = rows.stop - start
        yield rows, x[rows], y[rows], [buf[:k] for buf in buffers]


def _sum(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


# The Functions here run in eager mode only, so they take the classic ``forward(ctx, ...)``
# form: ``apply`` then skips the signature binding that a ``setup_context`` Function pays on
# every call (about 30 us).


class _DifferenceLoss(torch.autograd.Function):
    """``factor * sum(loss(input - target))`` for l1, mse and huber.

    When a gradient will be wanted (``keep_grad``), the forward writes the derivative's
    direction (``d`` for mse, ``sign(d)`` for l1, ``clamp(d, -delta, delta)`` for huber, all
    of which the total is computed from anyway) into one input-sized buffer as it goes, and
    the first backward scales that buffer in place and returns it: no pass over the inputs is
    repeated. A backward under create_graph, or a second backward (retain_graph), recomputes
    the derivative from the saved inputs.
    """

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, target: Tensor, kind: Kind, delta: float, factor: float, keep_grad: bool
    ) -> Tensor:
        ctx.save_for_backward(input, target)
        ctx.kind, ctx.delta, ctx.factor = kind, delta, factor
        # The derivative's direction, written chunk by chunk into the kept buffer or into scratch.
        direction = torch.empty(input.numel(), dtype=input.dtype, device=input.device) if keep_grad else None
        parts = []
        # Scratch: the difference d (l1, huber), and the direction when it is not kept.
        scratch = (0 if kind == "mse" else 1) + (direction is None)
        for rows, x, y, buffers in _chunks(input, target, scratch):
            out = buffers[-1] if direction is None else direction[rows]
            if kind == "mse":
                parts.append(torch.dot(torch.sub(x, y, out=out), out))
                continue
            d = torch.sub(x, y, out=buffers[0])
            if kind == "l1":
                parts.append(torch.dot(torch.sign(d, out=out), d))  # sign(d) d = |d|, exactly
            else:
                torch.clamp(d, -delta, delta, out=out)  # huber(d) = c (d - c / 2)
                parts.append(torch.dot(out, d.sub_(out, alpha=0.5)))
        total = _sum(parts)
        ctx.direction = None if direction is None else direction.view(input.shape)
        return total * factor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad * (2.0 * ctx.factor if ctx.kind == "mse" else ctx.factor)
        direction, ctx.direction = ctx.direction, None  # used once; a second backward recomputes
        rest = (None,) * 4
        if direction is not None and not torch.is_grad_enabled():
            if not need_x:
                return None, direction.mul_(-scale), *rest
            dx = direction.mul_(scale)
            return dx, (-dx if need_y else None), *rest
        input, target = ctx.saved_tensors
        d = input - target
        if torch.is_grad_enabled():  # create_graph: the backward is differentiated, stay out of place
            if ctx.kind == "mse":
                dx = d * scale
            elif ctx.kind == "l1":
                dx = d.sign() * scale
            else:
                dx = F.hardtanh(d, -ctx.delta, ctx.delta) * scale
        elif ctx.kind == "mse":
            dx = d.mul_(scale)
        elif ctx.kind == "l1":
            dx = d.sign_().mul_(scale)
        else:
            dx = d.clamp_(-ctx.delta, ctx.delta).mul_(scale)
        return (dx if need_x else None), (-dx if need_y else None), *rest


def fused_difference_loss(
    input: Tensor, target: Tensor, kind: Kind, reduction: str, *, delta: float = 1.0, scale: float = 1.0
) -> Tensor:
    """``reduce(loss(input - target))`` for l1 / mse / huber (``delta``), times ``scale``."""
    factor = scale / input.numel() if reduction == "mean" else scale
    keep_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    out: Tensor = _DifferenceLoss.apply(input, target, kind, delta, factor, keep_grad)  # type: ignore[no-untyped-call]
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

        parts = []
        for _, x, y, (sp,) in _chunks(input, target, 1):
            torch.nn.functional.softplus(x, out=sp)  # type: ignore[call-arg]
            parts.append(sp.sum() - torch.dot(x, y))
        return _sum(parts) * factor

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

        parts = []
        for _, p, y, (log_q, log_p) in _chunks(input, target, 2):
            # y log p + (1 - y) log q = log q + y (log p - log q)
            torch.log1p(torch.neg(p, out=log_q), out=log_q)
            torch.log(p, out=log_p)
            parts.append(log_q.sum() + torch.dot(y, log_p.sub_(log_q)))
        return -_sum(parts) * factor

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
