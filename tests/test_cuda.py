"""What only an accelerator shows: host synchronisations, and value checks that fail
asynchronously there (as torch's kernels do). Skipped, with the reason, without CUDA."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from funcloss._bench.cases import Sampler

from .harness import value_and_grads
from .registry import Row, rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _host_syncs(fn: Callable[..., Tensor], row: Row) -> list[str]:
    """Messages of the synchronising calls made by one forward and backward on CUDA."""
    ex = row.case.make(Sampler(0, torch.float32, "cuda"), row.case.defaults())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            value_and_grads(fn, ex)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("row", rows())
def test_no_host_sync_where_torch_has_none(row: Row) -> None:
    if _host_syncs(row.case.theirs, row):
        return  # torch synchronises here too (length or variance checks read values on the host)
    assert _host_syncs(row.case.ours, row) == []


BAD_VALUES = {
    "cross_entropy": "F(torch.randn(4, 3, device='cuda'), torch.tensor([0, 1, 7, 2], device='cuda'))",
    "nll_loss": "F(torch.randn(4, 3, device='cuda'), torch.tensor([0, -5, 1, 2], device='cuda'))",
    "binary_cross_entropy": "F(torch.full((4,), 1.5, device='cuda'), torch.rand(4, device='cuda'))",
    "multi_margin_loss": "F(torch.randn(4, 3, device='cuda'), torch.tensor([0, 1, 3, 2], device='cuda'))",
    "multilabel_margin_loss": (
        "F(torch.randn(2, 3, device='cuda'), torch.tensor([[0, 5, -1], [1, -1, 0]], device='cuda'))"
    ),
}


# torch's CUDA multilabel_margin_loss does not check its targets; funcloss does.
CASES = [(n, lib) for n in sorted(BAD_VALUES) for lib in ("funcloss", "torch.nn.functional")]
CASES.remove(("multilabel_margin_loss", "torch.nn.functional"))


@pytest.mark.parametrize(("name", "library"), CASES)
def test_out_of_range_values_fail_on_the_device(name: str, library: str) -> None:
    """On CUDA the check is a device-side assertion: the process's CUDA context is lost, so each
    case runs in its own interpreter. funcloss fails wherever torch does."""
    script = textwrap.dedent(
        f"""
        import torch, funcloss, torch.nn.functional
        F = {"funcloss" if library == "funcloss" else "torch.nn.functional"}.{name}
        {BAD_VALUES[name]}
        torch.cuda.synchronize()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr or "AcceleratorError" in result.stderr, result.stderr[-2000:]
