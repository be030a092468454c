"""Every line marked here must be a type error: the losses beyond torch.nn."""

import torch

import funcloss as fl

logits = torch.randn(4, 5)
labels = torch.tensor([0, 2, 1, 4])

fl.focal_loss(logits, labels, None, 2.0)  # type: ignore[call-arg]
fl.focal_loss(logits, labels, gamma="2")  # type: ignore[arg-type]
fl.sigmoid_focal_loss(logits, logits, reduction="batchmean")  # type: ignore[arg-type]
fl.quantile_loss(logits, logits, "median")  # type: ignore[arg-type]
fl.class_weights(labels, method="inverse")  # type: ignore[arg-type]
fl.class_weights(labels, 5, "balanced")  # type: ignore[call-arg]
fl.robust_loss(logits, logits, 1.0)  # type: ignore[call-arg]
fl.real_world_weight_cross_entropy(logits, labels, reduction="batchmean")  # type: ignore[arg-type]
fl.loss_baseline(fl.cross_entropy, labels).skill("0.5")  # type: ignore[arg-type]
