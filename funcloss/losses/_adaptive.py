"""Adaptive softmax (Grave et al. 2017) as pure functions of explicit parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_range, is_eager


class ASMOutput(NamedTuple):
    """What `adaptive_log_softmax_with_loss` returns (torch's module returns the same pair)."""

    output: Tensor
    """``(N,)`` (or a scalar): the log-probability of each target."""
    loss: Tensor
    """The mean negative log-likelihood."""


def _bounds(head_weight: Tensor, tail_weights: Sequence[tuple[Tensor, Tensor]], cutoffs: Sequence[int]) -> list[int]:
    cut = [int(c) for c in cutoffs]
    if not cut or cut != sorted(cut) or cut[0] <= 0 or len(set(cut)) != len(cut):
        raise ValueError(
            f"adaptive_log_softmax_with_loss(...): expected cutoffs to be unique, positive, increasing integers, "
            f"got {list(cutoffs)}."
        )
    if len(tail_weights) != len(cut):
        raise ValueError(
            f"adaptive_log_softmax_with_loss(...): expected one (projection, output) weight pair per cutoff "
            f"({len(cut)}), got {len(tail_weights)}."
        )
    if head_weight.size(0) != cut[0] + len(cut):
        raise ValueError(
            f"adaptive_log_softmax_with_loss(...): expected head_weight with {cut[0] + len(cut)} rows "
            f"(shortlist {cut[0]} + {len(cut)} clusters), got {head_weight.size(0)}."
        )
    bounds = [*cut, cut[-1] + tail_weights[-1][1].size(0)]
    for i, (_, out_w) in enumerate(tail_weights):
        if out_w.size(0) != bounds[i + 1] - bounds[i]:
            raise ValueError(
                f"adaptive_log_softmax_with_loss(...): expected tail {i}'s output weight to have "
                f"{bounds[i + 1] - bounds[i]} rows (classes {bounds[i]}..{bounds[i + 1] - 1}), got {out_w.size(0)}."
            )
    return bounds


def _head(input: Tensor, head_weight: Tensor, head_bias: Tensor | None) -> Tensor:
    logits = input @ head_weight.T
    return torch.log_softmax(logits if head_bias is None else logits + head_bias, dim=-1)


def _cluster_logprob(x: Tensor, projection: Tensor, out_weight: Tensor) -> Tensor:
    return torch.log_softmax((x @ projection.T) @ out_weight.T, dim=-1)


def adaptive_log_softmax_with_loss(
    input: Tensor,
    target: Tensor,
    head_weight: Tensor,
    tail_weights: Sequence[tuple[Tensor, Tensor]],
    cutoffs: Sequence[int],
    *,
    head_bias: Tensor | None = None,
) -> ASMOutput:
    """Adaptive softmax: the log-probability of each target and the mean NLL.

    Classes below ``cutoffs[0]`` are scored by the head; cluster ``i`` (classes
    ``cutoffs[i]`` to the next cutoff) gets one head logit and its own two-layer softmax:

    .. math::
        \\log p(y) = \\log p_{\\text{head}}(c(y)) + [c(y) \\text{ is a cluster}]\\,\\log p_{c(y)}(y)

    Same output and loss as ``torch.nn.AdaptiveLogSoftmaxWithLoss`` with the same weights
    (``head.weight``, ``head.bias``, ``tail[i][0].weight``, ``tail[i][1].weight``). In eager mode
    each cluster runs only on its own rows; under transforms every cluster runs on every row
    (masked), which gives the same values and composes with ``vmap``.

    Args:
        input: ``(N, in_features)`` or ``(in_features,)``.
        target: ``(N,)`` or a scalar, class indices in ``[0, n_classes)``.
        head_weight: ``(cutoffs[0] + n_clusters, in_features)``.
        tail_weights: per cluster, ``(projection (h_i, in_features), output (size_i, h_i))``.
        cutoffs: the constructor's cutoffs (``n_classes`` excluded).
        head_bias: ``(cutoffs[0] + n_clusters,)``.

    References:
        Grave, E. et al. "Efficient softmax approximation for GPUs", ICML 2017.

    See also: ``torch.nn.AdaptiveLogSoftmaxWithLoss``.
    """
    bounds = _bounds(head_weight, tail_weights, cutoffs)
    n_classes = bounds[-1]
    if target.dim() == 1:
        if input.dim() != 2 or input.size(0) != target.size(0):
            raise RuntimeError(
                f"adaptive_log_softmax_with_loss(...): expected input (N, in_features) with N = {target.size(0)} "
                f"for a 1-D target, got {tuple(input.shape)}."
            )
    elif target.dim() == 0:
        if input.dim() != 1:
            raise RuntimeError(
                f"adaptive_log_softmax_with_loss(...): expected a 1-D input for a 0-D target, got {tuple(input.shape)}."
            )
    else:
        raise RuntimeError(
            "adaptive_log_softmax_with_loss(...): expected a 0-D or 1-D target; multi-target is not supported."
        )
    check_range(
        target,
        0,
        n_classes - 1,
        RuntimeError,
        f"adaptive_log_softmax_with_loss(...): target values should be in [0, {n_classes - 1}].",
    )
    batched = target.dim() == 1
    x = input if batched else input.unsqueeze(0)
    y = target if batched else target.unsqueeze(0)
    shortlist = bounds[0]
    cluster = torch.zeros_like(y)
    for c in bounds[:-1]:
        cluster = cluster + (y >= c).to(y.dtype)
    head_index = torch.where(cluster == 0, y, shortlist + cluster - 1)
    output = _head(x, head_weight, head_bias).gather(1, head_index.unsqueeze(1))[:, 0]
    for i, (projection, out_weight) in enumerate(tail_weights):
        low, size = bounds[i], bounds[i + 1] - bounds[i]
        if is_eager() and not y.is_meta:  # the meta device has no rows to select: the dense form
            rows = (cluster == i + 1).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            local = _cluster_logprob(x.index_select(0, rows), projection, out_weight)
            picked = local.gather(1, (y.index_select(0, rows) - low).unsqueeze(1))[:, 0]
            output = output.index_add(0, rows, picked)
        else:
            local = _cluster_logprob(x, projection, out_weight)
            picked = local.gather(1, (y - low).clamp(0, size - 1).unsqueeze(1))[:, 0]
            output = output + torch.where(cluster == i + 1, picked, torch.zeros_like(picked))
    loss = (-output).mean()
    return ASMOutput(output if batched else output[0], loss)


def adaptive_log_prob(
    input: Tensor,
    head_weight: Tensor,
    tail_weights: Sequence[tuple[Tensor, Tensor]],
    cutoffs: Sequence[int],
    *,
    head_bias: Tensor | None = None,
) -> Tensor:
    """Log-probabilities of all ``n_classes`` classes under the adaptive softmax, ``(N, n_classes)``
    for ``(N, in_features)`` input, ``(n_classes,)`` for an unbatched ``(in_features,)`` one (so
    it batches under ``vmap``; torch's ``log_prob`` takes only the first).

    See also: ``torch.nn.AdaptiveLogSoftmaxWithLoss.log_prob``.
    """
    bounds = _bounds(head_weight, tail_weights, cutoffs)
    head = _head(input, head_weight, head_bias)
    shortlist = bounds[0]
    parts = [head[..., :shortlist]]
    for i, (projection, out_weight) in enumerate(tail_weights):
        parts.append(_cluster_logprob(input, projection, out_weight) + head[..., shortlist + i : shortlist + i + 1])
    return torch.cat(parts, dim=-1)
