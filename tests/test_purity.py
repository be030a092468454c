"""No torch loss kernel runs inside a funcloss loss, forward or backward; no input is mutated."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from funcloss._bench.cases import Sampler

from .harness import quiet_call, with_grad
from .registry import Row, rows

FORBIDDEN = re.compile(r"loss|kl_div|binary_cross_entropy|nll|ctc|margin|hinge|embedding_loss")


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class RecordFunctions(TorchFunctionMode):
    """Sees torch.nn.functional and torch.* calls, including composite losses that the
    dispatcher only ever sees decomposed."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(str(getattr(func, "__name__", func)))
        return func(*args, **(kwargs or {}))


def _recorded_ops(fn: Any, row: Row, options: dict[str, Any]) -> set[str]:
    ex = row.case.make(Sampler(3), options)
    args = with_grad(ex)
    with RecordFunctions() as functions, RecordOps() as kernels:
        out = quiet_call(fn, *args, **ex.kwargs)
        if out.requires_grad and out.numel():
            torch.autograd.grad(out.sum(), [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])
    ops: set[str] = functions.ops | kernels.ops
    return ops


@pytest.mark.parametrize("row", rows())
def test_no_loss_kernel_runs(row: Row) -> None:
    ops: set[str] = set()
    for reduction in row.case.options.get("reduction", [None]):
        options = row.case.defaults()
        if reduction is not None:
            options["reduction"] = reduction
        ops |= _recorded_ops(row.case.ours, row, options)
    assert ops, "the recorder saw nothing"
    assert not {op for op in ops if FORBIDDEN.search(op)}, f"{row.name} ran a torch loss kernel"


@pytest.mark.parametrize("row", rows())
def test_recorder_sees_torch_kernel(row: Row) -> None:
    """The recorder would notice: torch's own loss trips it."""
    if row.name == "adaptive_log_softmax_with_loss":
        pytest.skip("torch's AdaptiveLogSoftmaxWithLoss is itself linear + log_softmax + gather, no loss kernel")
    ops = _recorded_ops(row.case.theirs, row, row.case.defaults())
    assert {op for op in ops if FORBIDDEN.search(op)}, f"no loss kernel seen in torch's {row.name}: {sorted(ops)}"


@pytest.mark.parametrize("row", rows())
def test_inputs_not_mutated(row: Row) -> None:
    ex = row.case.make(Sampler(5), row.case.defaults())
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in ex.args]
    quiet_call(row.case.ours, *ex.args, **ex.kwargs)
    for a, b in zip(ex.args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
