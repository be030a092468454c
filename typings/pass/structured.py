"""mypy --strict must accept all of this: the structured losses, the criteria and the
per-sample API."""

import torch
from torch import Tensor, nn

import funcloss as fl
import funcloss.nn as fnn

logits = torch.randn(4, 5)
labels = torch.tensor([0, 2, 1, 4])
log_probs = torch.randn(12, 2, 6).log_softmax(-1)
targets = torch.randint(1, 6, (2, 3))

a: Tensor = fl.cross_entropy(logits, labels, torch.ones(5), ignore_index=0, label_smoothing=0.1)
b: Tensor = fl.nll_loss(logits.log_softmax(-1), labels, reduction="none")
c: Tensor = fl.ctc_loss(log_probs, targets, [12, 10], (3, 2), blank=0, zero_infinity=True)
d: Tensor = fl.ctc_loss(log_probs, targets, torch.tensor([12, 10]), torch.tensor([3, 2]))
hidden, vocab = torch.randn(4, 3), torch.randn(5, 3)
e: Tensor = fl.linear_cross_entropy(hidden, vocab, labels, linear_bias=torch.zeros(5), chunk_size=2)
f: Tensor = fl.multi_margin_loss(logits, labels, 2, 0.5, torch.ones(5), reduction="sum")


def cosine(x1: Tensor, x2: Tensor) -> Tensor:
    return 1 - torch.nn.functional.cosine_similarity(x1, x2)


g: Tensor = fl.triplet_margin_with_distance_loss(logits, logits, logits, distance_function=cosine, swap=True)
h: Tensor = fl.triplet_margin_with_distance_loss(logits, logits, logits, distance_function=fl.pairwise_distance)

asm = fl.adaptive_log_softmax_with_loss(
    torch.randn(4, 3), labels, torch.randn(4, 3), [(torch.randn(2, 3), torch.randn(2, 2))], [3]
)
out: Tensor = asm.output
loss: Tensor = asm.loss

# Criteria: torch's constructor arguments; a call type-checks against forward.
ce: Tensor = fnn.CrossEntropyLoss(weight=torch.ones(5), label_smoothing=0.1)(logits, labels)
ctc: Tensor = fnn.CTCLoss(blank=0)(log_probs, targets, torch.tensor([12, 10]), torch.tensor([3, 2]))
trip: Tensor = fnn.TripletMarginWithDistanceLoss(distance_function=cosine)(logits, logits, logits)
wrapped: Tensor = fnn.Criterion(fl.huber_loss, delta=0.5)(logits, logits)
criterion: nn.Module = fnn.MSELoss()

# Per-sample gradients and their signs.
model = nn.Linear(5, 3)
grads: dict[str, Tensor] = fl.per_sample_grads(model, fl.cross_entropy, logits, labels % 3, chunk_size=2)
stats = fl.grad_stats(model, fl.cross_entropy, logits, labels % 3, groups=labels % 2, label_smoothing=0.1)
several = fl.per_sample_grads(model, fl.cross_entropy, (logits,), labels % 3)  # model(*inputs)
by_name = fl.grad_stats(model, fl.cross_entropy, {"input": logits}, labels % 3)  # model(**inputs)
looped = fl.per_sample_grads(model, fl.cross_entropy, logits, labels % 3, method="loop", randomness="same")
agreement: dict[str, Tensor] = fl.sign_agreement(stats)
mask: dict[str, Tensor] = fl.and_mask(grads, 0.8, rescale=True)
report: str = str(fl.sign_report(stats))
per_sample: Tensor = fl.sample_disagreement(grads)
