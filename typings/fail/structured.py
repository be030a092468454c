"""Every line marked here must be a type error: the structured losses, the criteria and the
per-sample API."""

import torch
from torch import Tensor, nn

import funcloss as fl
import funcloss.nn as fnn

logits = torch.randn(4, 5)
labels = torch.tensor([0, 2, 1, 4])
log_probs = torch.randn(12, 2, 6).log_softmax(-1)
targets = torch.randint(1, 6, (2, 3))


def similarity(x1: Tensor, x2: Tensor) -> float:
    return 0.0


fl.cross_entropy(logits, labels, reduction="batchmean")  # type: ignore[arg-type]
fl.cross_entropy(logits, labels, None, -1)  # type: ignore[call-arg]
fl.nll_loss(logits, labels, label_smoothing=0.1)  # type: ignore[call-arg]
fl.ctc_loss(log_probs, targets, [12.0, 10.0], [3, 2])  # type: ignore[list-item]
fl.linear_cross_entropy(logits, logits, labels, reduction="avg")  # type: ignore[arg-type]
fl.triplet_margin_with_distance_loss(logits, logits, logits, distance_function=similarity)  # type: ignore[arg-type]
missing = fl.adaptive_log_softmax_with_loss(logits, labels, logits, [(logits, logits)], [3]).logits  # type: ignore[attr-defined]
fnn.CrossEntropyLoss()(logits)  # type: ignore[call-arg]
fnn.CTCLoss()(log_probs, targets, [12, 10], [3, 2])  # type: ignore[arg-type]
fnn.TripletMarginWithDistanceLoss(distance_function=similarity)  # type: ignore[arg-type]
bad: str = fnn.MSELoss()(logits, logits)  # type: ignore[assignment]
fl.per_sample_grads(nn.Linear(5, 3), fl.cross_entropy, logits, labels, chunk_size="8")  # type: ignore[arg-type]
absent = fl.grad_stats(nn.Linear(5, 3), fl.cross_entropy, logits, labels).sign  # type: ignore[attr-defined]
fl.per_sample_grads(nn.Linear(5, 3), fl.cross_entropy, [logits], labels)  # type: ignore[arg-type]
fl.grad_stats(nn.Linear(5, 3), fl.cross_entropy, {1: logits}, labels)  # type: ignore[dict-item]
fl.grad_stats(nn.Linear(5, 3), fl.cross_entropy, logits, labels, method="loops")  # type: ignore[arg-type]
fl.sign_agreement([logits])  # type: ignore[arg-type]
fl.sign_report([logits])  # type: ignore[arg-type]
fl.GradStats.from_grads(logits)  # type: ignore[arg-type]
