"""Losses on probabilities and log-probabilities: binary cross-entropy (on probabilities and on
logits) and the Kullback-Leibler divergence."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autocast import float32_under_autocast, refused_under_autocast
from .._checks import (
    broadcast_shape,
    check_reduction,
    check_same_shape,
    compiled_plainly,
    is_eager,
    on_accelerator,
)
from .._combinators import batchmean, reduce
from .._typing import KLDivReduction, Reduction
from ._fused import fused_logits_bce, fused_probability_bce, use_fused

# torch clamps each log term of BCE at -100 and its gradient's denominator p(1 - p) at 1e-12.
_LOG_FLOOR = -100.0
_GRAD_FLOOR = 1e-12

# torch refuses binary_cross_entropy under CUDA autocast (the float16 logs underflow).
_BCE_UNSAFE = (
    "binary_cross_entropy(...): expected no CUDA autocast region, got one. As in torch, "
    "binary_cross_entropy is unsafe to autocast: a sigmoid in float16 saturates at 0 and 1. Pass logits "
    "to binary_cross_entropy_with_logits instead (safe to autocast), or compute the loss outside the region."
)


class _ClampedLog(torch.autograd.Function):
    """``max(log p, -100)`` with the derivative ``1 / max(p, 1e-12)``, for compiled graphs:
    Inductor fuses its forward and backward with the loss's (about half the work of the
    zero-valued-term form of `_bce_log`, whose second derivatives the eager form needs)."""

    @staticmethod
    def forward(ctx: Any, p: Tensor) -> Tensor:
        ctx.save_for_backward(p)
        # Literals, not the module's constants: under dynamic shapes dynamo would lift those
        # floats into symbolic inputs, which a traced Function's body cannot take.
        return torch.log(p).clamp_min(-100.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        p: Tensor = ctx.saved_tensors[0]
        return grad / p.clamp_min(1e-12)


def _bce_log(p: Tensor) -> Tensor:
    """``max(log p, -100)`` whose derivative is capped at ``1 / 1e-12`` near ``p = 0``.

    A plain clamp would give a zero (or NaN) gradient at ``p = 0``; torch's backward instead
    pushes with ``1 / 1e-12``. The value is taken without gradient; a zero-valued term
    ``f(p) - f(p).detach()`` carries the derivative, with
    ``f(p) = log(max(p, 1e-12)) + min(p, 1e-12) / 1e-12``: ``1 / p`` above ``1e-12`` (second
    derivative ``-1 / p^2``), ``1 / 1e-12`` below it (second derivative 0).
    """
    if p.dtype in (torch.float16, torch.bfloat16):
        # 1e-12 and its inverse are out of half precision's range: work in float32, as torch's
        # half kernels compute in float internally.
        return _bce_log(p.float()).to(p.dtype)
    if compiled_plainly():
        out: Tensor = _ClampedLog.apply(p)  # type: ignore[no-untyped-call]
        return out
    value = torch.log(p.detach()).clamp_min(_LOG_FLOOR)
    # threshold's derivative is 0 at p == 1e-12 exactly, so there only the min term counts.
    f = torch.add(torch.log(F.threshold(p, _GRAD_FLOOR, _GRAD_FLOOR)), p.clamp_max(_GRAD_FLOOR), alpha=1 / _GRAD_FLOOR)
    return (f - f.detach()) + value


def _check_weight_shape(fn: str, name: str, weight: Tensor | None, input: Tensor) -> None:
    """torch weighs in place: a weight may broadcast to the input's shape, not enlarge it."""
    if weight is not None and broadcast_shape(input.shape, weight.shape) != input.shape:
        raise RuntimeError(
            f"{fn}(...): expected a {name} broadcastable to the input's shape {tuple(input.shape)} without "
            f"enlarging it, got {tuple(weight.shape)}."
        )


@refused_under_autocast("cuda", _BCE_UNSAFE)
@float32_under_autocast
def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Binary cross-entropy between probabilities and targets in [0, 1].

    .. math::
        \\ell_i = -w_i \\left[ y_i \\max(\\log x_i, -100) + (1 - y_i) \\max(\\log(1 - x_i), -100) \\right]

    The clamp at -100 makes ``x = 0`` against ``y = 1`` cost exactly 100, as in torch.

    Args:
        input: probabilities, any shape, values in [0, 1] (checked in eager mode).
        target: same shape and dtype as ``input``.
        weight: broadcastable to ``input``, multiplies each element.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.binary_cross_entropy``; `binary_cross_entropy_with_logits`
    is the numerically stable choice when you have logits.
    """
    check_reduction("binary_cross_entropy", reduction)
    check_same_shape("binary_cross_entropy", input, target)
    _check_weight_shape("binary_cross_entropy", "weight", weight, input)
    if input.dtype != target.dtype:
        raise RuntimeError(
            f"binary_cross_entropy(...): expected target of the input's dtype {input.dtype}, got "
            f"{target.dtype}. Convert it with target.to(input.dtype)."
        )
    if not input.is_floating_point():
        raise NotImplementedError(
            f"binary_cross_entropy(...): expected floating-point probabilities, got {input.dtype} (torch's kernel "
            "is not implemented for it)."
        )
    interior = False
    if is_eager() and input.numel() and on_accelerator(input):
        # As torch's kernel does there: a device-side assertion, no host synchronisation (and
        # so no knowledge of whether the clamps can act: the clamped path is taken).
        inside = (input.detach() >= 0) & (input.detach() <= 1) & (target.detach() >= 0) & (target.detach() <= 1)
        torch._assert_async(
            inside.all(), "binary_cross_entropy(...): expected all elements of input and target in [0, 1]."
        )
    elif is_eager() and input.numel():
        # One pass for the range check; the same min/max say whether torch's clamps can act.
        low, high = torch.stack(list(torch.aminmax(input.detach()))).double().tolist()
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            raise RuntimeError(
                "binary_cross_entropy(...): expected all elements of input to be between 0 and 1, got values "
                f"in [{low}, {high}]. Apply sigmoid, or use binary_cross_entropy_with_logits on logits."
            )
        t_low, t_high = torch.stack(list(torch.aminmax(target.detach()))).double().tolist()
        if not (t_low >= 0.0 and t_high <= 1.0):
            raise RuntimeError(
                "binary_cross_entropy(...): expected all elements of target to be between 0 and 1 (probabilities "
                f"or labels), got values in [{t_low}, {t_high}]. all elements of target should be between 0 and 1."
            )
        interior = low >= _GRAD_FLOOR and 1.0 - high >= _GRAD_FLOOR
    if interior and weight is None and use_fused(input, target, reduction):
        return fused_probability_bce(input, target, reduction)
    if interior:
        # No probability within 1e-12 of 0 or 1: torch's clamps cannot act, plain logs are exact.
        log_p, log_q = torch.log(input), torch.log1p(-input)
        values = -torch.lerp(log_q, log_p, target)
    elif torch.compiler.is_compiling():
        # Compiled, the two logs apart: Inductor fuses them into the loss's one pass, where it
        # would materialise a stacked [p, 1 - p] (4x slower forward+backward, measured).
        values = -torch.lerp(_bce_log(1 - input), _bce_log(input), target)
    else:
        # Both logs in one pass over [p, 1 - p]; y log p + (1 - y) log q = lerp(log q, log p, y).
        logs = _bce_log(torch.stack([input, 1 - input]))
        values = -torch.lerp(logs[1], logs[0], target)
    if weight is not None:
        values = values * weight
        if values.dtype != input.dtype:
            values = values.to(input.dtype)  # torch's kernel weighs in the input's dtype
    return reduce(values, reduction)


@float32_under_autocast
def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy on logits, computed stably through ``log sigmoid``.

    .. math::
        \\ell_i = -w_i \\left[ p_c\\, y_i \\log \\sigma(x_i) + (1 - y_i) \\log(1 - \\sigma(x_i)) \\right]

    Args:
        input: logits, any shape.
        target: same shape as ``input``, values in [0, 1].
        weight: broadcastable to ``input``, multiplies each element.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        pos_weight: weight of the positive term, broadcast against the target (typically one
            per class in the last dim).

    See also: ``torch.nn.functional.binary_cross_entropy_with_logits``.
    """
    check_reduction("binary_cross_entropy_with_logits", reduction)
    check_same_shape("binary_cross_entropy_with_logits", input, target)
    if not (input.is_floating_point() or target.is_floating_point()):
        raise NotImplementedError(
            f"binary_cross_entropy_with_logits(...): expected floating-point logits and target, got {input.dtype} "
            f"and {target.dtype} (torch's kernel is not implemented for them)."
        )
    if not target.is_floating_point():
        raise RuntimeError(
            f"binary_cross_entropy_with_logits(...): expected a floating-point target (0/1 labels or "
            f"probabilities), got {target.dtype}. Convert it with target.to(input.dtype)."
        )
    _check_weight_shape("binary_cross_entropy_with_logits", "weight", weight, input)
    _check_weight_shape("binary_cross_entropy_with_logits", "pos_weight", pos_weight, input)
    if weight is None and pos_weight is None and use_fused(input, target, reduction):
        return fused_logits_bce(input, target, reduction)
    log_sig = F.logsigmoid(input)
    if pos_weight is None:
        values = (1 - target) * input - log_sig
    else:
        values = (1 - target) * input - ((pos_weight - 1) * target + 1) * log_sig
    if weight is not None:
        values = values * weight
    if values.dtype != target.dtype and target.is_floating_point():
        values = values.to(target.dtype)  # torch computes in place on 1 - target: its dtype
    return reduce(values, reduction)


@float32_under_autocast
def kl_div(
    input: Tensor,
    target: Tensor,
    *,
    reduction: KLDivReduction = "mean",
    log_target: bool = False,
) -> Tensor:
    """Kullback-Leibler divergence ``KL(target || exp(input))``, with ``input`` as log-probabilities.

    .. math::
        \\ell_i = y_i (\\log y_i - x_i) \\quad (0 \\log 0 = 0), \\qquad
        \\ell_i = e^{y_i} (y_i - x_i) \\;\\; \\text{if log\\_target}

    ``"batchmean"`` divides the sum by the batch size and is the true KL divergence;
    ``"mean"`` divides by the number of elements and warns, as torch does.

    Args:
        input: log-probabilities, any shape.
        target: probabilities (or log-probabilities with ``log_target``), broadcastable.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"`` | ``"batchmean"``.
        log_target: read ``target`` as log-probabilities.

    References:
        Kullback, S. and Leibler, R. A. "On Information and Sufficiency", 1951.

    See also: ``torch.nn.functional.kl_div``.
    """
    check_reduction("kl_div", reduction, ("none", "mean", "sum", "batchmean"))
    if input.is_complex() or target.is_complex():
        raise RuntimeError(
            f"kl_div(...): expected real input and target, got {input.dtype} and {target.dtype}. "
            "Complex inputs are not supported (as in torch)."
        )
    if not (input.is_floating_point() and target.is_floating_point()):
        raise RuntimeError(
            f"kl_div(...): expected floating-point input and target, got {input.dtype} and {target.dtype}. "
            "Integral inputs not supported (as in torch); convert them with .float()."
        )
    if reduction == "mean" and not torch.compiler.is_compiling():
        warnings.warn(
            "kl_div(...): reduction='mean' divides the total loss by both the batch size and the "
            "support size. 'batchmean' divides only by the batch size, and aligns with the KL "
            "divergence's definition.",
            UserWarning,
            stacklevel=3,  # the caller of the autocast wrapper
        )
    if log_target:
        values = torch.exp(target) * (target - input)
    else:
        values = torch.addcmul(torch.xlogy(target, target), target, input, value=-1.0)
    if reduction == "batchmean":
        if input.dim() == 0:
            return values.sum()
        if values.shape[:1] == input.shape[:1]:
            return batchmean(values)
        # A target that broadcasts the input to more rows: torch still divides by the input's.
        return values.sum() / input.size(0)
    return reduce(values, reduction)
