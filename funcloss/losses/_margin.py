"""Margin losses: soft margin, hinge embedding and margin ranking (two-class), and the
multi-class / multi-label margins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autocast import float32_under_autocast
from .._checks import broadcast_shape, check_range, check_reduction, is_eager
from .._combinators import class_values, reduce
from .._typing import Reduction


@float32_under_autocast
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
    if not (input.is_floating_point() or input.is_complex()):
        # torch's kernel computes log(1 + exp(-y x)) in place in the input's dtype.
        raise RuntimeError(
            f"soft_margin_loss(...): expected floating-point scores, got {input.dtype}: the loss is computed "
            "in the input's dtype, which cannot hold it. Convert the input with input.float()."
        )
    if broadcast_shape(input.shape, target.shape) != input.shape:
        raise RuntimeError(
            f"soft_margin_loss(...): expected a target broadcastable to the input's shape "
            f"{tuple(input.shape)}, got {tuple(target.shape)}."
        )
    if input.is_complex() or target.is_complex():
        values = _complex_soft_margin(input, target)
    else:
        values = F.softplus(-input * target)
    # torch's kernel returns the input's dtype whatever the target's.
    return reduce(values if values.dtype == input.dtype else values.to(input.dtype), reduction)


def _complex_soft_margin(input: Tensor, target: Tensor) -> Tensor:
    """torch's kernel evaluates ``log(1 + exp(-y x))`` in the input's dtype, so a complex
    input gives a complex value; a complex target with a real input cannot be cast back."""
    if not input.is_complex():
        raise RuntimeError(
            f"soft_margin_loss(...): result type {torch.promote_types(input.dtype, target.dtype)} can't be cast "
            f"to the input's dtype {input.dtype}. Pass a real target, or make the input complex too."
        )
    return torch.log1p(torch.exp(-input * target))


@float32_under_autocast
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
    # torch forms margin - x in the input's dtype: an integral input truncates the margin and
    # gives an integral loss (whose "mean" is then refused).
    gap = margin - input if input.is_floating_point() else torch.full_like(input, margin) - input
    hinge = torch.where(target != 1, gap.clamp_min(0), zero)
    direct = torch.where(target != -1, input, zero)
    return reduce(hinge + direct, reduction)


@float32_under_autocast
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
    # The margin is a float (``+ 0.0``; also for a symbolic int), as torch's: integral scores
    # give a floating-point loss.
    return reduce((-target * (input1 - input2) + (margin + 0.0)).clamp_min(0), reduction)


def _check_index_classes(fn: str, input: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """The number of classes (1 for a scalar score, which torch's kernels take as one class)."""
    if input.dim() > 2 or (input.dim() > 0 and input.size(-1) == 0):
        raise RuntimeError(
            f"{fn}(...): expected scores of shape (N, C) or (C,) with C >= 1 (a scalar is one class), got "
            f"{tuple(input.shape)}. Expected non-empty vector or matrix with optional 0-dim batch size."
        )
    if not input.is_floating_point():
        raise NotImplementedError(
            f"{fn}(...): expected floating-point scores, got {input.dtype} (torch's kernel is not implemented for it)."
        )
    if target.dtype != torch.int64:  # torch's margin kernels take Long only (nll takes Byte too)
        raise RuntimeError(f"{fn}(...): expected int64 class-index targets, got {target.dtype}. Use target.long().")
    return target, input.size(-1) if input.dim() else 1


@float32_under_autocast
def multi_margin_loss(
    input: Tensor,
    target: Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Multi-class hinge loss (one-vs-all margins against the target class).

    .. math::
        \\ell_n = \\frac{1}{C} \\sum_{i \\ne y_n} w_{y_n} \\max(0, \\Delta - x_{n, y_n} + x_{n, i})^p

    (torch multiplies ``w[y]`` after the power.) The mean of an empty batch is NaN; torch's
    kernel returns uninitialised memory there.

    Args:
        input: scores ``(N, C)``, ``(C,)``, or a scalar (one class, a loss of 0), as torch.
        target: class indices ``(N,)``, or with one sample a scalar or ``(1,)``, in ``[0, C)``
            (checked in eager mode). ``"none"`` gives the target's shape.
        p: 1 or 2.
        margin: ``Delta``.
        weight: ``(C,)`` per-class weights.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.multi_margin_loss``.
    """
    check_reduction("multi_margin_loss", reduction)
    if p not in (1, 2):
        raise ValueError(f"multi_margin_loss(...): expected p to be 1 or 2, got {p}. only p == 1 and p == 2 supported.")
    if weight is not None and weight.dim() != 1:
        raise ValueError(
            f"multi_margin_loss(...): expected a one-dimensional weight (C,), got shape {tuple(weight.shape)}. "
            "weight must be one-dimensional."
        )
    if weight is not None and weight.dtype != input.dtype:
        raise RuntimeError(
            f"multi_margin_loss(...): expected a weight of the input's dtype {input.dtype}, got {weight.dtype}. "
            f"Convert it with weight.to({input.dtype})."
        )
    target, classes = _check_index_classes("multi_margin_loss", input, target)
    if weight is not None and weight.numel() != classes:
        raise RuntimeError(
            f"multi_margin_loss(...): expected a weight of {classes} elements, one per class, got "
            f"{weight.numel()}. inconsistent weight size."
        )
    # As torch: one target per sample, as (N,) or (with one sample) a scalar; "none" gives the
    # target's shape.
    frames = input.size(0) if input.dim() == 2 else 1
    if target.dim() > 1 or target.numel() != frames:
        raise RuntimeError(
            f"multi_margin_loss(...): expected target of shape ({frames},)"
            f"{' or ()' if frames == 1 else ''} for scores {tuple(input.shape)}, got {tuple(target.shape)}. "
            "target tensor should be 1-D with size equal to the number of input samples."
        )
    out_shape = target.shape
    if target.dim() != input.dim() - 1:  # a scalar score, or a target of one more or one fewer dim
        input, target = input.reshape(frames, classes), target.reshape(frames)
    # On accelerators the gather below is the range check, a device-side assertion as in torch.
    check_range(
        target,
        0,
        classes - 1,
        RuntimeError,
        f"multi_margin_loss(...): expected targets in [0, {classes - 1}], got one out of range. target out of range.",
        on_device="skip",
    )
    # z over every class, the target's own included, with its difference x_y - x_y written as
    # an exact 0 (an infinite x_y would give inf - inf = NaN there): its term relu(margin)^p,
    # whose derivative is 0, is subtracted instead of masked (fewer kernels, which is what
    # vmap pays for).
    index = target.unsqueeze(-1)
    x_y = input.gather(-1, index)
    diff = input - x_y
    # In place in eager mode (no second (N, C) buffer); vmap has no rule for the in-place form.
    diff = diff.scatter_(-1, index, 0.0) if is_eager() else diff.scatter(-1, index, 0.0)
    z = torch.relu(diff + margin)
    h = z if p == 1 else z * z
    values = h.mean(-1) - max(margin, 0.0) ** p / classes
    if weight is not None:
        values = values * class_values(weight, target)
    return reduce(values if values.shape == out_shape else values.reshape(out_shape), reduction)


# Up to this many classes multilabel_margin_loss forms the (S, C) pairwise hinges; above it,
# the sort-based O(C log C) form (fewer FLOPs and no (N, C, C) float tensor).
_PAIRWISE_CLASSES = 32


@float32_under_autocast
def multilabel_margin_loss(
    input: Tensor,
    target: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Multi-label hinge loss: every target class should outscore every non-target class by 1.

    .. math::
        \\ell_n = \\frac{1}{C} \\sum_{j \\in Y_n} \\sum_{i \\notin Y_n} \\max(0, 1 - (x_{n, j} - x_{n, i}))

    ``Y_n`` is read from the target row's prefix before its first ``-1`` (entries after it are
    ignored; a class listed twice counts twice, as in torch). The mean of an empty batch is NaN;
    torch's kernel returns uninitialised memory there.

    Args:
        input: scores ``(N, C)``, ``(C,)``, or a scalar (one class, a loss of 0), as torch.
        target: int64 class indices padded with -1, ``(N, C)`` for a batch; for an unbatched
            input its ``C`` elements as ``(C,)`` (or a scalar for one class). ``"none"`` gives
            ``(N,)`` for a batch, a scalar otherwise.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.multilabel_margin_loss``.
    """
    check_reduction("multilabel_margin_loss", reduction)
    target, classes = _check_index_classes("multilabel_margin_loss", input, target)
    # As torch: an unbatched (C,) or scalar input takes any target of C elements up to 1-D, and
    # gives a scalar loss under "none" too.
    batched = input.dim() == 2
    if target.shape != input.shape if batched else target.dim() > 1 or target.numel() != classes:
        raise RuntimeError(
            f"multilabel_margin_loss(...): expected target of the input's shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}. inconsistent target size."
        )
    if not batched:
        return multilabel_margin_loss(
            input.reshape(1, classes), target.reshape(1, classes), reduction=reduction
        ).reshape(())
    check_range(
        target,
        -1,
        classes - 1,
        RuntimeError,
        f"multilabel_margin_loss(...): expected targets in [-1, {classes - 1}], got one out of range. "
        "argument #2 'target' is out of range.",
        on_device="assert",
    )
    listed = target.cummin(-1).values >= 0  # before the first -1 (targets are >= -1)
    safe = target.clamp_min(0)
    x_j = input.gather(-1, safe)  # (..., S): the listed targets' scores
    counts = torch.zeros(input.shape, dtype=torch.int64, device=input.device).scatter_add(-1, safe, listed.long())
    zero = torch.zeros((), dtype=input.dtype, device=input.device)
    if classes <= _PAIRWISE_CLASSES:
        # Few classes: the (S, C) pairwise hinges directly, the fewest kernels. The non-target
        # mask multiplies (a listed target's NaN reaches its row, as in the sorted form below);
        # the unlisted slots are dropped with `where`.
        nontarget = (counts == 0).to(input.dtype)
        z = torch.relu((input.unsqueeze(-2) - x_j.unsqueeze(-1)) + 1) * nontarget.unsqueeze(-2)
        terms = torch.where(listed, z.sum(-1), zero)
        return reduce(terms.sum(-1) / classes, reduction)
    is_target = counts > 0  # (..., C)
    # For each listed j: sum over non-targets i with x_i > x_j - 1 of (1 - x_j + x_i)
    #   = count_j (1 - x_j) + (sum of those x_i),
    # read off the sorted non-target scores with a suffix sum: O(C log C) per row instead of
    # an (S, C) pairwise tensor. Targets sort first (key -far) and add 0 to the sums; the
    # strict ">" (searchsorted right=True) gives a zero gradient at a tie, like torch's z > 0.
    far = torch.finfo(input.dtype).max / 4
    keys, order = torch.where(is_target, -far, input).sort(dim=-1)
    values = torch.where(is_target, torch.zeros_like(input), input).gather(-1, order)
    suffix = torch.cat([values.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(values[..., :1])], dim=-1)
    below = torch.searchsorted(keys.detach().contiguous(), (x_j - 1).detach().contiguous(), right=True)
    count = (classes - below).to(input.dtype)
    above = suffix.gather(-1, below)
    terms = torch.where(listed, count * (1 - x_j) + above, zero)
    return reduce(terms.sum(-1) / classes, reduction)


def multilabel_soft_margin_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """One-vs-all logistic loss over C labels, averaged over the labels.

    .. math::
        \\ell_n = -\\frac{1}{C} \\sum_c w_c \\left[ y_{n,c} \\log \\sigma(x_{n,c})
                  + (1 - y_{n,c}) \\log \\sigma(-x_{n,c}) \\right]

    Args:
        input: logits ``(N, C)`` (or ``(C,)``).
        target: same shape, values in [0, 1].
        weight: broadcastable per-class weight ``(C,)``.
        reduction: ``"none"`` (one value per sample) | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.multilabel_soft_margin_loss``.
    """
    check_reduction("multilabel_soft_margin_loss", reduction)
    values = -(target * F.logsigmoid(input) + (1 - target) * F.logsigmoid(-input))
    if weight is not None:
        values = values * weight
    classes = input.size(input.dim() - 1)
    return reduce(values.sum(dim=input.dim() - 1) / classes, reduction)
