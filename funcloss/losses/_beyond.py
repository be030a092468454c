"""Beyond torch.nn: focal losses, the real-world-weight cross-entropy, the quantile (pinball)
loss, Barron's robust loss and class-weight estimators.

Same conventions as the torch.nn losses: pure functions, unreduced values plus a reduction,
no data-dependent Python control flow (every transform composes), value checks in eager mode.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .._autocast import float32_under_autocast
from .._checks import check_reduction, check_values, is_eager
from .._combinators import class_values, reduce
from .._typing import Reduction
from ._classification import (
    _check_class_weight,
    _check_in_range,
    _check_index_target,
    _class_dim,
    _class_mean,
    _pick,
)
from ._probabilistic import binary_cross_entropy_with_logits

ClassWeightMethod = Literal["balanced", "inverse_sqrt", "effective_number"]


def _modulating(one_minus_p: Tensor, gamma: float) -> Tensor:
    """``(1 - p)^gamma`` whose derivative at ``1 - p = 0`` is taken as 0 (its limit times the
    log-probability it multiplies, which is 0 there), not ``inf * 0 = NaN`` for ``gamma < 1``."""
    positive = one_minus_p > 0
    safe = torch.where(positive, one_minus_p, torch.ones_like(one_minus_p))
    return torch.where(positive, safe.pow(gamma), torch.zeros_like(one_minus_p))


def _check_gamma(fn: str, gamma: float) -> None:
    if not gamma >= 0.0:  # also refuses NaN
        raise ValueError(f"{fn}(...): expected gamma >= 0, got {gamma}. gamma = 0 is the plain cross-entropy.")


@float32_under_autocast
def focal_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    gamma: float = 2.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Softmax focal loss: cross-entropy down-weighted where the model is already confident.

    With ``p = softmax(x)`` over the class dim and class-index targets ``y``:

    .. math::
        \\ell_n = -w_{y_n} (1 - p_{n, y_n})^{\\gamma} \\log p_{n, y_n} \\; [y_n \\ne \\text{ignore\\_index}],
        \\qquad \\text{mean} = \\frac{\\sum_n \\ell_n}{\\sum_n w_{y_n} [y_n \\ne \\text{ignore\\_index}]}

    ``weight`` plays the part of the paper's ``alpha_t`` (one per class), and the mean is
    `cross_entropy`'s weighted mean, so ``gamma = 0`` gives exactly
    ``cross_entropy(input, target, weight, ignore_index=..., reduction=...)``. Where
    ``p_{n, y_n}`` is exactly 1 the loss and its gradient are 0 for every ``gamma > 0``.

    Args:
        input: logits ``(N, C)``, ``(N, C, d1, ..., dK)`` or unbatched ``(C,)``.
        target: class indices (int64/uint8) ``(N,)``, ``(N, d1, ..., dK)`` or a scalar, each in
            ``[0, C)`` or equal to ``ignore_index`` (checked in eager mode: ``IndexError``).
        weight: ``(C,)`` per-class weights (``alpha``), e.g. from `class_weights`.
        gamma: focusing parameter, ``>= 0`` (the paper's default 2).
        ignore_index: target value that contributes nothing (to the mean's denominator either).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Lin, T.-Y., Goyal, P., Girshick, R., He, K. and Dollar, P. "Focal Loss for Dense Object
        Detection", ICCV 2017.
    """
    check_reduction("focal_loss", reduction)
    _check_gamma("focal_loss", gamma)
    class_dim = _class_dim("focal_loss", input, IndexError)
    classes = input.size(class_dim)
    target = _check_index_target("focal_loss", tuple(input.shape), target, class_dim)
    _check_class_weight("focal_loss", weight, classes, input.dtype)
    target = target.long()
    _check_in_range(target, classes, ignore_index)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    log_p = _pick(torch.log_softmax(input, dim=class_dim), safe, class_dim)
    kept = keep.to(log_p.dtype)
    w = kept if weight is None else class_values(weight, safe) * kept
    nll = -log_p * w
    values = nll if gamma == 0 else _modulating(-torch.expm1(log_p), gamma) * nll
    return _class_mean(values, w, reduction)


@float32_under_autocast
def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "none",
) -> Tensor:
    """Sigmoid (binary, per element) focal loss, with torchvision's arguments and defaults.

    With ``p = sigmoid(x)``, ``p_t = p y + (1 - p)(1 - y)`` and
    ``alpha_t = alpha y + (1 - alpha)(1 - y)``:

    .. math::
        \\ell = \\alpha_t \\, (1 - p_t)^{\\gamma} \\, \\text{BCE}(x, y)

    where ``BCE`` is `binary_cross_entropy_with_logits` unreduced; a negative ``alpha`` turns
    the ``alpha_t`` factor off. As in ``torchvision.ops.sigmoid_focal_loss``, the default
    reduction is ``"none"`` (other funcloss losses default to ``"mean"``), and ``"mean"`` is
    the plain mean over elements (RetinaNet normalises the sum by the number of positive
    anchors instead: take ``"sum"`` and divide).

    Args:
        inputs: logits, any shape.
        targets: same shape, values in [0, 1] (usually 0 or 1).
        alpha: weight of the positives in ``[0, 1]``, or negative for none.
        gamma: focusing parameter, ``>= 0``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Lin, T.-Y. et al. "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    check_reduction("sigmoid_focal_loss", reduction)
    _check_gamma("sigmoid_focal_loss", gamma)
    ce = binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p = torch.sigmoid(inputs)
    values = ce if gamma == 0 else ce * _modulating(p + targets - 2 * p * targets, gamma)  # 1 - p_t
    if alpha >= 0:
        values = values * ((1 - alpha) + (2 * alpha - 1) * targets)  # alpha_t
    return reduce(values, reduction)


def _log1m_softmax(x: Tensor, logp: Tensor, class_dim: int) -> Tensor:
    """``log(1 - p)`` for ``p = softmax(x)``, accurate where ``p`` is near 1 too.

    ``1 - p_j`` is the mass of the other classes. Off the most likely class ``p_j <= 1/2`` and
    ``log1p(-p_j)`` is exact; at the most likely class the other classes' mass is summed
    directly (no ``1 - p`` cancellation: ``-log(1 - p)`` stays finite and exact for a logit gap
    of 20 in float32, where ``p`` rounds to 1). It is floored at the dtype's smallest normal
    number (``log`` about -87 in float32), as torch's BCE floors its logs, so that a certain
    wrong prediction gives a large finite loss and gradient rather than inf and NaN."""
    classes = x.size(class_dim)
    shape = [1] * x.dim()
    shape[class_dim] = classes
    is_top = torch.arange(classes, device=x.device).reshape(shape) == x.argmax(class_dim, keepdim=True)
    scaled = torch.exp(x - x.detach().amax(class_dim, keepdim=True))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    rest = torch.where(is_top, zero, scaled).sum(class_dim, keepdim=True)
    at_top = torch.log(rest.clamp_min(torch.finfo(x.dtype).tiny)) - torch.log(scaled.sum(class_dim, keepdim=True))
    return torch.where(is_top, at_top, torch.log1p(-torch.where(is_top, zero, logp.exp())))


def _check_costs(name: str, cost: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(cost.shape) != shape:
        raise ValueError(
            f"real_world_weight_cross_entropy(...): expected {name} of shape {shape}, got {tuple(cost.shape)}."
        )
    if not cost.is_floating_point():
        raise ValueError(f"real_world_weight_cross_entropy(...): expected floating-point {name}, got {cost.dtype}.")
    check_values(lambda: cost >= 0, ValueError, f"real_world_weight_cross_entropy(...): expected {name} >= 0 (costs).")


@float32_under_autocast
def real_world_weight_cross_entropy(
    input: Tensor,
    target: Tensor,
    fn_weight: Tensor | None = None,
    fp_weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Real-world-weight cross-entropy: cross-entropy with a cost for each kind of mistake.

    With ``p = softmax(x)`` over the class dim, a false-negative cost per true class ``a``
    (``fn_weight``) and a false-positive cost matrix ``B`` (``fp_weight``; ``B[i, j]`` is the cost
    of predicting ``j`` when the truth is ``i``, zero diagonal):

    .. math::
        \\ell_n = -a_{y_n} \\log p_{n, y_n} - \\sum_{j} B_{y_n, j} \\log(1 - p_{n, j})

    The second term, new in the paper, penalises probability put on each wrong class by what
    that particular mistake costs (e.g. calling a malignant lesion benign). ``"mean"`` averages
    over the positions whose target is not ``ignore_index``: the costs are not a reweighting
    of the mean (unlike `cross_entropy`'s ``weight``). With ``a = 1`` and ``B = 0`` this is
    exactly `cross_entropy`. The paper's binary form is `binary_cross_entropy_with_logits`
    with ``weight=c_fp`` and ``pos_weight=c_fn / c_fp``.

    Args:
        input: logits ``(N, C)``, ``(N, C, d1, ..., dK)`` or unbatched ``(C,)``.
        target: class indices (int64/uint8) ``(N,)``, ``(N, d1, ..., dK)`` or a scalar, each in
            ``[0, C)`` or equal to ``ignore_index`` (checked in eager mode: ``IndexError``).
        fn_weight: ``(C,)`` false-negative costs, ``>= 0``; default all 1.
        fp_weight: ``(C, C)`` false-positive costs, ``>= 0`` with a zero diagonal; default none.
        ignore_index: target value that contributes nothing (to the mean's count either).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Ho, Y. and Wookey, S. "The Real-World-Weight Cross-Entropy Loss Function: Modeling the
        Costs of Mislabeling", IEEE Access 8, 2020.
    """
    fn = "real_world_weight_cross_entropy"
    check_reduction(fn, reduction)
    class_dim = _class_dim(fn, input, IndexError)
    classes = input.size(class_dim)
    target = _check_index_target(fn, tuple(input.shape), target, class_dim)
    target = target.long()
    _check_in_range(target, classes, ignore_index)
    if fn_weight is not None:
        _check_costs("fn_weight", fn_weight, (classes,))
    if fp_weight is not None:
        _check_costs("fp_weight", fp_weight, (classes, classes))
        check_values(
            lambda: fp_weight.diagonal() == 0,
            ValueError,
            f"{fn}(...): expected fp_weight with a zero diagonal (predicting the true class is no false positive).",
        )
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    logp = torch.log_softmax(input, dim=class_dim)
    values = -_pick(logp, safe, class_dim)
    if fn_weight is not None:
        values = values * class_values(fn_weight.to(logp.dtype), safe)
    if fp_weight is not None:
        rows = fp_weight.to(logp.dtype).index_select(0, safe.reshape(-1)).reshape(*safe.shape, classes)
        values = values - (rows.movedim(-1, class_dim) * _log1m_softmax(input, logp, class_dim)).sum(class_dim)
    kept = keep.to(values.dtype)
    return _class_mean(values * kept, kept, reduction)


def quantile_loss(
    input: Tensor,
    target: Tensor,
    quantile: float | Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Quantile (pinball) loss: minimised by the ``quantile``-th quantile of the target.

    With ``d = target - input`` and ``q = quantile``:

    .. math::
        \\ell = \\max(q\\, d, (q - 1)\\, d) = \\tfrac12 |d| + (q - \\tfrac12)\\, d

    ``q = 0.5`` is half of `l1_loss`. At ``d = 0`` the gradient is ``-(q - 1/2)`` with respect
    to the input (the mean of the two one-sided slopes, as `l1_loss` takes 0 there).

    Args:
        input: predictions, any shape.
        target: broadcastable to ``input``.
        quantile: in ``[0, 1]``: a float, or a tensor broadcastable to ``input`` (several
            quantiles at once, e.g. ``(Q,)`` against predictions ``(N, Q)``); checked in eager
            mode.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Koenker, R. and Bassett, G. "Regression Quantiles", Econometrica 46(1), 1978.
    """
    check_reduction("quantile_loss", reduction)
    if isinstance(quantile, Tensor):
        check_values(
            lambda: (quantile >= 0) & (quantile <= 1),
            ValueError,
            "quantile_loss(...): expected every quantile in [0, 1].",
        )
    elif not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile_loss(...): expected quantile in [0, 1], got {quantile}.")
    d = target - input
    return reduce(0.5 * d.abs() + (quantile - 0.5) * d, reduction)


def robust_loss(
    input: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    scale: float | Tensor = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Barron's general robust loss: one shape parameter spans L2, pseudo-Huber, Cauchy,
    Geman-McClure and Welsch.

    With ``z = (input - target) / scale`` and ``a = alpha``:

    .. math::
        \\rho(z, a) = \\frac{|a - 2|}{a} \\left[ \\left( \\frac{z^2}{|a - 2|} + 1 \\right)^{a/2} - 1 \\right]

    and its limits: ``a = 2``: ``z^2 / 2`` (L2); ``a = 0``: ``log(z^2 / 2 + 1)`` (Cauchy);
    ``a = -inf``: ``1 - exp(-z^2 / 2)`` (Welsch); ``a = +inf``: ``exp(z^2 / 2) - 1``. ``a = 1`` is
    ``sqrt(z^2 + 1) - 1`` (pseudo-Huber, Charbonnier) and ``a = -2`` is ``2 z^2 / (z^2 + 4)``
    (Geman-McClure). Every member has curvature 1 at ``z = 0`` (``rho ~ z^2 / 2``); the lower
    ``a``, the less a large residual costs and pulls. The bracket is computed as
    ``expm1((a / 2) log1p(z^2 / |a - 2|))``, accurate near the limits.

    Args:
        input: predictions, any shape.
        target: broadcastable to ``input``.
        alpha: shape parameter, a float in ``[-inf, inf]`` (fixed: the loss alone has no
            minimum over it; Barron learns it through a likelihood with a normaliser).
        scale: ``c > 0``, the residual size where the loss bends; a float or a tensor
            broadcastable to ``input`` (checked in eager mode).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Barron, J. T. "A General and Adaptive Robust Loss Function", CVPR 2019.
    """
    check_reduction("robust_loss", reduction)
    if alpha != alpha:  # NaN (math.isnan cannot take compile's symbolic floats)
        raise ValueError("robust_loss(...): expected alpha to be a number in [-inf, inf], got nan.")
    if isinstance(scale, Tensor):
        check_values(lambda: scale > 0, ValueError, "robust_loss(...): expected every scale > 0.")
    elif not scale > 0:
        raise ValueError(f"robust_loss(...): expected scale > 0, got {scale}.")
    z = (input - target) / scale
    z2 = z * z
    if alpha == 2:
        values = 0.5 * z2
    elif alpha == 0:
        values = torch.log1p(0.5 * z2)
    elif alpha == -math.inf:
        values = -torch.expm1(-0.5 * z2)
    elif alpha == math.inf:
        values = torch.expm1(0.5 * z2)
    else:
        b = abs(alpha - 2)
        values = (b / alpha) * torch.expm1((alpha / 2) * torch.log1p(z2 / b))
    return reduce(values, reduction)


def _refuse_empty_classes(fn: str, counts: Tensor, expected: str, fix: str) -> None:
    """``ValueError`` naming the classes whose count is 0 (their weight would be infinite)."""
    missing = (counts == 0).nonzero().reshape(-1).tolist()
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{fn}(...): expected {expected}; missing ({len(missing)} of {counts.numel()}): {shown}. "
            f"Their weights would be infinite: {fix}."
        )


def class_weights(
    target: Tensor,
    num_classes: int | None = None,
    *,
    method: ClassWeightMethod = "balanced",
    beta: float = 0.999,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-class weights ``(C,)`` from class-index targets, for ``weight=`` of `cross_entropy`,
    `nll_loss` or `focal_loss`.

    With ``n_c`` samples of class ``c`` and ``n`` in all (targets equal to ``ignore_index``
    left out), before normalisation:

    - ``"balanced"``: ``1 / n_c`` (King and Zeng 2001): every class then weighs the same in total;
    - ``"inverse_sqrt"``: ``1 / sqrt(n_c)``, a milder correction;
    - ``"effective_number"``: ``(1 - beta) / (1 - beta^{n_c})`` (Cui et al. 2019), the inverse
      of the expected number of distinct samples; ``beta = 0`` is no reweighting and
      ``beta -> 1`` approaches ``"balanced"``.

    The weights are then scaled so that the average weight over the samples is 1
    (``sum_c n_c w_c = n``); ``"balanced"`` is then ``n / (C n_c)``. Under ``"mean"``
    reduction the scale cancels; under ``"sum"`` it keeps the loss at the unweighted scale.
    (Cui et al. scale theirs to sum to ``C`` over classes; the ratios are the same.)

    An estimator, not a loss: it reads the targets' values and runs in eager mode only.

    Args:
        target: class indices, any shape (int64/int32/uint8).
        num_classes: ``C``; by default the largest target plus one.
        method: ``"balanced"`` | ``"inverse_sqrt"`` | ``"effective_number"``.
        beta: for ``"effective_number"``, in ``[0, 1)``.
        ignore_index: target value left out of the counts.
        dtype: of the returned weights.

    Raises:
        ValueError: a class has no sample (its weight would be infinite; pass the classes that
            occur, or weights of your own), a target is out of range, or an option is invalid.

    References:
        King, G. and Zeng, L. "Logistic Regression in Rare Events Data", Political Analysis 9(2), 2001.
        Cui, Y., Jia, M., Lin, T.-Y., Song, Y. and Belongie, S. "Class-Balanced Loss Based on
        Effective Number of Samples", CVPR 2019.
    """
    if method not in ("balanced", "inverse_sqrt", "effective_number"):
        raise ValueError(
            f"class_weights(...): expected method 'balanced', 'inverse_sqrt' or 'effective_number', got {method!r}."
        )
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class_weights(...): expected beta in [0, 1), got {beta}.")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"class_weights(...): expected integer class indices, got {target.dtype}.")
    if not is_eager():
        raise RuntimeError("class_weights(...): reads the targets' values; call it outside transforms and compile.")
    kept = target.reshape(-1)
    kept = kept[kept != ignore_index].long()
    if num_classes is None:
        if kept.numel() == 0:
            raise ValueError("class_weights(...): no target to count (all ignored or empty); pass num_classes.")
        num_classes = int(kept.max()) + 1
    if num_classes < 1:
        raise ValueError(f"class_weights(...): expected num_classes >= 1, got {num_classes}.")
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= num_classes):
        raise ValueError(
            f"class_weights(...): expected targets in [0, {num_classes - 1}] or ignore_index ({ignore_index}), "
            f"got values in [{int(kept.min())}, {int(kept.max())}]."
        )
    counts = torch.bincount(kept.cpu(), minlength=num_classes).to(torch.float64)
    _refuse_empty_classes(
        "class_weights",
        counts,
        f"every class in [0, {num_classes - 1}] to occur",
        "count over data that has every class, or build the weights yourself",
    )
    if method == "balanced":
        raw = 1.0 / counts
    elif method == "inverse_sqrt":
        raw = counts.rsqrt()
    else:
        # 1 - beta^n as -expm1(n log beta): exact for beta near 1, and 1 for beta = 0 (log 0 = -inf).
        raw = (1.0 - beta) / -torch.expm1(counts * torch.tensor(beta, dtype=torch.float64).log())
    weights = raw * (counts.sum() / (counts * raw).sum())
    return weights.to(dtype=dtype, device=target.device)


def positive_weights(target: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """``pos_weight`` for `binary_cross_entropy_with_logits` from multi-label targets: per class
    (the last dim), the number of negatives over the number of positives.

    With that weight the positives of each class count as much in total as its negatives
    (torch's documentation of ``pos_weight``: 100 positives and 300 negatives give 3). Soft
    targets count fractionally: ``sum (1 - y) / sum y``.

    An estimator, not a loss: it reads the targets' values and runs in eager mode only.

    Args:
        target: ``(..., C)`` values in [0, 1] (0/1 labels or probabilities).
        dtype: of the returned weights.

    Raises:
        ValueError: a class has no positive (its weight would be infinite), a target outside
            [0, 1], or targets that are not floating point or bool.
    """
    if not (target.is_floating_point() or target.dtype == torch.bool):
        raise ValueError(
            f"positive_weights(...): expected 0/1 or probability targets (floating point or bool), got {target.dtype}."
        )
    if target.dim() == 0:
        raise ValueError("positive_weights(...): expected targets (..., C), got a scalar.")
    if not is_eager():
        raise RuntimeError("positive_weights(...): reads the targets' values; call it outside transforms and compile.")
    y = target.reshape(-1, target.size(-1)).to(torch.float64)
    if y.numel() and not bool(((y >= 0) & (y <= 1)).all()):
        raise ValueError("positive_weights(...): expected targets in [0, 1].")
    positives = y.sum(0)
    _refuse_empty_classes("positive_weights", positives, "every class to have a positive", "count over more data")
    return ((y.size(0) - positives) / positives).to(dtype=dtype, device=target.device)
