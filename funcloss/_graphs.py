"""CUDA graphs for the looped recursions (CTC's alpha and beta passes).

On a GPU each step of a recursion is a few small kernels, and at realistic sizes the time goes
to launching them from the host (about 1700 launches per CTC forward and backward at T=200),
not to the GPU's work. (With Triton each recursion is one kernel, `funcloss._ctc_triton`; the
graph then saves the launches of the dozen kernels around it.) A CUDA graph records the
launches of one call and replays them as one.
`replayed` captures a function the second time the same shapes (and dtypes, strides, device)
come, and replays it from then on: the same kernels on copies of the inputs, so the values are
those of the plain call. Shapes seen once never pay for a capture; the last `CACHE_SIZE`
graphs are kept, each with its own GPU memory for its buffers. Off with the environment
variable ``FUNCLOSS_CUDA_GRAPHS=0`` (read at import) or ``funcloss._graphs.enabled = False``.
Inside someone else's graph capture (``torch.compile(mode="reduce-overhead")``, a user's
``torch.cuda.graph``) the plain call runs and is captured there.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

enabled = os.environ.get("FUNCLOSS_CUDA_GRAPHS", "1") != "0"
CACHE_SIZE = 4
_SEEN_LIMIT = 1024

_Entry = tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], tuple[Tensor, ...]]
_graphs: OrderedDict[Hashable, _Entry] = OrderedDict()
_seen: dict[Hashable, int] = {}
_failed: set[Hashable] = set()
_lock = threading.Lock()


def replayed(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> tuple[Tensor, ...]:
    """``fn(*inputs)``, on CUDA through a CUDA graph of it once the same shapes come again.

    ``fn`` must take and return tensors only, launch the same kernels for inputs of the same
    shapes whatever their values, and read no values on the host. The outputs are fresh
    tensors (copies of the graph's own)."""
    first = inputs[0]
    if not _eligible(first):
        return fn(*inputs)
    # Capture and replay on the data's device, whichever device is current.
    with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
        return _replayed(fn, inputs)


def _replayed(fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    first = inputs[0]
    key = (fn, first.device, torch.is_grad_enabled(), tuple((t.shape, t.dtype, t.stride()) for t in inputs))
    with _lock:
        if key not in _graphs and key not in _failed:
            if len(_seen) > _SEEN_LIMIT:
                _seen.clear()
            _seen[key] = _seen.get(key, 0) + 1
        plain = key in _failed or (key not in _graphs and _seen[key] < 2)
    if plain:
        return fn(*inputs)
    with _lock:  # one replay at a time: the graph's buffers are shared
        entry = _graphs.get(key)
        if entry is None:
            try:
                entry = _capture(fn, inputs)
            except RuntimeError:
                _failed.add(key)  # a function this cannot record: it stays plain
                entry = None
            else:
                _graphs[key] = entry
                while len(_graphs) > CACHE_SIZE:
                    _graphs.popitem(last=False)
        else:
            _graphs.move_to_end(key)
        if entry is not None:
            graph, static_in, static_out = entry
            for static, given in zip(static_in, inputs):
                static.copy_(given)
            graph.replay()
            return tuple(out.clone() for out in static_out)
    return fn(*inputs)


def _eligible(first: Tensor) -> bool:
    """Graphs are on, the data is on CUDA, and nothing records or traces this call already."""
    if not (enabled and first.is_cuda):
        return False
    with torch.cuda.device(first.device):
        capturing = torch.cuda.is_current_stream_capturing()
    return not capturing and not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None


def _capture(fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...]) -> _Entry:
    static_in = tuple(t.clone() for t in inputs)
    side = torch.cuda.Stream(device=inputs[0].device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(side):
        fn(*static_in)  # warm up outside the capture, as CUDA graphs need
    torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_in)
    return graph, static_in, static_out


def clear() -> None:
    """Drop every kept graph (and its GPU memory) and what was seen."""
    with _lock:
        _graphs.clear()
        _seen.clear()
        _failed.clear()
