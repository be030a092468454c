"""Margin losses: soft margin, hinge embedding and margin ranking (two-class), and the
multi-class / multi-label margins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import broadcast_shape, check_reduction
from .._combinators import reduce
from .._typing import Reduction


def soft_margin_loss(
    input: Tensor,
    target: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Two-class logistic loss for targets in {-1, 1}.

    .. math::
        \\ell_i = \\log(1 + e^{-y_i x_i})

    Computed as ``softplus(-y x)``: finite for any ``|x y|`` (torch's kernel overflows to
    ``inf`` once ``-x y`` passes about 88 in float32).

    Args:
        input: any shape.
        target: broadcastable to ``input`` without enlarging it; usually -1 or 1.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.soft_margin_loss``.
    """
    check_reduction("soft_margin_loss", reduction)
    if broadcast_shape(input.shape, target.shape) != input.shape:
        raise RuntimeError(
            f"soft_margin_loss(...): expected a target broadcastable to the input's shape "
            f"{tuple(input.shape)}, got {tuple(target.shape)}."
        )
    return reduce(F.softplus(-input * target), reduction)


def hinge_embedding_loss(
    input: Tensor,
    target: Tensor,
    margin: float = 1.0,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Hinge loss on a distance for similar (1) / dissimilar (-1) pairs.

    .. math::
        \\ell_i = [y_i \\ne -1]\\, x_i + [y_i \\ne 1] \\max(0, \\Delta - x_i)

    (For targets in {-1, 1} this is ``x`` for similar pairs and the hinge for dissimilar ones;
    other target values get both terms, as in torch.)

    Args:
        input: distances, any shape.
        target: broadcastable to ``input``, -1 or 1.
        margin: the margin ``Delta``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.hinge_embedding_loss``.
    """
    check_reduction("hinge_embedding_loss", reduction)
    zero = torch.zeros((), dtype=input.dtype, device=input.device)
    hinge = torch.where(target != 1, (margin - input).clamp_min(0), zero)
    direct = torch.where(target != -1, input, zero)
    return reduce(hinge + direct, reduction)


def margin_ranking_loss(
    input1: Tensor,
    input2: Tensor,
    target: Tensor,
    margin: float = 0,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Ranking hinge: ``input1`` should exceed ``input2`` by ``margin`` where ``target = 1``.

    .. math::
        \\ell_i = \\max(0, -y_i (x_{1,i} - x_{2,i}) + \\Delta)

    Args:
        input1, input2: scores, same number of dimensions.
        target: 1 or -1, same number of dimensions.
        margin: the margin ``Delta``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.margin_ranking_loss``.
    """
    check_reduction("margin_ranking_loss", reduction)
    if not input1.dim() == input2.dim() == target.dim():
        raise RuntimeError(
            "margin_ranking_loss(...): expected input1, input2 and target with the same number "
            f"of dimensions, got {tuple(input1.shape)}, {tuple(input2.shape)} and "
            f"{tuple(target.shape)}."
        )
    return reduce((-target * (input1 - input2) + margin).clamp_min(0), reduction)
