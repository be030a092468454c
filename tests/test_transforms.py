"""The transform matrix: every loss under grad, vmap (no fallback), vmap(grad), jvp, jacfwd,
jacrev, hessian and torch.compile, against torch's eager result."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.func as tf

from funcloss._bench.cases import Example, Sampler
from funcloss._bench.transforms import TRANSFORMS, apply, mapped, positional, with_grad

from .registry import DEVICES, Row, rows
from .transforms import torch_reference

NONE_REDUCTION = {"jacfwd", "jacrev"}


def example_for(row: Row, transform: str, device: str) -> Example:
    options = dict(row.case.defaults())
    if transform in NONE_REDUCTION and "reduction" in options:
        options["reduction"] = "none"
    dtype = torch.float32 if transform.startswith("compile") else torch.float64
    return row.case.make(Sampler(7, dtype, device), options)


def _compare(ours: Any, theirs: Any, dtype: torch.dtype, what: str) -> None:
    if isinstance(ours, (tuple, list)):
        assert len(ours) == len(theirs), what
        for a, b in zip(ours, theirs):
            _compare(a, b, dtype, what)
        return
    rtol, atol = (1e-6, 1e-8) if dtype == torch.float64 else (1e-4, 1e-5)
    expected = theirs.to(ours.dtype) if isinstance(theirs, torch.Tensor) else theirs
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("row", rows())
def test_transform(row: Row, transform: str, device: str) -> None:
    ex = example_for(row, transform, device)
    if transform.startswith("compile"):
        torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduction.*'mean' divides.*")
        # A vmap that falls back to torch's per-example loop warns: that fails here.
        warnings.filterwarnings("error", message=".*performance drop.*")
        ours = apply(transform, row.case.ours, ex)
    theirs = torch_reference(transform, row.case.theirs, ex, row.case.torch_breaks)
    dtype = ex.args[0].dtype
    if transform == "hessian" and "hessian" in row.case.torch_breaks:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    else:
        _compare(ours, theirs, dtype, f"{row.name} under {transform}")


@pytest.mark.parametrize("row", [r for r in rows() if "vmap" in r.values[0].case.torch_breaks])
def test_torch_itself_falls_back_under_vmap(row: Row) -> None:
    """The gap funcloss closes is real: torch's own loss loops (or fails) under vmap.

    If this fails, torch has gained a batching rule and the table in the README should say so.
    """
    ex = example_for(row, "vmap", "cpu")
    flat, args, dims = mapped(row.case.theirs, ex)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tf.vmap(flat, in_dims=dims)(*args)
        except (RuntimeError, ValueError):
            return
    assert any("performance drop" in str(w.message) for w in caught), "torch vmapped without falling back"


# Float options, each with values to compile in turn (the first is the registry's default).
FLOAT_OPTIONS: list[tuple[str, str, tuple[float, ...]]] = [
    ("huber_loss", "delta", (1.0, 0.5, 2.5)),
    ("smooth_l1_loss", "beta", (1.0, 0.3, 2.5)),
    ("hinge_embedding_loss", "margin", (1.0, 0.4, 2.5)),
    ("margin_ranking_loss", "margin", (0.0, 0.4, 2.5)),
    ("poisson_nll_loss", "eps", (1e-8, 0.5, 2.5)),
    ("gaussian_nll_loss", "eps", (1e-6, 0.5, 2.5)),
    ("cross_entropy", "label_smoothing", (0.0, 0.3, 0.7)),
    ("multi_margin_loss", "margin", (1.0, 0.4, 2.5)),
    ("cosine_embedding_loss", "margin", (0.0, 0.4, -0.5)),
    ("triplet_margin_loss", "margin", (1.0, 0.4, 2.5)),
]


@pytest.mark.parametrize(("name", "option", "values"), FLOAT_OPTIONS, ids=[f"{n}-{o}" for n, o, _ in FLOAT_OPTIONS])
def test_compiled_float_options_follow_each_value(
    name: str, option: str, values: tuple[float, ...], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torch.compile(dynamic=True) a float option is symbolic, and compiled graphs are
    cached (on disk too, across processes): a loss compiled for one value must not give that
    value's result for the next (torch 2.13 did so for a float used as a clamp bound)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache, as on a fresh machine
    from funcloss._bench.cases import CASES

    case = CASES[name]
    ex = case.make(Sampler(5, torch.float32, "cpu"), case.defaults())
    for value in values:
        torch._dynamo.reset()
        kwargs = {**ex.kwargs, option: value}
        point = Example(ex.args, kwargs, ex.diff, ex.in_dims)
        ours = apply("compile_dyn", case.ours, point)
        theirs = torch_reference("compile", case.theirs, point, case.torch_breaks)
        _compare(ours, theirs, torch.float32, f"{name} compiled with {option}={value}")


@pytest.mark.parametrize("transform", ["vmap", "vmap_grad", "jvp", "hessian"])
@pytest.mark.parametrize("row", [r for r in rows() if "weight" in r.values[0].case.options])
def test_transform_with_weights(row: Row, transform: str) -> None:
    """The matrix again with each loss's weight option on: a class weight indexed by one
    example's 0-dim target must not read the target's value (vmap cannot)."""
    case = row.case
    ex = case.make(Sampler(7, torch.float64, "cpu"), {**case.defaults(), "weight": True})
    if transform.startswith("vmap") and ex.in_dims is None:
        pytest.skip("this example has no batch dimension")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduction.*'mean' divides.*")
        warnings.filterwarnings("error", message=".*performance drop.*")
        ours = apply(transform, case.ours, ex)
    theirs = torch_reference(transform, case.theirs, ex, case.torch_breaks)
    if transform == "hessian" and "hessian" in case.torch_breaks:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    else:
        _compare(ours, theirs, torch.float64, f"{row.name} with weights under {transform}")


class _Exported(torch.nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs: torch.Tensor) -> Any:
        return self.fn(*xs)


@pytest.mark.parametrize("row", rows())
def test_export(row: Row) -> None:
    """torch.export.export (non-strict, its default) traces every loss into one graph; the
    exported program gives torch's eager value and, differentiated, torch's gradients."""
    case = row.case
    ex = example_for(row, "compile", "cpu")
    tensors = tuple(i for i, a in enumerate(ex.args) if isinstance(a, torch.Tensor))
    f, xs = positional(case.ours, ex, tensors)
    program = torch.export.export(_Exported(f), tuple(xs))
    args = with_grad(ex.args, ex.diff)
    out = program.module()(*(args[i] for i in tensors))
    grads = torch.autograd.grad(out, [args[i] for i in ex.diff], allow_unused=True, materialize_grads=True)
    ours = (out.detach(), *grads)
    theirs = torch_reference("compile", case.theirs, ex, case.torch_breaks)
    _compare(ours, theirs, torch.float32, f"{row.name} exported")
