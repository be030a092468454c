"""Loss baselines: the loss of the best prediction that ignores the inputs.

A loss value means little alone: 0.42 nats of cross-entropy is excellent on 1000 balanced
classes and poor on a 95/5 split. `loss_baseline` gives the loss of the best *constant*
prediction (the same for every sample: class frequencies, the mean, the median, a quantile)
for the same targets and options, computed through the loss itself, and `Baseline.skill`
turns a model's loss into ``1 - loss / baseline``: 1 is perfect, 0 is no better than the
constant, negative is worse. For `mse_loss` the skill is the coefficient of determination
R^2; for `cross_entropy` with class indices it is McFadden's pseudo-R^2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _beyond, _classification, _margin, _probabilistic, _regression

__all__ = ["Baseline", "loss_baseline"]


@dataclass(frozen=True)
class Baseline:
    """The best constant prediction for some targets and its loss.

    Attributes:
        value: the loss of ``prediction`` against the targets, with the options given (and so
            the same reduction as the model's loss it is compared with).
        prediction: one sample's prediction, the loss's ``input`` without its batch dim; it is
            expanded along the batch dim when the loss is evaluated.
        description: what the prediction is, e.g. ``"log class frequencies"``.
    """

    value: Tensor
    prediction: Tensor
    description: str

    def skill(self, loss: Tensor | float) -> Tensor:
        """``1 - loss / value``: 1 for a perfect model, 0 for one no better than the constant,
        negative for a worse one (NaN or inf when the baseline is 0: the targets are constant)."""
        return 1 - torch.as_tensor(loss, dtype=self.value.dtype, device=self.value.device) / self.value


def _unsupported(fn: Callable[..., Tensor], kwargs: dict[str, Any], why: str) -> ValueError:
    name = getattr(fn, "__name__", repr(fn))
    return ValueError(
        f"loss_baseline(...): no closed-form constant for {name} with options {sorted(kwargs)}: {why}. "
        f"Supported: {', '.join(sorted({f.__name__ for f in _SUPPORTED}))}."
    )


def _mean(target: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return target.mean(0)
    w = weight.expand_as(target).to(target.dtype)
    return (w * target).sum(0) / w.sum(0)


def _order_statistic(target: Tensor, q: float | Tensor) -> Tensor:
    """Per position along dim 0: the smallest ``y`` with at least a ``q`` share of the targets at or
    below it (the lower median for ``q = 1/2``), a minimiser of the summed pinball loss."""
    n = target.size(0)
    ordered = target.sort(0).values
    rank = torch.as_tensor(q, dtype=torch.float64, device=target.device).mul(n).ceil().long().sub(1).clamp(0, n - 1)
    rank = rank.expand(target.shape[1:]).unsqueeze(0)
    return ordered.gather(0, rank)[0]


def _root(slope: Callable[[Tensor], Tensor], low: Tensor, high: Tensor) -> Tensor:
    """Per position, a zero of the non-decreasing ``slope`` in ``[low, high]`` by bisection (the
    minimiser of a convex loss over a constant, ``slope`` its derivative): 64 halvings take a
    float64 bracket to its last bit."""
    for _ in range(64):
        mid = (low + high) / 2
        up = slope(mid) > 0
        high = torch.where(up, mid, high)
        low = torch.where(up, low, mid)
    return (low + high) / 2


def _huber_location(target: Tensor, delta: float, weight: Tensor | None) -> Tensor:
    """The constant minimising the summed Huber loss: the root of ``sum_n w_n clamp(c - y_n,
    -delta, delta)``, between the smallest and largest target."""
    y = target.to(torch.float64)
    w = None if weight is None else weight.expand_as(target).to(torch.float64)

    def slope(c: Tensor) -> Tensor:
        psi = (c - y).clamp(-delta, delta)
        return (psi if w is None else w * psi).sum(0)

    return _root(slope, y.amin(0), y.amax(0)).to(target.dtype)


def _sign_log_odds(target: Tensor) -> Tensor:
    """The constant minimising ``sum_n log(1 + exp(-y_n c))``: the root of
    ``-sum_n y_n sigmoid(-y_n c)``; for labels in {-1, 1}, the log-odds of +1. Bracketed in
    [-40, 40] (a loss of 4e-18 where every label agrees)."""
    y = target.to(torch.float64)
    bound = torch.full(target.shape[1:], 40.0, dtype=torch.float64, device=target.device)
    return _root(lambda c: -(y * torch.sigmoid(-y * c)).sum(0), -bound, bound).to(target.dtype)


# A finite log-probability for a class no target has: exp(-1e4) is 0, and 0 * -1e4 is 0 where
# log(0) = -inf would make a probability target's 0 * log p a NaN.
_LOG_ZERO = -1e4


def _class_prior(
    target: Tensor,
    classes: int,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    dtype: torch.dtype,
) -> Tensor:
    """Log of the constant class distribution that minimises the (weighted, smoothed) mean
    cross-entropy, per position after the batch dim: ``(C, d1, ...)``.

    Setting the derivative of the mean loss over the simplex to zero gives ``p_c`` proportional
    to ``w_c ((1 - eps) n_c + eps N / C)`` for class indices (``n_c`` kept targets of class
    ``c`` out of ``N``), and to ``w_c ((1 - eps) qbar_c + eps / C)`` for class probabilities
    (``qbar`` their mean)."""
    if target.is_floating_point():
        mass = (1 - smoothing) * target.to(dtype).mean(0) + smoothing / classes
    else:
        keep = target != ignore_index
        safe = torch.where(keep, target, torch.zeros_like(target)).long()
        counts = torch.zeros((classes, *target.shape[1:]), dtype=dtype, device=target.device)
        counts.scatter_add_(0, safe, keep.to(dtype))
        mass = (1 - smoothing) * counts + smoothing / classes * counts.sum(0, keepdim=True)
    if weight is not None:
        mass = mass * weight.to(dtype).reshape(classes, *([1] * (mass.dim() - 1)))
    return torch.log(mass / mass.sum(0, keepdim=True)).clamp_min(_LOG_ZERO)


def loss_baseline(
    loss_fn: Callable[..., Tensor],
    target: Tensor,
    *,
    num_classes: int | None = None,
    **loss_kwargs: Any,
) -> Baseline:
    """The loss of the best prediction that is the same for every sample, for these targets.

    ``loss_fn`` is a funcloss loss or its torch.nn.functional namesake (or a ``functools.partial``
    of one binding options by keyword); ``loss_kwargs`` are the options the model's loss is
    computed with (reduction, weights, ...). The constant is the
    minimiser of the loss over predictions constant along the batch dim (dim 0), one per
    position after it:

    ============================================  ==================================================
    loss                                          constant prediction
    ============================================  ==================================================
    ``mse_loss``                                  mean (weighted mean with ``weight``)
    ``l1_loss``                                   median (lower median)
    ``quantile_loss``                             the ``quantile``-th order statistic
    ``cross_entropy`` (indices or probabilities)  log class frequencies (weighted by ``weight``,
                                                  smoothed by ``label_smoothing``)
    ``nll_loss``                                  log class frequencies (weighted)
    ``binary_cross_entropy``                      mean target
    ``binary_cross_entropy_with_logits``          logit of the mean target (``pos_weight`` included)
    ``poisson_nll_loss``                          mean target (its log with ``log_input``)
    ``huber_loss``, ``smooth_l1_loss``            Huber's location estimate (by bisection)
    ``soft_margin_loss``                          log-odds of the labels
    ``multilabel_soft_margin_loss``               logit of each class's frequency
    ``gaussian_nll_loss`` (``var=`` given)        the mean weighted by ``1 / var``
    ============================================  ==================================================

    Args:
        loss_fn: the loss.
        target: the targets the model is evaluated on, with their batch dim first.
        num_classes: ``C`` for class-index targets; by default the weight's length, else the
            largest target plus one.
        **loss_kwargs: the loss's options.

    Returns:
        A `Baseline`: its ``value`` is ``loss_fn(prediction expanded over the batch, target,
        **loss_kwargs)``, and ``skill(model_loss)`` is ``1 - model_loss / value``.

    Raises:
        ValueError: a loss (or option) without a closed-form constant here, or no targets.

    References:
        McFadden, D. "Conditional logit analysis of qualitative choice behavior", 1974 (the
        likelihood-ratio index ``1 - L / L_0``).
    """
    if target.dim() == 0 or target.size(0) == 0:
        raise ValueError(f"loss_baseline(...): expected targets with a non-empty batch dim, got {tuple(target.shape)}.")
    kwargs = dict(loss_kwargs)
    while isinstance(loss_fn, functools.partial) and not loss_fn.args:  # options bound with partial
        kwargs = {**loss_fn.keywords, **kwargs}
        loss_fn = loss_fn.func
    n = target.size(0)
    dtype = target.dtype if target.is_floating_point() else torch.get_default_dtype()
    description: str
    if loss_fn in (_regression.mse_loss, F.mse_loss):
        prediction, description = _mean(target, kwargs.get("weight")), "mean"
    elif loss_fn in (_regression.l1_loss, F.l1_loss):
        if kwargs.get("weight") is not None:
            raise _unsupported(loss_fn, kwargs, "a weighted median is not implemented")
        prediction, description = _order_statistic(target, 0.5), "median"
    elif loss_fn is _beyond.quantile_loss:
        if "quantile" not in kwargs:
            raise ValueError("loss_baseline(...): quantile_loss needs its quantile= option.")
        prediction, description = _order_statistic(target, kwargs["quantile"]), "quantile"
    elif loss_fn in (_classification.cross_entropy, F.cross_entropy, _classification.nll_loss, F.nll_loss):
        weight = kwargs.get("weight")
        smoothing = float(kwargs.get("label_smoothing", 0.0))
        if target.is_floating_point():
            classes = target.size(1)
        elif num_classes is not None:
            classes = num_classes
        elif weight is not None:
            classes = weight.numel()
        else:
            classes = int(target.max()) + 1
        ignore_index = int(kwargs.get("ignore_index", -100))
        if not target.is_floating_point() and weight is not None:
            dtype = weight.dtype  # class-index targets: scores in the weight's dtype, as the loss requires
        prediction = _class_prior(target, classes, weight, ignore_index, smoothing, dtype)
        description = "log class frequencies"
    elif loss_fn in (_probabilistic.binary_cross_entropy, F.binary_cross_entropy):
        prediction, description = _mean(target, kwargs.get("weight")), "mean target"
    elif loss_fn in (_probabilistic.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits):
        p = _mean(target, kwargs.get("weight"))
        pos_weight = kwargs.get("pos_weight")
        if pos_weight is not None:  # the minimiser of pw t log s + (1 - t) log(1 - s)
            p = pos_weight * p / (pos_weight * p + 1 - p)
        # A finite logit where every target agrees: its loss, log1p(exp(-40)), is 4e-18.
        prediction, description = (torch.logit(p).clamp(-40.0, 40.0), "logit of the mean target")
    elif loss_fn in (_regression.huber_loss, F.huber_loss, _regression.smooth_l1_loss, F.smooth_l1_loss):
        huber = loss_fn in (_regression.huber_loss, F.huber_loss)
        delta = float(kwargs.get("delta", 1.0) if huber else kwargs.get("beta", 1.0))
        weight = kwargs.get("weight") if huber else None
        if delta == 0:  # smooth_l1 with beta 0 is l1
            prediction, description = _order_statistic(target, 0.5), "median"
        else:
            prediction, description = _huber_location(target, delta, weight), "Huber location"
    elif loss_fn in (_margin.soft_margin_loss, F.soft_margin_loss):
        prediction, description = _sign_log_odds(target), "log-odds of the labels"
    elif loss_fn in (_margin.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss):
        mean = target.to(dtype).mean(0)
        prediction, description = torch.logit(mean).clamp(-40.0, 40.0), "logit of each class's frequency"
    elif loss_fn in (_regression.gaussian_nll_loss, F.gaussian_nll_loss):
        if "var" not in kwargs:
            raise ValueError("loss_baseline(...): gaussian_nll_loss needs its var= option.")
        var = torch.as_tensor(kwargs["var"], dtype=target.dtype, device=target.device)
        if var.dim() == target.dim() - 1 and var.dim() > 0 and var.shape != target.shape[1:]:
            var = var.unsqueeze(-1)  # (N, ..., D) targets with one variance per row
        precision = 1 / var.clamp_min(float(kwargs.get("eps", 1e-6))).expand_as(target)
        prediction, description = _mean(target, precision), "precision-weighted mean"
    elif loss_fn in (_regression.poisson_nll_loss, F.poisson_nll_loss):
        log_input = kwargs.get("log_input", True)
        mean = target.mean(0)
        prediction = mean.log().clamp_min(_LOG_ZERO) if log_input else mean
        description = "log mean target" if log_input else "mean target"
    else:
        raise _unsupported(loss_fn, kwargs, "not a loss this knows")
    expanded = prediction.unsqueeze(0).expand(n, *prediction.shape)
    value = loss_fn(expanded, target, **kwargs)
    return Baseline(value=value.detach(), prediction=prediction, description=description)


_SUPPORTED: tuple[Callable[..., Tensor], ...] = (
    _regression.mse_loss,
    _regression.l1_loss,
    _beyond.quantile_loss,
    _classification.cross_entropy,
    _classification.nll_loss,
    _probabilistic.binary_cross_entropy,
    _probabilistic.binary_cross_entropy_with_logits,
    _regression.poisson_nll_loss,
    _regression.huber_loss,
    _regression.smooth_l1_loss,
    _margin.soft_margin_loss,
    _margin.multilabel_soft_margin_loss,
    _regression.gaussian_nll_loss,
)
