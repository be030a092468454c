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
from funcloss import Reduction
from funcloss._bench.cases import ADAPTIVE_CUTOFFS, Example, Sampler

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


def _adaptive_against_log_prob(row: Row, ex: Example, device: str, dtype: torch.dtype) -> None:
    """torch's AdaptiveLogSoftmaxWithLoss fails under CUDA autocast: it copies its float32
    log-probabilities (autocast runs log_softmax in float32) into a buffer of the input's dtype
    with ``index_copy_``, which refuses the mix. funcloss returns the float32 loss. The module's
    ``log_prob`` does run there (it assigns into such a buffer, rounding to the input's dtype):
    the oracle is the mean negative log-probability of the targets from it, to that dtype's
    precision."""
    names = ["head.weight", "tail.0.0.weight", "tail.0.1.weight", "tail.1.0.weight", "tail.1.1.weight"]
    x = ex.args[0]
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(x.size(-1), 10, list(ADAPTIVE_CUTOFFS), div_value=2.0)
    module = module.to(device=x.device, dtype=x.dtype)

    class LogProb(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner.log_prob(x)
            return out

    wrapper = LogProb()

    def theirs(x: torch.Tensor, y: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 2
        params = {f"inner.{name}": w for name, w in zip(names, weights)}
        logp: torch.Tensor = torch.func.functional_call(wrapper, params, (x if batched else x[None],))
        return -logp.gather(1, (y if batched else y[None])[:, None]).mean()

    with torch.autocast(device, dtype=dtype):
        their_value, their_grads = value_and_grads(theirs, ex)
        ours, our_grads = value_and_grads(row.case.ours, ex)
    assert their_value.dtype == dtype
    assert ours.dtype == torch.float32 or device != "cuda", "torch's per-op policy: float32 log-probabilities"
    tol = row.tolerance(dtype)
    assert_close(ours, their_value.to(ours.dtype), tol, "adaptive_log_softmax_with_loss value under CUDA autocast")
    for i, (g, h) in zip(ex.diff, zip(our_grads, their_grads)):
        assert_close(g, h, tol, f"adaptive_log_softmax_with_loss grad of arg {i} under CUDA autocast")


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
            if row.name == "adaptive_log_softmax_with_loss" and "index_copy_" in str(e):
                _adaptive_against_log_prob(row, ex, device, dtype)
                continue
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


def _torch_ce_under_cuda_autocast(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, reduction: str, smoothing: float
) -> torch.Tensor:
    """torch's cross_entropy of half-precision logits under CUDA autocast, step by step: it
    passes the logits' dtype to log_softmax (whose CUDA kernel computes in float and rounds
    once to that dtype), runs nll_loss in float32, and forms the smoothing term from the same
    log-probabilities."""
    classes = logits.size(1)
    logp = F.log_softmax(logits.float(), 1).to(logits.dtype).float()
    loss = F.nll_loss(logp, y, weight, reduction=reduction)
    if not smoothing:
        return loss
    keep = y != -100
    w = torch.ones(classes) if weight is None else weight
    smooth = -(logp * w).sum(1) * keep
    smooth_reduced = {"mean": smooth.sum() / w[y.clamp(min=0)][keep].sum(), "sum": smooth.sum(), "none": smooth}
    return (1 - smoothing) * loss + smooth_reduced[reduction] * (smoothing / classes)


CUDA_AUTOCAST_OPTIONS = [
    {},
    {"reduction": "none"},
    {"reduction": "sum", "weight": True},
    {"ignore": True},
    {"label_smoothing": 0.2},
    {"label_smoothing": 0.2, "weight": True, "reduction": "none"},
]


def _class_options(
    options: dict[str, Any], n: int, classes: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, Reduction, float]:
    """Targets (one ignored with ``ignore``), class weights, reduction and smoothing."""
    y = torch.randint(0, classes, (n,), generator=gen)
    if options.get("ignore"):
        y[2] = -100
    weight = torch.rand(classes, generator=gen) if options.get("weight") else None
    return y, weight, options.get("reduction", "mean"), options.get("label_smoothing", 0.0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("options", CUDA_AUTOCAST_OPTIONS, ids=repr)
def test_cross_entropy_rounds_log_probs_as_torch_under_cuda_autocast(
    options: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under CUDA autocast torch's cross_entropy rounds the log-probabilities of a half input
    to its dtype before a float32 loss; funcloss's CUDA branch does the same
    (`test_autocast_matches_torch` checks it against torch on CUDA). Here the branch runs on
    this device against torch's steps."""
    from funcloss.losses import _classification

    monkeypatch.setattr(_classification, "autocast_device", lambda args, kwargs: "cuda")
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(11, 7, generator=gen)).to(dtype).requires_grad_()
    y, weight, reduction, smoothing = _class_options(options, 11, 7, gen)
    ours = fl.cross_entropy(x, y, weight, reduction=reduction, label_smoothing=smoothing)
    theirs = _torch_ce_under_cuda_autocast(x, y, weight, reduction, smoothing)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(ours.sum(), x)
    (h,) = torch.autograd.grad(theirs.sum(), x)
    assert g.dtype == h.dtype == dtype
    torch.testing.assert_close(g, h)


@pytest.mark.parametrize("options", CUDA_AUTOCAST_OPTIONS, ids=repr)
def test_linear_cross_entropy_rounds_log_probs_as_torch_under_cuda_autocast(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunked linear cross-entropy under CUDA autocast (float16, autocast's default
    there) rounds each chunk's log-probabilities as the composition's cross_entropy does."""
    from funcloss.losses import _classification

    monkeypatch.setattr(_classification, "autocast_device", lambda args, kwargs: "cuda")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=gen).requires_grad_()
    w = torch.randn(50, 16, generator=gen).requires_grad_()
    b = torch.randn(50, generator=gen).requires_grad_()
    y, weight, reduction, smoothing = _class_options(options, 37, 50, gen)
    kwargs: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing, "weight": weight}
    with _LargestOutput() as seen:
        ours = fl.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=5, **kwargs)
    assert seen.numel < 37 * 50, "the (N, C) logits were formed: the chunked path did not run"
    logits = F.linear(x.half(), w.half(), b.half())  # as CUDA autocast's float16 linear
    theirs = _torch_ce_under_cuda_autocast(logits, y, weight, reduction, smoothing)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for g, h in zip(torch.autograd.grad(ours.sum(), (x, w, b)), torch.autograd.grad(theirs.sum(), (x, w, b))):
        assert g.dtype == h.dtype == torch.float32
        torch.testing.assert_close(g, h, rtol=2e-3, atol=2e-3)


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


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_inside_compile(device: str) -> None:
    """An autocast region inside a compiled function (fullgraph): the policy traces. The
    oracle is torch's losses compiled the same way: Inductor keeps a fused kernel's
    intermediates in float32, so on CUDA its compiled cross_entropy (torch's and funcloss's
    alike, measured) does not round the log-probabilities as the eager kernels do; against
    the eager ones the results agree to the half dtype's precision."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=gen).bfloat16().to(device)
    y = torch.randn(8, 5, generator=gen).bfloat16().to(device)
    t = torch.randint(0, 5, (8,), generator=gen).to(device)
    w = torch.randn(5, 5, generator=gen).to(device)

    def ours(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(device, dtype=torch.bfloat16):
            return fl.cross_entropy(x, t), fl.mse_loss(x, y), fl.linear_cross_entropy(x, w, t)

    def theirs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(device, dtype=torch.bfloat16):
            return F.cross_entropy(x, t), F.mse_loss(x, y), F.cross_entropy(F.linear(x, w), t)

    torch._dynamo.reset()
    results = torch.compile(ours, fullgraph=True)(x, t, y, w)
    torch._dynamo.reset()
    expected = torch.compile(theirs, fullgraph=True)(x, t, y, w)
    assert all(r.dtype == e.dtype == torch.float32 for r, e in zip(results, expected))
    torch.testing.assert_close(results, expected)
    torch.testing.assert_close(results, theirs(x, t, y, w), rtol=1e-2, atol=1e-2)


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
    # funcloss once per chunk: they agree to the half dtype's precision (the coarser of the
    # autocast dtype and the gradient's own: a bfloat16 input's gradient under float16 autocast).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    precision = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
    for g, h in zip(our_grads, their_grads):
        assert g is not None and h is not None and g.dtype == h.dtype
        half = max(precision[dtype], precision.get(g.dtype, 0.0))
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
