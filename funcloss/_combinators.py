"""Combinators: reductions, weighting, masking, scaling and sums of losses.

Two levels. Tensor-level functions (`reduce`, `weighted_mean`, `normalized_sum`, `batchmean`) turn
unreduced values into a result; every torch-compatible loss in funcloss ends in one of them.
Function-level combinators (`reduced`, `weighted`, `masked`, `scaled`, `loss_sum`) take a loss
and return a loss with the same call signature. They are small frozen records of a function and
its configuration, so they print, compare, pickle and compose with ``torch.func`` transforms.

A loss given to a function-level combinator should return *unreduced* values (for the built-in
losses: ``reduction="none"``); the combinator then applies its own reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Concatenate, Generic, ParamSpec

import torch
from torch import Tensor

from ._checks import check_reduction
from ._typing import Reduction, WeightBy

P = ParamSpec("P")

__all__ = [
    "LossSum",
    "Masked",
    "Reduced",
    "Scaled",
    "Weighted",
    "batchmean",
    "loss_sum",
    "masked",
    "normalized_sum",
    "reduce",
    "reduced",
    "scaled",
    "weighted",
    "weighted_mean",
    "weighted_reduce",
]


# --------------------------------------------------------------------------- tensor level


def class_values(weight: Tensor, target: Tensor) -> Tensor:
    """``weight[target]`` for a ``(C,)`` weight and class indices of any shape, as one
    ``index_select``: indexing with a 0-dim index (one example's target under ``vmap``) would
    read the index's value, which vmap cannot."""
    return weight.index_select(0, target.reshape(-1)).reshape(target.shape)


def reduce(values: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Reduce unreduced loss values: ``"none"`` returns them, ``"sum"`` sums, ``"mean"`` averages.

    The mean of an empty tensor is NaN, as in torch.nn.functional.
    """
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    check_reduction("reduce", reduction)
    raise AssertionError("unreachable")


def normalized_sum(values: Tensor, normalizer: Tensor | float) -> Tensor:
    """``sum(values) / normalizer``: a mean with an explicit denominator."""
    return values.sum() / normalizer


def weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """``sum(w * v) / sum(w)`` with ``weight`` broadcast to ``values``' shape.

    This is torch's weighted mean for cross-entropy with class weights, and for l1/mse with
    ``weight=``. All-zero weights give NaN (0 / 0), as in torch.
    """
    w = weight.expand_as(values) if weight.shape != values.shape else weight
    return (values * w).sum() / w.sum()


def batchmean(values: Tensor) -> Tensor:
    """``sum(values) / values.size(0)``; a 0-dim tensor is returned as its sum."""
    if values.dim() == 1:
        return values.mean()  # the same division, one kernel (per example under vmap)
    total = values.sum()
    if values.dim() == 0:
        return total
    return total / values.size(0)


def weighted_reduce(values: Tensor, weight: Tensor | None, reduction: Reduction) -> Tensor:
    """`reduce`, or with a weight: ``"mean"`` is `weighted_mean`, the others reduce ``w * v``."""
    if weight is None:
        return reduce(values, reduction)
    if reduction == "mean":
        return weighted_mean(values, weight)
    return reduce(values * weight, reduction)


# --------------------------------------------------------------------------- function level


@dataclass(frozen=True)
class Reduced(Generic[P]):
    """A loss whose unreduced values are reduced; see `reduced`."""

    loss: Callable[P, Tensor]
    reduction: Reduction = "mean"
    normalizer: Tensor | float | None = None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Tensor:
        values = self.loss(*args, **kwargs)
        if self.normalizer is not None:
            return normalized_sum(values, self.normalizer)
        return reduce(values, self.reduction)


def reduced(
    loss: Callable[P, Tensor],
    reduction: Reduction = "mean",
    *,
    normalizer: Tensor | float | None = None,
) -> Reduced[P]:
    """Reduce the values of an unreduced loss.

    Args:
        loss: returns unreduced values.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        normalizer: if given, the result is ``sum(values) / normalizer`` (the reduction is then
            ignored): a mean over a count other than the number of elements.

    Example:
        >>> mean_l1 = reduced(functools.partial(l1_loss, reduction="none"))
    """
    check_reduction("reduced", reduction)
    return Reduced(loss, reduction, normalizer)


@dataclass(frozen=True)
class Scaled(Generic[P]):
    """A loss multiplied by a constant; see `scaled`."""

    loss: Callable[P, Tensor]
    factor: float

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Tensor:
        return self.loss(*args, **kwargs) * self.factor


def scaled(loss: Callable[P, Tensor], factor: float) -> Scaled[P]:
    """``factor * loss(...)``, keeping the loss's call signature."""
    if not isinstance(factor, (int, float)):
        raise TypeError(f"scaled(...): expected factor to be a float, got {type(factor).__name__}.")
    return Scaled(loss, float(factor))


def _check_fits(fn: str, what: str, other: Tensor, values: Tensor) -> None:
    """``other`` (a weight or mask) must broadcast to the loss values' shape without growing
    it: a reduced loss (a scalar) would otherwise be spread silently over the weight's shape."""
    shape = tuple(values.shape)
    if other.dim() <= values.dim() and all(o in (1, v) for o, v in zip(reversed(other.shape), reversed(shape))):
        return
    hint = (
        " The loss returned a scalar: it reduces its values itself. Pass it unreduced, e.g. "
        "functools.partial(loss, reduction='none'), and give the reduction here."
        if values.dim() == 0
        else ""
    )
    raise ValueError(
        f"{fn}(...): expected a {what} broadcastable to the loss values' shape {shape}, got shape "
        f"{tuple(other.shape)}.{hint}"
    )


def _expand_weight(fn: str, weight: Tensor, by: WeightBy, values: Tensor, target: Tensor) -> Tensor:
    if by == "element":
        _check_fits(fn, "per-element weight", weight, values)
        return weight
    if by == "sample":
        if values.dim() == 0:
            _check_fits(fn, "per-sample weight", weight, values)  # raises: the loss reduced already
        if weight.dim() != 1 or weight.size(0) != values.size(0):
            raise ValueError(
                f"{fn}(...): expected a 1-D per-sample weight of length {values.size(0)} "
                f"(the loss's dim 0), got shape {tuple(weight.shape)}."
            )
        return weight.reshape(weight.shape + (1,) * (values.dim() - 1))
    if by == "class":
        if weight.dim() != 1:
            raise ValueError(f"{fn}(...): expected a 1-D per-class weight of shape (C,), got {tuple(weight.shape)}.")
        if target.is_floating_point():
            target = target.long()
        w = class_values(weight, target)
        _check_fits(fn, "per-class weight gathered by the target", w, values)
        return w
    raise ValueError(f"{fn}(...): expected by to be 'element', 'sample' or 'class', got {by!r}.")


@dataclass(frozen=True)
class Weighted(Generic[P]):
    """A loss whose values are weighted; see `weighted`."""

    loss: Callable[Concatenate[Tensor, Tensor, P], Tensor]
    weight: Tensor
    by: WeightBy = "element"
    reduction: Reduction = "none"

    def __call__(self, input: Tensor, target: Tensor, /, *args: P.args, **kwargs: P.kwargs) -> Tensor:
        values = self.loss(input, target, *args, **kwargs)
        w = _expand_weight("weighted", self.weight, self.by, values, target)
        if self.reduction == "mean":
            return weighted_mean(values, w)
        return reduce(values * w, self.reduction)


def weighted(
    loss: Callable[Concatenate[Tensor, Tensor, P], Tensor],
    weight: Tensor,
    *,
    by: WeightBy = "element",
    reduction: Reduction = "none",
) -> Weighted[P]:
    """Weight an unreduced loss per element, per sample or per target class.

    .. math::
        \\ell'_i = w_i \\, \\ell_i, \\qquad \\text{mean} = \\frac{\\sum_i w_i \\ell_i}{\\sum_i w_i}

    Args:
        loss: ``(input, target, ...) -> values``, unreduced.
        weight: ``by="element"``: broadcastable to the values; ``by="sample"``: shape ``(N,)``,
            one weight per entry of the values' dim 0; ``by="class"``: shape ``(C,)``, gathered
            by the (integer, or integral float) target, which must have the values' shape.
        by: what ``weight`` indexes.
        reduction: ``"mean"`` is the weighted mean above (torch's convention for class weights).

    To mask and weight together, weight by ``weight * mask``.
    """
    check_reduction("weighted", reduction)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weighted(...): expected weight to be a Tensor, got {type(weight).__name__}.")
    if by not in ("element", "sample", "class"):
        raise ValueError(f"weighted(...): expected by to be 'element', 'sample' or 'class', got {by!r}.")
    return Weighted(loss, weight, by, reduction)


@dataclass(frozen=True)
class Masked(Generic[P]):
    """A loss restricted to the elements where a mask is true; see `masked`."""

    loss: Callable[P, Tensor]
    mask: Tensor
    reduction: Reduction = "none"

    def _blank(self, a: object) -> object:
        if isinstance(a, Tensor) and a.is_floating_point() and a.shape == self.mask.shape:
            return torch.where(self.mask, a, torch.zeros((), dtype=a.dtype, device=a.device))
        return a

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Tensor:
        blanked = [self._blank(a) for a in args]
        values = self.loss(*blanked, **kwargs)  # type: ignore[arg-type]
        if self.mask.shape != values.shape:
            _check_fits("masked", "mask", self.mask, values)
            keep = self.mask.expand_as(values)
        else:
            keep = self.mask
        kept = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
        if self.reduction == "mean":
            return kept.sum() / keep.sum()
        return reduce(kept, self.reduction)


def masked(loss: Callable[P, Tensor], mask: Tensor, *, reduction: Reduction = "none") -> Masked[P]:
    """Keep the loss values where ``mask`` is true and zero the others.

    Masked-out values are replaced (not multiplied by 0). Before the loss runs, masked-out
    entries of every floating-point positional argument of exactly the mask's shape are set to
    0, so a NaN or inf there (a missing label, say) reaches neither the result nor the gradient.
    ``reduction="mean"`` averages over the kept elements only (NaN if none are kept, like
    torch's mean of nothing).

    Args:
        loss: returns unreduced values.
        mask: boolean, broadcastable to the values.
    """
    check_reduction("masked", reduction)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"masked(...): expected a boolean mask tensor, got {got}. Use mask.bool().")
    return Masked(loss, mask, reduction)


@dataclass(frozen=True)
class LossSum(Generic[P]):
    """A weighted sum of losses whose terms stay available.

    Calling it returns ``sum_k weights[k] * terms[k](...)``. `values` returns each term
    unweighted, `weighted_values` each term times its weight: log them, or hand the terms to
    `funcloss.gradient_conflicts` to see where they pull the parameters in opposite directions.
    """

    terms: Mapping[str, Callable[P, Tensor]]
    weights: Mapping[str, float] = field(default_factory=dict)

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)

    def values(self, *args: P.args, **kwargs: P.kwargs) -> dict[str, Tensor]:
        return {name: term(*args, **kwargs) for name, term in self.terms.items()}

    def weighted_values(self, *args: P.args, **kwargs: P.kwargs) -> dict[str, Tensor]:
        return {name: v * self.weight(name) for name, v in self.values(*args, **kwargs).items()}

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Tensor:
        values = self.weighted_values(*args, **kwargs)
        parts = list(values.values())
        if any(part.shape != parts[0].shape for part in parts[1:]):
            shapes = ", ".join(f"{name}: {tuple(v.shape)}" for name, v in values.items())
            raise ValueError(
                f"loss_sum(...): expected terms of one shape, got {shapes}. Adding them would broadcast "
                "(a reduced term's scalar added to every element of an unreduced one). Give every term the "
                "same reduction."
            )
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


def loss_sum(
    terms: Mapping[str, Callable[P, Tensor]],
    weights: Mapping[str, float] | None = None,
) -> LossSum[P]:
    """Sum named losses with optional weights (missing weights are 1).

    Example:
        >>> total = loss_sum({"huber": huber, "l1": l1}, weights={"l1": 0.1})
        >>> total(x, y)            # a Tensor
        >>> total.values(x, y)     # {"huber": ..., "l1": ...}
    """
    if not terms:
        raise ValueError("loss_sum(...): expected at least one term, got none.")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise ValueError(
            f"loss_sum(...): expected weights only for the terms {sorted(terms)}, got weights for "
            f"{unknown}. Check the names."
        )
    for name, term in terms.items():
        if not callable(term):
            raise TypeError(f"loss_sum(...): expected term {name!r} to be callable, got {type(term).__name__}.")
    return LossSum(dict(terms), {k: float(v) for k, v in weights.items()})
