"""The loss registry: one row per loss (funcloss function, torch oracle, strategy, tolerance).

The function, oracle and input maker come from `funcloss._bench.cases` (shared with
``python -m funcloss check``); this module adds the hypothesis strategy and tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import strategies as st

from funcloss._bench.cases import CASES, LossCase


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


TOLERANCE: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-7, 1e-9),
    torch.float32: Tolerance(2e-5, 2e-5),
    torch.float16: Tolerance(2e-2, 2e-2),
    torch.bfloat16: Tolerance(6e-2, 6e-2),
}


@dataclass(frozen=True)
class Row:
    case: LossCase
    # Extra slack for losses whose reduction order differs from torch's kernels.
    slack: float = 1.0

    @property
    def name(self) -> str:
        return self.case.name

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        t = TOLERANCE[dtype]
        return Tolerance(t.rtol * self.slack, t.atol * self.slack)

    def options(self) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({k: st.sampled_from(list(v)) for k, v in self.case.options.items()})


ROWS: dict[str, Row] = {name: Row(case) for name, case in CASES.items()}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ),
]


def rows() -> list[Any]:
    return [pytest.param(row, id=name) for name, row in ROWS.items()]
