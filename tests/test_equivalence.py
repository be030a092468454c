"""funcloss against torch.nn.functional: values, shapes, dtypes and gradients, for every row."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from funcloss._bench.cases import Sampler

from .harness import assert_close, value_and_grads
from .registry import DEVICES, Row, rows

DTYPES = [torch.float64, torch.float32]
HALF = [torch.float16, torch.bfloat16]


def _check(row: Row, options: dict[str, Any], seed: int, dtype: torch.dtype, device: str) -> None:
    ex = row.case.make(Sampler(seed, dtype, device), options)
    tol = row.tolerance(dtype)
    ours, our_grads = value_and_grads(row.case.ours, ex)
    theirs, their_grads = value_and_grads(row.case.theirs, ex)
    assert_close(ours, theirs, tol, f"{row.name} value {options}")
    for i, (g, h) in zip(ex.diff, zip(our_grads, their_grads)):
        assert_close(g, h, tol, f"{row.name} grad of arg {i} {options}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", rows())
def test_matches_torch(row: Row, dtype: torch.dtype, device: str) -> None:
    @given(options=row.options(), seed=st.integers(0, 2**16))
    def run(options: dict[str, Any], seed: int) -> None:
        _check(row, options, seed, dtype, device)

    run()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("row", rows())
def test_matches_torch_half(row: Row, dtype: torch.dtype, device: str) -> None:
    """float16/bfloat16 against torch in the same dtype, or, where torch has no kernel for that
    dtype on this device, against torch in float32 rounded to the dtype."""
    if not row.case.half:
        pytest.skip(f"{row.name} is float32/float64 only, in torch and in funcloss")
    defaults = row.case.defaults()
    for reduction in ("none", "sum") if "reduction" in defaults else (None,):
        options = defaults if reduction is None else {**defaults, "reduction": reduction}
        try:
            _check(row, options, 0, dtype, device)
        except (NotImplementedError, RuntimeError) as e:
            if "not implemented for" not in str(e):
                raise
            _check_against_float32(row, options, dtype, device)


def _check_against_float32(row: Row, options: dict[str, Any], dtype: torch.dtype, device: str) -> None:
    ex = row.case.make(Sampler(0, dtype, device), options)
    ours, our_grads = value_and_grads(row.case.ours, ex)
    up = type(ex)(
        tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in ex.args),
        {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in ex.kwargs.items()},
        ex.diff,
        ex.in_dims,
    )
    theirs, their_grads = value_and_grads(row.case.theirs, up)
    tol = row.tolerance(dtype)
    assert_close(ours, theirs.to(dtype), tol, f"{row.name} {dtype} value vs float32 torch")
    for g, h in zip(our_grads, their_grads):
        assert_close(g, None if h is None else h.to(dtype), tol, f"{row.name} {dtype} grad vs float32 torch")
