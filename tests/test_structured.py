"""Named tests for the structured losses' traps (see TORCH_SEMANTICS.md)."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import funcloss as fl
import funcloss.nn as fnn

from .registry import DEVICES

D = torch.float64


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- cross-entropy / nll


def test_weighted_mean_is_not_none_then_mean() -> None:
    x = torch.randn(6, 4, generator=_g(), dtype=D)
    y = torch.tensor([0, 1, 1, 3, 2, 0])
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=D)
    ours = fl.cross_entropy(x, y, w)
    none = fl.cross_entropy(x, y, w, reduction="none")
    torch.testing.assert_close(ours, none.sum() / w[y].sum())
    assert not torch.isclose(ours, none.mean())
    torch.testing.assert_close(ours, F.cross_entropy(x, y, w))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("device", DEVICES)
def test_large_inputs_pick_through_the_flat_view(fn: str, device: str) -> None:
    """From 2^16 elements on the CPU picks targets from the flat view (index_select); smaller
    inputs gather. Both against torch, with and without an ignored target."""
    from funcloss.losses._classification import _FLAT_PICK

    # Shapes in turn, and back to the first: the row offsets kept between calls are per shape.
    for rows, classes in ((_FLAT_PICK // 50 + 3, 50), (_FLAT_PICK // 40 + 1, 40), (_FLAT_PICK // 50 + 3, 50)):
        x = torch.randn(rows, classes, generator=_g(), dtype=D).log_softmax(1).to(device).requires_grad_()
        y = torch.randint(0, classes, (rows,), generator=_g(1)).to(device)
        for target in (y, torch.where(torch.arange(rows, device=device) % 7 == 0, -100, y)):
            ours, theirs = getattr(fl, fn)(x, target), getattr(F, fn)(x, target)
            torch.testing.assert_close(ours, theirs)
            torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_large_cross_entropy_forms_its_gradient_in_the_forward(
    reduction: str, smoothing: float, weighted: bool, device: str
) -> None:
    """From 2^16 elements, a reduced cross-entropy whose input requires grad forms the
    gradient in the forward: scaled by the incoming gradient, right for a second backward
    (retain_graph) and under create_graph (double backward), NaN with a zero gradient when
    every target is ignored."""
    from funcloss.losses._classification import _FLAT_PICK

    rows, classes = _FLAT_PICK // 40 + 5, 40
    x = torch.randn(rows, classes, generator=_g(), dtype=D).to(device).requires_grad_(True)
    y = torch.randint(0, classes, (rows,), generator=_g(1))
    y[::9] = -100
    y = y.to(device)
    kwargs: dict[str, Any] = {
        "weight": torch.rand(classes, generator=_g(2), dtype=D).to(device) if weighted else None,
        "reduction": reduction,
        "label_smoothing": smoothing,
    }
    ours, theirs = fl.cross_entropy(x, y, **kwargs), F.cross_entropy(x, y, **kwargs)
    torch.testing.assert_close(ours, theirs)
    (expected,) = torch.autograd.grad(3.0 * theirs, x, retain_graph=True)
    for _ in range(2):
        torch.testing.assert_close(torch.autograd.grad(3.0 * ours, x, retain_graph=True)[0], expected)
    (g,) = torch.autograd.grad(fl.cross_entropy(x, y, **kwargs), x, create_graph=True)  # a fresh forward
    (h,) = torch.autograd.grad(theirs, x, create_graph=True)
    v = torch.randn(rows, classes, generator=_g(3), dtype=D).to(device)
    torch.testing.assert_close(torch.autograd.grad((g * v).sum(), x)[0], torch.autograd.grad((h * v).sum(), x)[0])
    if reduction == "mean":
        none = fl.cross_entropy(x, torch.full_like(y, -100), **kwargs)
        assert torch.isnan(none)
        assert torch.equal(torch.autograd.grad(none, x)[0], torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_large_cross_entropy_keeps_log_softmax_precision(
    reduction: fl.Reduction, smoothing: float, device: str
) -> None:
    """The gradient-in-the-forward path takes the target's log-probability from the softmax
    (x_y - max x + log max p; with smoothing, log_softmax): as precise as torch's log_softmax
    in float32 for logits far from 0 (an offset of 1e6, where a logsumexp formed first would
    be off by its rounding, up to 0.06 a row, and a smoothing sum of the raw logits by far
    more) and for targets whose probability underflows to 0 (a finite loss)."""
    from funcloss.losses._classification import _FLAT_PICK

    rows, classes = _FLAT_PICK // 40 + 5, 40
    x = torch.randn(rows, classes, generator=_g()) * 3 + 1e6
    y = torch.randint(0, classes, (rows,), generator=_g(1))
    x[::5].scatter_(1, y[::5, None], -150.0, reduce="add")  # p_y = exp(-150) is 0 in float32
    x, y = x.to(device).requires_grad_(True), y.to(device)
    kwargs: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing}
    ours, theirs = fl.cross_entropy(x, y, **kwargs), F.cross_entropy(x, y, **kwargs)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, theirs)
    exact = F.cross_entropy(x.double(), y, **kwargs)
    assert abs(ours.double() - exact) <= abs(theirs.double() - exact) + 1e-6 * abs(exact)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


@pytest.mark.parametrize("rows", [7, 2000])
def test_class_weight_gradient_at_every_size(rows: int) -> None:
    """A class weight that requires grad gets its gradient (torch raises instead) whether the
    input is small (the composition) or large enough for the gradient-in-the-forward Function,
    which then steps aside: against the weighted mean written out."""
    classes = 40
    x = torch.randn(rows, classes, generator=_g(), dtype=D, requires_grad=True)
    y = torch.randint(0, classes, (rows,), generator=_g(1))
    w = torch.rand(classes, generator=_g(2), dtype=D).add_(0.5).requires_grad_()
    ours = torch.autograd.grad(fl.cross_entropy(x, y, w), (x, w))
    picked = x.log_softmax(1)[torch.arange(rows), y]
    expected = torch.autograd.grad(-(w[y] * picked).sum() / w[y].sum(), (x, w))
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(fl.nll_loss(x.log_softmax(1), y, w), (x, w)), expected)


def test_batch_of_one_weights_cancel() -> None:
    x, y = torch.randn(1, 4, generator=_g(), dtype=D), torch.tensor([2])
    w = torch.tensor([1.0, 2.0, 7.0, 3.0], dtype=D)
    torch.testing.assert_close(fl.cross_entropy(x, y, w), fl.cross_entropy(x, y))


def test_probability_targets_mean_divides_by_positions_not_weights() -> None:
    x = torch.randn(3, 4, 2, generator=_g(), dtype=D)
    q = torch.softmax(torch.randn(3, 4, 2, generator=_g(1), dtype=D), dim=1)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=D)
    ours = fl.cross_entropy(x, q, w, label_smoothing=0.2)
    qs = q * 0.8 + 0.2 / 4
    expected = -(x.log_softmax(1) * qs * w.view(1, 4, 1)).sum() / (3 * 2)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, F.cross_entropy(x, q, w, label_smoothing=0.2))


def test_label_smoothing_excludes_ignored_rows_and_uses_weighted_denominator() -> None:
    x = torch.randn(5, 3, generator=_g(), dtype=D)
    y = torch.tensor([0, -100, 2, 1, -100])
    w = torch.tensor([0.5, 2.0, 1.5], dtype=D)
    eps = 0.3
    logp = x.log_softmax(1)
    keep = y != -100
    ys = y.clamp_min(0)
    nll = (-(logp.gather(1, ys[:, None])[:, 0]) * w[ys] * keep).sum()
    smooth = (-(logp * w).sum(1) * keep).sum()
    expected = ((1 - eps) * nll + eps / 3 * smooth) / (w[ys] * keep).sum()
    ours = fl.cross_entropy(x, y, w, label_smoothing=eps)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, F.cross_entropy(x, y, w, label_smoothing=eps))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_all_targets_ignored(fn: str) -> None:
    x = torch.randn(3, 4, generator=_g(), dtype=D)
    y = torch.full((3,), -100)
    loss = getattr(fl, fn)
    assert torch.isnan(loss(x, y))
    assert loss(x, y, reduction="sum").item() == 0
    grad = tf.grad(lambda z: loss(z, y))(x)
    assert torch.equal(grad, torch.zeros_like(x))
    xt = x.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(getattr(F, fn)(xt, y), xt)
    torch.testing.assert_close(grad, theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_unbatched_ignored_target_is_nan_on_every_device(fn: str, device: str) -> None:
    """A ``(C,)`` input whose target is ignored: 0/0 under mean. torch's CPU kernel gives NaN,
    its CUDA kernel 0; funcloss gives torch's CPU answer on every device."""
    x = torch.randn(4, generator=_g(), dtype=D)
    y = torch.tensor(-100)
    assert torch.isnan(getattr(F, fn)(x, y))  # the CPU oracle
    ours = getattr(fl, fn)(x.to(device), y.to(device))
    assert ours.device.type == device
    assert torch.isnan(ours)
    assert getattr(fl, fn)(x.to(device), y.to(device), reduction="sum").item() == 0


def test_unbatched_and_k_dimensional() -> None:
    x = torch.randn(5, generator=_g(), dtype=D)
    torch.testing.assert_close(fl.cross_entropy(x, torch.tensor(3)), F.cross_entropy(x, torch.tensor(3)))
    xk = torch.randn(2, 5, 3, 4, generator=_g(), dtype=D)
    yk = torch.randint(0, 5, (2, 3, 4), generator=_g())
    torch.testing.assert_close(fl.cross_entropy(xk, yk, reduction="none"), F.cross_entropy(xk, yk, reduction="none"))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_byte_class_targets_at_every_rank(fn: str) -> None:
    """torch takes uint8 class indices for (N, C) and (C,) inputs but its K-dimensional
    kernel refuses them ("expected scalar type Long but found Byte"); funcloss takes them at
    every rank (segmentation masks are often uint8), with torch's values for the int64 copy."""
    xk = torch.randn(2, 5, 3, 4, generator=_g(), dtype=D).log_softmax(1).requires_grad_()
    yk = torch.randint(0, 5, (2, 3, 4), generator=_g())
    with pytest.raises(RuntimeError, match="Long but found Byte"):
        getattr(F, fn)(xk, yk.to(torch.uint8))
    ours = getattr(fl, fn)(xk, yk.to(torch.uint8))
    theirs = getattr(F, fn)(xk, yk)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, xk), torch.autograd.grad(theirs, xk))


@pytest.mark.parametrize(
    ("target", "kwargs", "exc", "match"),
    [
        (torch.tensor([1, 2, 5]), {}, IndexError, "Target 5 is out of bounds"),
        (torch.tensor([1, -3, 2]), {}, IndexError, "Target -3 is out of bounds"),
        (torch.tensor([1, 2, 3], dtype=torch.int32), {}, RuntimeError, "Long or Byte"),
        (torch.tensor([1, 2]), {}, ValueError, r"batch_size \(3\) to match target batch_size \(2\)"),
        (torch.rand(3, 5), {"ignore_index": 1}, RuntimeError, "not supported for floating point target"),
        (torch.tensor([1, 2, 3]), {"label_smoothing": 1.5}, RuntimeError, "label_smoothing"),
        (torch.tensor([1, 2, 3]), {"weight": torch.ones(4)}, RuntimeError, "weight tensor of shape"),
    ],
)
def test_cross_entropy_errors_like_torch(
    target: torch.Tensor, kwargs: dict[str, object], exc: type[Exception], match: str
) -> None:
    x = torch.randn(3, 5)
    with pytest.raises(exc):
        F.cross_entropy(x, target, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(exc, match=match):
        fl.cross_entropy(x, target, **kwargs)  # type: ignore[arg-type]


def test_out_of_range_targets_are_unchecked_under_vmap() -> None:
    """The value check reads tensor values, so it steps aside under transforms."""
    x, y = torch.randn(3, 5), torch.tensor([1, 2, 4])
    out = tf.vmap(fl.cross_entropy)(x, y)
    torch.testing.assert_close(out, F.cross_entropy(x, y, reduction="none"))


# ---------------------------------------------------------------- margins


def test_multilabel_margin_ignores_entries_after_the_first_minus_one() -> None:
    x = torch.randn(2, 5, generator=_g(), dtype=D)
    a = torch.tensor([[3, 0, -1, 1, 2], [4, -1, 0, 0, 0]])
    b = torch.tensor([[3, 0, -1, 4, 4], [4, -1, 2, 3, 1]])
    torch.testing.assert_close(fl.multilabel_margin_loss(x, a), fl.multilabel_margin_loss(x, b))
    torch.testing.assert_close(fl.multilabel_margin_loss(x, a), F.multilabel_margin_loss(x, a))


@pytest.mark.parametrize("classes", [3, 32, 33, 70])
@pytest.mark.parametrize("device", DEVICES)
def test_multilabel_margin_both_forms_match_torch(classes: int, device: str) -> None:
    """Up to 32 classes the pairwise form runs, above it the sorted one: both against torch,
    values and gradients, with repeated classes, ties at the margin and -1 padding.

    The oracle is torch's CPU kernel on every device: its CUDA backward kernel races on
    repeated targets (pytorch/pytorch#84202, open) and, measured on an H100 with torch 2.11,
    gives gradients off by up to 0.58 from 70 classes on, where its CPU kernel, its own CUDA
    forward and funcloss on either device agree."""
    g = _g(classes)
    # Integer-valued scores make exact ties (x_j - x_i == 1) common.
    x = torch.randint(-3, 4, (9, classes), generator=g).to(D)
    target = torch.randint(0, classes, (9, classes), generator=g)
    stop = torch.randint(0, classes + 1, (9,), generator=g)
    target[torch.arange(classes) >= stop[:, None]] = -1
    target[0, : min(3, classes)] = target[0, 0]  # a class listed three times
    target[1] = torch.arange(classes)  # every class a target: nothing to hinge against
    target[2, 0] = -1  # nothing listed
    target = target.to(device)
    x = x.to(device).requires_grad_()
    ours = fl.multilabel_margin_loss(x, target, reduction="none")
    theirs = F.multilabel_margin_loss(x.cpu(), target.cpu(), reduction="none").to(device)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(v.sum(), x)[0] for v in (ours, theirs)))


@pytest.mark.parametrize("p", [1, 2])
def test_multi_margin_weight_multiplies_after_the_power(p: int) -> None:
    x = torch.randn(3, 4, generator=_g(), dtype=D)
    y = torch.tensor([0, 3, 1])
    w = torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=D)
    z = (1.0 - x.gather(1, y[:, None]) + x).clamp_min(0) ** p
    z = z * (torch.arange(4) != y[:, None]) * w[y][:, None]
    torch.testing.assert_close(fl.multi_margin_loss(x, y, p=p, weight=w, reduction="none"), z.sum(1) / 4)
    torch.testing.assert_close(fl.multi_margin_loss(x, y, p=p, weight=w), F.multi_margin_loss(x, y, p=p, weight=w))


def test_multi_margin_errors() -> None:
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="p to be 1 or 2"):
        fl.multi_margin_loss(x, y, p=3)
    with pytest.raises(ValueError, match="one-dimensional weight"):
        fl.multi_margin_loss(x, y, weight=torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="target out of range"):
        fl.multi_margin_loss(x, torch.tensor([0, 1, 4]))


@pytest.mark.parametrize("fn", ["multi_margin_loss", "multilabel_margin_loss"])
def test_margin_mean_of_empty_batch_is_nan(fn: str) -> None:
    """torch's kernels return uninitialised memory here; funcloss returns the NaN of an empty mean."""
    target = torch.zeros(0, dtype=torch.int64) if fn == "multi_margin_loss" else torch.zeros(0, 4, dtype=torch.int64)
    assert torch.isnan(getattr(fl, fn)(torch.randn(0, 4), target))


# ---------------------------------------------------------------- embeddings


def test_triplet_adds_eps_to_the_difference_and_swaps() -> None:
    a, p, n = (torch.randn(4, 3, generator=_g(i), dtype=D) for i in range(3))
    eps = 1e-2

    def d(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ((u - v + eps) ** 2).sum(-1).sqrt()

    expected = (1.0 + d(a, p) - torch.minimum(d(a, n), d(p, n))).clamp_min(0)
    ours = fl.triplet_margin_loss(a, p, n, eps=eps, swap=True, reduction="none")
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, F.triplet_margin_loss(a, p, n, eps=eps, swap=True, reduction="none"))


def test_triplet_with_any_distance_callable() -> None:
    a, p, n = (torch.randn(4, 3, generator=_g(i), dtype=D) for i in range(3))

    def manhattan(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u - v).abs().sum(-1)

    ours = fl.triplet_margin_with_distance_loss(a, p, n, distance_function=manhattan, margin=0.5)
    theirs = F.triplet_margin_with_distance_loss(a, p, n, distance_function=manhattan, margin=0.5)
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="margin > 0"):
        fl.triplet_margin_with_distance_loss(a, p, n, margin=0.0)


# ---------------------------------------------------------------- CTC


def _ctc_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.randn(12, 3, 6, generator=_g(), dtype=D)
    targets = torch.tensor([[1, 2, 2, 3], [4, 5, 0, 0], [1, 0, 0, 0]])
    return logits, targets, torch.tensor([12, 9, 5]), torch.tensor([4, 2, 1])


def test_ctc_mean_divides_by_target_length_then_averages() -> None:
    logits, t, il, tl = _ctc_inputs()
    lp = logits.log_softmax(-1)
    none = fl.ctc_loss(lp, t, il, tl, reduction="none")
    torch.testing.assert_close(fl.ctc_loss(lp, t, il, tl), (none / tl).mean())
    torch.testing.assert_close(fl.ctc_loss(lp, t, il, tl), F.ctc_loss(lp, t, il, tl))


def test_ctc_concatenated_targets_equal_padded() -> None:
    logits, t, il, tl = _ctc_inputs()
    lp = logits.log_softmax(-1)
    flat = torch.cat([t[i, : tl[i]] for i in range(3)])
    torch.testing.assert_close(
        fl.ctc_loss(lp, flat, il, tl, reduction="none"), fl.ctc_loss(lp, t, il, tl, reduction="none")
    )


def test_ctc_unbatched() -> None:
    logits, t, il, tl = _ctc_inputs()
    lp = logits[:, 0].log_softmax(-1)
    ours = fl.ctc_loss(lp, t[0], il[0], tl[0], reduction="none")
    assert ours.shape == ()
    torch.testing.assert_close(ours, F.ctc_loss(lp, t[0], il[0], tl[0], reduction="none"))


def test_ctc_infeasible_is_inf_with_zero_gradient_and_zero_infinity_zeroes_it() -> None:
    """An infeasible sequence is inf, as in torch; its gradient is zero (torch's is NaN)."""
    logits, t, _, tl = _ctc_inputs()
    il = torch.tensor([4, 9, 5])  # [1, 2, 2, 3] needs 5 steps
    for zero_infinity, value in ((False, float("inf")), (True, 0.0)):
        losses = fl.ctc_loss(logits.log_softmax(-1), t, il, tl, reduction="none", zero_infinity=zero_infinity)
        assert losses[0].item() == value
        grad = tf.grad(lambda z, zi=zero_infinity: fl.ctc_loss(z.log_softmax(-1), t, il, tl, zero_infinity=zi))(logits)
        assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))
        assert torch.isfinite(grad).all()
    x = logits.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.ctc_loss(x.log_softmax(-1), t, il, tl), x)
    assert torch.isnan(theirs[:4, 0]).all()


def test_ctc_gradient_with_respect_to_log_probs_is_the_true_derivative() -> None:
    """torch returns exp(log_probs) - gamma; funcloss the true derivative -gamma."""
    logits, t, il, tl = _ctc_inputs()
    lp = logits.log_softmax(-1)
    ours = tf.grad(lambda z: fl.ctc_loss(z, t, il, tl, reduction="sum"))(lp)
    lpt = lp.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.ctc_loss(lpt, t, il, tl, reduction="sum"), lpt)
    active = (torch.arange(12)[:, None] < il[None, :])[..., None]
    torch.testing.assert_close(ours, (theirs - lp.exp() * active))
    # Eager mode (the fast path) agrees with the transform path.
    lpe = lp.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(fl.ctc_loss(lpe, t, il, tl, reduction="sum"), lpe)
    torch.testing.assert_close(eager, ours)


def test_ctc_finite_differences_agree_with_gradient() -> None:
    logits, t, il, tl = _ctc_inputs()

    def f(z: torch.Tensor) -> torch.Tensor:
        return fl.ctc_loss(z, t, il, tl)

    lp = logits.log_softmax(-1)
    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),))


@pytest.mark.parametrize("device", DEVICES)
def test_ctc_gradient_checking_every_step_equals_the_gradient_from_the_lengths(device: str) -> None:
    """The backward without a host read of the lengths (every step checks for sequences ending
    there: what CUDA runs, and records as a graph) gives the gradient of the one that reads
    which steps to check (bit for bit on the CPU), lengths ragged and some zero."""
    from funcloss.losses import _sequence

    gen = torch.Generator().manual_seed(5)
    steps, batch, classes, labels = 30, 6, 7, 5
    log_probs = torch.randn(steps, batch, classes, generator=gen, dtype=D).log_softmax(2).to(device)
    targets = torch.randint(1, classes, (batch, labels), generator=gen).to(device)
    in_len = torch.tensor([30, 1, 17, 17, 0, 29], device=device)
    tgt_len = torch.tensor([5, 0, 4, 5, 0, 2], device=device)
    ext, skip = _sequence._extended(targets, 0, D)
    ll, padded = _sequence._ctc_forward(log_probs, ext, skip, in_len, tgt_len)
    grad_ll = torch.randn(batch, generator=gen, dtype=D).to(device)
    args = (grad_ll, log_probs, ext, skip, in_len, tgt_len, ll, padded)
    (every,) = _sequence._ctc_grad_every_step(*args)
    from_lengths = _sequence._ctc_grad_from(*args, starting=set((in_len - 1).tolist()))
    torch.testing.assert_close(every, from_lengths, rtol=1e-12, atol=1e-12)  # CUDA's index_add_ is atomic
    assert every.abs().sum() > 0


def test_ctc_errors() -> None:
    logits, t, il, tl = _ctc_inputs()
    with pytest.raises(RuntimeError, match="non-empty log_probs"):
        fl.ctc_loss(
            torch.randn(5, 0, 4),
            torch.zeros(0, 2, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
        )
    with pytest.raises(RuntimeError, match="other than the blank"):
        fl.ctc_loss(logits.log_softmax(-1), t, il, tl, blank=2)
    with pytest.raises(RuntimeError, match="input_lengths <="):
        fl.ctc_loss(logits.log_softmax(-1), t, torch.tensor([13, 9, 5]), tl)


@pytest.mark.parametrize("bad", [6, 7, -1])
def test_ctc_refuses_target_classes_out_of_range(bad: int) -> None:
    """A target class outside [0, C) within target_lengths is an IndexError (torch's CPU kernel
    reads outside log_probs there); padding past target_lengths is never read."""
    logits, t, il, tl = _ctc_inputs()  # 6 classes
    lp = logits.log_softmax(-1)
    out_of_range = t.clone()
    out_of_range[1, 1] = bad
    with pytest.raises(IndexError, match=f"in \\[0, 5\\] within target_lengths, got {bad}"):
        fl.ctc_loss(lp, out_of_range, il, tl)
    concatenated = torch.cat([out_of_range[i, : int(n)] for i, n in enumerate(tl)])
    with pytest.raises(IndexError, match=f"got {bad}"):
        fl.ctc_loss(lp, concatenated, il, tl)
    padding = t.clone()
    padding[2, 3] = bad  # past the last sequence's one label
    torch.testing.assert_close(fl.ctc_loss(lp, padding, il, tl), F.ctc_loss(lp, t, il, tl))


def test_ctc_eager_double_backward_is_refused_not_wrong() -> None:
    """The eager fast path's backward is first-order; torch.func.hessian takes the other path."""
    logits, t, il, tl = _ctc_inputs()
    lp = logits.log_softmax(-1).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fl.ctc_loss(lp, t, il, tl), lp, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), lp)


def _ctc_graph(steps: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The graph torch.compile traces for ctc_loss over ``steps`` steps (its call targets), and
    the compiled loss's value and gradient."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    g = _g(steps)
    lp = torch.randn(steps, 3, 6, generator=g).log_softmax(-1).requires_grad_(True)
    t = torch.randint(1, 6, (3, 4), generator=g)
    il, tl = torch.tensor([steps, steps - 1, steps - 2]), torch.tensor([4, 3, 2])
    torch._dynamo.reset()
    out = torch.compile(fl.ctc_loss, backend=record, fullgraph=True)(lp, t, il, tl)
    (grad,) = torch.autograd.grad(out, lp)
    ours, (expected,) = fl.ctc_loss(lp, t, il, tl), torch.autograd.grad(fl.ctc_loss(lp, t, il, tl), lp)
    torch.testing.assert_close(out, ours)
    torch.testing.assert_close(grad, expected)
    (gm,) = graphs
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"], out, grad


def test_compiled_ctc_is_one_operator_whatever_the_length() -> None:
    """Compiled, the recursion is one opaque operator: the traced graph does not grow with the
    number of steps (an unrolled time loop took minutes to compile at a few hundred steps),
    and value and gradient are the eager ones. torch.export keeps ATen operators only."""
    short, _, _ = _ctc_graph(8)
    long, _, _ = _ctc_graph(64)
    assert any("funcloss.ctc_alphas" in target for target in short)
    assert len(long) == len(short)
    # Through AOTAutograd, whose tracing runs both operators' fake (shape-only) forms.
    lp = torch.randn(8, 2, 5, generator=_g()).log_softmax(-1).requires_grad_(True)
    t, il, tl = torch.tensor([[1, 2], [3, 3]]), torch.tensor([8, 7]), torch.tensor([2, 2])
    torch._dynamo.reset()
    (grad,) = torch.autograd.grad(torch.compile(fl.ctc_loss, backend="aot_eager", fullgraph=True)(lp, t, il, tl), lp)
    torch.testing.assert_close(grad, torch.autograd.grad(fl.ctc_loss(lp, t, il, tl), lp)[0])

    class Loss(torch.nn.Module):
        def forward(self, lp: torch.Tensor, t: torch.Tensor, il: torch.Tensor, tl: torch.Tensor) -> torch.Tensor:
            return fl.ctc_loss(lp, t, il, tl)

    lp = lp.detach()
    program = torch.export.export(Loss(), (lp, t, il, tl))
    assert not any("funcloss" in str(n.target) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(lp, t, il, tl), F.ctc_loss(lp, t, il, tl))


# ---------------------------------------------------------------- linear CE and adaptive softmax


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_linear_cross_entropy_chunks_agree_and_differentiate_the_bias(chunk: int) -> None:
    x = torch.randn(7, 4, generator=_g(), dtype=D, requires_grad=True)
    w = torch.randn(9, 4, generator=_g(1), dtype=D, requires_grad=True)
    b = torch.randn(9, generator=_g(2), dtype=D, requires_grad=True)
    y = torch.tensor([0, 8, 3, -100, 4, 4, 1])
    cw = torch.rand(9, generator=_g(3), dtype=D)
    ours = fl.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, label_smoothing=0.1, chunk_size=chunk)
    theirs = F.cross_entropy(F.linear(x, w, b), y, cw, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    for g, h in zip(torch.autograd.grad(ours, (x, w, b)), torch.autograd.grad(theirs, (x, w, b))):
        torch.testing.assert_close(g, h)


# Keyword arguments of torch.nn.LinearCrossEntropyOptions (torch >= 2.13).
LCE_OPTIONS: list[dict[str, Any]] = [
    {},
    {"batch_chunk_size": 3},
    {"batch_chunk_size": 100},
    {"chunking_method": "aspect_ratio"},
    {"chunking_method": "aspect_ratio:4"},
    {"chunking_method": None},
]
needs_lce_options = pytest.mark.skipif(
    not hasattr(torch.nn, "LinearCrossEntropyOptions"), reason="torch < 2.13 has no LinearCrossEntropyOptions"
)


def _record_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows per chunk each chunked linear cross-entropy call resolves."""
    from funcloss.losses import _classification

    seen: list[int] = []
    resolve = _classification._rows_per_chunk

    def spy(*args: Any) -> int:
        seen.append(resolve(*args))
        return seen[-1]

    monkeypatch.setattr(_classification, "_rows_per_chunk", spy)
    return seen


@needs_lce_options
@pytest.mark.parametrize("option_kwargs", LCE_OPTIONS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_takes_torch_options(
    option_kwargs: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``options`` is accepted as torch's function accepts it, and picks the same rows per
    chunk as torch's own resolution of it (its ``_adjust``, used here only as the oracle)."""
    options = torch.nn.LinearCrossEntropyOptions(**option_kwargs)
    seen = _record_chunks(monkeypatch)
    x = torch.randn(37, 6, generator=_g(), dtype=D).to(dtype).requires_grad_()
    w = torch.randn(50, 6, generator=_g(1), dtype=D).to(dtype).requires_grad_()
    y = torch.randint(0, 50, (37,), generator=_g(2))
    ours = fl.linear_cross_entropy(x, w, y, options=options)
    theirs = F.linear_cross_entropy(x, w, y, options=options)
    expected = options._adjust(  # type: ignore[no-untyped-call]
        num_batches=37, in_features=6, num_classes=50, dtype=dtype, device=x.device
    )
    assert seen == [expected.batch_chunk_size]
    tol = 2e-2 if dtype == torch.bfloat16 else None
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for g, h in zip(torch.autograd.grad(ours, (x, w)), torch.autograd.grad(theirs, (x, w))):
        torch.testing.assert_close(g, h, rtol=tol, atol=tol)


@needs_lce_options
def test_linear_cross_entropy_options_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, y = torch.randn(8, 4), torch.randn(20, 4), torch.randint(0, 20, (8,))
    with pytest.raises(ValueError, match="chunk_size or options, got both"):
        fl.linear_cross_entropy(x, w, y, chunk_size=2, options=torch.nn.LinearCrossEntropyOptions())
    clash = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3, chunking_method="aspect_ratio")
    with pytest.raises(ValueError, match="different chunk sizes"):
        F.linear_cross_entropy(x, w, y, options=clash)
    with pytest.raises(ValueError, match="different chunk sizes"):
        fl.linear_cross_entropy(x, w, y, options=clash)
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        fl.linear_cross_entropy(x, w, y, chunk_size=0)
    seen = _record_chunks(monkeypatch)
    criterion = fnn.LinearCrossEntropyLoss(4, 20, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3))
    criterion(x, y)
    assert seen == [3]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_cross_entropy_gradients_formed_in_the_forward(reduction: str, smoothing: float, weighted: bool) -> None:
    """The reduced loss forms its gradients while the forward has each chunk's logits: they
    are scaled by the incoming gradient, survive a second backward (retain_graph), follow only
    the inputs that require grad, and are skipped under no_grad."""
    x = torch.randn(11, 4, generator=_g(), dtype=D, requires_grad=True)
    w = torch.randn(7, 4, generator=_g(1), dtype=D, requires_grad=True)
    b = torch.randn(7, generator=_g(2), dtype=D, requires_grad=True)
    y = torch.tensor([0, 6, 3, -100, 4, 4, 1, 2, -100, 5, 0])
    cw = torch.rand(7, generator=_g(3), dtype=D) if weighted else None
    kwargs: dict[str, Any] = {"weight": cw, "reduction": reduction, "label_smoothing": smoothing}
    ours = fl.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=3, **kwargs)
    theirs = F.cross_entropy(F.linear(x, w, b), y, **kwargs)
    torch.testing.assert_close(ours, theirs)
    expected = torch.autograd.grad(3.0 * theirs, (x, w, b))
    for _ in range(2):  # the second backward recomputes
        got = torch.autograd.grad(3.0 * ours, (x, w, b), retain_graph=True)
        for g, h in zip(got, expected):
            torch.testing.assert_close(g, h)
    (gw,) = torch.autograd.grad(fl.linear_cross_entropy(x.detach(), w, y, chunk_size=3, **kwargs), w)
    (hw,) = torch.autograd.grad(F.cross_entropy(F.linear(x.detach(), w), y, **kwargs), w)
    torch.testing.assert_close(gw, hw)
    with torch.no_grad():
        torch.testing.assert_close(fl.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=3, **kwargs), theirs)


def test_linear_cross_entropy_every_target_ignored() -> None:
    """Mean over no kept target: NaN, with a zero gradient (as torch), in eager mode and
    chunked under torch.func.grad."""
    x = torch.randn(4, 3, generator=_g(), dtype=D, requires_grad=True)
    w = torch.randn(5, 3, generator=_g(1), dtype=D, requires_grad=True)
    y = torch.full((4,), -100)
    ours = fl.linear_cross_entropy(x, w, y, chunk_size=2)
    assert torch.isnan(ours)
    for g in torch.autograd.grad(ours, (x, w)):
        assert torch.equal(g, torch.zeros_like(g))
    (theirs,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w), y), (w,))
    assert torch.equal(theirs, torch.zeros_like(theirs))
    options: list[dict[str, Any]] = [{}, {"label_smoothing": 0.2}, {"weight": torch.rand(5, generator=_g(2), dtype=D)}]
    for kw in options:
        loss = functools.partial(fl.linear_cross_entropy, x.detach(), target=y, chunk_size=2, **kw)
        g = tf.grad(loss)(w.detach())
        assert torch.equal(g, torch.zeros_like(g)), kw


def test_linear_cross_entropy_double_backward_in_eager() -> None:
    """The chunked backward recomputes from the inputs, so it is itself differentiable."""
    x = torch.randn(5, 3, generator=_g(), dtype=D, requires_grad=True)
    w = torch.randn(4, 3, generator=_g(1), dtype=D, requires_grad=True)
    y = torch.tensor([0, 3, 1, 2, 2])
    (g,) = torch.autograd.grad(fl.linear_cross_entropy(x, w, y, chunk_size=2), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), w)
    (g2,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w), y), x, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.pow(2).sum(), w)
    torch.testing.assert_close(gg, gg2)


def test_adaptive_output_and_log_prob_match_the_module() -> None:
    torch.manual_seed(0)
    m = torch.nn.AdaptiveLogSoftmaxWithLoss(8, 12, [3, 7], div_value=2.0, head_bias=True).double()
    x = torch.randn(9, 8, generator=_g(), dtype=D)
    y = torch.tensor([0, 2, 3, 6, 7, 11, 5, 1, 9])
    tails = [(t[0].weight, t[1].weight) for t in m.tail]  # type: ignore[index]
    ours = fl.adaptive_log_softmax_with_loss(x, y, m.head.weight, tails, [3, 7], head_bias=m.head.bias)
    theirs = m(x, y)
    torch.testing.assert_close(ours.output, theirs.output)
    torch.testing.assert_close(ours.loss, theirs.loss)
    torch.testing.assert_close(
        fl.adaptive_log_prob(x, m.head.weight, tails, [3, 7], head_bias=m.head.bias), m.log_prob(x)
    )
    with pytest.raises(RuntimeError, match=r"should be in \[0, 11\]"):
        fl.adaptive_log_softmax_with_loss(x, y + 5, m.head.weight, tails, [3, 7], head_bias=m.head.bias)
    with pytest.raises(ValueError, match="cutoffs"):
        fl.adaptive_log_softmax_with_loss(x, y, m.head.weight, tails, [7, 3])


def test_linear_cross_entropy_k_dimensional_weight() -> None:
    """A (C, *out_features, H) weight gives logits (N, C, *out_features), as in torch."""
    x = torch.randn(5, 4, generator=_g(), dtype=D, requires_grad=True)
    w = torch.randn(3, 2, 4, generator=_g(1), dtype=D, requires_grad=True)
    b = torch.randn(3, 2, generator=_g(2), dtype=D)
    y = torch.randint(0, 3, (5, 2), generator=_g(3))
    for kwargs in (
        {},
        {"reduction": "none"},
        {"label_smoothing": 0.1, "weight": torch.rand(3, generator=_g(4), dtype=D)},
    ):
        ours = fl.linear_cross_entropy(x, w, y, linear_bias=b, **kwargs)
        theirs = F.linear_cross_entropy(x, w, y, linear_bias=b, **kwargs)
        torch.testing.assert_close(ours, theirs)
        for g, h in zip(torch.autograd.grad(ours.sum(), (x, w)), torch.autograd.grad(theirs.sum(), (x, w))):
            torch.testing.assert_close(g, h)
    with pytest.raises(RuntimeError, match="needs batched"):
        fl.linear_cross_entropy(x[0], w, y[0])
    with pytest.raises(RuntimeError, match="linear_bias shape"):
        fl.linear_cross_entropy(x, w, y, linear_bias=torch.zeros(3, dtype=D))


def test_ctc_under_vmap_runs_the_batched_recursion_once() -> None:
    """Under vmap alone, CTC folds vmap's batch into its own (one eager call for every
    example): values, nested vmap and autograd through the vmapped call must all match
    torch."""
    logits, t, il, tl = _ctc_inputs()
    lp = logits.log_softmax(-1)

    def one(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return fl.ctc_loss(a, b, c, d, reduction="none")

    per_example = tf.vmap(one, in_dims=(1, 0, 0, 0))
    expected = F.ctc_loss(lp, t, il, tl, reduction="none")
    torch.testing.assert_close(per_example(lp, t, il, tl), expected)
    nested = tf.vmap(per_example, in_dims=(0, None, None, None))(torch.stack([lp, lp * 1.0]), t, il, tl)
    torch.testing.assert_close(nested[1], expected)
    x = logits.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(per_example(x.log_softmax(-1), t, il, tl).sum(), x)
    xt = logits.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.ctc_loss(xt.log_softmax(-1), t, il, tl, reduction="sum"), xt)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("targets", ["padded", "concatenated"])
def test_ctc_under_vmap_over_batches_of_sequences(reduction: str, targets: str) -> None:
    """vmap over examples that are themselves batches ``(T, N, C)``: values and gradients
    through the vmapped call as torch's loss per example."""
    gen = _g()
    logits = torch.randn(3, 10, 4, 6, generator=gen, dtype=D)  # 3 examples of 4 sequences
    il = torch.tensor([[10, 7, 9, 4], [10, 10, 3, 8], [6, 10, 10, 5]])
    tl = torch.tensor([[3, 2, 0, 1], [4, 1, 2, 3], [2, 3, 1, 2]])
    labels = torch.randint(1, 6, (3, 4, 4), generator=gen)
    if targets == "padded":
        t = labels
    else:  # each example's targets concatenated; vmap needs one length, so all sum to 6 here
        tl = torch.tensor([[3, 2, 0, 1], [1, 1, 2, 2], [2, 2, 1, 1]])
        t = torch.stack([torch.cat([labels[e, n, : int(tl[e, n])] for n in range(4)]) for e in range(3)])
    x = logits.clone().requires_grad_(True)

    def one(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return fl.ctc_loss(a.log_softmax(-1), b, c, d, reduction=reduction)  # type: ignore[arg-type]

    ours = tf.vmap(one)(x, t, il, tl)
    (our_grad,) = torch.autograd.grad(ours.sum(), x)
    xt = logits.clone().requires_grad_(True)
    theirs = torch.stack([F.ctc_loss(xt[e].log_softmax(-1), t[e], il[e], tl[e], reduction=reduction) for e in range(3)])
    (their_grad,) = torch.autograd.grad(theirs.sum(), xt)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def test_ctc_inside_vmap_with_no_batched_input() -> None:
    """CTC called inside a vmap on inputs the vmap does not batch: the plain loss, and its
    gradient through autograd."""
    logits, t, il, tl = _ctc_inputs()
    x = logits.clone().requires_grad_(True)
    scales = torch.tensor([0.5, 2.0, 3.0], dtype=D)
    out = tf.vmap(lambda s: fl.ctc_loss(x.log_softmax(-1), t, il, tl) * s)(scales)
    (ours,) = torch.autograd.grad(out.sum(), x)
    xt = logits.clone().requires_grad_(True)
    expected = F.ctc_loss(xt.log_softmax(-1), t, il, tl)
    (theirs,) = torch.autograd.grad(expected * scales.sum(), xt)
    torch.testing.assert_close(out, expected.detach() * scales)
    torch.testing.assert_close(ours, theirs)


def _linear_ce_problem(weighted: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(7, 6, dtype=torch.float64, generator=gen)
    b = torch.randn(7, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 7, (10,), generator=gen)
    y[3] = -100  # one ignored row
    cw = torch.rand(7, dtype=torch.float64, generator=gen) + 0.5 if weighted else torch.ones(0)
    return x, w, b, y, cw


TRANSFORMED_LCE_OPTIONS: list[dict[str, Any]] = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"weighted": True, "label_smoothing": 0.3},
    {"weighted": True},
]


@pytest.mark.parametrize("transform", ["grad", "vmap", "vmap_grad", "jacrev", "jacrev_jacrev", "hessian", "jvp"])
@pytest.mark.parametrize("options", TRANSFORMED_LCE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_linear_cross_entropy_chunked_under_transforms(transform: str, options: dict[str, Any]) -> None:
    """Under torch.func, linear_cross_entropy with more rows than a chunk runs chunk by chunk
    (grad, vjp/jacrev and vmap; forward mode takes the composition): values, gradients and
    second derivatives equal torch's cross_entropy(linear(...)) under the same transform."""
    options = dict(options)
    x, w, b, y, cw = _linear_ce_problem(options.pop("weighted", False))
    kw = {**options, **({"weight": cw} if cw.numel() else {})}

    def ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fl.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=3, **kw)

    def theirs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(x, w, b), y, **kw)

    def total(f: Any) -> Any:
        return lambda *a: f(*a).sum()

    def run(f: Any) -> Any:
        if transform == "grad":
            return tf.grad(total(f), argnums=(0, 1, 2))(x, w, b, y)
        if transform == "vmap":  # two examples of five rows each
            return tf.vmap(f, in_dims=(0, None, None, 0))(x.reshape(2, 5, 6), w, b, y.reshape(2, 5))
        if transform == "vmap_grad":
            per_example = tf.vmap(tf.grad(total(f), argnums=(1, 2)), in_dims=(0, None, None, 0))
            return per_example(x.reshape(2, 5, 6), w, b, y.reshape(2, 5))
        if transform == "jacrev":
            return tf.jacrev(f, argnums=(0, 1))(x, w, b, y)
        if transform == "jacrev_jacrev":
            return tf.jacrev(tf.jacrev(total(f), argnums=1), argnums=1)(x, w, b, y)
        if transform == "hessian":
            return tf.hessian(total(f), argnums=0)(x, w, b, y)
        tangent = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).reshape(x.shape)
        return tf.jvp(lambda x: f(x, w, b, y), (x,), (tangent,))

    if transform.startswith("vmap"):
        # torch's own loss cannot be vmapped with a class weight, smoothing and an ignored
        # target (a masked_select): loop over the examples instead.
        rows = [slice(0, 5), slice(5, 10)]
        if transform == "vmap":
            expected: Any = torch.stack([theirs(x[r], w, b, y[r]) for r in rows])
        else:
            grads = [tf.grad(total(theirs), argnums=(1, 2))(x[r], w, b, y[r]) for r in rows]
            expected = tuple(torch.stack(g) for g in zip(*grads))
        torch.testing.assert_close(run(ours), expected, rtol=1e-9, atol=1e-12)
    else:
        torch.testing.assert_close(run(ours), run(theirs), rtol=1e-9, atol=1e-12)


def _peak_live_bytes(fn: Any) -> int:
    """The most bytes of tensor storage alive at once while ``fn`` runs (every storage an
    operator returns counts until it is freed)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.live, self.peak, self.seen = 0, 0, set[int]()

        def _freed(self, key: int, n: int) -> None:
            self.live -= n
            self.seen.discard(key)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key, n = storage.data_ptr(), storage.nbytes()
                    if n and key not in self.seen:
                        self.seen.add(key)
                        self.live += n
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(storage, self._freed, key, n)
            return out

    with Live() as mode:
        fn()
    peak: int = mode.peak
    return peak


@pytest.mark.parametrize("transform", ["grad", "vmap_grad"])
def test_linear_cross_entropy_keeps_no_full_logits_under_grad(transform: str) -> None:
    """torch.func.grad of a chunked linear_cross_entropy holds about a chunk of logits at a
    time, not the (N, C) logits, their softmax and its gradient (torch.func forms gradients
    with create_graph; a backward that recorded itself would keep every chunk's softmax)."""
    gen = torch.Generator().manual_seed(0)
    n, hidden, classes = 1024, 16, 4000
    x = torch.randn(n, hidden, generator=gen)
    w = torch.randn(classes, hidden, generator=gen) * 0.1
    y = torch.randint(0, classes, (n,), generator=gen)

    def peak(chunk: int) -> int:
        def loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fl.linear_cross_entropy(x, w, y, chunk_size=chunk)

        if transform == "grad":
            return _peak_live_bytes(lambda: tf.grad(loss)(w, x, y))
        per_example = tf.vmap(tf.grad(loss), in_dims=(None, 0, 0))
        return _peak_live_bytes(lambda: per_example(w, x.reshape(2, n // 2, hidden), y.reshape(2, n // 2)))

    logits = n * classes * 4
    chunked, whole = peak(n // 64), peak(n)  # chunk_size >= N: the plain composition
    assert whole >= 2 * logits, "the reference should hold the full logits more than once"
    assert chunked <= 0.35 * logits, f"chunked peak {chunked} bytes against {logits} bytes of logits"


@pytest.mark.parametrize("options", [{"reduction": "mean"}, {"reduction": "none", "label_smoothing": 0.2}])
def test_compiled_linear_cross_entropy_holds_no_full_logits(options: dict[str, Any]) -> None:
    """Under torch.compile the chunked loss is one operator: no value in the traced graph has
    the (N, C) shape of the logits (the composition's has), and the compiled value and
    gradients are the eager ones."""
    n, hidden, classes = 96, 8, 50
    x = torch.randn(n, hidden, generator=_g(), requires_grad=True)
    w = torch.randn(classes, hidden, generator=_g(1), requires_grad=True)
    b = torch.randn(classes, generator=_g(2), requires_grad=True)
    y = torch.randint(0, classes, (n,), generator=_g(3))
    y[:3] = -100

    def shapes(chunk: int) -> set[tuple[int, ...]]:
        graphs: list[torch.fx.GraphModule] = []

        def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
            graphs.append(gm)
            return gm.forward

        def loss(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return fl.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=chunk, **options)

        torch._dynamo.reset()
        out = torch.compile(loss, backend=record, fullgraph=True)(x, w, b)
        expected = loss(x, w, b)
        torch.testing.assert_close(out, expected)
        for g, h in zip(torch.autograd.grad(out.sum(), (x, w, b)), torch.autograd.grad(expected.sum(), (x, w, b))):
            torch.testing.assert_close(g, h)
        (gm,) = graphs
        values = [node.meta.get("example_value") for node in gm.graph.nodes]
        flat = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
        return {tuple(v.shape) for v in flat if isinstance(v, torch.Tensor)}

    assert (n, classes) in shapes(n), "the composition should form the logits"
    assert (n, classes) not in shapes(16)


def test_class_weights_summing_to_zero_give_nan_with_a_zero_gradient() -> None:
    """The documented difference: with class weights that are 0 on every kept target the mean
    is 0 / 0 = NaN in both; torch's gradient is NaN on the kept rows, funcloss's is 0 (as both
    give when every target is ignored), on every path."""
    x = torch.randn(6, 3, generator=_g(), dtype=D)
    w = torch.randn(4, 3, generator=_g(1), dtype=D)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    zero = torch.zeros(4, dtype=D)
    wr = w.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.cross_entropy(F.linear(x, wr), y, weight=zero), (wr,))
    assert torch.isnan(theirs).all()
    paths: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "cross_entropy": lambda w: fl.cross_entropy(F.linear(x, w), y, weight=zero),
        "linear, composition": lambda w: fl.linear_cross_entropy(x, w, y, weight=zero),
        "linear, chunked under grad": lambda w: fl.linear_cross_entropy(x, w, y, weight=zero, chunk_size=2),
    }
    for name, loss in paths.items():
        assert torch.isnan(loss(w)), name
        g = tf.grad(loss)(w)
        assert torch.equal(g, torch.zeros_like(g)), name
    (eager,) = torch.autograd.grad(fl.linear_cross_entropy(x, wr, y, weight=zero, chunk_size=2), (wr,))
    assert torch.equal(eager, torch.zeros_like(eager))


_COMPILED_CE_PEAK = """
import sys, warnings
import torch, torch.nn.functional as F
import funcloss as fl
from funcloss._bench.rss import peak_extra_bytes
warnings.simplefilter("ignore")
gen = torch.Generator().manual_seed(0)
z = torch.randn(2048, 8000, generator=gen).requires_grad_()
y = torch.randint(0, 8000, (2048,), generator=gen)
y[:5] = -100
fn = fl.cross_entropy if sys.argv[1] == "funcloss" else F.cross_entropy
compiled = torch.compile(lambda z: fn(z, y, label_smoothing=0.1), fullgraph=True)
(g,) = torch.autograd.grad(compiled(z), (z,))
(eager,) = torch.autograd.grad(F.cross_entropy(z, y, label_smoothing=0.1), (z,))
torch.testing.assert_close(g, eager)
del g, eager
print(max(peak_extra_bytes(lambda: torch.autograd.grad(compiled(z), (z,))) for _ in range(3)))
"""


def test_compiled_cross_entropy_holds_as_much_as_torchs() -> None:
    """Compiled, funcloss's cross_entropy (its gradient equal to torch's) peaks at the memory of
    torch's compiled one: one (N, C) buffer for the log-softmax and its gradient. A gather picking
    the target's log-probability would need a second (its backward scatters into a new one)."""
    logits = 2048 * 8000 * 4
    peaks = {}
    for library in ("funcloss", "torch"):
        out = subprocess.run(
            [sys.executable, "-c", _COMPILED_CE_PEAK, library], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[library] = int(out.stdout.split()[-1])
    assert peaks["torch"] < 1.5 * logits, peaks
    assert peaks["funcloss"] <= 1.2 * peaks["torch"] + 0.05 * logits, peaks


@pytest.mark.parametrize("library", ["funcloss", "torch.nn.functional"])
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_compiled_class_loss_refuses_a_target_out_of_range(name: str, library: str) -> None:
    """Compiled, a target out of range fails with RuntimeError (a check inside the compiled
    code) in funcloss as in torch, rather than picking nothing."""
    fn: Callable[..., torch.Tensor] = getattr(fl if library == "funcloss" else F, name)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(4, 5, generator=_g()).log_softmax(1)
    with pytest.raises(RuntimeError, match="out of bounds"):
        compiled(x, torch.tensor([0, 1, 7, 2]))
    torch.testing.assert_close(compiled(x, torch.tensor([0, 1, 4, -100])), fn(x, torch.tensor([0, 1, 4, -100])))
