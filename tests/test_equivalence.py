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
    if not row.case.half:
        pytest.skip(f"torch has no {dtype} {row.name} on this device")
    defaults = row.case.defaults()
    for reduction in ("none", "sum"):
        if "reduction" in defaults:
            _check(row, {**defaults, "reduction": reduction}, 0, dtype, device)
