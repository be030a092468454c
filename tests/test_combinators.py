"""Combinators against their definitions, under transforms, and as records."""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import funcloss as fl

l1_none = functools.partial(fl.l1_loss, reduction="none")
huber_none = functools.partial(fl.huber_loss, reduction="none")


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)


def test_reduce(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    v = xy[0]
    assert fl.reduce(v, "none") is v
    torch.testing.assert_close(fl.reduce(v, "sum"), v.sum())
    torch.testing.assert_close(fl.reduce(v, "mean"), v.sum() / v.numel())
    torch.testing.assert_close(fl.batchmean(v), v.sum() / 5)
    torch.testing.assert_close(fl.normalized_sum(v, 7.0), v.sum() / 7.0)
    with pytest.raises(ValueError, match="expected reduction"):
        fl.reduce(v, "avg")  # type: ignore[arg-type]


def test_weighted_by_element_matches_torch_l1_weight(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    w = torch.rand(5, 3, dtype=torch.float64) + 0.1
    ours = fl.weighted(l1_none, w, reduction="mean")(x, y)
    torch.testing.assert_close(ours, F.l1_loss(x, y, weight=w))  # type: ignore[call-arg]


def test_weighted_by_sample(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    ours = fl.weighted(huber_none, w, by="sample", reduction="sum")(x, y)
    expected = sum(w[i] * F.huber_loss(x[i], y[i], reduction="sum") for i in range(5))
    torch.testing.assert_close(ours, expected)
    mean = fl.weighted(huber_none, w, by="sample", reduction="mean")(x, y)
    torch.testing.assert_close(mean, expected / (3 * w.sum()))


def test_weighted_by_class_is_torch_class_weighted_mean() -> None:
    logits = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 3, 2, 0])
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)

    def nll_none(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x.log_softmax(-1).gather(-1, t[:, None])[:, 0]

    ours = fl.weighted(nll_none, w, by="class", reduction="mean")(logits, target)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, weight=w))

    # Per example under vmap(grad): one example's target is 0-dim, and gathering the class
    # weight with it must not read its value.
    def one(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return fl.weighted(functools.partial(fl.cross_entropy, reduction="none"), w, by="class", reduction="sum")(x, t)

    grads = tf.vmap(tf.grad(one))(logits, target)
    loop = torch.stack([tf.grad(F.cross_entropy)(logits[i], target[i]) * w[target[i]] for i in range(6)])
    torch.testing.assert_close(grads, loop)


def test_weighted_rejects_bad_weight_shapes(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    with pytest.raises(ValueError, match="1-D per-sample weight of length 5"):
        fl.weighted(l1_none, torch.ones(4), by="sample")(x, y)
    with pytest.raises(ValueError, match="per-class weight"):
        fl.weighted(l1_none, torch.ones(2, 2), by="class")(x, y)
    with pytest.raises(ValueError, match="by to be"):
        fl.weighted(l1_none, torch.ones(2), by="row")  # type: ignore[arg-type]


@pytest.mark.parametrize("by", ["element", "sample", "class"])
def test_weights_and_masks_never_spread_a_reduced_loss(xy: tuple[torch.Tensor, torch.Tensor], by: str) -> None:
    """A loss that reduces its values itself returns a scalar: a weight or mask of the batch's
    shape would broadcast it into a tensor of copies and sum that (the mean times sum(w)).
    That is refused, with the fix in the message; so is a weight that grows the values."""
    x, y = xy
    weight = {"element": torch.rand(5, 3), "sample": torch.rand(5), "class": torch.rand(3)}[by]
    target = y.argmax(1) if by == "class" else y
    reduced = fl.cross_entropy if by == "class" else fl.l1_loss
    with pytest.raises(ValueError, match=r"shape \(\).*returned a scalar.*reduction='none'"):
        fl.weighted(reduced, weight, by=by, reduction="sum")(x, target)  # type: ignore[arg-type]
    if by == "element":
        with pytest.raises(
            ValueError, match=r"broadcastable to the loss values' shape \(5, 3\), got shape \(2, 5, 3\)"
        ):
            fl.weighted(l1_none, torch.rand(2, 5, 3))(x, y)
        for fits in (torch.rand(3), torch.rand(5, 1), torch.tensor(2.0)):  # broadcasting within the shape stays
            torch.testing.assert_close(fl.weighted(l1_none, fits, reduction="sum")(x, y), (l1_none(x, y) * fits).sum())


def test_masks_must_fit_the_values(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    with pytest.raises(ValueError, match=r"mask broadcastable to the loss values' shape \(5, 3\), got shape \(4, 3\)"):
        fl.masked(l1_none, torch.ones(4, 3, dtype=torch.bool))(x, y)
    with pytest.raises(ValueError, match=r"returned a scalar"):
        fl.masked(fl.l1_loss, torch.ones(5, 3, dtype=torch.bool), reduction="mean")(x, y)


def test_masked_keeps_nan_out_of_value_and_gradient(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    y = y.clone()
    y[1, 2] = float("nan")
    mask = ~torch.isnan(y)
    loss = fl.masked(functools.partial(fl.mse_loss, reduction="none"), mask, reduction="mean")
    value, grad = torch.func.grad_and_value(loss)(x, y)[::-1]
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    d = (x - y)[mask]
    torch.testing.assert_close(value, (d * d).mean())
    assert grad[1, 2] == 0


def test_masked_requires_a_boolean_mask(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(TypeError, match="boolean mask"):
        fl.masked(l1_none, torch.ones(5, 3))


def test_scaled(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    torch.testing.assert_close(
        fl.scaled(fl.mse_loss, 0.25)(x, y, reduction="sum"), 0.25 * F.mse_loss(x, y, reduction="sum")
    )
    with pytest.raises(TypeError, match="factor"):
        fl.scaled(fl.mse_loss, "2")  # type: ignore[arg-type]


def test_loss_sum_terms_stay_inspectable(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    total = fl.loss_sum({"huber": fl.huber_loss, "l1": fl.l1_loss}, weights={"l1": 0.1})
    values = total.values(x, y)
    assert set(values) == {"huber", "l1"}
    torch.testing.assert_close(values["l1"], F.l1_loss(x, y))
    torch.testing.assert_close(total.weighted_values(x, y)["l1"], 0.1 * F.l1_loss(x, y))
    torch.testing.assert_close(total(x, y), F.huber_loss(x, y) + 0.1 * F.l1_loss(x, y))


def test_loss_sum_rejects_bad_terms() -> None:
    with pytest.raises(ValueError, match="at least one term"):
        fl.loss_sum({})
    with pytest.raises(ValueError, match="weights only for the terms"):
        fl.loss_sum({"a": fl.l1_loss}, weights={"b": 1.0})


def test_loss_sum_terms_must_share_a_shape(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A reduced term (a scalar) beside an unreduced one would be added to every element."""
    x, y = xy
    terms: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": l1_none, "mse": fl.mse_loss}
    mixed = fl.loss_sum(terms)
    with pytest.raises(ValueError, match=r"one shape, got l1: \(5, 3\), mse: \(\)"):
        mixed(x, y)
    assert mixed.values(x, y)["mse"].shape == ()  # the terms themselves stay inspectable


def test_masked_sample_weighted_mix_of_huber_and_l1_under_vmap_grad() -> None:
    """The composition from the README: a masked, per-sample-weighted mix of huber and l1."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 4, generator=g) > 0.3
    sample_w = torch.rand(6, generator=g, dtype=torch.float64)
    mix = fl.loss_sum({"huber": huber_none, "l1": l1_none}, weights={"l1": 0.5})
    loss = fl.weighted(fl.masked(mix, mask), sample_w, by="sample", reduction="sum")
    ours = tf.grad(loss)(x, y)
    xt = x.clone().requires_grad_(True)
    manual = (
        (F.huber_loss(xt, y, reduction="none") + 0.5 * F.l1_loss(xt, y, reduction="none")) * mask * sample_w[:, None]
    ).sum()
    (expected,) = torch.autograd.grad(manual, xt)
    torch.testing.assert_close(ours, expected)

    # Per-sample: the same mix under vmap(grad), one row at a time.
    def per_row(xi: torch.Tensor, yi: torch.Tensor, mi: torch.Tensor) -> torch.Tensor:
        return fl.masked(mix, mi, reduction="sum")(xi, yi)

    rows = tf.vmap(tf.grad(per_row))(x, y, mask)
    for i in range(6):
        xi = x[i].clone().requires_grad_(True)
        m = ((F.huber_loss(xi, y[i], reduction="none") + 0.5 * F.l1_loss(xi, y[i], reduction="none")) * mask[i]).sum()
        torch.testing.assert_close(rows[i], torch.autograd.grad(m, xi)[0])


@pytest.mark.parametrize("dynamic", [False, True])
def test_combinators_compile_into_one_graph(dynamic: bool) -> None:
    """The README's composition under torch.compile(fullgraph=True): the combinators' shape
    checks are plain Python over shapes (symbols under dynamic=True), never a graph break."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    mask, sample_w = torch.rand(6, 4, generator=g) > 0.3, torch.rand(6, generator=g)
    mix = fl.loss_sum({"huber": huber_none, "l1": l1_none}, weights={"l1": 0.5})
    loss = fl.weighted(fl.masked(mix, mask), sample_w, by="sample", reduction="mean")
    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, eager = compiled(xc, y), loss(xe, y)
    torch.testing.assert_close(ours, eager)
    torch.testing.assert_close(torch.autograd.grad(ours, xc), torch.autograd.grad(eager, xe))


def test_combinators_pickle_and_print() -> None:
    loss = fl.reduced(fl.scaled(l1_none, 2.0), "sum")
    again = pickle.loads(pickle.dumps(loss))
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(again(x, y), loss(x, y))
    assert "Scaled" in repr(loss) and "factor=2.0" in repr(loss)


def test_reduced_with_normalizer(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    torch.testing.assert_close(fl.reduced(l1_none, normalizer=5)(x, y), (x - y).abs().sum() / 5)
