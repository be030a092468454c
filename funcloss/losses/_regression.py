"""Regression losses: l1, mse, huber, smooth_l1, poisson_nll and gaussian_nll."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._autocast import float32_under_autocast
from .._checks import check_reduction, check_values, warn_if_broadcast
from .._combinators import reduce, weighted_reduce
from .._typing import Reduction
from ._fused import fused_difference_loss, use_fused


def _elementwise_weight(fn: str, weight: Tensor | None, input: Tensor) -> None:
    if weight is not None and weight.shape != input.shape:
        raise ValueError(
            f"{fn}(...): expected weight of the input's shape {tuple(input.shape)}, got "
            f"{tuple(weight.shape)}. Weights are per element; expand them to the input's shape."
        )


def _promote_bools(
    fn: str, input: Tensor, target: Tensor, *, result_in_input_dtype: bool = False
) -> tuple[Tensor, Tensor]:
    """Operand dtypes as torch's kernels take them: with no floating-point operand they are not
    implemented (``NotImplementedError``); a bool operand is promoted against the other one (a
    bool target of 0/1 labels, say), where Python's ``-`` refuses bools. With
    ``result_in_input_dtype`` (huber_loss) the kernel writes into the input's dtype, so an
    integral input is a ``RuntimeError`` as there."""
    if result_in_input_dtype and input.dtype == torch.bool and target.dtype != torch.bool:
        raise RuntimeError(f"{fn}(...): expected a floating-point input, got bool. Convert it with input.float().")
    if not (input.is_floating_point() or target.is_floating_point()):
        raise NotImplementedError(
            f"{fn}(...): expected a floating-point input or target, got {input.dtype} and {target.dtype} "
            "(torch's kernel is not implemented for them). Convert them with .float()."
        )
    if result_in_input_dtype and not input.is_floating_point():
        raise RuntimeError(
            f"{fn}(...): expected a floating-point input, got {input.dtype}: the result, in the input's dtype, "
            "cannot hold the loss. Convert it with input.float()."
        )
    if input.dtype != torch.bool and target.dtype != torch.bool:
        return input, target
    dtype = torch.result_type(input, target)
    return input.to(dtype), target.to(dtype)


@float32_under_autocast
def l1_loss(
    input: Tensor,
    target: Tensor,
    *,
    reduction: Reduction = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Mean absolute error.

    .. math::
        \\ell_i = w_i \\, |x_i - y_i|

    ``"mean"`` is ``sum(l) / sum(w)`` when a weight is given, the plain mean otherwise; ``"sum"``
    sums.

    Args:
        input: any shape.
        target: broadcastable to ``input`` (a different shape warns, as in torch, then
            broadcasts).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        weight: per-element weight of ``input``'s shape.

    Returns:
        A scalar, or the broadcast shape for ``"none"``.

    See also: ``torch.nn.functional.l1_loss``.
    """
    warn_if_broadcast("l1_loss", input, target)
    check_reduction("l1_loss", reduction)
    _elementwise_weight("l1_loss", weight, input)
    if weight is None and use_fused(input, target, reduction):
        return fused_difference_loss(input, target, "l1", reduction)
    x, y = input, target
    return weighted_reduce((x - y).abs(), weight, reduction)


@float32_under_autocast
def mse_loss(
    input: Tensor,
    target: Tensor,
    *,
    reduction: Reduction = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Mean squared error.

    .. math::
        \\ell_i = w_i \\, (x_i - y_i)^2

    ``"mean"`` is ``sum(l) / sum(w)`` when a weight is given, the plain mean otherwise.

    Args:
        input: any shape.
        target: broadcastable to ``input`` (a different shape warns, then broadcasts).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        weight: per-element weight of ``input``'s shape.

    See also: ``torch.nn.functional.mse_loss``.
    """
    warn_if_broadcast("mse_loss", input, target)
    check_reduction("mse_loss", reduction)
    if input.is_complex() or target.is_complex():
        raise NotImplementedError(
            f"mse_loss(...): expected real input and target, got {input.dtype} and {target.dtype} (torch's kernel "
            "has no complex form). For a complex error use ((input - target).abs() ** 2).mean()."
        )
    _elementwise_weight("mse_loss", weight, input)
    input, target = _promote_bools("mse_loss", input, target)
    if weight is None and use_fused(input, target, reduction):
        return fused_difference_loss(input, target, "mse", reduction)
    x, y = input, target
    d = x - y
    return weighted_reduce(d * d, weight, reduction)


def _compiled_operand(value: float, like: Tensor) -> Tensor | float:
    """A float option as an operand: itself in eager mode; a 0-d tensor while torch.compile
    traces. With ``dynamic=True`` torch.compile makes a float argument symbolic, and torch
    2.13's Inductor can then cache a graph with the first value baked into a ``clamp`` bound
    and reuse it for every later value, silently (pytorch/pytorch#194976, fixed after 2.13).
    Tensor operands stay inputs of the graph."""
    if torch.compiler.is_compiling():
        return torch.full((), value, dtype=like.dtype, device=like.device)
    return value


def _huber_values(d: Tensor, delta: Tensor | float) -> Tensor:
    """``c (d - c / 2)`` with ``c = clamp(d, -delta, delta)``: ``d^2 / 2`` inside the band and
    ``delta (|d| - delta / 2)`` outside, in three kernels. Inside, ``d - d / 2`` is exact, so
    the value is ``d^2 / 2`` rounded once; the derivative is ``c`` and the second derivative
    the band's indicator, as with the two-branch form."""
    if isinstance(delta, Tensor):  # under torch.compile (see `_compiled_operand`)
        c = torch.clamp(d, min=-delta, max=delta)
    else:
        c = d.clamp(-delta, delta)
    return c * torch.sub(d, c, alpha=0.5)


@float32_under_autocast
def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: Reduction = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Huber loss: quadratic near zero, linear beyond ``delta``.

    .. math::
        \\ell_i = w_i \\begin{cases} \\tfrac12 (x_i - y_i)^2 & |x_i - y_i| < \\delta \\\\
                  \\delta (|x_i - y_i| - \\tfrac12 \\delta) & \\text{otherwise} \\end{cases}

    ``"mean"`` is the plain mean of the weighted values (torch divides by the element count
    here, not by ``sum(w)`` as l1 and mse do).

    Args:
        input: any shape.
        target: broadcastable to ``input``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        delta: the threshold, > 0.
        weight: per-element weight of ``input``'s shape.

    References:
        Huber, P. J. "Robust Estimation of a Location Parameter", Annals of Mathematical
        Statistics, 1964.

    See also: ``torch.nn.functional.huber_loss``.
    """
    warn_if_broadcast("huber_loss", input, target)
    check_reduction("huber_loss", reduction)
    if not delta > 0:
        raise RuntimeError(
            f"huber_loss(...): expected delta > 0, got {delta}. huber_loss does not support "
            "non-positive values for delta."
        )
    _elementwise_weight("huber_loss", weight, input)
    input, target = _promote_bools("huber_loss", input, target, result_in_input_dtype=True)
    if weight is None and use_fused(input, target, reduction):
        return fused_difference_loss(input, target, "huber", reduction, delta=delta)
    d = input - target
    values = _huber_values(d, _compiled_operand(delta, d))
    if values.dtype != input.dtype:
        values = values.to(input.dtype)  # torch's kernel computes in the input's dtype
    if weight is not None:
        values = values * weight  # then weighs, with type promotion
    return reduce(values, reduction)


@float32_under_autocast
def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    *,
    reduction: Reduction = "mean",
    beta: float = 1.0,
) -> Tensor:
    """Smooth L1 loss: Huber loss divided by ``beta``; ``beta = 0`` is exactly L1.

    .. math::
        \\ell_i = \\begin{cases} \\tfrac{0.5 (x_i - y_i)^2}{\\beta} & |x_i - y_i| < \\beta \\\\
                  |x_i - y_i| - \\tfrac12 \\beta & \\text{otherwise} \\end{cases}

    Args:
        input: any shape.
        target: broadcastable to ``input``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        beta: the threshold, >= 0.

    References:
        Girshick, R. "Fast R-CNN", ICCV 2015.

    See also: ``torch.nn.functional.smooth_l1_loss``.
    """
    warn_if_broadcast("smooth_l1_loss", input, target)
    check_reduction("smooth_l1_loss", reduction)
    if beta < 0:
        raise RuntimeError(
            f"smooth_l1_loss(...): expected beta >= 0, got {beta}. smooth_l1_loss does not support "
            "negative values for beta."
        )
    input, target = _promote_bools("smooth_l1_loss", input, target)
    if use_fused(input, target, reduction):
        if beta == 0.0:
            return fused_difference_loss(input, target, "l1", reduction)
        return fused_difference_loss(input, target, "huber", reduction, delta=beta, scale=1.0 / beta)
    x, y = input, target
    d = x - y
    if beta == 0.0:
        return reduce(d.abs(), reduction)
    b = _compiled_operand(beta, d)
    return reduce(_huber_values(d, b) / b, reduction)


@float32_under_autocast
def poisson_nll_loss(
    input: Tensor,
    target: Tensor,
    log_input: bool = True,
    full: bool = False,
    *,
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> Tensor:
    """Negative log-likelihood of a Poisson target.

    .. math::
        \\ell_i = \\begin{cases} e^{x_i} - y_i x_i & \\text{log\\_input} \\\\
                  x_i - y_i \\log(x_i + \\varepsilon) & \\text{otherwise} \\end{cases}
                  \\; + \\; [\\text{full}, y_i > 1]\\,(y_i \\log y_i - y_i + \\tfrac12 \\log(2\\pi y_i))

    The last term is Stirling's approximation of ``log(y!)``, added only where ``y > 1``.

    Args:
        input: the rate's log (``log_input=True``) or the rate itself.
        target: counts, broadcastable to ``input``.
        log_input: whether ``input`` is a log-rate.
        full: add the Stirling term.
        eps: keeps ``log`` finite at rate 0 when ``log_input=False``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.poisson_nll_loss``.
    """
    check_reduction("poisson_nll_loss", reduction)
    if log_input:
        values = torch.exp(input) - target * input
    else:
        values = input - target * torch.log(input + eps)
    if full:
        # Evaluated at 1 where masked, so the unused branch has a finite gradient.
        big = target > 1
        y = torch.where(big, target, torch.ones_like(target))
        stirling = y * torch.log(y) - y + 0.5 * torch.log(2 * math.pi * y)
        values = values + torch.where(big, stirling, torch.zeros_like(stirling))
    return reduce(values, reduction)


def _gaussian_var(input: Tensor, var: Tensor | float) -> Tensor:
    if isinstance(var, (int, float)):
        if var < 0:
            raise ValueError(f"gaussian_nll_loss(...): expected var >= 0, got {var}. var has negative entry/entries.")
        return var * torch.ones_like(input)
    if not isinstance(var, Tensor):
        raise TypeError(f"gaussian_nll_loss(...): expected var to be a Tensor or float, got {type(var).__name__}.")
    check_values(
        lambda: ~(var < 0),  # NaN passes, as in torch (and propagates)
        ValueError,
        "gaussian_nll_loss(...): expected every var >= 0, got a negative entry. "
        "var has negative entry/entries. Pass a variance (e.g. softplus of a raw output).",
    )
    if not (var.is_floating_point() or var.is_complex()):
        # torch clamps a copy of var in place at eps, which an integral or bool tensor cannot hold.
        raise RuntimeError(
            f"gaussian_nll_loss(...): expected a floating-point var, got {var.dtype} (it is clamped at eps in "
            "its own dtype). Convert it with var.float()."
        )
    if var.shape == input.shape:
        return var
    if var.shape == input.shape[:-1]:
        return var.unsqueeze(-1)
    if input.dim() == var.dim() and sum(v for i, v in zip(input.shape, var.shape) if i != v) == 1:
        return var
    raise ValueError(
        f"gaussian_nll_loss(...): expected var of shape {tuple(input.shape)}, "
        f"{tuple(input.shape[:-1])}, or with one dimension of size 1, got {tuple(var.shape)}. "
        "var is of incorrect size."
    )


def gaussian_nll_loss(
    input: Tensor,
    target: Tensor,
    var: Tensor | float,
    full: bool = False,
    eps: float = 1e-6,
    reduction: Reduction = "mean",
) -> Tensor:
    """Negative log-likelihood of a Gaussian target with predicted mean and variance.

    .. math::
        \\ell_i = \\tfrac12 \\left(\\log \\max(\\sigma^2_i, \\varepsilon)
                  + \\frac{(x_i - y_i)^2}{\\max(\\sigma^2_i, \\varepsilon)}\\right)
                  + [\\text{full}] \\tfrac12 \\log 2\\pi

    The clamp at ``eps`` is invisible to autograd, as in torch: the gradient with respect to
    ``var`` is taken at the clamped value and passed through as if unclamped.

    Args:
        input: predicted mean, any shape.
        target: same shape as ``input`` (or broadcastable).
        var: predicted variance: a float, ``input``'s shape, ``input``'s shape without its last
            dim, or ``input``'s shape with one dim of size 1. Must be non-negative (checked in
            eager mode; unchecked under transforms, so the loss vmaps).
        full: add the constant ``0.5 log(2 pi)``.
        eps: lower clamp of ``var``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Nix, D. A. and Weigend, A. S. "Estimating the mean and variance of the target
        probability distribution", ICNN 1994.

    See also: ``torch.nn.functional.gaussian_nll_loss``.
    """
    check_reduction("gaussian_nll_loss", reduction)
    v = _gaussian_var(input, var)
    # Below eps the value is eps and the gradient passes through as if unclamped (torch clamps
    # in place under no_grad); an infinite variance stays infinite (no inf - inf).
    v = torch.where(v < eps, (v - v.detach()) + eps, v)
    d = input - target
    # ``pow`` as torch writes it: under CUDA autocast it runs in float32 (a product would not).
    values = 0.5 * (torch.log(v) + d.pow(2) / v)
    if full:
        values = values + 0.5 * math.log(2 * math.pi)
    return reduce(values, reduction)
