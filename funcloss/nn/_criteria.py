"""Criteria: drop-in ``nn.Module`` adapters for every torch.nn loss, and `Criterion`.

Each adapter takes exactly torch's constructor arguments (legacy ``size_average``/``reduce``
included, mapped as torch maps them, with torch's deprecation warning), registers the same
buffers and parameters under the same names, and calls the funcloss function in one line.
Each subclasses torch's class of the same name (``isinstance`` checks in other libraries hold)
and overrides every public method that class defines; torch's ``__init__`` is not run (each
adapter sets every attribute it sets).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # torch >= 2.13
    from torch.nn import LinearCrossEntropyLoss as _TorchLinearCrossEntropyLoss
    from torch.nn import LinearCrossEntropyOptions
else:  # absent before torch 2.13 (the criterion is then a plain module)
    _TorchLinearCrossEntropyLoss = getattr(nn, "LinearCrossEntropyLoss", nn.Module)

from .. import _checks, _combinators
from .._typing import KLDivReduction, Reduction
from ..losses import _adaptive, _classification, _embedding, _margin, _probabilistic, _regression, _sequence
from ..losses._adaptive import ASMOutput

__all__ = [
    "AdaptiveLogSoftmaxWithLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CTCLoss",
    "CosineEmbeddingLoss",
    "Criterion",
    "CrossEntropyLoss",
    "GaussianNLLLoss",
    "HingeEmbeddingLoss",
    "HuberLoss",
    "KLDivLoss",
    "L1Loss",
    "LinearCrossEntropyLoss",
    "MSELoss",
    "MarginRankingLoss",
    "MultiLabelMarginLoss",
    "MultiLabelSoftMarginLoss",
    "MultiMarginLoss",
    "NLLLoss",
    "PoissonNLLLoss",
    "SmoothL1Loss",
    "SoftMarginLoss",
    "TripletMarginLoss",
    "TripletMarginWithDistanceLoss",
]

_REDUCTIONS = ("none", "mean", "sum")


def _legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """torch's mapping of the deprecated flags to a reduction, with torch's warning."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "mean" if size_average and reduce else "sum" if reduce else "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.",
        UserWarning,
        stacklevel=4,
    )
    return reduction


def _refuse_torchscript(module: nn.Module) -> nn.Module:
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on a module and each submodule
    before compiling: say plainly that funcloss is not TorchScript, instead of TorchScript's
    complaint about the first annotation it cannot read."""
    raise RuntimeError(
        f"torch.jit.script(...): expected a TorchScript-compatible module, got funcloss's {type(module).__name__}. "
        "funcloss's criteria are Python functions of tensors and are not TorchScript (torch.jit.script is "
        "deprecated). Use torch.compile or torch.export, which trace them into one graph, or script torch.nn's "
        "criterion of the same name."
    )


class _Loss(nn.Module):
    """Configuration only: a reduction, options in `_options`, tensors as buffers."""

    __prepare_scriptable__ = _refuse_torchscript

    _options: tuple[str, ...] = ()
    _allowed: tuple[str, ...] = _REDUCTIONS
    reduction: str  # as in torch's criteria; checked at construction and again by each call

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean") -> None:
        nn.Module.__init__(self)  # not torch's class's __init__: this one sets all it would
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        _checks.check_reduction(type(self).__name__, reduction, self._allowed)
        self.reduction = reduction

    @property
    def _reduction(self) -> Reduction:
        """`reduction` as the functions take it (they check the value)."""
        return cast(Reduction, self.reduction)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in (*self._options, "reduction"))


class _WeightedLoss(_Loss):
    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)


class L1Loss(_Loss, nn.L1Loss):
    """Criterion for `funcloss.l1_loss`; see ``torch.nn.L1Loss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _regression.l1_loss(input, target, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class MSELoss(_Loss, nn.MSELoss):
    """Criterion for `funcloss.mse_loss`; see ``torch.nn.MSELoss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _regression.mse_loss(input, target, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class HuberLoss(_Loss, nn.HuberLoss):
    """Criterion for `funcloss.huber_loss`; see ``torch.nn.HuberLoss``."""

    _options = ("delta",)

    def __init__(self, reduction: str = "mean", delta: float = 1.0) -> None:
        super().__init__(reduction=reduction)
        self.delta = delta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _regression.huber_loss(input, target, self._reduction, self.delta)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class SmoothL1Loss(_Loss, nn.SmoothL1Loss):
    """Criterion for `funcloss.smooth_l1_loss`; see ``torch.nn.SmoothL1Loss``."""

    _options = ("beta",)

    def __init__(
        self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean", beta: float = 1.0
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _regression.smooth_l1_loss(input, target, reduction=self._reduction, beta=self.beta)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class SoftMarginLoss(_Loss, nn.SoftMarginLoss):
    """Criterion for `funcloss.soft_margin_loss`; see ``torch.nn.SoftMarginLoss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _margin.soft_margin_loss(input, target, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class HingeEmbeddingLoss(_Loss, nn.HingeEmbeddingLoss):
    """Criterion for `funcloss.hinge_embedding_loss`; see ``torch.nn.HingeEmbeddingLoss``."""

    _options = ("margin",)

    def __init__(
        self, margin: float = 1.0, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.margin = margin

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _margin.hinge_embedding_loss(input, target, self.margin, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class MarginRankingLoss(_Loss, nn.MarginRankingLoss):
    """Criterion for `funcloss.margin_ranking_loss`; see ``torch.nn.MarginRankingLoss``."""

    _options = ("margin",)

    def __init__(
        self, margin: float = 0.0, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.margin = margin

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return _margin.margin_ranking_loss(input1, input2, target, self.margin, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class PoissonNLLLoss(_Loss, nn.PoissonNLLLoss):
    """Criterion for `funcloss.poisson_nll_loss`; see ``torch.nn.PoissonNLLLoss``."""

    _options = ("log_input", "full", "eps")

    def __init__(
        self,
        log_input: bool = True,
        full: bool = False,
        size_average: bool | None = None,
        eps: float = 1e-8,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_input = log_input
        self.full = full
        self.eps = eps

    def forward(self, log_input: Tensor, target: Tensor) -> Tensor:
        return _regression.poisson_nll_loss(
            log_input,
            target,
            self.log_input,
            self.full,
            eps=self.eps,
            reduction=self._reduction,
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class GaussianNLLLoss(_Loss, nn.GaussianNLLLoss):
    """Criterion for `funcloss.gaussian_nll_loss`; see ``torch.nn.GaussianNLLLoss``."""

    _options = ("full", "eps")

    def __init__(self, *, full: bool = False, eps: float = 1e-6, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.full = full
        self.eps = eps

    def forward(self, input: Tensor, target: Tensor, var: Tensor | float) -> Tensor:
        return _regression.gaussian_nll_loss(input, target, var, self.full, self.eps, self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class BCELoss(_WeightedLoss, nn.BCELoss):
    """Criterion for `funcloss.binary_cross_entropy`; see ``torch.nn.BCELoss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _probabilistic.binary_cross_entropy(input, target, self.weight, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class BCEWithLogitsLoss(_Loss, nn.BCEWithLogitsLoss):
    """Criterion for `funcloss.binary_cross_entropy_with_logits`; see ``torch.nn.BCEWithLogitsLoss``."""

    weight: Tensor | None
    pos_weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _probabilistic.binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            reduction=self._reduction,
            pos_weight=self.pos_weight,
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class KLDivLoss(_Loss, nn.KLDivLoss):
    """Criterion for `funcloss.kl_div`; see ``torch.nn.KLDivLoss``."""

    _options = ("log_target",)
    _allowed = ("none", "mean", "sum", "batchmean")

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        log_target: bool = False,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        reduction = cast(KLDivReduction, self.reduction)  # KLDivLoss also allows "batchmean"
        return _probabilistic.kl_div(input, target, reduction=reduction, log_target=self.log_target)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class CrossEntropyLoss(_WeightedLoss, nn.CrossEntropyLoss):
    """Criterion for `funcloss.cross_entropy`; see ``torch.nn.CrossEntropyLoss``."""

    _options = ("ignore_index", "label_smoothing")

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _classification.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self._reduction,
            label_smoothing=self.label_smoothing,
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class NLLLoss(_WeightedLoss, nn.NLLLoss):
    """Criterion for `funcloss.nll_loss`; see ``torch.nn.NLLLoss``."""

    _options = ("ignore_index",)

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _classification.nll_loss(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self._reduction
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class MultiMarginLoss(_WeightedLoss, nn.MultiMarginLoss):
    """Criterion for `funcloss.multi_margin_loss`; see ``torch.nn.MultiMarginLoss``."""

    _options = ("p", "margin")

    def __init__(
        self,
        p: int = 1,
        margin: float = 1.0,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        if p not in (1, 2):
            raise ValueError(
                f"MultiMarginLoss(...): expected p to be 1 or 2, got {p}. only p == 1 and p == 2 supported"
            )
        if weight is not None and weight.dim() != 1:
            raise ValueError(
                f"MultiMarginLoss(...): expected a one-dimensional weight, got shape {tuple(weight.shape)}. "
                "MultiMarginLoss: expected weight to be None or 1D tensor"
            )
        self.p = p
        self.margin = margin

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _margin.multi_margin_loss(input, target, self.p, self.margin, self.weight, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class MultiLabelMarginLoss(_Loss, nn.MultiLabelMarginLoss):
    """Criterion for `funcloss.multilabel_margin_loss`; see ``torch.nn.MultiLabelMarginLoss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _margin.multilabel_margin_loss(input, target, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class MultiLabelSoftMarginLoss(_WeightedLoss, nn.MultiLabelSoftMarginLoss):
    """Criterion for `funcloss.multilabel_soft_margin_loss`; see ``torch.nn.MultiLabelSoftMarginLoss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _margin.multilabel_soft_margin_loss(input, target, self.weight, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class CosineEmbeddingLoss(_Loss, nn.CosineEmbeddingLoss):
    """Criterion for `funcloss.cosine_embedding_loss`; see ``torch.nn.CosineEmbeddingLoss``."""

    _options = ("margin",)

    def __init__(
        self, margin: float = 0.0, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.margin = margin

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return _embedding.cosine_embedding_loss(input1, input2, target, self.margin, reduction=self._reduction)

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class TripletMarginLoss(_Loss, nn.TripletMarginLoss):
    """Criterion for `funcloss.triplet_margin_loss`; see ``torch.nn.TripletMarginLoss``."""

    _options = ("margin", "p", "eps", "swap")

    def __init__(
        self,
        margin: float = 1.0,
        p: float = 2.0,
        eps: float = 1e-6,
        swap: bool = False,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        if margin <= 0:
            raise ValueError(
                f"TripletMarginLoss(...): expected margin > 0, got {margin}. "
                f"TripletMarginLoss: expected margin to be greater than 0, got {margin} instead"
            )
        self.margin = margin
        self.p = p
        self.eps = eps
        self.swap = swap

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return _embedding.triplet_margin_loss(
            anchor,
            positive,
            negative,
            self.margin,
            self.p,
            self.eps,
            self.swap,
            reduction=self._reduction,
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class TripletMarginWithDistanceLoss(_Loss, nn.TripletMarginWithDistanceLoss):
    """Criterion for `funcloss.triplet_margin_with_distance_loss`; see ``torch.nn.TripletMarginWithDistanceLoss``."""

    _options = ("distance_function", "margin", "swap")

    def __init__(
        self,
        *,
        distance_function: Callable[[Tensor, Tensor], Tensor] | None = None,
        margin: float = 1.0,
        swap: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        if margin <= 0:
            raise ValueError(
                f"TripletMarginWithDistanceLoss(...): expected margin > 0, got {margin}. "
                f"TripletMarginWithDistanceLoss: expected margin to be greater than 0, got {margin} instead"
            )
        # As torch's: without a distance function, a PairwiseDistance submodule.
        self.distance_function: Callable[[Tensor, Tensor], Tensor] = (
            distance_function if distance_function is not None else nn.PairwiseDistance()
        )
        self.margin = margin
        self.swap = swap

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        distance = self.distance_function
        if type(distance) is nn.PairwiseDistance:
            # torch's module, its formula computed by funcloss's own pairwise_distance.
            distance = functools.partial(
                _embedding.pairwise_distance, p=distance.norm, eps=distance.eps, keepdim=distance.keepdim
            )
        return _embedding.triplet_margin_with_distance_loss(
            anchor,
            positive,
            negative,
            distance_function=distance,
            margin=self.margin,
            swap=self.swap,
            reduction=self._reduction,
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class CTCLoss(_Loss, nn.CTCLoss):
    """Criterion for `funcloss.ctc_loss`; see ``torch.nn.CTCLoss``."""

    _options = ("blank", "zero_infinity")

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> None:
        super().__init__(reduction=reduction)
        self.blank = blank
        self.zero_infinity = zero_infinity

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
        return _sequence.ctc_loss(
            log_probs,
            targets,
            input_lengths,
            target_lengths,
            self.blank,
            self._reduction,
            self.zero_infinity,
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward


class LinearCrossEntropyLoss(_WeightedLoss, _TorchLinearCrossEntropyLoss):
    """Criterion for `funcloss.linear_cross_entropy`: a ``linear`` layer's parameters plus the loss.

    Same parameters (``linear.weight``, ``linear.bias``), initialisation and state-dict keys as
    ``torch.nn.LinearCrossEntropyLoss``. ``options`` picks the rows per chunk as in torch;
    funcloss computes in chunks in eager mode with or without it (see `linear_cross_entropy`).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: LinearCrossEntropyOptions | None = None,
    ) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(
                f"LinearCrossEntropyLoss(...): expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}."
            )
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(
                f"LinearCrossEntropyLoss(...): expected label_smoothing to be in range [0, 1], got {label_smoothing}."
            )
        super().__init__(weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        # Stored two-dimensional, as torch stores it, and reshaped in forward.
        size = num_classes * math.prod(out_features)
        self.linear = nn.Linear(in_features, size, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return _classification.linear_cross_entropy(
            input,
            self.linear.weight.reshape(*shape, self.linear.in_features),
            target,
            linear_bias=bias,
            weight=self.weight,
            reduction=self._reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, options={self.options}"
        )


class AdaptiveLogSoftmaxWithLoss(nn.AdaptiveLogSoftmaxWithLoss):
    """Criterion for `funcloss.adaptive_log_softmax_with_loss`, with the head and tail layers.

    Same parameters (``head.weight``, ``head.bias``, ``tail.<i>.0.weight``,
    ``tail.<i>.1.weight``), initialisation and state-dict keys as
    ``torch.nn.AdaptiveLogSoftmaxWithLoss``; `log_prob` and `predict` as there.
    """

    __prepare_scriptable__ = _refuse_torchscript

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        cutoffs: Sequence[int],
        div_value: float = 4.0,
        head_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not torch's class's __init__: this one sets all it would
        cut = list(cutoffs)
        if len(cut) == 0:
            raise ValueError("AdaptiveLogSoftmaxWithLoss(...): cutoffs should be a sequence of length larger than 0")
        if (
            cut != sorted(cut)
            or min(cut) <= 0
            or max(cut) > n_classes - 1
            or len(set(cut)) != len(cut)
            or any(int(c) != c for c in cut)
        ):
            raise ValueError(
                f"AdaptiveLogSoftmaxWithLoss(...): expected cutoffs to be unique, positive integers sorted in "
                f"increasing order, each between 1 and n_classes-1 ({n_classes - 1}), got {cut}."
            )
        self.in_features = in_features
        self.n_classes = n_classes
        self.cutoffs = [*cut, n_classes]
        self.div_value = div_value
        self.head_bias = head_bias
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters
        self.head = nn.Linear(in_features, self.head_size, bias=head_bias, device=device, dtype=dtype)
        self.tail = nn.ModuleList()
        for i in range(self.n_clusters):
            hidden = int(in_features // (div_value ** (i + 1)))
            size = self.cutoffs[i + 1] - self.cutoffs[i]
            self.tail.append(
                nn.Sequential(
                    nn.Linear(in_features, hidden, bias=False, device=device, dtype=dtype),
                    nn.Linear(hidden, size, bias=False, device=device, dtype=dtype),
                )
            )

    def _tails(self) -> list[tuple[Tensor, Tensor]]:
        return [(t[0].weight, t[1].weight) for t in self.tail]  # type: ignore[index]

    def reset_parameters(self) -> None:
        """Draw the head and tail weights afresh, as at construction (``nn.Linear``'s
        initialisation)."""
        self.head.reset_parameters()
        for module in self.tail.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    # funcloss's ASMOutput: a NamedTuple with the fields (output, loss) of torch's _ASMoutput.
    def forward(self, input_: Tensor, target_: Tensor) -> ASMOutput:  # type: ignore[override]
        return _adaptive.adaptive_log_softmax_with_loss(
            input_, target_, self.head.weight, self._tails(), self.cutoffs[:-1], head_bias=self.head.bias
        )

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward

    def log_prob(self, input: Tensor) -> Tensor:
        """Log-probabilities of every class, ``(N, n_classes)``; of an unbatched
        ``(in_features,)`` input, ``(n_classes,)`` (torch's module takes only ``(N, in_features)``)."""
        return _adaptive.adaptive_log_prob(
            input, self.head.weight, self._tails(), self.cutoffs[:-1], head_bias=self.head.bias
        )

    def predict(self, input: Tensor) -> Tensor:
        """The most probable class of each row, ``(N,)`` (a scalar for an unbatched input)."""
        return self.log_prob(input).argmax(dim=-1)


def _check_options(loss_fn: Callable[..., Tensor], options: dict[str, Any]) -> None:
    """At construction, as the named criteria do: option names the loss does not take (unless
    it takes ``**kwargs``), and a ``reduction`` outside the values its ``Literal`` annotation
    allows."""
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin, say)
        return
    kinds = {p.kind for p in parameters.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        taken = [k for k, p in parameters.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
        unknown = [k for k in options if k not in taken]
        if unknown:
            raise TypeError(
                f"Criterion(...): expected options that {name} takes ({', '.join(taken)}), got {', '.join(unknown)}."
            )
    if isinstance(options.get("reduction"), str):
        try:
            hint = typing.get_type_hints(loss_fn).get("reduction")
        except Exception:  # unresolvable annotations: leave the check to the call
            return
        allowed = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        reduction = options["reduction"]
        if allowed and reduction not in allowed:
            raise ValueError(
                f"Criterion(...): expected a reduction {name} takes ({', '.join(map(repr, allowed))}), got "
                f"{reduction!r}. {reduction} is not a valid value for reduction."
            )


# The combinators whose fields `Criterion` looks into (a user's own classes are left whole).
_COMBINATORS = (
    _combinators.Reduced,
    _combinators.Scaled,
    _combinators.Weighted,
    _combinators.Masked,
    _combinators.LossSum,
)


def _map_held(fn: Any, swap: Callable[[str, Tensor], Tensor], path: str = "loss") -> Any:
    """``fn`` rebuilt with each tensor it holds inside replaced by ``swap(path, tensor)``: the
    fields of funcloss's combinators (a `weighted` weight, a `masked` mask, a `LossSum`'s
    terms) and keyword arguments bound with ``functools.partial``, recursively. The paths are
    the buffer names."""
    if isinstance(fn, functools.partial):
        keywords = {k: swap(f"{path}_{k}", v) if isinstance(v, Tensor) else v for k, v in fn.keywords.items()}
        return functools.partial(_map_held(fn.func, swap, f"{path}_func"), *fn.args, **keywords)
    if isinstance(fn, _COMBINATORS):
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(fn):
            value, where = getattr(fn, f.name), f"{path}_{f.name}"
            if isinstance(value, Tensor):
                changes[f.name] = swap(where, value)
            elif isinstance(value, Mapping):
                changes[f.name] = {k: _map_held(t, swap, f"{where}_{k}") for k, t in value.items()}
            else:
                changes[f.name] = _map_held(value, swap, where)
        return dataclasses.replace(fn, **changes)
    return fn


def _held_tensors(fn: Any) -> dict[str, Tensor]:
    """The tensors ``fn`` holds inside it (see `_map_held`), by buffer name."""
    found: dict[str, Tensor] = {}

    def record(name: str, tensor: Tensor) -> Tensor:
        found[name] = tensor
        return tensor

    _map_held(fn, record)
    return found


class Criterion(nn.Module):
    """Any functional loss as a criterion: ``Criterion(loss_fn, **options)``.

    Options become its configuration: tensors are registered as buffers (so they move with
    ``.to()``, appear in ``state_dict()`` and can be swapped by ``torch.func.functional_call``),
    everything else is kept as-is. ``forward(*args, **kwargs)`` calls
    ``loss_fn(*args, **options, **kwargs)``; keyword arguments given at call time win.

    Example:
        >>> criterion = Criterion(funcloss.cross_entropy, weight=torch.tensor([1.0, 3.0]), label_smoothing=0.1)
        >>> criterion(logits, labels)

    A loss assembled with the combinators, or any function of yours, works the same; to pickle
    the criterion, the function must be importable (not a lambda). Tensors the loss holds
    inside (a `weighted` weight, a `masked` mask, keywords bound with ``functools.partial``,
    at any depth of the combinators) are buffers too, named by their path (``loss_weight``,
    ``loss_loss_mask``, ``loss_terms_ce_weight``, ...), and each call uses the buffers' current
    tensors.
    """

    __prepare_scriptable__ = _refuse_torchscript

    def __init__(self, loss_fn: Callable[..., Tensor], **options: Any) -> None:
        super().__init__()
        if not callable(loss_fn):
            raise TypeError(f"Criterion(...): expected a callable loss, got {type(loss_fn).__name__}.")
        _check_options(loss_fn, options)
        self.loss_fn = loss_fn
        self._buffer_options: list[str] = []
        self._plain_options: dict[str, Any] = {}
        for name, value in options.items():
            if isinstance(value, Tensor):
                self.register_buffer(name, value)
                self._buffer_options.append(name)
            else:
                self._plain_options[name] = value
        held = _held_tensors(loss_fn)
        clash = sorted(set(held) & set(options))
        if clash:
            raise ValueError(
                f"Criterion(...): expected option names other than the buffer names of the tensors the loss holds, "
                f"got {', '.join(clash)}. Rename the option."
            )
        for name, value in held.items():
            self.register_buffer(name, value)
        self._held = list(held)

    @property
    def options(self) -> dict[str, Any]:
        """The configuration passed to the loss, buffers included."""
        return {**self._plain_options, **{name: getattr(self, name) for name in self._buffer_options}}

    def _current_loss(self) -> Callable[..., Tensor]:
        """The loss as it holds this module's buffers now (moved, loaded or swapped)."""
        if not self._held:
            return self.loss_fn
        rebuilt: Callable[..., Tensor] = _map_held(self.loss_fn, lambda name, _: cast(Tensor, getattr(self, name)))
        return rebuilt

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._current_loss()(*args, **{**self.options, **kwargs})

    if TYPE_CHECKING:  # calls type-check against forward (nn.Module.__call__ returns Any)
        __call__ = forward

    def extra_repr(self) -> str:
        loss_fn = self._current_loss()
        name = getattr(loss_fn, "__name__", repr(loss_fn))
        parts = [name] + [f"{k}={v!r}" for k, v in self._plain_options.items()]
        parts += [f"{k}=<buffer {tuple(getattr(self, k).shape)}>" for k in self._buffer_options]
        return ", ".join(parts)
