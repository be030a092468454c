"""The CUDA-graph cache's bookkeeping (`funcloss._graphs.replayed`), on any machine: the
device's graph is stood in for by one that replays the function on its captured buffers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from funcloss import _graphs


class _FakeGraph:
    """Replays ``fn`` on the captured input buffers into the captured output buffers."""

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], static_in: tuple[Tensor, ...]) -> None:
        self.fn, self.static_in = fn, static_in
        self.static_out = tuple(t.clone() for t in fn(*static_in))
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for out, new in zip(self.static_out, self.fn(*self.static_in)):
            out.copy_(new)


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[_FakeGraph]]:
    captured: list[_FakeGraph] = []

    def capture(fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...]) -> object:
        graph = _FakeGraph(fn, tuple(t.clone() for t in inputs))
        captured.append(graph)
        return graph, graph.static_in, graph.static_out

    _graphs.clear()
    monkeypatch.setattr(_graphs, "_eligible", lambda first: True)
    monkeypatch.setattr(_graphs, "_capture", capture)
    yield captured
    _graphs.clear()


def _twice_and_sum(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    return x * 2, (x + y).sum()


def test_a_shape_is_captured_the_second_time_and_replayed_after(fake_device: list[_FakeGraph]) -> None:
    """Once: plain. Twice: captured. Then replayed, on each call's own inputs, the outputs
    fresh tensors (not the graph's buffers, which the next replay overwrites)."""
    gen = torch.Generator().manual_seed(0)
    outs = []
    for call in range(4):
        x, y = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
        got = _graphs.replayed(_twice_and_sum, x, y)
        for a, b in zip(got, _twice_and_sum(x, y)):
            assert torch.equal(a, b), call
        outs.append(got)
        assert len(fake_device) == (0 if call == 0 else 1)
    assert fake_device[0].replays == 3
    assert not torch.equal(outs[2][0], outs[3][0]), "an earlier output was overwritten by a later replay"
    assert all(o[0].data_ptr() != fake_device[0].static_out[0].data_ptr() for o in outs)


def test_each_shape_has_its_graph_and_only_the_last_few_are_kept(fake_device: list[_FakeGraph]) -> None:
    for rows in range(1, _graphs.CACHE_SIZE + 2):
        for _ in range(2):
            _graphs.replayed(_twice_and_sum, torch.ones(rows, 2), torch.ones(rows, 2))
    assert len(fake_device) == _graphs.CACHE_SIZE + 1
    assert len(_graphs._graphs) == _graphs.CACHE_SIZE
    _graphs.replayed(_twice_and_sum, torch.ones(1, 2), torch.ones(1, 2))  # evicted: seen again
    assert len(fake_device) == _graphs.CACHE_SIZE + 2


def test_a_function_that_cannot_be_captured_stays_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[int] = []

    def refuse(fn: object, inputs: object) -> object:
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    _graphs.clear()
    monkeypatch.setattr(_graphs, "_eligible", lambda first: True)
    monkeypatch.setattr(_graphs, "_capture", refuse)
    x = torch.arange(4.0)
    for _ in range(4):
        got = _graphs.replayed(_twice_and_sum, x, x)
        assert torch.equal(got[0], x * 2)
    assert attempts == [1]
    _graphs.clear()


def test_off_or_on_the_cpu_the_function_runs_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    _graphs.clear()
    x = torch.arange(3.0)
    for _ in range(3):
        _graphs.replayed(_twice_and_sum, x, x)
    assert not _graphs._graphs and not _graphs._seen  # the CPU: nothing recorded
    monkeypatch.setattr(_graphs, "enabled", False)
    assert not _graphs._eligible(x)
