"""Under torch.autocast, funcloss's losses follow torch's: the result's dtype, value and
gradients, for every registry row; torch's float32 losses stay float32; binary_cross_entropy
is refused under CUDA autocast as torch refuses it."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import funcloss as fl
from funcloss._bench.cases import Example, Sampler

from .harness import assert_close, value_and_grads
from .registry import DEVICES, Row, Tolerance, rows

LOW = [torch.bfloat16, torch.float16]


def _half_outputs(ex: Example, dtype: torch.dtype) -> Example:
    """The example as an autocast region hands it over: the positional tensors (a model's
    outputs) in ``dtype``; keyword tensors (class weights and the like, parameters) stay
    float32."""
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in ex.args)
    return dataclasses.replace(ex, args=args)


def _under_autocast(row: Row, ex: Example, device: str, dtype: torch.dtype, ours: bool) -> Any:
    fn = row.case.ours if ours else row.case.theirs
    with torch.autocast(device, dtype=dtype):
        return value_and_grads(fn, ex)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("row", rows())
def test_autocast_matches_torch(row: Row, dtype: torch.dtype, device: str) -> None:
    defaults = row.case.defaults()
    for reduction in ("none", "mean") if "reduction" in defaults else (None,):
        options = defaults if reduction is None else {**defaults, "reduction": reduction}
        ex = _half_outputs(row.case.make(Sampler(1, torch.float32, device), options), dtype)
        try:
            theirs, their_grads = _under_autocast(row, ex, device, dtype, ours=False)
        except RuntimeError as e:
            if "autocast" not in str(e):
                raise
            # torch refuses some losses under some devices' autocast: funcloss refuses them too.
            with pytest.raises(RuntimeError, match="autocast"):
                _under_autocast(row, ex, device, dtype, ours=True)
            continue
        ours, our_grads = _under_autocast(row, ex, device, dtype, ours=True)
        # Where torch computes in float32, both sides read the same half-precision inputs and
        # agree to float32 accuracy; where it follows its primitives, to the half dtype's.
        tol = row.tolerance(torch.float32) if theirs.dtype == torch.float32 else row.tolerance(dtype)
        tol = Tolerance(tol.rtol * 20, tol.atol * 20)  # float32 sums of half values, in another order
        assert_close(ours, theirs, tol, f"{row.name} value under autocast {options}")
        for i, (g, h) in zip(ex.diff, zip(our_grads, their_grads)):
            assert_close(g, h, row.tolerance(dtype), f"{row.name} grad of arg {i} under autocast {options}")


def test_autocast_keeps_a_large_mean_in_float32() -> None:
    """The point of the policy: a mean over many bfloat16 values, summed in float32, against
    the same values' float64 mean (bfloat16 arithmetic keeps about three digits)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=gen).bfloat16()
    y = torch.randn(1 << 16, generator=gen).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fl.mse_loss(x, y)
    exact = ((x.double() - y.double()) ** 2).mean()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=0)


def test_autocast_under_vmap_and_grad() -> None:
    """The policy composes with torch.func: per-example losses and gradients under autocast are
    float32 losses and half-precision gradients (the inputs' dtype), equal to an eager loop."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen).bfloat16()
    t = torch.randint(0, 5, (6,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = tf.vmap(fl.cross_entropy)(x, t)
        grads = tf.vmap(tf.grad(fl.cross_entropy))(x, t)
        loop = torch.stack([F.cross_entropy(x[i], t[i]) for i in range(6)])
        loop_grads = torch.stack([tf.grad(F.cross_entropy)(x[i], t[i]) for i in range(6)])
    assert losses.dtype == torch.float32 and grads.dtype == torch.bfloat16
    torch.testing.assert_close(losses, loop)
    torch.testing.assert_close(grads, loop_grads)


def test_outside_autocast_nothing_changes() -> None:
    """Half-precision inputs outside an autocast region (or in a disabled one) keep their
    dtype, as torch's losses do."""
    x = torch.rand(8, dtype=torch.bfloat16)
    y = torch.rand(8, dtype=torch.bfloat16)
    assert fl.mse_loss(x, y).dtype == F.mse_loss(x, y).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert fl.binary_cross_entropy(x, y).dtype == torch.bfloat16


def test_warnings_point_at_the_caller() -> None:
    """The autocast wrapper adds a frame: torch-style warnings still name the caller's line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fl.mse_loss(torch.zeros(3, 2), torch.zeros(2))
        fl.kl_div(torch.zeros(3), torch.ones(3) / 3)
    assert len(caught) == 2
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]


def test_autocast_inside_compile() -> None:
    """An autocast region inside a compiled function (fullgraph): the policy traces."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=gen).bfloat16()
    y = torch.randn(8, 5, generator=gen).bfloat16()
    t = torch.randint(0, 5, (8,), generator=gen)

    @torch.compile(fullgraph=True)
    def ours(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fl.cross_entropy(x, t), fl.mse_loss(x, y)

    ce, mse = ours(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(x, t), F.mse_loss(x, y)
    assert ce.dtype == mse.dtype == torch.float32
    torch.testing.assert_close((ce, mse), expected)


class _LargestOutput(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The most elements any aten op's tensor output held."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _linear_ce_under_autocast(
    fn: Any, tensors: list[torch.Tensor], target: torch.Tensor, device: str, dtype: torch.dtype, **kwargs: Any
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    x, w, b = (t.detach().clone().requires_grad_(True) for t in tensors)
    with torch.autocast(device, dtype=dtype):
        out = fn(x, w, target, linear_bias=b, **kwargs)
        grads = torch.autograd.grad(out.sum(), (x, w, b))
    return out, list(grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1}, {"reduction": "none"}, {"reduction": "sum"}], ids=repr
)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_linear_cross_entropy_stays_chunked_under_autocast(
    dtype: torch.dtype, options: dict[str, Any], input_dtype: torch.dtype, device: str
) -> None:
    """Mixed precision is where large vocabularies are trained: under autocast the loss is
    still computed chunk by chunk (no op ever outputs N x C elements), with torch's policy for
    the composition: logits in the autocast dtype, a float32 loss, gradients in the inputs'
    dtypes."""
    gen = torch.Generator().manual_seed(0)
    n, classes, hidden = 37, 50, 16
    x = torch.randn(n, hidden, generator=gen).to(device, input_dtype)
    w = torch.randn(classes, hidden, generator=gen).to(device)
    b = torch.randn(classes, generator=gen).to(device)
    y = torch.randint(0, classes, (n,), generator=gen).to(device)
    y[3] = -100
    kwargs = {**options, "weight": torch.rand(classes, generator=gen).to(device)}

    def composition(x: Any, w: Any, y: Any, *, linear_bias: Any, **kw: Any) -> torch.Tensor:
        return F.cross_entropy(F.linear(x, w, linear_bias), y, **kw)

    theirs, their_grads = _linear_ce_under_autocast(composition, [x, w, b], y, device, dtype, **kwargs)
    with _LargestOutput() as seen:
        ours, our_grads = _linear_ce_under_autocast(
            fl.linear_cross_entropy, [x, w, b], y, device, dtype, chunk_size=5, **kwargs
        )
    assert seen.numel < n * classes, f"an op output {seen.numel} elements: the (N, C) logits were formed"
    assert ours.dtype == theirs.dtype == torch.float32
    # The same half-precision logits: the loss agrees to float32 accuracy. The weight and bias
    # gradients are sums over rows of half-precision products, which torch rounds once and
    # funcloss once per chunk: they agree to the half dtype's precision.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    half = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for g, h in zip(our_grads, their_grads):
        assert g is not None and h is not None and g.dtype == h.dtype
        torch.testing.assert_close(g, h, rtol=half, atol=half)


def test_linear_cross_entropy_differentiates_a_class_weight() -> None:
    """A class weight that requires grad (torch refuses one) gets the composition's gradient,
    not a silent None or a partial one from the chunked path."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 6, (9,), generator=gen)
    cw = torch.rand(6, generator=gen, dtype=torch.float64, requires_grad=True)
    for kwargs in ({}, {"label_smoothing": 0.2}, {"reduction": "none", "label_smoothing": 0.2}):
        ours = fl.linear_cross_entropy(x, w, y, weight=cw, chunk_size=2, **kwargs)
        theirs = fl.cross_entropy(x @ w.T, y, cw, **kwargs)
        (g,) = torch.autograd.grad(ours.sum(), cw)
        (h,) = torch.autograd.grad(theirs.sum(), cw)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(g, h)
