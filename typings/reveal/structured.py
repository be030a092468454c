"""The types mypy infers for the structured losses, the criteria and the per-sample API."""

from typing import assert_type

import torch
from torch import Tensor, nn

import funcloss as fl
import funcloss.nn as fnn

logits = torch.randn(4, 5)
labels = torch.tensor([0, 2, 1, 4])
log_probs = torch.randn(12, 2, 6).log_softmax(-1)
targets = torch.randint(1, 6, (2, 3))

assert_type(fl.cross_entropy(logits, labels), Tensor)
assert_type(fl.nll_loss(logits, labels), Tensor)
assert_type(fl.ctc_loss(log_probs, targets, [12, 10], [3, 2]), Tensor)
assert_type(fl.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), labels), Tensor)
assert_type(fl.multilabel_margin_loss(logits, torch.full((4, 5), -1)), Tensor)

asm = fl.adaptive_log_softmax_with_loss(
    torch.randn(4, 3), labels, torch.randn(4, 3), [(torch.randn(2, 3), torch.randn(2, 2))], [3]
)
assert_type(asm, fl.ASMOutput)
assert_type(asm.output, Tensor)

# A criterion's call has its forward's types (nn.Module's own __call__ returns Any).
assert_type(fnn.CrossEntropyLoss()(logits, labels), Tensor)
assert_type(fnn.MarginRankingLoss()(logits[:, 0], logits[:, 1], labels.sign()), Tensor)
assert_type(fnn.Criterion(fl.mse_loss)(logits, logits), Tensor)
asm_module = fnn.AdaptiveLogSoftmaxWithLoss(3, 5, [3])
assert_type(asm_module(torch.randn(4, 3), labels), fl.ASMOutput)

model = nn.Linear(5, 3)
assert_type(fl.per_sample_grads(model, fl.cross_entropy, logits, labels % 3), dict[str, Tensor])
stats = fl.grad_stats(model, fl.cross_entropy, logits, labels % 3)
assert_type(stats, fl.GradStats)
assert_type(stats.sq_norms, Tensor)
assert_type(stats.gsnr, dict[str, Tensor])
assert_type(fl.sign_agreement(stats), dict[str, Tensor])
assert_type(fl.and_mask(stats, 0.5), dict[str, Tensor])
assert_type(fl.sign_report(stats), fl.SignReport)
assert_type(fl.sign_report({"w": logits}), fl.SignReport)
assert_type(fl.GradStats.from_grads({"w": logits}), fl.GradStats)


def first(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return fl.mse_loss(x @ params["w"], y)


conflicts = fl.gradient_conflicts({"a": first, "b": first}, {"w": torch.randn(5, 5)}, logits, logits)
assert_type(conflicts, fl.Conflicts)
assert_type(conflicts.cosine, Tensor)
