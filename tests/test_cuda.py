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
import torch.nn.functional as F
from torch import Tensor

import funcloss as fl
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


def _ctc_step(
    fn: Callable[..., Tensor],
    logits: Tensor,
    targets: Tensor,
    in_len: Tensor,
    tgt_len: Tensor,
    *,
    zero_infinity: bool = False,
) -> tuple[Tensor, Tensor]:
    """Value and gradient with respect to the logits (through log_softmax, where torch's CTC
    backward and the true derivative agree: see TORCH_SEMANTICS.md)."""
    x = logits.detach().requires_grad_(True)
    loss = fn(x.log_softmax(2), targets, in_len, tgt_len, reduction="sum", zero_infinity=zero_infinity)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _has_triton() -> bool:
    from funcloss.losses import _sequence

    return _sequence._triton_kernels() is not None


@pytest.mark.skipif(not _has_triton(), reason="Triton is not installed (the CUDA-graph recursion runs instead)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("steps", "batch", "classes", "labels"),
    [(50, 4, 6, 8), (1, 3, 4, 2), (30, 2, 5, 0), (450, 3, 20, 200), (200, 16, 40, 30)],
)
def test_ctc_triton_kernels_equal_the_torch_recursion(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, steps: int, batch: int, classes: int, labels: int
) -> None:
    """With Triton, CTC's alpha and beta recursions on CUDA are one kernel each: their loss and
    gradient equal the torch recursion's within rounding (inputs of zero length, empty targets,
    infeasible alignments, 401 states: more than one warp per sequence, lengths given as strided
    views) and torch's kernel's."""
    from funcloss import _graphs
    from funcloss.losses import _sequence

    gen = torch.Generator().manual_seed(steps)
    logits = torch.randn(steps, batch, classes, generator=gen, dtype=dtype).cuda()
    targets = torch.randint(1, classes, (batch, labels), generator=gen).cuda()
    in_len = torch.randint(0, steps + 1, (batch,), generator=gen)
    in_len = in_len.index_fill(0, torch.tensor([0]), steps).cuda()
    tgt_len = torch.randint(0, labels + 1, (batch,), generator=gen).cuda()
    assert _sequence._triton(logits) is not None
    # Lengths as strided views: the kernels index them as given.
    in_view, tgt_view = torch.stack([in_len, in_len.flip(0)], 1)[:, 0], torch.stack([tgt_len, tgt_len], 1)[:, 0]
    assert not in_view.is_contiguous()
    kernels = _ctc_step(fl.ctc_loss, logits, targets, in_view, tgt_view, zero_infinity=True)
    monkeypatch.setattr(_sequence, "triton_enabled", False)
    monkeypatch.setattr(_graphs, "enabled", False)
    plain = _ctc_step(fl.ctc_loss, logits, targets, in_len, tgt_len, zero_infinity=True)
    # Rounding: alphas of a few thousand nats keep ~4 (float32) or ~13 (float64) decimals, and
    # the three-way log-sum-exp rounds differently from two logaddexps over hundreds of steps.
    rtol, atol = (1e-9, 1e-10) if dtype == torch.float64 else (1e-4, 5e-4)
    torch.testing.assert_close(kernels, plain, rtol=rtol, atol=atol)
    theirs = _ctc_step(F.ctc_loss, logits, targets, in_len, tgt_len, zero_infinity=True)
    torch.testing.assert_close(kernels, theirs, rtol=rtol, atol=atol)
    # Infeasible alignments: the same infinite losses without zero_infinity.
    monkeypatch.setattr(_sequence, "triton_enabled", True)
    loss = fl.ctc_loss(logits.log_softmax(2), targets, in_len, tgt_len, reduction="none")
    torch.testing.assert_close(loss, F.ctc_loss(logits.log_softmax(2), targets, in_len, tgt_len, reduction="none"))


def test_ctc_replays_a_cuda_graph_with_the_plain_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton, from the second call of the same shapes CTC's forward and backward run
    as CUDA graphs: each call's values (new inputs and lengths every time) equal the plain
    recursion's exactly, its gradients up to the order of an atomic summation, and torch's
    within rounding."""
    from funcloss import _graphs
    from funcloss.losses import _sequence

    monkeypatch.setattr(_sequence, "triton_enabled", False)
    _graphs.clear()
    gen = torch.Generator().manual_seed(0)
    steps, batch, classes, labels = 50, 4, 6, 8
    for call in range(4):
        logits = torch.randn(steps, batch, classes, generator=gen).cuda()
        targets = torch.randint(1, classes, (batch, labels), generator=gen).cuda()
        in_len = torch.randint(steps // 2, steps + 1, (batch,), generator=gen)
        in_len = in_len.index_fill(0, torch.tensor([0]), steps).cuda()  # the longest: the shapes stay
        tgt_len = torch.randint(0, labels + 1, (batch,), generator=gen).cuda()
        graphed = _ctc_step(fl.ctc_loss, logits, targets, in_len, tgt_len)
        monkeypatch.setattr(_graphs, "enabled", False)
        plain = _ctc_step(fl.ctc_loss, logits, targets, in_len, tgt_len)
        monkeypatch.setattr(_graphs, "enabled", True)
        assert torch.equal(graphed[0], plain[0]), call
        # The gradient's scatter is an atomic index_add_ on CUDA: equal up to its summation order.
        torch.testing.assert_close(graphed[1], plain[1], rtol=1e-6, atol=1e-7)
        theirs = _ctc_step(F.ctc_loss, logits, targets, in_len, tgt_len)
        torch.testing.assert_close(graphed, theirs, atol=1e-4, rtol=1e-4)
    assert len(_graphs._graphs) == 2, "the forward and the backward kept as graphs"


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch-recursion"])
def test_ctc_recursions_inside_a_users_cuda_graph_run_plainly(monkeypatch: pytest.MonkeyPatch, triton: bool) -> None:
    """Inside a capture of someone else's (``torch.compile(mode="reduce-overhead")`` runs the
    compiled CTC operator so) the recursions record their plain kernels (or the Triton ones)
    into that graph, a capture inside a capture being impossible, and read nothing on the
    host: the replays compute the forward and the gradient for new inputs."""
    from funcloss import _graphs
    from funcloss.losses import _sequence

    if triton and not _has_triton():
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(_sequence, "triton_enabled", triton)
    _graphs.clear()
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(1, 5, (3, 4), generator=gen).cuda()
    in_len, tgt_len = torch.tensor([20, 15, 9]).cuda(), torch.tensor([4, 2, 3]).cuda()
    ext, skip = _sequence._extended(targets, 0, torch.float32)
    static = torch.randn(20, 3, 5, generator=gen).log_softmax(2).cuda()
    weights = torch.ones(3, device="cuda")

    def both() -> tuple[Tensor, Tensor]:
        ll, padded = _sequence._CTCFunction.forward(static, ext, skip, in_len, tgt_len)
        return ll, _sequence._ctc_grad(weights, static, ext, skip, in_len, tgt_len, ll, padded)

    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        both()  # warm up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ll, grad = both()
    assert not _graphs._graphs, "no graph of funcloss's own inside the user's"
    fresh = torch.randn(20, 3, 5, generator=gen).log_softmax(2).cuda()
    static.copy_(fresh)
    graph.replay()
    x = fresh.clone().requires_grad_(True)
    theirs = -F.ctc_loss(x, targets, in_len, tgt_len, reduction="none")
    torch.testing.assert_close(ll, theirs.detach())
    (expected,) = torch.autograd.grad(fl.ctc_loss(x, targets, in_len, tgt_len, reduction="sum"), x)
    torch.testing.assert_close(-grad, expected)
