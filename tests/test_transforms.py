"""The transform matrix: every loss under grad, vmap (no fallback), vmap(grad), jvp, jacfwd,
jacrev, hessian and torch.compile, against torch's eager result."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.func as tf

from funcloss._bench.cases import Example, Sampler
from funcloss._bench.transforms import TRANSFORMS, apply, mapped

from .registry import DEVICES, Row, rows
from .transforms import torch_reference

NONE_REDUCTION = {"jacfwd", "jacrev"}


def example_for(row: Row, transform: str, device: str) -> Example:
    options = dict(row.case.defaults())
    if transform in NONE_REDUCTION and "reduction" in options:
        options["reduction"] = "none"
    dtype = torch.float32 if transform == "compile" else torch.float64
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
    if transform == "compile":
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
