"""The types mypy infers, pinned with assert_type."""

import functools
from typing import assert_type

import torch
from torch import Tensor

import funcloss as fl

x = torch.randn(4, 3)
y = torch.randn(4, 3)

assert_type(fl.mse_loss(x, y), Tensor)
assert_type(fl.binary_cross_entropy(x.sigmoid(), y.sigmoid()), Tensor)
assert_type(fl.reduce(x, "sum"), Tensor)

mix = fl.loss_sum({"a": fl.mse_loss, "b": fl.l1_loss})
assert_type(mix(x, y), Tensor)
assert_type(mix.values(x, y), dict[str, Tensor])

none_l1 = functools.partial(fl.l1_loss, reduction="none")
assert_type(fl.reduced(none_l1, "mean")(x, y), Tensor)
assert_type(fl.scaled(fl.huber_loss, 0.5)(x, y, delta=2.0), Tensor)


# per_sample_grad keeps the argument types; the gradient has the params' type.
def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return fl.mse_loss(x @ params["w"], y)


params = {"w": torch.randn(3, 3)}
assert_type(fl.per_sample_grad(example_loss)(params, x, y), dict[str, Tensor])
assert_type(fl.grad_stats(torch.nn.Linear(3, 3), fl.mse_loss, x, y).coherence, Tensor)
