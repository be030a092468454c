"""Every line marked here must be a type error (warn_unused_ignores fails a vanished one)."""

import torch

import funcloss as fl

x = torch.randn(4, 3)
y = torch.randn(4, 3)

fl.mse_loss(x, y, reduction="average")  # type: ignore[arg-type]
fl.kl_div(x, y, reduction="batchsum")  # type: ignore[arg-type]
fl.l1_loss(x, y, "mean")  # type: ignore[call-arg]
fl.mse_loss(x, y, size_average=True)  # type: ignore[call-arg]
fl.huber_loss(x, y, delta="1")  # type: ignore[arg-type]
fl.scaled(fl.mse_loss, 2.0)(x, y, reduction="avg")  # type: ignore[arg-type]
fl.loss_sum({"a": fl.mse_loss})(x, y, bogus=1)  # type: ignore[call-arg]
fl.weighted(fl.l1_loss, torch.ones(3), by="row")  # type: ignore[arg-type]
fl.reduced(fl.l1_loss, "batchmean")  # type: ignore[arg-type]
s: str = fl.mse_loss(x, y)  # type: ignore[assignment]
fl.per_sample_grad(fl.mse_loss)(x, "y")  # type: ignore[arg-type]
fl.and_mask({"w": x}, threshold="high")  # type: ignore[arg-type]
