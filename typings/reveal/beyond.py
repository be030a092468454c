"""The types mypy infers for the losses beyond torch.nn."""

from typing import assert_type

import torch
from torch import Tensor

import funcloss as fl

logits = torch.randn(4, 5)
labels = torch.tensor([0, 2, 1, 4])

weights = fl.class_weights(torch.tensor([0, 1, 2, 3, 4, 4]), method="effective_number", beta=0.99)
assert_type(weights, Tensor)
assert_type(fl.focal_loss(logits, labels, weights, gamma=1.5), Tensor)
assert_type(fl.sigmoid_focal_loss(logits, torch.rand(4, 5), 0.25, 2.0, "mean"), Tensor)
assert_type(fl.quantile_loss(logits, logits, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])), Tensor)
method: fl.ClassWeightMethod = "inverse_sqrt"
assert_type(fl.class_weights(torch.tensor([0, 1, 2, 3, 4]), None, method=method), Tensor)
assert_type(fl.robust_loss(logits, logits, alpha=-2.0, scale=torch.ones(4, 5)), Tensor)
costs = torch.ones(5, 5) - torch.eye(5)
assert_type(fl.real_world_weight_cross_entropy(logits, labels, torch.ones(5), costs, reduction="sum"), Tensor)
baseline = fl.loss_baseline(fl.cross_entropy, labels, num_classes=5)
assert_type(baseline, fl.Baseline)
assert_type(baseline.skill(fl.cross_entropy(logits, labels)), Tensor)
assert_type(fl.positive_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dtype=torch.float64), Tensor)
