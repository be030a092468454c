"""Embedding losses: cosine embedding and triplet margin (with a p-norm or any distance)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._autocast import float32_under_autocast
from .._checks import check_reduction
from .._combinators import reduce
from .._typing import DistanceFunction, Reduction

# torch adds this to each squared magnitude before dividing.
_COSINE_EPS = 1e-12


@float32_under_autocast
def cosine_embedding_loss(
    input1: Tensor,
    input2: Tensor,
    target: Tensor,
    margin: float = 0,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Pull similar pairs (target 1) together and push dissimilar ones (-1) below a cosine margin.

    .. math::
        \\cos_n = \\frac{x_{1,n} \\cdot x_{2,n}}{\\sqrt{(\\|x_{1,n}\\|^2 + \\epsilon)(\\|x_{2,n}\\|^2 + \\epsilon)}},
        \\quad \\ell_n = \\begin{cases} 1 - \\cos_n & y_n = 1 \\\\ \\max(0, \\cos_n - \\Delta) & y_n = -1 \\end{cases}

    with ``epsilon = 1e-12`` (other target values contribute 0, as in torch).

    Args:
        input1, input2: ``(N, D)`` or ``(D,)``.
        target: ``(N,)`` or a scalar, 1 or -1.
        margin: ``Delta``, usually in [-1, 1].
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.cosine_embedding_loss``.
    """
    check_reduction("cosine_embedding_loss", reduction)
    if target.dim() > 1:
        raise RuntimeError(
            f"cosine_embedding_loss(...): expected a 0-D or 1-D target, got shape {tuple(target.shape)}. "
            "0D or 1D target tensor expected, multi-target not supported."
        )
    if input1.dim() != target.dim() + 1 or input2.dim() != input1.dim():
        raise RuntimeError(
            f"cosine_embedding_loss(...): expected inputs with one more dim than the target {tuple(target.shape)}, "
            f"got {tuple(input1.shape)} and {tuple(input2.shape)}."
        )
    dim = input1.dim() - 1
    prod = (input1 * input2).sum(dim)
    mag1 = (input1 * input1).sum(dim) + _COSINE_EPS
    mag2 = (input2 * input2).sum(dim) + _COSINE_EPS
    cos = prod / (mag1 * mag2).sqrt()
    zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
    pos = torch.where(target == 1, 1 - cos, zero)
    neg = torch.where(target == -1, (cos - margin).clamp_min(0), zero)
    return reduce(pos + neg, reduction)


def pairwise_distance(x1: Tensor, x2: Tensor, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False) -> Tensor:
    """``|| x1 - x2 + eps ||_p`` over the last dim: torch's pairwise distance, eps included."""
    distance: Tensor = torch.linalg.vector_norm(x1 - x2 + eps, ord=p, dim=-1, keepdim=keepdim)
    return distance


def _check_triplet(fn: str, anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> None:
    if margin <= 0:
        raise ValueError(f"{fn}(...): expected margin > 0, got {margin}. margin must be greater than 0.")
    if not anchor.dim() == positive.dim() == negative.dim():
        raise RuntimeError(
            f"{fn}(...): the anchor, positive, and negative tensors are expected to have the same number of "
            f"dimensions, but got: anchor {anchor.dim()}D, positive {positive.dim()}D, "
            f"and negative {negative.dim()}D inputs."
        )


@float32_under_autocast
def triplet_margin_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 1.0,
    p: float = 2,
    eps: float = 1e-6,
    swap: bool = False,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Triplet loss: the anchor should be closer to the positive than to the negative by a margin.

    .. math::
        d(a, b) = \\| a - b + \\epsilon \\|_p, \\qquad
        \\ell_n = \\max(0, d(a_n, p_n) - d(a_n, n_n) + \\Delta)

    With ``swap``, ``d(a, n)`` is replaced by ``min(d(a, n), d(p, n))``.

    Args:
        anchor, positive, negative: ``(N, D)`` or ``(D,)``, the same number of dimensions.
        margin: ``Delta`` > 0.
        p: the norm's degree.
        eps: added to each difference (keeps the norm's gradient finite).
        swap: use the distance swap of Balntas et al.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Schroff, F. et al. "FaceNet: A Unified Embedding for Face Recognition and Clustering", CVPR 2015.
        Balntas, V. et al. "Learning local feature descriptors with triplets and shallow
        convolutional neural networks", BMVC 2016.

    See also: ``torch.nn.functional.triplet_margin_loss``.
    """
    check_reduction("triplet_margin_loss", reduction)
    _check_triplet("triplet_margin_loss", anchor, positive, negative, margin)
    d_pos = pairwise_distance(anchor, positive, p, eps)
    d_neg = pairwise_distance(anchor, negative, p, eps)
    if swap:
        d_neg = torch.minimum(d_neg, pairwise_distance(positive, negative, p, eps))
    return reduce((margin + d_pos - d_neg).clamp_min(0), reduction)


def triplet_margin_with_distance_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    distance_function: DistanceFunction | None = None,
    margin: float = 1.0,
    swap: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Triplet loss with any distance: ``max(0, d(a, p) - d(a, n) + margin)``.

    Args:
        anchor, positive, negative: embeddings with the same number of dimensions.
        distance_function: ``(x1, x2) -> distances``; default `pairwise_distance` (p = 2).
        margin: > 0.
        swap: replace ``d(a, n)`` by ``min(d(a, n), d(p, n))``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.triplet_margin_with_distance_loss``.
    """
    check_reduction("triplet_margin_with_distance_loss", reduction)
    _check_triplet("triplet_margin_with_distance_loss", anchor, positive, negative, margin)
    d = distance_function if distance_function is not None else pairwise_distance
    d_pos = d(anchor, positive)
    d_neg = d(anchor, negative)
    if swap:
        d_neg = torch.minimum(d_neg, d(positive, negative))
    return reduce(torch.clamp_min(margin + d_pos - d_neg, 0), reduction)
