"""Losses beyond torch.nn (focal, sigmoid focal, quantile) and the class-weight estimators.

No torch.nn loss of the same name exists, so each row's oracle is the loss written out from its
paper's definition with torch's own kernels where one applies (``F.cross_entropy``,
``F.binary_cross_entropy_with_logits``, ``torch.maximum``): a different computation from
funcloss's. The rows run through the same checks as the torch.nn rows: values and gradients
(hypothesis), every transform, no loss kernel inside, inputs untouched.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import funcloss as fl
from funcloss._bench.cases import Example, LossCase, Sampler
from funcloss._bench.transforms import TRANSFORMS, apply

from .harness import assert_close, value_and_grads
from .registry import DEVICES, Row
from .test_purity import FORBIDDEN, RecordFunctions, RecordOps
from .transforms import torch_reference

# --------------------------------------------------------------------------- oracles


def _mean_over(values: Tensor, count: Tensor) -> Tensor:
    """``sum / count``; with nothing counted (every target ignored) NaN with a zero gradient,
    torch's cross-entropy convention."""
    empty = count == 0
    return torch.where(empty, torch.nan, values.sum() / torch.where(empty, 1, count))


def focal_reference(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    gamma: float = 2.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Lin et al.'s focal loss from torch's unweighted per-position cross-entropy ``-log p_t``."""
    ce = F.cross_entropy(input, target, reduction="none", ignore_index=ignore_index)
    keep = target != ignore_index
    w = keep.to(input.dtype)
    if weight is not None:
        w = w * weight[torch.where(keep, target, 0)]
    p_t = torch.exp(-ce)
    values = w * (1 - p_t) ** gamma * ce
    if reduction == "mean":
        return _mean_over(values, w.sum())
    return values.sum() if reduction == "sum" else values


def sigmoid_focal_reference(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """torchvision's ``sigmoid_focal_loss`` as its documentation defines it."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def quantile_reference(input: Tensor, target: Tensor, quantile: Any, *, reduction: str = "mean") -> Tensor:
    d = target - input
    values = torch.maximum(quantile * d, (quantile - 1) * d)
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def robust_reference(
    input: Tensor, target: Tensor, *, alpha: float = 1.0, scale: Any = 1.0, reduction: str = "mean"
) -> Tensor:
    """Barron's loss in its named special cases, and the plain power form otherwise."""
    z2 = ((input - target) / scale) ** 2
    named: dict[float, Callable[[Tensor], Tensor]] = {
        2.0: lambda t: t / 2,
        1.0: lambda t: torch.sqrt(t + 1) - 1,  # pseudo-Huber / Charbonnier
        0.0: lambda t: torch.log(t / 2 + 1),  # Cauchy
        -2.0: lambda t: 2 * t / (t + 4),  # Geman-McClure
        -math.inf: lambda t: 1 - torch.exp(-t / 2),  # Welsch
        math.inf: lambda t: torch.exp(t / 2) - 1,
    }
    b = abs(alpha - 2)
    values = named[alpha](z2) if alpha in named else b / alpha * ((z2 / b + 1) ** (alpha / 2) - 1)
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def rwwce_reference(
    input: Tensor,
    target: Tensor,
    fn_weight: Tensor | None = None,
    fp_weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Ho and Wookey's loss with one-hot targets and cost matrices: ``-(Y diag(a)) . log P -
    (Y B) . log(1 - P)`` summed over classes, evaluated in float64 (literally, ``log(1 - P)``
    loses all of float32's digits as ``P`` nears 1) and returned in the input's dtype."""
    dtype, input = input.dtype, input.double()
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.size(class_dim)
    keep = target != ignore_index
    probs = torch.softmax(input.movedim(class_dim, -1), -1)
    onehot = F.one_hot(torch.where(keep, target, 0), classes).double() * keep.unsqueeze(-1)
    a = torch.ones(classes, dtype=input.dtype, device=input.device) if fn_weight is None else fn_weight.double()
    b = (
        torch.zeros(classes, classes, dtype=input.dtype, device=input.device)
        if fp_weight is None
        else fp_weight.double()
    )
    values = -(onehot * a * torch.log(probs) + (onehot @ b) * torch.log(1 - probs)).sum(-1)
    if reduction == "mean":
        return _mean_over(values, keep.sum()).to(dtype)
    return (values.sum() if reduction == "sum" else values).to(dtype)


# --------------------------------------------------------------------------- the rows


REDUCTIONS = ["mean", "sum", "none"]


def _make_focal(s: Sampler, o: Mapping[str, Any]) -> Example:
    shape = o["shape"]
    unbatched = len(shape) == 1
    classes = shape[0] if unbatched else shape[1]
    x = s.normal(shape, 2.0)
    target_shape = () if unbatched else (shape[0], *shape[2:])
    y = s.integers(target_shape, 0, classes)
    if o["ignore"] and y.numel():
        y = torch.where(s.uniform(target_shape) < 0.3, torch.full_like(y, -100), y)
    kw: dict[str, Any] = {"gamma": o["gamma"], "reduction": o["reduction"]}
    if o["weight"]:
        kw["weight"] = s.uniform((classes,), 0.2, 2.0)
    in_dims = (0, 0) if not unbatched and shape[0] > 0 else None
    return Example((x, y), kw, (0,), in_dims, {"weight": None})


def _make_rwwce(s: Sampler, o: Mapping[str, Any]) -> Example:
    ex = _make_focal(s, {**o, "gamma": 0.0, "weight": False})
    classes = ex.args[0].shape[0 if ex.args[0].dim() == 1 else 1]
    kw: dict[str, Any] = {"reduction": o["reduction"]}
    if o["costs"] in ("fn", "both"):
        kw["fn_weight"] = s.uniform((classes,), 0.0, 3.0)
    if o["costs"] in ("fp", "both"):
        off_diagonal = 1 - torch.eye(classes, dtype=s.dtype, device=s.device)
        kw["fp_weight"] = s.uniform((classes, classes), 0.0, 3.0) * off_diagonal
    return Example(ex.args, kw, ex.diff, ex.in_dims, {"fn_weight": None, "fp_weight": None})


def _make_sigmoid_focal(s: Sampler, o: Mapping[str, Any]) -> Example:
    shape = o["shape"]
    x = s.normal(shape, 2.0)
    y = s.uniform(shape) if o["soft"] else s.integers(shape, 0, 2).to(x.dtype)
    kw = {"alpha": o["alpha"], "gamma": o["gamma"], "reduction": o["reduction"]}
    in_dims = (0, 0) if len(shape) and shape[0] > 0 else None
    return Example((x, y), kw, (0, 1) if o["soft"] else (0,), in_dims)


def _make_quantile(s: Sampler, o: Mapping[str, Any]) -> Example:
    shape = o["shape"]
    x, y = s.normal(shape), s.normal(shape)
    q: float | Tensor = o["quantile"]
    if q == "per column":
        q = s.uniform(shape[-1:], 0.05, 0.95)
    in_dims = (0, 0) if len(shape) > 1 and shape[0] > 0 else None
    # The quantile tensor is a shared positional argument (None under vmap).
    return Example((x, y, q), {"reduction": o["reduction"]}, (0, 1), None if in_dims is None else (0, 0, None))


def _make_robust(s: Sampler, o: Mapping[str, Any]) -> Example:
    shape = o["shape"]
    x, y = s.normal(shape, 2.0), s.normal(shape)
    scale: float | Tensor = o["scale"]
    kw: dict[str, Any] = {"alpha": o["alpha"], "reduction": o["reduction"]}
    if scale == "per element":
        kw["scale"] = s.uniform(shape, 0.5, 2.0)
    else:
        kw["scale"] = scale
    in_dims = (0, 0) if len(shape) and shape[0] > 0 else None
    return Example((x, y), kw, (0, 1), in_dims, {"scale": 0})


CASES = {
    "focal_loss": LossCase(
        "focal_loss",
        fl.focal_loss,
        focal_reference,
        _make_focal,
        {
            "shape": [(5, 4), (3, 4, 2), (4,), (0, 3)],
            "gamma": [2.0, 0.0, 0.5, 1.0, 3.5],
            "weight": [False, True],
            "ignore": [False, True],
            "reduction": REDUCTIONS,
        },
    ),
    "real_world_weight_cross_entropy": LossCase(
        "real_world_weight_cross_entropy",
        fl.real_world_weight_cross_entropy,
        rwwce_reference,
        _make_rwwce,
        {
            "shape": [(5, 4), (3, 4, 2), (4,), (0, 3)],
            "costs": ["both", "fn", "fp", "none"],
            "ignore": [False, True],
            "reduction": REDUCTIONS,
        },
    ),
    "sigmoid_focal_loss": LossCase(
        "sigmoid_focal_loss",
        fl.sigmoid_focal_loss,
        sigmoid_focal_reference,
        _make_sigmoid_focal,
        {
            "shape": [(4, 3), (5,), (), (0, 2), (2, 3, 2)],
            "alpha": [0.25, -1.0, 0.0, 0.8],
            "gamma": [2.0, 0.0, 0.5, 1.0],
            "soft": [False, True],
            "reduction": ["none", "mean", "sum"],
        },
    ),
    "quantile_loss": LossCase(
        "quantile_loss",
        fl.quantile_loss,
        quantile_reference,
        _make_quantile,
        {
            "shape": [(4, 3), (5,), (2, 3, 2), (0, 3)],
            "quantile": [0.9, 0.5, 0.1, 0.0, 1.0, "per column"],
            "reduction": REDUCTIONS,
        },
    ),
    "robust_loss": LossCase(
        "robust_loss",
        fl.robust_loss,
        robust_reference,
        _make_robust,
        {
            "shape": [(4, 3), (5,), (), (0, 2), (2, 3, 2)],
            "alpha": [1.0, 2.0, 0.0, -2.0, -math.inf, math.inf, 0.5, -7.0, 3.0],
            "scale": [1.0, 0.3, "per element"],
            "reduction": REDUCTIONS,
        },
    ),
}
ROWS = [pytest.param(Row(case), id=name) for name, case in CASES.items()]


# --------------------------------------------------------------------------- generic checks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("row", ROWS)
def test_matches_definition(row: Row, dtype: torch.dtype, device: str) -> None:
    @given(options=row.options(), seed=st.integers(0, 2**16))
    def run(options: dict[str, Any], seed: int) -> None:
        ex = row.case.make(Sampler(seed, dtype, device), options)
        tol = row.tolerance(dtype)
        ours, our_grads = value_and_grads(row.case.ours, ex)
        theirs, their_grads = value_and_grads(row.case.theirs, ex)
        assert_close(ours, theirs, tol, f"{row.name} value {options}")
        for i, g, h in zip(ex.diff, our_grads, their_grads):
            assert_close(g, h, tol, f"{row.name} grad of arg {i} {options}")

    run()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("row", ROWS)
def test_transform(row: Row, transform: str, device: str) -> None:
    options = row.case.defaults()
    options["reduction"] = "none" if transform in ("jacfwd", "jacrev") else "mean"
    if row.name == "focal_loss":
        options["weight"] = True  # (an ignored target would make a per-example mean 0 / 0 under vmap)
    dtype = torch.float32 if transform.startswith("compile") else torch.float64
    ex = row.case.make(Sampler(11, dtype, device), options)
    if transform.startswith("compile"):
        torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")  # no vmap fallback
        ours = apply(transform, row.case.ours, ex)
    theirs = torch_reference(transform, row.case.theirs, ex, frozenset())
    rtol, atol = (1e-6, 1e-8) if dtype == torch.float64 else (1e-4, 1e-5)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, msg=lambda m: f"{row.name} under {transform}: {m}")


@pytest.mark.parametrize("row", ROWS)
def test_no_loss_kernel_runs_and_inputs_untouched(row: Row) -> None:
    ex = row.case.make(Sampler(3), row.case.defaults())
    before = [a.clone() if isinstance(a, Tensor) else a for a in ex.args]
    args = [a.clone().requires_grad_() if i in ex.diff else a for i, a in enumerate(ex.args)]
    with RecordFunctions() as functions, RecordOps() as kernels:
        out = row.case.ours(*args, **ex.kwargs)
        torch.autograd.grad(out.sum(), [args[i] for i in ex.diff])
    ops = functions.ops | kernels.ops
    assert ops, "the recorder saw nothing"
    assert not {op for op in ops if FORBIDDEN.search(op)}, f"{row.name} ran a torch loss kernel"
    for a, b in zip(ex.args, before):
        if isinstance(a, Tensor):
            assert torch.equal(a, b), f"{row.name} modified an input"


@pytest.mark.parametrize("row", ROWS)
def test_meta_tensors_give_the_definitions_shape(row: Row) -> None:
    """On the meta device (shape inference, no data) the loss runs forward and backward, with
    the shape and dtype its definition gives on the CPU."""
    ex = row.case.make(Sampler(0, torch.float32, "cpu"), row.case.defaults())
    args = [a.to("meta").requires_grad_(i in ex.diff) if isinstance(a, Tensor) else a for i, a in enumerate(ex.args)]
    kwargs = {k: v.to("meta") if isinstance(v, Tensor) else v for k, v in ex.kwargs.items()}
    expected = row.case.theirs(*ex.args, **ex.kwargs)
    out = row.case.ours(*args, **kwargs)
    assert (out.device.type, out.shape, out.dtype) == ("meta", expected.shape, expected.dtype)
    inputs = [args[i] for i in ex.diff]
    for a, g in zip(inputs, torch.autograd.grad(out.sum(), inputs, allow_unused=True)):
        assert g is None or (g.device.type == "meta" and g.shape == a.shape)


# --------------------------------------------------------------------------- focal loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4), (5,)])
def test_focal_with_gamma_zero_is_torch_cross_entropy(shape: tuple[int, ...], reduction: str) -> None:
    s = Sampler(1)
    x = s.normal(shape).requires_grad_()
    y = s.integers(() if len(shape) == 1 else (shape[0], *shape[2:]), 0, 5)
    if y.dim():
        y[0] = 3  # a weighted, ignored class appears at least once
    w = s.uniform((5,), 0.1, 2.0)
    ours = fl.focal_loss(x, y, w, gamma=0.0, ignore_index=3, reduction=reduction)  # type: ignore[arg-type]
    theirs = F.cross_entropy(x, y, w, ignore_index=3, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(v.sum(), x)[0] for v in (ours, theirs)))


def test_focal_down_weights_confident_examples() -> None:
    """The point of the loss: well-classified examples lose most of their weight, hard ones
    keep theirs, so the hard one's share of the total grows with gamma."""
    x = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.2, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    shares = []
    for gamma in (0.0, 1.0, 2.0, 5.0):
        values = fl.focal_loss(x, y, gamma=gamma, reduction="none")
        shares.append(float(values[1] / values.sum()))
    assert shares == sorted(shares) and shares[-1] > 0.99


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
def test_focal_certain_prediction_has_zero_gradient_not_nan(gamma: float) -> None:
    x = torch.tensor([[120.0, 0.0, -3.0], [0.5, 0.0, 0.0]], requires_grad=True)  # p = 1 exactly in float32
    y = torch.tensor([0, 1])
    loss = fl.focal_loss(x, y, gamma=gamma, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert loss[0] == 0 and torch.all(grad[0] == 0)
    assert torch.isfinite(grad).all() and grad[1].abs().sum() > 0
    h = tf.hessian(lambda z: fl.focal_loss(z, y[0], gamma=gamma))(x[0].detach())
    assert torch.isfinite(h).all()
    one_class = torch.randn(4, 1, requires_grad=True)  # p = 1 whatever the logit
    values = fl.focal_loss(one_class, torch.zeros(4, dtype=torch.long), gamma=gamma, reduction="none")
    assert torch.all(values == 0) and torch.all(torch.autograd.grad(values.sum(), one_class)[0] == 0)


def test_focal_refuses_bad_input_as_cross_entropy_does() -> None:
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="gamma >= 0"):
        fl.focal_loss(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma >= 0"):
        fl.focal_loss(x, y, gamma=math.nan)
    with pytest.raises(IndexError):
        fl.focal_loss(x, torch.tensor([0, 4, 1]))
    with pytest.raises(IndexError):
        F.cross_entropy(x, torch.tensor([0, 4, 1]))  # the same class of error as torch's
    with pytest.raises(ValueError, match="reduction"):
        fl.focal_loss(x, y, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="weight"):
        fl.focal_loss(x, y, torch.ones(3))
    with pytest.raises(ValueError, match="batch_size"):
        fl.focal_loss(x, y[:2])


def test_focal_all_ignored_mean_is_nan_like_cross_entropy() -> None:
    x, y = torch.randn(2, 3, requires_grad=True), torch.full((2,), -100)
    ours = fl.focal_loss(x, y)
    assert torch.isnan(ours) and torch.isnan(F.cross_entropy(x, y))
    assert torch.all(torch.autograd.grad(ours, x)[0] == 0)


# --------------------------------------------------------------------------- real-world-weight CE


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_rwwce_reduces_to_torch_cross_entropy(reduction: str) -> None:
    """Unit false-negative costs and no false-positive cost: cross_entropy; false-negative costs
    alone: torch's class-weighted sum, averaged over the kept targets (not over their weights)."""
    s = Sampler(9)
    x = s.normal((7, 5, 2)).requires_grad_()
    y = s.integers((7, 2), 0, 5)
    y[0, 0] = -100
    ours = fl.real_world_weight_cross_entropy(x, y, reduction=reduction)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, F.cross_entropy(x, y, reduction=reduction))
    a = s.uniform((5,), 0.5, 3.0)
    costed = fl.real_world_weight_cross_entropy(x, y, a, reduction=reduction)  # type: ignore[arg-type]
    theirs = F.cross_entropy(x, y, a, reduction="none" if reduction == "none" else "sum")
    theirs = theirs / (y != -100).sum() if reduction == "mean" else theirs
    torch.testing.assert_close(costed, theirs)


def test_rwwce_false_positive_cost_pushes_that_wrong_class_down() -> None:
    x = torch.zeros(1, 4, dtype=torch.float64)
    y = torch.tensor([0])
    costs = torch.zeros(4, 4, dtype=torch.float64)
    costs[0, 2] = 5.0  # calling a 0 a 2 is expensive
    plain = tf.grad(fl.real_world_weight_cross_entropy)(x, y)
    costed = tf.grad(lambda z: fl.real_world_weight_cross_entropy(z, y, fp_weight=costs))(x)
    assert costed[0, 2] > plain[0, 2] and costed[0, 1] < plain[0, 1]  # class 2 pushed down hardest
    # The term is -5 log(1 - p_2), accurate where p_2 is within 1e-8 of 1 (in float32 p_2 rounds
    # to 1 and log(1 - p_2) would be -inf).
    confident_wrong = torch.tensor([[-20.0, 0.0, 20.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(confident_wrong, 1)[0]
    expected = -torch.log(p[0]) - 5 * torch.log(p[0] + p[1] + p[3])  # the others' mass, summed
    value = fl.real_world_weight_cross_entropy(confident_wrong, y, fp_weight=costs)
    torch.testing.assert_close(value, expected, rtol=1e-13, atol=0)
    single = confident_wrong.float().requires_grad_()
    value32 = fl.real_world_weight_cross_entropy(single, y, fp_weight=costs.float())
    torch.testing.assert_close(value32, expected.float(), rtol=1e-6, atol=0)
    (grad32,) = torch.autograd.grad(value32, single)
    torch.testing.assert_close(
        grad32, tf.grad(fl.real_world_weight_cross_entropy)(confident_wrong, y, None, costs).float()
    )
    # Certain and wrong beyond what the dtype resolves: a large finite loss, finite gradients.
    hopeless = torch.tensor([[-500.0, 0.0, 500.0, 0.0]], requires_grad=True)
    value = fl.real_world_weight_cross_entropy(hopeless, y, fp_weight=costs.float())
    assert torch.isfinite(value) and torch.isfinite(torch.autograd.grad(value, hopeless)[0]).all()


def test_rwwce_refuses_bad_costs() -> None:
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="zero diagonal"):
        fl.real_world_weight_cross_entropy(x, y, fp_weight=torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"fp_weight of shape \(4, 4\)"):
        fl.real_world_weight_cross_entropy(x, y, fp_weight=torch.zeros(4))
    with pytest.raises(ValueError, match=r"fn_weight >= 0"):
        fl.real_world_weight_cross_entropy(x, y, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(IndexError):
        fl.real_world_weight_cross_entropy(x, torch.tensor([0, 9, 1]))


# --------------------------------------------------------------------------- sigmoid focal loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_without_focus_or_alpha_is_torch_bce(reduction: str) -> None:
    s = Sampler(2)
    x, y = s.normal((4, 3)).requires_grad_(), s.uniform((4, 3))
    ours = fl.sigmoid_focal_loss(x, y, alpha=-1.0, gamma=0.0, reduction=reduction)  # type: ignore[arg-type]
    theirs = F.binary_cross_entropy_with_logits(x, y, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(v.sum(), x)[0] for v in (ours, theirs)))


def test_sigmoid_focal_defaults_are_torchvisions() -> None:
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]).double()
    out = fl.sigmoid_focal_loss(x, y)
    assert out.shape == (3, 2)  # reduction "none"
    torch.testing.assert_close(out, sigmoid_focal_reference(x, y, 0.25, 2.0))
    with pytest.raises(ValueError, match="reduction"):
        fl.sigmoid_focal_loss(x, y, reduction="batchmean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gamma"):
        fl.sigmoid_focal_loss(x, y, gamma=-0.5)


# --------------------------------------------------------------------------- quantile loss


def test_quantile_at_one_half_is_half_torch_l1_with_its_gradient_at_ties() -> None:
    x = torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 2.0, -2.0, 1.0], dtype=torch.float64)  # two ties
    ours = fl.quantile_loss(x, y, 0.5, reduction="sum")
    theirs = 0.5 * F.l1_loss(x, y, reduction="sum")
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(v, x)[0] for v in (ours, theirs)))


def test_quantile_is_minimised_at_the_empirical_quantile() -> None:
    """The defining property: over constant predictions c, the mean pinball loss is smallest
    at the q-quantile of the targets (checked on a grid against numpy's quantile)."""
    targets = Sampler(4).normal((201,))
    grid = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    for q in (0.1, 0.5, 0.8):
        risk = torch.stack([fl.quantile_loss(c.expand(201), targets, q) for c in grid])
        best = float(grid[risk.argmin()])
        assert best == pytest.approx(float(np.quantile(targets.numpy(), q, method="inverted_cdf")), abs=2e-3)


def test_quantile_refuses_quantiles_outside_zero_one() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"quantile in \[0, 1\]"):
        fl.quantile_loss(x, x, 1.5)
    with pytest.raises(ValueError, match=r"every quantile in \[0, 1\]"):
        fl.quantile_loss(x, x, torch.tensor([0.5, -0.1, 0.2]))
    with pytest.raises(ValueError, match="reduction"):
        fl.quantile_loss(x, x, 0.5, reduction="max")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- robust loss


@pytest.mark.parametrize("alpha", [2.0, 1.0, 0.0, -2.0, -math.inf, math.inf, 0.5, -7.0])
def test_robust_loss_has_unit_curvature_at_zero_for_every_shape(alpha: float) -> None:
    """Barron's normalisation: each member is z^2 / (2 c^2) to second order."""
    c = 0.7
    h = tf.hessian(lambda d: fl.robust_loss(d, torch.zeros(()), alpha=alpha, scale=c))(
        torch.zeros((), dtype=torch.float64)
    )
    torch.testing.assert_close(h, torch.tensor(1 / c**2, dtype=torch.float64))


@pytest.mark.parametrize("limit", [2.0, 0.0])
def test_robust_loss_is_continuous_in_alpha_at_its_limits(limit: float) -> None:
    r = torch.linspace(-6, 6, 25, dtype=torch.float64)
    at = fl.robust_loss(r, torch.zeros_like(r), alpha=limit, reduction="none")
    for near in (limit - 1e-7, limit + 1e-7):
        torch.testing.assert_close(
            fl.robust_loss(r, torch.zeros_like(r), alpha=near, reduction="none"), at, rtol=1e-5, atol=1e-9
        )


def test_robust_loss_at_two_is_half_torch_mse_and_lower_alpha_pulls_less() -> None:
    x, y = Sampler(6).normal((5, 3)), Sampler(7).normal((5, 3))
    torch.testing.assert_close(fl.robust_loss(x, y, alpha=2.0, scale=0.5), 0.5 * F.mse_loss(x / 0.5, y / 0.5))
    far = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    pulls = [torch.autograd.grad(fl.robust_loss(far, torch.zeros(()), alpha=a), far)[0] for a in (2.0, 1.0, 0.0, -2.0)]
    assert all(a > b for a, b in itertools.pairwise(pulls)), pulls


def test_robust_loss_compiled_with_dynamic_floats_follows_each_alpha_and_scale() -> None:
    """Compiled once with dynamic=True (floats become symbols), later alphas and scales must not
    reuse the first call's values."""
    torch._dynamo.reset()
    compiled = torch.compile(fl.robust_loss, fullgraph=True, dynamic=True)
    x, y = Sampler(8, torch.float32).normal((6, 2), 3.0), torch.zeros(6, 2)
    for alpha, scale in [(1.0, 1.0), (0.5, 2.0), (-3.0, 0.4), (2.0, 1.5), (0.0, 0.7), (4.0, 1.0)]:
        torch.testing.assert_close(
            compiled(x, y, alpha=alpha, scale=scale),
            fl.robust_loss(x, y, alpha=alpha, scale=scale),
            rtol=1e-5,
            atol=1e-6,
        )


def test_robust_loss_refuses_bad_options() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="scale > 0"):
        fl.robust_loss(x, x, scale=0.0)
    with pytest.raises(ValueError, match="every scale > 0"):
        fl.robust_loss(x, x, scale=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="alpha"):
        fl.robust_loss(x, x, alpha=math.nan)


# --------------------------------------------------------------------------- class weights


def _weights_by_definition(labels: list[int], classes: int, method: str, beta: float) -> list[float]:
    counts = [labels.count(c) for c in range(classes)]
    n = len(labels)
    if method == "balanced":
        raw = [1 / k for k in counts]
    elif method == "inverse_sqrt":
        raw = [k**-0.5 for k in counts]
    else:
        raw = [(1 - beta) / (1 - beta**k) for k in counts]
    scale = n / sum(k * r for k, r in zip(counts, raw))
    return [r * scale for r in raw]


@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    method=st.sampled_from(["balanced", "inverse_sqrt", "effective_number"]),
    beta=st.sampled_from([0.0, 0.5, 0.9, 0.999, 0.99999]),
)
def test_class_weights_match_their_definition(labels: list[int], method: fl.ClassWeightMethod, beta: float) -> None:
    classes = max(labels) + 1
    if len(set(labels)) < classes:
        labels = labels + [c for c in range(classes) if c not in labels]
    padded = torch.tensor([*labels, -100, -100])  # ignored targets are not counted
    ours = fl.class_weights(padded, method=method, beta=beta, dtype=torch.float64)
    expected = _weights_by_definition(labels, classes, method, beta)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9)


def test_balanced_weights_give_every_class_the_same_total_weight() -> None:
    y = torch.tensor([0] * 50 + [1] * 7 + [2] * 3)
    w = fl.class_weights(y, method="balanced", dtype=torch.float64)
    totals = torch.zeros(3, dtype=torch.float64).index_add_(0, y, w[y])
    torch.testing.assert_close(totals, torch.full((3,), 20.0, dtype=torch.float64))
    # Used as cross_entropy's weight: the weighted mean over the batch is the mean over classes
    # of each class's mean loss.
    x = Sampler(5).normal((60, 3))
    per_class = torch.stack([F.cross_entropy(x[y == c], y[y == c]) for c in range(3)])
    torch.testing.assert_close(fl.cross_entropy(x, y, w), per_class.mean())


def test_effective_number_spans_no_reweighting_to_balanced() -> None:
    y = torch.tensor([0] * 90 + [1] * 10)
    none = fl.class_weights(y, method="effective_number", beta=0.0)
    torch.testing.assert_close(none, torch.ones(2))
    close = fl.class_weights(y, method="effective_number", beta=1 - 1e-9, dtype=torch.float64)
    torch.testing.assert_close(close, fl.class_weights(y, method="balanced", dtype=torch.float64), rtol=1e-6, atol=0)


def test_class_weights_refuse_what_they_cannot_weigh() -> None:
    with pytest.raises(ValueError, match=r"missing \(2 of 4\): 1, 3"):
        fl.class_weights(torch.tensor([0, 2, 2]), num_classes=4)
    with pytest.raises(ValueError, match=r"targets in \[0, 1\]"):
        fl.class_weights(torch.tensor([0, 1, 2]), num_classes=2)
    with pytest.raises(ValueError, match="integer class indices"):
        fl.class_weights(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="method"):
        fl.class_weights(torch.tensor([0, 1]), method="inverse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        fl.class_weights(torch.tensor([0, 1]), method="effective_number", beta=1.0)
    with pytest.raises(ValueError, match="pass num_classes"):
        fl.class_weights(torch.full((3,), -100))
    with pytest.raises(RuntimeError, match="outside transforms"):
        tf.vmap(lambda t: fl.class_weights(t, num_classes=3))(torch.tensor([[0, 1, 2]]))


def test_class_weights_keep_the_targets_device_and_take_a_dtype() -> None:
    w = fl.class_weights(torch.tensor([0, 1, 1], dtype=torch.uint8), dtype=torch.float16)
    assert w.dtype == torch.float16 and w.device == torch.device("cpu") and w.shape == (2,)


def test_positive_weights_balance_each_class_as_torch_documents() -> None:
    # torch's pos_weight example: 100 positives and 300 negatives of one class give 3.
    y = torch.zeros(400, 2)
    y[:100, 0] = 1
    y[:200, 1] = 1
    torch.testing.assert_close(fl.positive_weights(y), torch.tensor([3.0, 1.0]))
    # Weighted so, each class's positives weigh as much as its negatives in the loss's sum.
    s = Sampler(12)
    labels = (s.uniform((50, 4, 3)) < torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)).to(torch.float64)
    w = fl.positive_weights(labels, dtype=torch.float64)
    flat = labels.reshape(-1, 3)
    torch.testing.assert_close((flat * w).sum(0), (1 - flat).sum(0))
    assert fl.positive_weights(labels.bool()).dtype == torch.float32


def test_positive_weights_refuse_what_they_cannot_weigh() -> None:
    with pytest.raises(ValueError, match=r"missing \(1 of 2\): 1"):
        fl.positive_weights(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fl.positive_weights(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="floating point or bool"):
        fl.positive_weights(torch.tensor([[1, 0]]))
    with pytest.raises(RuntimeError, match="outside transforms"):
        tf.vmap(fl.positive_weights)(torch.ones(2, 3, 2))
