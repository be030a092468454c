"""`loss_baseline`: the best constant prediction's loss, checked against statistics computed
independently (numpy) and against a numerical minimisation over constants."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import funcloss as fl
from funcloss._bench.cases import Sampler


def _targets(kind: str, s: Sampler) -> Tensor:
    if kind == "real":
        return s.normal((37, 3)) * 2 + 1  # n q is not an integer: one quantile minimises
    if kind == "classes":
        return torch.where(s.uniform((40,)) < 0.6, 0, s.integers((40,), 0, 4))
    if kind == "classes 2-D":
        return s.integers((20, 5), 0, 3)
    if kind == "probabilities":
        return s.uniform((30, 4)).softmax(1)
    if kind == "binary":
        return (s.uniform((40, 3)) < 0.3).to(torch.float64)
    if kind == "signs":
        return torch.where(s.uniform((40, 3)) < 0.7, 1.0, -1.0).to(torch.float64)
    if kind == "counts":
        return torch.poisson(s.uniform((40, 2), 0.5, 4.0), generator=s.gen)
    raise ValueError(kind)


# (loss, target kind, options, smooth: whether a quasi-Newton minimiser finds the optimum)
CASES: list[tuple[Callable[..., Tensor], str, dict[str, Any], bool]] = [
    (fl.mse_loss, "real", {}, True),
    (F.mse_loss, "real", {"reduction": "sum"}, True),
    (fl.mse_loss, "real", {"weight": torch.linspace(0.2, 2.0, 111, dtype=torch.float64).reshape(37, 3)}, True),
    (fl.l1_loss, "real", {}, False),
    (fl.quantile_loss, "real", {"quantile": 0.8}, False),
    (fl.quantile_loss, "real", {"quantile": torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)}, False),
    (fl.cross_entropy, "classes", {}, True),
    (F.cross_entropy, "classes", {"weight": torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)}, True),
    (fl.cross_entropy, "classes", {"label_smoothing": 0.2}, True),
    (
        fl.cross_entropy,
        "classes",
        {"label_smoothing": 0.1, "weight": torch.tensor([1.0, 2.0, 0.5, 3.0]).double()},
        True,
    ),
    (fl.cross_entropy, "classes", {"ignore_index": 0}, True),
    (fl.cross_entropy, "classes 2-D", {}, True),
    (fl.cross_entropy, "probabilities", {"label_smoothing": 0.1}, True),
    (fl.cross_entropy, "probabilities", {"weight": torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)}, True),
    (fl.nll_loss, "classes", {"weight": torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)}, True),
    (fl.binary_cross_entropy, "binary", {}, True),
    (fl.binary_cross_entropy_with_logits, "binary", {"pos_weight": torch.tensor([2.0, 0.5, 1.0]).double()}, True),
    (F.poisson_nll_loss, "counts", {}, True),
    (fl.huber_loss, "real", {"delta": 0.5}, True),
    (F.huber_loss, "real", {"delta": 2.0, "reduction": "sum"}, True),
    (fl.huber_loss, "real", {"weight": torch.linspace(0.2, 2.0, 111, dtype=torch.float64).reshape(37, 3)}, True),
    (fl.smooth_l1_loss, "real", {"beta": 0.7}, True),
    (F.smooth_l1_loss, "real", {"beta": 0.0}, False),
    (fl.soft_margin_loss, "signs", {}, True),
    (fl.multilabel_soft_margin_loss, "binary", {}, True),
    (F.gaussian_nll_loss, "real", {"var": 0.5}, True),
    (fl.gaussian_nll_loss, "real", {"var": torch.linspace(0.1, 3.0, 37, dtype=torch.float64)}, True),
    (fl.poisson_nll_loss, "counts", {"log_input": False}, True),
]
IDS = [f"{getattr(f, '__module__', '').split('.')[0]}.{f.__name__}-{kind}-{sorted(o)}" for f, kind, o, _ in CASES]


def _loss_at(fn: Callable[..., Tensor], constant: Tensor, target: Tensor, kwargs: dict[str, Any]) -> Tensor:
    if fn in (fl.nll_loss, F.nll_loss):
        constant = constant.log_softmax(0)  # nll_loss takes log-probabilities: stay on the simplex
    return fn(constant.unsqueeze(0).expand(target.size(0), *constant.shape), target, **kwargs)


def _numerical_minimum(fn: Callable[..., Tensor], start: Tensor, target: Tensor, kwargs: dict[str, Any]) -> float:
    c = start.detach().clone().clamp(-30, 30).requires_grad_()
    if fn in (fl.binary_cross_entropy, F.binary_cross_entropy):
        c = c.detach().clamp(0.05, 0.95).requires_grad_()
    opt = torch.optim.LBFGS(
        [c], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        value = _loss_at(fn, c, target, kwargs)
        value.backward()  # type: ignore[no-untyped-call]
        return value

    opt.step(closure)  # type: ignore[no-untyped-call]
    return float(_loss_at(fn, c.detach(), target, kwargs))


@pytest.mark.parametrize(("fn", "kind", "kwargs", "smooth"), CASES, ids=IDS)
def test_no_constant_does_better(fn: Callable[..., Tensor], kind: str, kwargs: dict[str, Any], smooth: bool) -> None:
    target = _targets(kind, Sampler(0))
    base = fl.loss_baseline(fn, target, **kwargs)
    torch.testing.assert_close(base.value, _loss_at(fn, base.prediction, target, kwargs))
    # "Lower" means lower by more than the rounding of a loss value in its dtype (a float32 loss
    # evaluated at two nearby optima can differ in its last bit, depending on the CPU's kernels).
    rounding = 4 * torch.finfo(base.value.dtype).eps * abs(float(base.value))
    gen = torch.Generator().manual_seed(1)
    for scale in (1.0, 0.1, 0.01):
        for _ in range(20):
            nudged = base.prediction + scale * torch.randn(base.prediction.shape, generator=gen, dtype=torch.float64)
            if fn in (fl.binary_cross_entropy,):
                nudged = nudged.clamp(1e-6, 1 - 1e-6)
            if fn is fl.poisson_nll_loss and not kwargs.get("log_input", True):
                nudged = nudged.clamp_min(1e-3)
            assert float(_loss_at(fn, nudged, target, kwargs)) >= float(base.value) - 1e-12 - rounding
    if smooth:
        # From a poor start (zeros, or 1/2 for probabilities), a quasi-Newton minimiser reaches
        # the same value and no lower.
        start = torch.zeros_like(base.prediction) + (0.5 if fn is fl.binary_cross_entropy else 0.0)
        found = _numerical_minimum(fn, start, target, kwargs)
        assert found == pytest.approx(float(base.value), rel=1e-6, abs=1e-9)
        assert found >= float(base.value) - 1e-9 - rounding


def test_mse_skill_is_the_coefficient_of_determination() -> None:
    s = Sampler(3)
    y = s.normal((60, 2))
    pred = y + 0.5 * s.normal((60, 2))
    base = fl.loss_baseline(fl.mse_loss, y)
    yn, pn = y.numpy(), pred.numpy()
    r2 = 1 - ((yn - pn) ** 2).sum() / ((yn - yn.mean(0)) ** 2).sum()
    assert float(base.skill(fl.mse_loss(pred, y))) == pytest.approx(r2, rel=1e-12)
    assert base.description == "mean"


@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=80))
def test_cross_entropy_baseline_is_the_entropy_of_the_class_frequencies(labels: list[int]) -> None:
    y = torch.tensor(labels)
    base = fl.loss_baseline(fl.cross_entropy, y.long(), num_classes=6)
    freq = np.bincount(labels, minlength=6) / len(labels)
    entropy = -sum(f * np.log(f) for f in freq if f > 0)
    assert float(base.value) == pytest.approx(entropy, abs=1e-6)
    assert base.prediction.shape == (6,)


def test_skill_reads_as_mcfadden_r2_and_is_negative_for_a_worse_model() -> None:
    y = torch.tensor([0] * 30 + [1] * 10)
    base = fl.loss_baseline(F.cross_entropy, y)
    good = torch.where(y.unsqueeze(1) == torch.arange(2), 3.0, 0.0)
    assert 0 < float(base.skill(F.cross_entropy(good, y))) < 1
    assert float(base.skill(F.cross_entropy(-good, y))) < 0
    assert float(base.skill(base.value)) == 0


def test_options_bound_with_partial_count_like_keywords() -> None:
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 5)
    w = torch.tensor([1.0, 2.0, 4.0])
    bound = fl.loss_baseline(functools.partial(fl.cross_entropy, weight=w, label_smoothing=0.1), y)
    direct = fl.loss_baseline(fl.cross_entropy, y, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(bound.value, direct.value)
    torch.testing.assert_close(bound.prediction, direct.prediction)
    assert not torch.allclose(direct.value, fl.loss_baseline(fl.cross_entropy, y).value)


def test_unsupported_losses_and_options_are_refused_with_the_list() -> None:
    y = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"Supported: .*mse_loss"):
        fl.loss_baseline(fl.kl_div, y)
    with pytest.raises(ValueError, match="var="):
        fl.loss_baseline(fl.gaussian_nll_loss, y)
    with pytest.raises(ValueError, match="weighted median"):
        fl.loss_baseline(fl.l1_loss, y, weight=torch.ones(5, 2))
    with pytest.raises(ValueError, match="quantile="):
        fl.loss_baseline(fl.quantile_loss, y)
    with pytest.raises(ValueError, match="non-empty batch"):
        fl.loss_baseline(fl.mse_loss, torch.zeros(0, 2))
