"""The edge-case catalogue: named tests for the places where a straightforward implementation
and torch disagree, plus bad input (same exception class as torch, a message that helps)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import funcloss as fl
from funcloss._bench.cases import Sampler
from funcloss._checks import check_values
from funcloss.losses import _fused

from .harness import quiet_call
from .registry import DEVICES, ROWS, Row, rows

T = torch.tensor


# ---------------------------------------------------------------- empty batches and reductions


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("mse_loss", lambda: (torch.randn(0, 3), torch.randn(0, 3))),
        ("l1_loss", lambda: (torch.randn(0), torch.randn(0))),
        ("binary_cross_entropy", lambda: (torch.rand(0, 2), torch.rand(0, 2))),
        ("binary_cross_entropy_with_logits", lambda: (torch.randn(0), torch.rand(0))),
        ("huber_loss", lambda: (torch.randn(0, 3), torch.randn(0, 3))),
        ("poisson_nll_loss", lambda: (torch.randn(0), torch.rand(0))),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(name: str, make: Callable[[], tuple[torch.Tensor, ...]], reduction: str) -> None:
    args = make()
    ours = getattr(fl, name)(*args, reduction=reduction)
    theirs = getattr(F, name)(*args, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    if reduction == "mean":
        assert torch.isnan(ours)
    if reduction == "sum":
        assert ours.item() == 0


def test_kl_div_batchmean_of_empty_batch_is_nan_like_torch() -> None:
    x, y = torch.randn(0, 3), torch.rand(0, 3)
    torch.testing.assert_close(
        fl.kl_div(x, y, reduction="batchmean"), F.kl_div(x, y, reduction="batchmean"), equal_nan=True
    )


@pytest.mark.parametrize(
    ("shape", "target_shape"),
    [((1,), (3,)), ((3,), (4, 3)), ((4, 3), (2, 4, 3)), ((3,), (0, 3)), ((4, 1), (4, 3)), ((), (2, 3))],
    ids=repr,
)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_batchmean_divides_by_the_inputs_batch_when_the_target_broadcasts(
    shape: tuple[int, ...], target_shape: tuple[int, ...], log_target: bool
) -> None:
    """torch's "batchmean" is the sum over the broadcast values divided by ``input.size(0)``,
    not by the broadcast shape's first dimension."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(shape, generator=gen, dtype=torch.float64), torch.rand(target_shape, generator=gen).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size-mismatch warning of a broadcast target
        results = []
        for fn in (F.kl_div, fl.kl_div):
            leaf = x.clone().requires_grad_()
            loss = fn(leaf, y, reduction="batchmean", log_target=log_target)
            results.append((loss, torch.autograd.grad(loss, leaf)[0]))
    (theirs, their_grad), (ours, our_grad) = results
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(our_grad, their_grad, equal_nan=True)


def test_l1_weighted_mean_divides_by_weight_sum_but_huber_by_count() -> None:
    x, y, w = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 3) + 0.5
    expected_l1 = ((x - y).abs() * w).sum() / w.sum()
    torch.testing.assert_close(fl.l1_loss(x, y, weight=w), expected_l1)
    # torch's stubs predate the weight= of torch 2.13.
    torch.testing.assert_close(fl.l1_loss(x, y, weight=w), F.l1_loss(x, y, weight=w))  # type: ignore[call-arg]
    torch.testing.assert_close(fl.huber_loss(x, y, weight=w), F.huber_loss(x, y, weight=w))  # type: ignore[call-arg]
    torch.testing.assert_close(fl.huber_loss(x, y, weight=w), (fl.huber_loss(x, y, reduction="none") * w).mean())


def test_smooth_l1_is_huber_over_beta_and_l1_at_beta_zero() -> None:
    x, y = torch.randn(50) * 3, torch.randn(50)
    torch.testing.assert_close(fl.smooth_l1_loss(x, y, beta=0.7), fl.huber_loss(x, y, delta=0.7) / 0.7)
    torch.testing.assert_close(fl.smooth_l1_loss(x, y, beta=0.0), fl.l1_loss(x, y))


# ---------------------------------------------------------------- extreme inputs


def test_bce_at_zero_and_one_costs_exactly_100() -> None:
    x = T([0.0, 1.0, 0.0, 1.0])
    y = T([1.0, 0.0, 0.0, 1.0])
    ours = fl.binary_cross_entropy(x, y, reduction="none")
    assert ours.tolist() == [100.0, 100.0, 0.0, 0.0]
    torch.testing.assert_close(ours, F.binary_cross_entropy(x, y, reduction="none"))


def test_bce_gradient_at_the_ends_pushes_like_torch() -> None:
    """torch caps the gradient's denominator p(1-p) at 1e-12 instead of returning 0 or NaN."""
    x = T([0.0, 1.0, 1e-14, 0.5, 1e-12, 1e-12], dtype=torch.float64)  # 1e-12: the cap's edge
    y = T([1.0, 0.0, 1.0, 1.0, 1.0, 0.3], dtype=torch.float64)
    ours = tf.grad(lambda p: fl.binary_cross_entropy(p, y, reduction="sum"))(x)
    xt = x.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.binary_cross_entropy(xt, y, reduction="sum"), xt)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0.0)


def test_bce_gradient_at_an_end_with_its_own_label_is_the_true_derivative() -> None:
    """At p = 0 with y = 0 (or p = 1 with y = 1) the loss is -log(1 - p) (or -log p), whose
    derivative there is 1 (or -1). torch's backward computes (p - y) / max(p (1 - p), 1e-12),
    which is 0 / 1e-12 = 0 there (NaN in half precision), and p / 1e-12 within 1e-12 of the
    end. A deliberate difference, documented in the README."""
    x = T([0.0, 1.0], dtype=torch.float64)
    y = T([0.0, 1.0], dtype=torch.float64)
    ours = tf.grad(lambda p: fl.binary_cross_entropy(p, y, reduction="sum"))(x)
    torch.testing.assert_close(ours, T([1.0, -1.0], dtype=torch.float64))
    xt = x.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.binary_cross_entropy(xt, y, reduction="sum"), xt)
    assert theirs.tolist() == [0.0, 0.0]
    # Within 1e-12 of the ends torch pushes with p / 1e-12 (and 1 - p for the other end);
    # funcloss keeps the derivative, about 1 and -1.
    near = T([1e-13, 1 - 2**-45], dtype=torch.float64)
    ours = tf.grad(lambda p: fl.binary_cross_entropy(p, y, reduction="sum"))(near)
    torch.testing.assert_close(ours, T([1.0, -1.0], dtype=torch.float64))
    # Just inside the ends both agree with the derivative.
    inside = T([1e-9, 1 - 1e-9], dtype=torch.float64)
    ours = tf.grad(lambda p: fl.binary_cross_entropy(p, y, reduction="sum"))(inside)
    it = inside.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.binary_cross_entropy(it, y, reduction="sum"), it)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("target_grad", [False, True])
def test_compiled_bce_at_the_ends_is_eager_bce(target_grad: bool) -> None:
    """Compiled, the capped logs take another form (one fused Function); values and gradients
    at and near the ends, the target's gradient too, are the eager ones."""
    x = T([0.0, 1.0, 0.0, 1.0, 1e-14, 1e-12, 1e-13, 1 - 2**-45, 0.5, 0.3], dtype=torch.float64)
    y = T([1.0, 0.0, 0.0, 1.0, 1.0, 0.3, 0.0, 1.0, 1.0, 0.7], dtype=torch.float64)

    def value_and_grads(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(target_grad)
        out = fn(xs, ys)
        return (out, *torch.autograd.grad(out.sum(), [xs, ys] if target_grad else [xs]))

    def loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return fl.binary_cross_entropy(p, t, reduction="none")

    torch._dynamo.reset()
    compiled = value_and_grads(torch.compile(loss, fullgraph=True))
    for got, expected in zip(compiled, value_and_grads(loss), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bce_in_half_precision_at_the_ends(dtype: torch.dtype) -> None:
    """0 and 1 cost 100 and push with 1/1e-12 (inf in half precision) as in torch's half
    kernels, eagerly and under vmap and grad (where the range is unknown, so the capped logs
    always run)."""
    x = T([0.0, 1.0, 0.5, 0.25, 1e-3], dtype=dtype)
    y = T([1.0, 0.0, 1.0, 0.0, 1.0], dtype=dtype)
    theirs = F.binary_cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(fl.binary_cross_entropy(x, y, reduction="none"), theirs)
    torch.testing.assert_close(tf.vmap(fl.binary_cross_entropy)(x, y), theirs)
    xt = x.clone().requires_grad_(True)
    (their_grad,) = torch.autograd.grad(F.binary_cross_entropy(xt, y, reduction="sum"), xt)
    ours = tf.grad(lambda p: fl.binary_cross_entropy(p, y, reduction="sum"))(x)
    torch.testing.assert_close(ours, their_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_with_logits_at_plus_minus_1e3(dtype: torch.dtype) -> None:
    x = T([-1e3, 1e3, -1e3, 1e3], dtype=dtype, requires_grad=True)
    y = T([1.0, 0.0, 0.0, 1.0], dtype=dtype)
    ours = fl.binary_cross_entropy_with_logits(x, y, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    torch.testing.assert_close(ours, theirs)
    assert ours.tolist() == [1000.0, 1000.0, 0.0, 0.0]
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g_ours, g_theirs)


def test_soft_margin_stays_finite_where_torch_overflows() -> None:
    """A documented difference: torch computes log1p(exp(-xy)) and returns inf past ~88."""
    x = T([-1e3, 1e3, 20.0])
    y = T([1.0, -1.0, 1.0])
    ours = fl.soft_margin_loss(x, y, reduction="none")
    theirs = F.soft_margin_loss(x, y, reduction="none")
    assert torch.isinf(theirs[:2]).all()
    torch.testing.assert_close(ours, T([1000.0, 1000.0, math.log1p(math.exp(-20.0))]))


def test_poisson_full_target_gradient_is_finite_where_torch_is_nan() -> None:
    """A documented difference: torch's Stirling mask leaks NaN into d/dy at y = 0."""
    x = torch.randn(4, dtype=torch.float64)
    y = T([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    ours = tf.grad(lambda t: fl.poisson_nll_loss(x, t, full=True, reduction="sum"))(y)
    yt = y.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.poisson_nll_loss(x, yt, full=True, reduction="sum"), yt)
    assert torch.isnan(theirs[0]) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours[1:], theirs[1:])
    torch.testing.assert_close(ours[0], -x[0])


def test_gaussian_var_clamp_passes_gradient_as_if_unclamped() -> None:
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    var = T([1e-9, 0.5, 2.0], dtype=torch.float64)
    ours = tf.grad(lambda v: fl.gaussian_nll_loss(x, y, v, reduction="sum"))(var)
    vt = var.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(F.gaussian_nll_loss(x, y, vt, reduction="sum"), vt)
    torch.testing.assert_close(ours, theirs)
    assert ours[0] != 0  # a real clamp would have killed it


def test_gaussian_negative_var_is_unchecked_under_vmap() -> None:
    """The value check steps aside under transforms instead of breaking vmap (torch's does)."""
    x, y, var = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 3)
    out = tf.vmap(fl.gaussian_nll_loss)(x, y, var)
    assert out.shape == (4,)
    with pytest.raises(ValueError, match="var has negative"):
        fl.gaussian_nll_loss(x, y, -var)


# torch's margin kernels test ``z > 0``, which a NaN fails, so they drop NaN silently; funcloss
# propagates it (no silent data loss).
TORCH_DROPS_NAN = {"multi_margin_loss", "multilabel_margin_loss"}


@pytest.mark.parametrize("row", rows())
def test_nan_propagates_like_torch(row: Row) -> None:
    ex = row.case.make(Sampler(11), {**row.case.defaults(), "reduction": "none"})
    x = ex.args[0].clone()
    x.view(-1)[0] = float("nan")
    args = (x, *ex.args[1:])
    try:
        theirs = quiet_call(row.case.theirs, *args, **ex.kwargs)
    except RuntimeError:
        # torch rejects NaN here (binary_cross_entropy's range check): so do we.
        with pytest.raises(RuntimeError):
            quiet_call(row.case.ours, *args, **ex.kwargs)
        return
    ours = quiet_call(row.case.ours, *args, **ex.kwargs)
    if row.name in TORCH_DROPS_NAN:
        assert torch.isnan(ours.reshape(-1)[0]) and not torch.isnan(theirs).any()
        torch.testing.assert_close(ours.reshape(-1)[1:], theirs.reshape(-1)[1:])
        return
    # NaN exactly where torch has NaN (equal_nan compares the positions).
    torch.testing.assert_close(ours, theirs, equal_nan=True)


# ---------------------------------------------------------------- warnings


@pytest.mark.parametrize("name", ["l1_loss", "mse_loss", "huber_loss", "smooth_l1_loss"])
def test_size_mismatch_warns_then_broadcasts_like_torch(name: str) -> None:
    x, y = torch.randn(4, 1), torch.randn(4)
    with pytest.warns(UserWarning, match="different to the input size"):
        ours = getattr(fl, name)(x, y, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(F, name)(x, y, reduction="none")
    assert ours.shape == theirs.shape == (4, 4)
    torch.testing.assert_close(ours, theirs)


def test_kl_div_mean_warns() -> None:
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        fl.kl_div(torch.randn(2, 3), torch.rand(2, 3))


# ---------------------------------------------------------------- bad input

BadCase = tuple[str, Callable[[], tuple[tuple[Any, ...], dict[str, Any]]], str]

BAD_INPUTS: list[BadCase] = [
    ("binary_cross_entropy", lambda: ((T([1.5, 0.2]), T([1.0, 0.0])), {}), "between 0 and 1"),
    ("binary_cross_entropy", lambda: ((T([-0.1]), T([1.0])), {}), "between 0 and 1"),
    ("binary_cross_entropy", lambda: ((torch.rand(3), torch.rand(4)), {}), "target of the input's shape"),
    ("binary_cross_entropy", lambda: ((torch.rand(3), torch.rand(3, dtype=torch.float64)), {}), "dtype"),
    (
        "binary_cross_entropy_with_logits",
        lambda: ((torch.rand(3), torch.rand(3, 1)), {}),
        "target of the input's shape",
    ),
    ("huber_loss", lambda: ((torch.rand(3), torch.rand(3)), {"delta": 0.0}), "delta > 0"),
    ("huber_loss", lambda: ((torch.rand(3), torch.rand(3)), {"delta": -1.0}), "delta > 0"),
    ("smooth_l1_loss", lambda: ((torch.rand(3), torch.rand(3)), {"beta": -0.5}), "beta >= 0"),
    ("gaussian_nll_loss", lambda: ((torch.rand(3), torch.rand(3), T([1.0, -1.0, 1.0])), {}), "negative"),
    ("gaussian_nll_loss", lambda: ((torch.rand(3), torch.rand(3), -1.0), {}), "negative"),
    ("gaussian_nll_loss", lambda: ((torch.rand(3, 4), torch.rand(3, 4), torch.rand(2, 4)), {}), "incorrect size"),
    ("l1_loss", lambda: ((torch.rand(3), torch.rand(3)), {"weight": torch.rand(4)}), "weight of the input's shape"),
    ("mse_loss", lambda: ((torch.rand(3), torch.rand(3)), {"weight": torch.rand(1)}), "weight of the input's shape"),
    ("mse_loss", lambda: ((torch.rand(3), torch.rand(4)), {}), "size of tensor"),
    (
        "margin_ranking_loss",
        lambda: ((torch.rand(3), torch.rand(3), torch.rand(1, 3)), {}),
        "same number of dimensions",
    ),
    ("soft_margin_loss", lambda: ((torch.rand(3, 1), torch.rand(3)), {}), "broadcastable to the input's shape"),
    # A class weight longer than C would index silently; shorter, with an IndexError.
    ("multi_margin_loss", lambda: ((torch.rand(4, 3), T([0, 1, 2, 1])), {"weight": torch.rand(4)}), "3 elements"),
    ("multi_margin_loss", lambda: ((torch.rand(4, 3), T([0, 1, 2, 1])), {"weight": torch.rand(1)}), "3 elements"),
    # No classes: torch refuses an empty class dimension (an empty batch is fine).
    ("multi_margin_loss", lambda: ((torch.rand(4, 0), torch.zeros(4, dtype=torch.int64)), {}), "C >= 1"),
    ("multi_margin_loss", lambda: ((torch.rand(0), torch.tensor(0)), {}), "C >= 1"),
    ("multilabel_margin_loss", lambda: ((torch.rand(4, 0), torch.zeros(4, 0, dtype=torch.int64)), {}), "C >= 1"),
    ("multilabel_margin_loss", lambda: ((torch.rand(0), torch.zeros(0, dtype=torch.int64)), {}), "C >= 1"),
    ("multi_margin_loss", lambda: ((torch.rand(2, 3), T([[1], [0]])), {}), "target of shape"),
    ("multi_margin_loss", lambda: ((torch.rand(2, 3), T(1)), {}), "target of shape"),
    ("multilabel_margin_loss", lambda: ((torch.rand(1, 3), T([0, 1, -1])), {}), "inconsistent target size"),
    ("multilabel_margin_loss", lambda: ((torch.rand(3), T([0])), {}), "inconsistent target size"),
    # A scalar input with an integer scalar target: torch takes the target, of the input's
    # shape, as class probabilities and refuses its dtype first; with a float one, the dimension.
    ("cross_entropy", lambda: ((torch.randn(()), T(0)), {}), "floating point"),
    ("cross_entropy", lambda: ((torch.randn(()), torch.tensor(0.0)), {}), "dimensions"),
    ("cross_entropy", lambda: ((torch.randn(()), T(0)), {"label_smoothing": 0.2}), "floating point"),
    # A batched input's batch size is checked before the target's dtype, as in torch.
    ("cross_entropy", lambda: ((torch.randn(4, 5), torch.rand(2)), {}), "batch_size"),
    ("nll_loss", lambda: ((torch.randn(4, 5), torch.rand(())), {}), "batch_size"),
    ("cross_entropy", lambda: ((torch.randn(4, 5, 3), torch.rand(4, 2)), {}), "target size"),
    ("nll_loss", lambda: ((torch.randn(0, 5), T(1)), {}), "batch dimension"),
    ("cross_entropy", lambda: ((torch.randn(0, 5), torch.rand(())), {}), "Long or Byte"),
]


@pytest.mark.parametrize(("name", "make", "match"), BAD_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input_raises_like_torch(
    name: str, make: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]], match: str
) -> None:
    args, kwargs = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as theirs:  # noqa: PT011
            getattr(F, name)(*args, **kwargs)
        with pytest.raises(theirs.type, match=match):
            getattr(fl, name)(*args, **kwargs)


@pytest.mark.parametrize("row", [r for r in rows() if "reduction" in r.values[0].case.options])
def test_invalid_reduction_raises_value_error_like_torch(row: Row) -> None:
    ex = row.case.make(Sampler(0), row.case.defaults())
    kwargs = {**ex.kwargs, "reduction": "average"}
    with pytest.raises(ValueError, match=r"not a?\s?valid"):
        row.case.theirs(*ex.args, **kwargs)
    with pytest.raises(ValueError, match=r"expected reduction to be one of .*got 'average'"):
        row.case.ours(*ex.args, **kwargs)


def test_every_registry_row_is_exported() -> None:
    assert set(ROWS) <= set(fl.__all__)


# ---------------------------------------------------------------- the eager fast path

FUSED = [
    ("l1_loss", {}),
    ("mse_loss", {}),
    ("huber_loss", {"delta": 0.7}),
    ("smooth_l1_loss", {"beta": 0.4}),
    ("smooth_l1_loss", {"beta": 0.0}),
    ("binary_cross_entropy_with_logits", {}),
    ("binary_cross_entropy", {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(300, 300), (600, 500)], ids=["one-chunk", "three-chunks"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("name", "kwargs"), FUSED, ids=[f"{n}-{k}" for n, k in FUSED])
def test_large_inputs_take_the_fast_path_and_still_match_torch(
    name: str,
    kwargs: dict[str, float],
    dtype: torch.dtype,
    reduction: str,
    shape: tuple[int, int],
    device: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large eager inputs reduce chunk by chunk through dot products (600 x 500 in chunks of
    2^17 on the CPU: two full chunks and a partial one) and their backward writes in place;
    values, gradients (input and target, with and without create_graph) and second
    derivatives must still be torch's."""
    if shape == (600, 500):
        monkeypatch.setattr(_fused, "_CHUNK", 1 << 17)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(True)
    y = torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(True)
    if name.startswith("binary_cross_entropy"):
        y = torch.rand(*shape, generator=g, dtype=dtype).to(device).requires_grad_(True)
    if name == "binary_cross_entropy":  # probabilities inside (1e-12, 1 - 1e-12): no clamp acts
        x = (torch.rand(*shape, generator=g, dtype=dtype) * 0.98 + 0.01).to(device).requires_grad_(True)
    ours = getattr(fl, name)(x, y, reduction=reduction, **kwargs)
    theirs = getattr(F, name)(x, y, reduction=reduction, **kwargs)
    fused = {"_DifferenceLossBackward", "_LogitsBCEBackward", "_ProbabilityBCEBackward"}
    # On accelerators BCE's range is not read back, so its clamped composition runs instead.
    assert type(ours.grad_fn).__name__ in fused or (name == "binary_cross_entropy" and device != "cpu")
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0.0)
    for a, b in zip(
        torch.autograd.grad(ours, (x, y), retain_graph=True), torch.autograd.grad(theirs, (x, y), retain_graph=True)
    ):
        torch.testing.assert_close(a, b)
    g_ours = torch.autograd.grad(ours, (x, y), create_graph=True)
    g_theirs = torch.autograd.grad(theirs, (x, y), create_graph=True)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)
    (h_ours,) = torch.autograd.grad((g_ours[0] ** 2).sum(), x)
    (h_theirs,) = torch.autograd.grad((g_theirs[0] ** 2).sum(), x)
    # Second derivatives of BCE scale like 1 / (p (1 - p))^2: in float32 two correct formulas
    # differ by rounding at ~1e-4 relative near p = 0.01 (float64 agrees to 1e-12).
    h_rtol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(h_ours, h_theirs, rtol=h_rtol, atol=1e-5)


@pytest.mark.parametrize(("name", "kwargs"), FUSED[:6], ids=[f"{n}-{k}" for n, k in FUSED[:6]])
def test_fast_path_with_non_contiguous_inputs(name: str, kwargs: dict[str, float]) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 600, generator=g, dtype=torch.float64).T.requires_grad_(True)
    y = torch.randn(500, 600, generator=g, dtype=torch.float64).T.requires_grad_(True)
    if name.startswith("binary_cross_entropy"):
        y = torch.rand(500, 600, generator=g, dtype=torch.float64).T.requires_grad_(True)
    ours = getattr(fl, name)(x, y, **kwargs)
    theirs = getattr(F, name)(x, y, **kwargs)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (x, y)), torch.autograd.grad(theirs, (x, y))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("wants", ["input", "target", "both"])
@pytest.mark.parametrize(("name", "kwargs"), FUSED[:5], ids=[f"{n}-{k}" for n, k in FUSED[:5]])
def test_fast_path_gradient_formed_in_the_forward_serves_one_backward(
    name: str, kwargs: dict[str, float], wants: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """l1/mse/huber/smooth_l1 form their gradient's direction in the forward (here in three
    chunks) and the first backward scales it in place. Whichever of input and target
    requires grad, a second backward (retain_graph) with another incoming gradient, one after
    a create_graph backward, and a forward under no_grad must all still give torch's
    gradients."""
    monkeypatch.setattr(_fused, "_CHUNK", 1 << 17)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(700, 400, generator=g, dtype=torch.float64).requires_grad_(wants != "target")
    y = torch.randn(700, 400, generator=g, dtype=torch.float64).requires_grad_(wants != "input")
    leaves = [t for t in (x, y) if t.requires_grad]
    ours = getattr(fl, name)(x, y, **kwargs)
    theirs = getattr(F, name)(x, y, **kwargs)
    for scale in (1.0, 3.0, -0.5):  # the first consumes the formed gradient; the others recompute
        expected = torch.autograd.grad(scale * theirs, leaves, retain_graph=True)
        got = torch.autograd.grad(scale * ours, leaves, retain_graph=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
    again = getattr(fl, name)(x, y, **kwargs)
    second = torch.autograd.grad(again, leaves, create_graph=True)
    for a, b in zip(second, torch.autograd.grad(theirs, leaves, retain_graph=True)):
        torch.testing.assert_close(a, b)
        assert a.requires_grad  # differentiable: the formed gradient was not used
    for a, b in zip(torch.autograd.grad(again, leaves), torch.autograd.grad(theirs, leaves)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(getattr(fl, name)(x, y, **kwargs), getattr(F, name)(x, y, **kwargs))


@pytest.mark.parametrize("row", rows())
def test_meta_tensors_give_torchs_shapes(row: Row) -> None:
    """On the meta device (shape inference, no data) every loss runs, forward and backward, and
    gives torch's shape and dtype. Where torch's own loss reads values there (CTC lengths,
    Gaussian variances, adaptive softmax's cluster rows) and refuses, the shape and dtype are
    those torch gives for the same inputs on the CPU."""
    ex = row.case.make(Sampler(0, torch.float32, "cpu"), row.case.defaults())
    args = [
        a.to("meta").requires_grad_(i in ex.diff) if isinstance(a, torch.Tensor) else a for i, a in enumerate(ex.args)
    ]
    kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in ex.kwargs.items()}
    try:
        theirs = quiet_call(row.case.theirs, *args, **kwargs)
    except (NotImplementedError, RuntimeError):
        theirs = quiet_call(row.case.theirs, *ex.args, **ex.kwargs)
    ours = quiet_call(row.case.ours, *args, **kwargs)
    assert ours.device.type == "meta"
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype
    inputs = [args[i] for i in ex.diff]
    if inputs and ours.requires_grad:
        grads = torch.autograd.grad(ours.sum(), inputs, allow_unused=True)
        for a, g in zip(inputs, grads):
            assert g is None or (g.device.type == "meta" and g.shape == a.shape)


def _forward_tangent(fn: Callable[..., torch.Tensor], primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """The eager forward-mode derivative (``torch.autograd.forward_ad``) of ``fn`` at ``primal``."""
    import torch.autograd.forward_ad as fwAD

    make: Callable[..., torch.Tensor] = fwAD.make_dual
    unpack: Callable[[torch.Tensor], Any] = fwAD.unpack_dual
    with fwAD.dual_level():
        out = unpack(fn(make(primal, tangent))).tangent
    assert isinstance(out, torch.Tensor)
    return out


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    "name", ["mse_loss", "l1_loss", "huber_loss", "binary_cross_entropy_with_logits", "cross_entropy"]
)
def test_eager_forward_mode_ad_on_large_inputs(name: str, requires_grad: bool) -> None:
    """The eager fast paths are autograd Functions without a jvp: inputs that carry a
    forward-mode tangent take the composition instead, so torch.autograd.forward_ad works."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 200, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    t = torch.randn(400, 200, generator=g, dtype=torch.float64)
    if name == "cross_entropy":
        y = torch.randint(0, 200, (400,), generator=g)
    else:
        y = torch.rand(400, 200, generator=g, dtype=torch.float64)
    ours = _forward_tangent(lambda p: getattr(fl, name)(p, y), x, t)
    theirs = _forward_tangent(lambda p: getattr(F, name)(p, y), x, t)
    torch.testing.assert_close(ours, theirs)


def test_eager_forward_mode_ad_through_linear_ce_and_ctc() -> None:
    """The chunked linear cross-entropy and CTC's eager recursion step aside for a tangent too:
    compared with the derivative from the backward (a dot product with the tangent)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 30, (64,), generator=g)
    t = torch.randn(64, 8, generator=g, dtype=torch.float64)
    tangent = _forward_tangent(lambda p: fl.linear_cross_entropy(p, w, y, chunk_size=16), x, t)
    (grad,) = torch.autograd.grad(fl.linear_cross_entropy(x, w, y, chunk_size=16), x)
    torch.testing.assert_close(tangent, (grad * t).sum())
    lp = torch.randn(12, 3, 5, generator=g, dtype=torch.float64).log_softmax(2).requires_grad_()
    targets = torch.randint(1, 5, (3, 4), generator=g)
    lengths, target_lengths = torch.full((3,), 12), torch.tensor([4, 3, 2])
    t = torch.randn(12, 3, 5, generator=g, dtype=torch.float64)
    tangent = _forward_tangent(lambda p: fl.ctc_loss(p, targets, lengths, target_lengths), lp, t)
    (grad,) = torch.autograd.grad(fl.ctc_loss(lp, targets, lengths, target_lengths), lp)
    torch.testing.assert_close(tangent, (grad * t).sum())


# ---------------------------------------------------------------- fake tensors


@pytest.mark.parametrize("row", rows())
def test_fake_tensors_give_the_real_shape_and_dtype(row: Row) -> None:
    """Under a fake tensor mode (shape propagation, memory estimation) there are no values to
    check: every loss steps around its value checks and fast paths, and gives the shape and
    dtype a real call gives (where torch's own nll_loss, cross_entropy and margins do too)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = row.case
    for reduction in ("none", "mean") if "reduction" in case.defaults() else (None,):
        options = case.defaults() if reduction is None else {**case.defaults(), "reduction": reduction}
        ex = case.make(Sampler(0, torch.float32, "cpu"), options)
        real = quiet_call(case.ours, *ex.args, **ex.kwargs)
        with FakeTensorMode() as mode:
            args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in ex.args]
            kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in ex.kwargs.items()}
            fake = quiet_call(case.ours, *args, **kwargs)
        assert (fake.shape, fake.dtype) == (real.shape, real.dtype), f"{row.name} {options}"


# ---------------------------------------------------------------- mixed dtypes


@pytest.mark.parametrize("name", ["huber_loss", "soft_margin_loss", "mse_loss", "l1_loss", "smooth_l1_loss"])
def test_a_wider_target_keeps_torchs_result_dtype(name: str) -> None:
    """A float64 target against a float32 input: the result has torch's dtype (the input's for
    huber and soft margin, whose kernels compute in it; the wider one for the others) and
    torch's value."""
    x = torch.randn(6, generator=torch.Generator().manual_seed(0))
    y = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64).sign()
    for reduction in ("none", "mean"):
        ours, theirs = getattr(fl, name)(x, y, reduction=reduction), getattr(F, name)(x, y, reduction=reduction)
        assert ours.dtype == theirs.dtype, (name, reduction)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    ("name", "input_dtype", "target_dtype"),
    [
        ("huber_loss", torch.float32, torch.float64),
        ("huber_loss", torch.float64, torch.float32),
        ("huber_loss", torch.float32, torch.int64),
        ("huber_loss", torch.bfloat16, torch.bool),
        ("soft_margin_loss", torch.float32, torch.bool),
        ("soft_margin_loss", torch.float64, torch.bool),
    ],
    ids=str,
)
def test_gradient_where_torchs_backward_refuses_the_targets_dtype(
    name: str, input_dtype: torch.dtype, target_dtype: torch.dtype
) -> None:
    """torch's forward takes these targets, but its backward fails (huber's kernel expects the
    target in the input's dtype; soft margin negates a bool target). funcloss's gradient is
    torch's with the target converted to the input's dtype, which is what torch's forward
    computes with."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, generator=gen) * 2).to(input_dtype)
    y = torch.randn(5, 3, generator=gen) * 2
    y = (y > 0) if target_dtype == torch.bool else y.round().to(target_dtype)
    for reduction in ("mean", "none"):
        theirs_in = x.clone().requires_grad_()
        with pytest.raises(RuntimeError):  # the torch behaviour this test is about
            torch.autograd.grad(getattr(F, name)(theirs_in, y, reduction=reduction).sum(), theirs_in)
        ref_loss = getattr(F, name)(theirs_in, y.to(input_dtype), reduction=reduction)
        (ref_grad,) = torch.autograd.grad(ref_loss.sum(), theirs_in)
        ours_in = x.clone().requires_grad_()
        loss = getattr(fl, name)(ours_in, y, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), ours_in)
        assert loss.dtype == ref_loss.dtype and grad.dtype == input_dtype
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)


OPERAND_LOSSES = [
    "l1_loss",
    "mse_loss",
    "huber_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "poisson_nll_loss",
    "kl_div",
    "hinge_embedding_loss",
    "multilabel_soft_margin_loss",
]
TARGET_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]


def _operand(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if dtype.is_floating_point:
        return torch.rand(shape, generator=gen).to(dtype)  # in [0, 1]: valid for every loss here
    return torch.randint(0, 2, shape, generator=gen).to(dtype)


def _assert_same_outcome(name: str, args: tuple[torch.Tensor, ...], what: str, **kwargs: Any) -> None:
    """torch's and funcloss's ``name`` on the same arguments: both compute (the same dtype, close
    values) or both raise the same exception class."""
    outcomes: list[torch.Tensor | type[Exception]] = []
    for fn in (getattr(F, name), getattr(fl, name)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # kl_div's "mean"
                outcomes.append(fn(*args, **kwargs))
        except (RuntimeError, NotImplementedError, ValueError, IndexError) as e:
            outcomes.append(type(e))
    theirs, ours = outcomes
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{what}: torch computes, funcloss raised {ours}"
        assert ours.dtype == theirs.dtype, what
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=2e-3, atol=2e-3, msg=what)
    else:
        assert ours is theirs, f"{what}: torch raises {theirs}, funcloss gave {ours}"


@pytest.mark.parametrize("shape", [(4, 3), (700, 1500)], ids=["small", "fast-path"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64, torch.bool, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("name", OPERAND_LOSSES)
def test_operand_dtypes_are_taken_or_refused_like_torch(
    name: str, input_dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """Integer and bool targets (0/1 labels), and bool and integer inputs: where torch's kernel
    computes, the same dtype and value (an integral hinge loss stays integral); where it
    refuses, the same exception class (a soft margin of integer scores, the mean of an integral
    loss)."""
    for target_dtype in TARGET_DTYPES:
        x, y = _operand(input_dtype, shape, 0), _operand(target_dtype, shape, 1)
        for reduction in ("mean", "none", "sum"):
            what = f"{name}({input_dtype}, {target_dtype}, reduction={reduction!r})"
            _assert_same_outcome(name, (x, y), what, reduction=reduction)


def _several_operands(name: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    values = [torch.rand(6, 4, generator=gen) for _ in range(3)]
    sign = (torch.rand(6, generator=gen) < 0.5).float() * 2 - 1
    if name == "margin_ranking_loss":
        return values[0][:, 0], values[1][:, 0], sign
    if name == "cosine_embedding_loss":
        return values[0], values[1], sign
    if name == "gaussian_nll_loss":
        return values[0], values[1], values[2] + 0.1
    return tuple(values)  # the triplets


@pytest.mark.parametrize(
    "name",
    [
        "margin_ranking_loss",
        "gaussian_nll_loss",
        "cosine_embedding_loss",
        "triplet_margin_loss",
        "triplet_margin_with_distance_loss",
    ],
)
def test_each_operand_dtype_is_taken_or_refused_like_torch(name: str) -> None:
    """The losses of three tensors, one operand at a time in another dtype and then all three in
    it: torch's result dtype and value, or its exception class (integral scores ranked against
    a float margin give a float loss; an integral variance, which torch clamps in place, is
    refused)."""
    operands = _several_operands(name)
    dtypes = [torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]

    def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t > 0.5 if dtype == torch.bool else t.to(dtype) if dtype.is_floating_point else (t * 3).to(dtype)

    for dtype in dtypes:
        cases = [tuple(cast(t, dtype) if i == k else t for i, t in enumerate(operands)) for k in range(3)]
        cases.append(tuple(cast(t, dtype) for t in operands))
        for k, args in enumerate(cases):
            which = "all operands" if k == 3 else f"operand {k}"
            for reduction in ("mean", "none", "sum"):
                what = f"{name}({which} {dtype}, reduction={reduction!r})"
                _assert_same_outcome(name, args, what, reduction=reduction)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64, torch.int64], ids=str)
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss", "multi_margin_loss", "multilabel_margin_loss"])
def test_class_index_dtypes_are_taken_or_refused_like_torch(name: str, input_dtype: torch.dtype) -> None:
    """Class indices in every integer dtype (and bool) against float and integer scores. (Half
    scores are left out: funcloss computes the margins in half precision where torch's CPU
    kernels have none, by design.)"""
    scores = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).to(input_dtype)
    for target_dtype in [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool]:
        if name == "multilabel_margin_loss":  # -1 ends a row; no -1 in the dtypes without one
            signed = target_dtype not in (torch.uint8, torch.bool)
            target = torch.tensor([[1, 0, -1, 0] if signed else [1, 0, 0, 0]] * 5).to(target_dtype)
        else:
            target = torch.tensor([0, 1, 3, 1, 0]).to(target_dtype)
        _assert_same_outcome(name, (scores, target), f"{name}({input_dtype}, {target_dtype})")


@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("option", ["plain", "weight", "pos_weight"])
def test_bce_with_logits_returns_the_targets_dtype(target_dtype: torch.dtype, option: str) -> None:
    """torch's BCE-with-logits works in place on ``1 - target``: its result has the target's
    dtype whatever the input's (float32 here)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, generator=gen), torch.rand(6, generator=gen).to(target_dtype)
    kwargs: dict[str, Any] = {} if option == "plain" else {option: torch.rand(6, generator=gen) + 0.5}
    for reduction in ("none", "mean"):
        ours = fl.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kwargs)
        theirs = F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kwargs)
        assert ours.dtype == theirs.dtype == target_dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-3)


def test_linear_cross_entropy_refuses_mixed_dtypes_as_torch() -> None:
    x, w = torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])
    with pytest.raises(RuntimeError, match="dtype"):
        F.linear_cross_entropy(x, w, y) if hasattr(F, "linear_cross_entropy") else F.linear(x, w)
    with pytest.raises(RuntimeError, match="dtype"):
        fl.linear_cross_entropy(x, w, y)


@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.float16], ids=str)
def test_weights_of_another_dtype_as_torch(weight_dtype: torch.dtype) -> None:
    """A weight of another dtype than a float32 input: the class-index losses refuse it with
    torch's exception class (their kernels take no other dtype); linear_cross_entropy refuses it
    on torch's default path and casts it given options, as torch's chunked path does; the
    elementwise weights give torch's result dtype (BCE weighs in the input's dtype, huber
    promotes)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 5, generator=gen), torch.tensor([0, 4, 2, 1])
    cw = torch.rand(5, generator=gen).to(weight_dtype)
    for name in ("cross_entropy", "nll_loss", "multi_margin_loss"):
        with pytest.raises(RuntimeError):
            getattr(F, name)(x, y, weight=cw)
        with pytest.raises(RuntimeError, match="dtype"):
            getattr(fl, name)(x, y, weight=cw)
    q = torch.softmax(torch.randn(4, 5, generator=gen), 1)  # probabilities: torch promotes
    ours, theirs = fl.cross_entropy(x, q, cw), F.cross_entropy(x, q, cw)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)

    h, lw = torch.randn(4, 3, generator=gen), torch.randn(5, 3, generator=gen)
    with pytest.raises(RuntimeError, match="dtype"):
        fl.linear_cross_entropy(h, lw, y, weight=cw)
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        ours = fl.linear_cross_entropy(h, lw, y, weight=cw, options=options)
        theirs = F.linear_cross_entropy(h, lw, y, weight=cw, options=options)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)

    p, t = torch.rand(4, 5, generator=gen) * 0.9 + 0.05, torch.rand(4, 5, generator=gen)
    ew = torch.rand(4, 5, generator=gen).to(weight_dtype)
    for name, a, b in (("binary_cross_entropy", p, t), ("huber_loss", x, t)):
        ours, theirs = getattr(fl, name)(a, b, weight=ew), getattr(F, name)(a, b, weight=ew)
        assert ours.dtype == theirs.dtype, name
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- target shapes torch accepts or refuses


@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy"])
def test_unbatched_input_takes_a_one_element_target(name: str) -> None:
    """torch accepts a ``(1,)`` target for an unbatched ``(C,)`` input (a scalar loss) and
    refuses a longer one with ValueError; a scalar input with a scalar index target is a
    RuntimeError for cross_entropy (the target, of the input's shape, read as probabilities)."""
    x = torch.randn(5, generator=torch.Generator().manual_seed(0)).log_softmax(0).requires_grad_()
    for reduction in ("none", "mean", "sum"):
        for target in (torch.tensor([3]), torch.tensor([-100])):
            ours = getattr(fl, name)(x, target, reduction=reduction)
            theirs = getattr(F, name)(x, target, reduction=reduction)
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, equal_nan=True)
            # torch's backward refuses the (1,) target it took ("size mismatch"), as does its
            # label smoothing: funcloss's gradient is that of the scalar target.
            with pytest.raises(RuntimeError, match="size mismatch"):
                torch.autograd.grad(theirs, x)
            (ours_grad,) = torch.autograd.grad(ours, x)
            (scalar_grad,) = torch.autograd.grad(getattr(F, name)(x, target[0], reduction=reduction), x)
            torch.testing.assert_close(ours_grad, scalar_grad, equal_nan=True)
    if name == "cross_entropy":
        with pytest.raises(RuntimeError, match="broadcast shape"):
            F.cross_entropy(x, torch.tensor([3]), label_smoothing=0.2)
        torch.testing.assert_close(
            fl.cross_entropy(x, torch.tensor([3]), label_smoothing=0.2),
            F.cross_entropy(x, torch.tensor(3), label_smoothing=0.2),
        )
    with pytest.raises(ValueError, match="1D target must have size 1"):
        getattr(fl, name)(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1D target must have size 1"):
        getattr(F, name)(x, torch.tensor([1, 2]))
    exc = RuntimeError if name == "cross_entropy" else ValueError
    with pytest.raises(exc):
        getattr(F, name)(x[0].detach(), torch.tensor(0))
    with pytest.raises(exc, match="dimension"):
        getattr(fl, name)(x[0], torch.tensor(0))


def test_negative_label_smoothing_is_refused_where_torch_ignores_it() -> None:
    """torch checks only the upper bound and computes a negative label_smoothing as none at
    all; funcloss refuses it, as it refuses one above 1."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 5, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    w = torch.randn(7, 5, generator=gen)
    torch.testing.assert_close(F.cross_entropy(x, y, label_smoothing=-0.1), F.cross_entropy(x, y))
    with pytest.raises(RuntimeError, match=r"label_smoothing in \[0, 1\], got -0.1"):
        fl.cross_entropy(x, y, label_smoothing=-0.1)
    with pytest.raises(RuntimeError, match=r"label_smoothing in \[0, 1\], got -0.1"):
        fl.cross_entropy(x, torch.rand(4, 5, generator=gen), label_smoothing=-0.1)  # probabilities
    with pytest.raises(RuntimeError, match=r"label_smoothing in \[0, 1\], got -0.1"):
        fl.linear_cross_entropy(x, w, y, label_smoothing=-0.1)


# (scores shape, target shape) pairs torch's margin kernels take: a scalar score is one class,
# an unbatched input takes a scalar or one-element target (multi_margin: "none" keeps the
# target's shape), and multilabel_margin's unbatched target is any C elements up to 1-D.
MARGIN_TARGET_SHAPES = [
    ("multi_margin_loss", (), ()),
    ("multi_margin_loss", (), (1,)),
    ("multi_margin_loss", (5,), ()),
    ("multi_margin_loss", (5,), (1,)),
    ("multi_margin_loss", (1, 5), ()),
    ("multi_margin_loss", (1, 5), (1,)),
    ("multi_margin_loss", (3, 5), (3,)),
    ("multilabel_margin_loss", (), ()),
    ("multilabel_margin_loss", (), (1,)),
    ("multilabel_margin_loss", (1,), ()),
    ("multilabel_margin_loss", (5,), (5,)),
    ("multilabel_margin_loss", (2, 5), (2, 5)),
]


@pytest.mark.parametrize(("name", "shape", "target_shape"), MARGIN_TARGET_SHAPES, ids=repr)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_margin_losses_take_torchs_target_shapes(
    name: str, shape: tuple[int, ...], target_shape: tuple[int, ...], reduction: str
) -> None:
    gen = torch.Generator().manual_seed(len(shape) + 3 * len(target_shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    classes = shape[-1] if shape else 1
    low = 0 if name == "multi_margin_loss" else -1
    target = torch.randint(low, classes, target_shape, generator=gen)
    results = []
    for fn in (getattr(F, name), getattr(fl, name)):
        leaf = x.clone().requires_grad_()
        loss = fn(leaf, target, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        results.append((loss, grad))
    (theirs, their_grad), (ours, our_grad) = results
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def test_ctc_target_shapes_as_torch() -> None:
    """Concatenated targets must hold exactly sum(target_lengths) entries (else they would be
    read past their end); targets of other dimensionality and scalar log-probs are refused
    with torch's exception classes."""
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(6, 3, 5, generator=gen).log_softmax(-1)
    t = torch.randint(1, 5, (3, 3), generator=gen)
    il, tl = torch.full((3,), 6), torch.full((3,), 3)
    for bad in (t.reshape(-1)[:5], torch.cat([t.reshape(-1), t.reshape(-1)])):
        with pytest.raises(RuntimeError):
            F.ctc_loss(lp, bad, il, tl)
        with pytest.raises(RuntimeError, match="sum\\(target_lengths\\) = 9"):
            fl.ctc_loss(lp, bad, il, tl)
    torch.testing.assert_close(fl.ctc_loss(lp, t.reshape(-1), il, tl), F.ctc_loss(lp, t.reshape(-1), il, tl))
    for bad in (t[..., None], t[0, 0]):
        with pytest.raises(RuntimeError):
            F.ctc_loss(lp, bad, il, tl)
        with pytest.raises(RuntimeError, match="expected targets"):
            fl.ctc_loss(lp, bad, il, tl)
    with pytest.raises(IndexError):
        F.ctc_loss(lp[0, 0, 0], t, il, tl)
    with pytest.raises(IndexError, match="expected log_probs"):
        fl.ctc_loss(lp[0, 0, 0], t, il, tl)
    # Padded targets hold one row per sequence (torch does not broadcast a single row).
    for padded in (t[:1], torch.cat([t, t[:1]])):
        with pytest.raises(RuntimeError):
            F.ctc_loss(lp, padded, il, tl)
        with pytest.raises(RuntimeError, match=r"one row per sequence \(3, S\)"):
            fl.ctc_loss(lp, padded, il, tl)
    # Unbatched: a 1-D target is the concatenated form of one sequence, exactly
    # target_length labels; a (1, S) one is padded.
    one, length = lp[:, 0], torch.tensor(2)
    with pytest.raises(RuntimeError):
        F.ctc_loss(one, t[0], il[0], length)
    with pytest.raises(RuntimeError, match="sum\\(target_lengths\\) = 2"):
        fl.ctc_loss(one, t[0], il[0], length)
    for target in (t[0, :2], t[:1]):
        torch.testing.assert_close(fl.ctc_loss(one, target, il[0], length), F.ctc_loss(one, target, il[0], length))


# ---------------------------------------------------------------- non-finite and out-of-range values


def test_gaussian_nan_and_infinite_variance_as_torch() -> None:
    """A NaN variance is not a negative one: no error, NaN where it is (torch's check is
    ``var < 0``). An infinite variance gives an infinite loss, not inf - inf = NaN."""
    x = torch.randn(4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.zeros(4)
    var = torch.tensor([float("nan"), 1e-9, 2.0, float("inf")], requires_grad=True)
    ours = fl.gaussian_nll_loss(x, y, var, reduction="none")
    theirs = F.gaussian_nll_loss(x, y, var, reduction="none")
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    finite = torch.isfinite(theirs)
    for g, h in zip(
        torch.autograd.grad(ours[finite].sum(), (x, var)), torch.autograd.grad(theirs[finite].sum(), (x, var))
    ):
        torch.testing.assert_close(g, h, equal_nan=True)


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan"), float("inf")])
def test_bce_refuses_a_target_outside_0_1_as_torch(bad: float) -> None:
    p = torch.full((3,), 0.5)
    y = torch.tensor([0.0, 1.0, bad])
    with pytest.raises(RuntimeError, match="target should be between 0 and 1"):
        F.binary_cross_entropy(p, y)
    with pytest.raises(RuntimeError, match="target should be between 0 and 1"):
        fl.binary_cross_entropy(p, y)


@pytest.mark.parametrize("score", [float("inf"), -float("inf")])
def test_multi_margin_infinite_target_score_as_torch(score: float) -> None:
    """The target's own difference is an exact 0 (not inf - inf): an infinite target score
    gives torch's value (every hinge 0 at +inf, infinite at -inf)."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 0, 3])
    x[0, 1] = score
    for p in (1, 2):
        torch.testing.assert_close(
            fl.multi_margin_loss(x, y, p=p, reduction="none"), F.multi_margin_loss(x, y, p=p, reduction="none")
        )


@pytest.mark.parametrize("name", ["mse_loss", "nll_loss"])
def test_complex_input_is_refused_as_torch(name: str) -> None:
    """torch's mse and nll kernels have no complex form; a composition would return a complex
    'loss' (d * d, not |d|^2) without complaint."""
    x = torch.randn(3, 4, dtype=torch.cfloat)
    y = torch.randn(3, 4, dtype=torch.cfloat) if name == "mse_loss" else torch.tensor([0, 3, 1])
    with pytest.raises(NotImplementedError):
        getattr(F, name)(x, y)
    with pytest.raises(NotImplementedError, match="complex"):
        getattr(fl, name)(x, y)


def test_complex_kl_div_and_soft_margin_as_torch() -> None:
    """kl_div refuses complex input with torch's RuntimeError; soft_margin_loss evaluates
    log(1 + exp(-y x)) on a complex input as torch's kernel does, and refuses a complex target
    against a real input (the result cannot be cast back)."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(3, 4, dtype=torch.cfloat, generator=gen)
    r = torch.randn(3, 4, generator=gen)
    for a, b in ((c, r), (r, c), (c, c)):
        with pytest.raises(RuntimeError, match=r"[Cc]omplex"):
            F.kl_div(a, b, reduction="sum")
        with pytest.raises(RuntimeError, match=r"[Cc]omplex"):
            fl.kl_div(a, b, reduction="sum")
    t = torch.randint(0, 2, (3, 4), generator=gen).float() * 2 - 1
    for reduction in ("none", "mean", "sum"):
        expected = F.soft_margin_loss(c, t, reduction=reduction)
        got = fl.soft_margin_loss(c, t, reduction=reduction)
        assert got.dtype == expected.dtype == torch.complex64
        torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError, match="can't be cast"):
        F.soft_margin_loss(r, t.to(torch.cfloat))
    with pytest.raises(RuntimeError, match="can't be cast"):
        fl.soft_margin_loss(r, t.to(torch.cfloat))


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("binary_cross_entropy", "weight"),
        ("binary_cross_entropy_with_logits", "weight"),
        ("binary_cross_entropy_with_logits", "pos_weight"),
    ],
)
def test_bce_weight_may_not_enlarge_the_output(name: str, key: str) -> None:
    """torch weighs in place: a weight that broadcasts to a larger shape than the input's is a
    RuntimeError, not a silently bigger loss."""
    gen = torch.Generator().manual_seed(0)
    p, y = torch.rand(4, 3, generator=gen) * 0.9 + 0.05, torch.rand(4, 3, generator=gen)
    big = {key: torch.rand(2, 4, 3, generator=gen)}
    with pytest.raises(RuntimeError, match="broadca"):
        getattr(F, name)(p, y, **big)
    with pytest.raises(RuntimeError, match="without enlarging it"):
        getattr(fl, name)(p, y, **big)
    for shape in ((3,), (4, 1), ()):
        fine = {key: torch.rand(shape, generator=gen)}
        torch.testing.assert_close(
            getattr(fl, name)(p, y, reduction="none", **fine), getattr(F, name)(p, y, reduction="none", **fine)
        )


def test_value_check_messages_are_formatted_only_to_raise() -> None:
    """A message function may read values (a length sum): on an accelerator that is a host
    synchronisation, so it runs only when the check fails."""
    calls: list[int] = []

    def message() -> str:
        calls.append(1)
        return "expected every value to hold"

    check_values(torch.tensor([True, True]), ValueError, message)
    check_values(lambda: torch.tensor([True]), ValueError, message)
    assert calls == []
    with pytest.raises(ValueError, match="expected every value to hold"):
        check_values(torch.tensor([True, False]), ValueError, message)
    assert calls == [1]
