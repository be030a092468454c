"""mypy --strict must accept all of this."""

import functools

import torch
from torch import Tensor

import funcloss as fl

x = torch.randn(4, 3)
y = torch.randn(4, 3)

a: Tensor = fl.mse_loss(x, y)
b: Tensor = fl.l1_loss(x, y, reduction="sum", weight=torch.ones(4, 3))
c: Tensor = fl.huber_loss(x, y, "none", 0.5)
d: Tensor = fl.kl_div(x.log_softmax(-1), y.softmax(-1), reduction="batchmean")
e: Tensor = fl.gaussian_nll_loss(x, y, 0.5)
f: Tensor = fl.gaussian_nll_loss(x, y, torch.ones(4, 3), full=True)

reduction: fl.Reduction = "mean"
g: Tensor = fl.smooth_l1_loss(x, y, reduction=reduction)

# Built-in losses play the Loss role.
role: fl.Loss = fl.mse_loss
role2: fl.Loss = fl.binary_cross_entropy_with_logits

# Combinators keep the loss role.
mix: fl.Loss = fl.loss_sum({"a": fl.mse_loss, "b": fl.l1_loss}, weights={"b": 0.5})
scaled: fl.Loss = fl.scaled(fl.mse_loss, 2.0)
masked: fl.Loss = fl.masked(functools.partial(fl.mse_loss, reduction="none"), x > 0, reduction="mean")
weighted: fl.Loss = fl.weighted(functools.partial(fl.l1_loss, reduction="none"), torch.ones(4), by="sample")


def my_loss(input: Tensor, target: Tensor) -> Tensor:
    return (input - target).abs().max()


custom: fl.Loss = fl.reduced(my_loss, "sum")
