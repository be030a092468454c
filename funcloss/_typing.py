"""Shared types: reduction literals and the roles a loss can play."""

from __future__ import annotations

from typing import Literal, Protocol

from torch import Tensor

Reduction = Literal["none", "mean", "sum"]
"""How a loss turns per-element values into its result, as in torch.nn.functional."""

KLDivReduction = Literal["none", "mean", "sum", "batchmean"]
"""`kl_div` also accepts ``"batchmean"``: the sum divided by the batch size (the true KL)."""

WeightBy = Literal["element", "sample", "class"]
"""What a weight tensor indexes: every element, every sample (dim 0), or the target class."""


class Loss(Protocol):
    """A loss: ``(input, target) -> Tensor``, reduced or unreduced.

    Every torch-compatible loss in funcloss with two tensor arguments has this role, and so does
    any user function with the same call form; combinators accept and return it.
    """

    def __call__(self, input: Tensor, target: Tensor, /) -> Tensor: ...


class DistanceFunction(Protocol):
    """A distance between two batches of embeddings, ``(x1, x2) -> (N,)``."""

    def __call__(self, x1: Tensor, x2: Tensor, /) -> Tensor: ...
