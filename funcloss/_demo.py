"""``python -m funcloss demo``: a functional training loop, then what the gradients' signs say.

The data are made here, deterministically: three Gaussian classes in 8 dimensions, imbalanced
70/20/10, with a few labels flipped on purpose. After training, the samples whose gradient
signs go against the batch's consensus should be mostly those flipped labels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
import torch.func as tf
from torch import Tensor, nn

import funcloss as fl

CLASSES = 3
FEATURES = 8


def dataset(seed: int = 0, n: int = 600, flipped: int = 12) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, labels, which labels were flipped): imbalanced 70/20/10 Gaussian classes."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(n * 0.7), int(n * 0.2)]
    sizes.append(n - sum(sizes))
    centres = torch.randn(CLASSES, FEATURES, generator=g) * 2.0
    xs, ys = [], []
    for c, size in enumerate(sizes):
        xs.append(centres[c] + torch.randn(size, FEATURES, generator=g))
        ys.append(torch.full((size,), c, dtype=torch.int64))
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(n, generator=g)
    x, y = x[order], y[order]
    noisy = torch.zeros(n, dtype=torch.bool)
    picks = torch.randperm(n, generator=g)[:flipped]
    y = y.clone()
    y[picks] = (y[picks] + 1 + torch.randint(0, CLASSES - 1, (flipped,), generator=g)) % CLASSES
    noisy[picks] = True
    return x, y, noisy


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def train(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float = 0.1,
    loss_fn: Callable[..., Tensor] = fl.cross_entropy,
    baseline: fl.Baseline | None = None,
    out: TextIO = sys.stdout,
) -> dict[str, Tensor]:
    """Full-batch gradient descent with ``torch.func.grad`` over a params dict (no ``.backward()``);
    with a ``baseline``, the progress line shows the loss's skill against it."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}

    def loss(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = tf.functional_call(net, p, (x,))
        return loss_fn(logits, y), logits

    step_fn = tf.grad(loss, has_aux=True)
    for step in range(1, steps + 1):
        grads, logits = step_fn(params)
        params = {k: v - lr * grads[k] for k, v in params.items()}
        live = out.isatty()
        if step == steps or step % max(1, steps // (20 if live else 4)) == 0:
            value = float(loss_fn(logits, y))
            accuracy = float((logits.argmax(1) == y).double().mean())
            bar = "#" * (20 * step // steps)
            line = f"training [{bar:<20}] step {step}/{steps}  loss {value:.4f}  accuracy {accuracy:.1%}"
            if baseline is not None:
                line += f"  skill {float(baseline.skill(value)):.2f}"
            print(f"\r{line}" if live else line, end="" if live else "\n", file=out, flush=True)
    if out.isatty():
        print(file=out)
    return params


def run(steps: int = 300, plot: str | None = "funcloss-demo.png", out: TextIO = sys.stdout) -> int:
    x, y, noisy = dataset()
    counts = torch.bincount(y, minlength=CLASSES).tolist()
    print(
        f"data: {len(y)} samples, {FEATURES} features, class counts {counts}, {int(noisy.sum())} labels flipped",
        file=out,
    )
    base = fl.loss_baseline(fl.cross_entropy, y, num_classes=CLASSES)
    print(
        f"baseline: predicting the class frequencies costs {float(base.value):.4f} nats; "
        "skill = 1 - loss / baseline (McFadden's pseudo-R^2)",
        file=out,
    )
    net = model()
    params = train(net, x, y, steps=steps, baseline=base, out=out)
    net.load_state_dict(params, strict=False)

    stats = fl.grad_stats(net, fl.cross_entropy, x, y, chunk_size=128)
    print(
        f"\nper-layer gradient signs over {stats.count} samples (m-coherence {float(stats.coherence):.2f}):", file=out
    )
    print(fl.sign_report(stats), file=out)

    grads = fl.per_sample_grads(net, fl.cross_entropy, x, y, chunk_size=128)
    against = fl.sample_disagreement(grads, threshold=0.5)
    shown = int(noisy.sum())
    worst = against.argsort(descending=True)[:shown]
    predicted = tf.functional_call(net, params, (x,)).argmax(1)
    print(
        "\nsamples whose gradients disagree most with the batch (share of the consensus elements, "
        "where 3 in 4 samples agree in sign, that they push the other way):",
        file=out,
    )
    print(f"{'sample':>6} {'label':>5} {'predicted':>9} {'against':>8}  flipped label?", file=out)
    for i in worst.tolist():
        print(
            f"{i:>6} {int(y[i]):>5} {int(predicted[i]):>9} {float(against[i]):>8.1%}  {'yes' if noisy[i] else 'no'}",
            file=out,
        )
    found = int(noisy[worst].sum())
    print(f"{found} of these {shown} are flipped labels (chance: {shown * shown / len(y):.1f}).", file=out)

    if plot:
        _plot(stats, Path(plot), out)
    return 0


def _plot(stats: fl.GradStats, path: Path, out: TextIO) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no plot: install matplotlib, e.g. pip install 'funcloss[plot]', to get one)", file=out)
        return
    report = fl.sign_report(stats)
    names = [r["name"] for r in report.rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [r["agreement"] for r in report.rows], color="#4c72b0")
    ax.set_ylabel("mean sign agreement")
    ax.set_ylim(0, 1)
    ax.set_title("How much the samples agree on each layer's gradient sign")
    fig.autofmt_xdate(rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nwrote the per-layer agreement plot to {path.resolve()}", file=out)
