"""Validation shared by every loss.

Checks of shapes, dtypes and options always run. Checks that read tensor values (a negative
variance, a probability outside [0, 1], a class index out of range) run only in eager mode: under
``vmap``, ``grad``, ``jvp``, ``torch.compile`` or a fake tensor mode they step aside, because
reading a value there either fails (vmap, fake tensors) or breaks the graph (compile).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor


def broadcast_shape(*shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes``, typed."""
    shape: torch.Size = torch.broadcast_shapes(*shapes)  # type: ignore[no-untyped-call]
    return shape


def is_eager() -> bool:
    """True when no torch.func transform is active, torch.compile is not tracing, and no fake
    tensor mode (shape propagation, memory estimation: there are no values to read) is on."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None


def has_tangent(*tensors: Tensor | None) -> bool:
    """Whether a tensor carries an eager forward-mode tangent (``torch.autograd.forward_ad``).
    The eager fast paths are custom autograd Functions without a ``jvp``; they step aside then,
    and the plain composition carries the tangent."""
    if getattr(fwAD, "_current_level", 0) < 0:  # no dual level is open, so no tensor has one
        return False
    unpack: Callable[[Tensor], Any] = fwAD.unpack_dual  # untyped in torch's stubs
    return any(t is not None and unpack(t).tangent is not None for t in tensors)


def compiled_plainly() -> bool:
    """True while torch.compile traces the loss outside any torch.func transform and not for
    torch.export: where a loss may run as one opaque custom operator (whose eager body then
    runs at call time) instead of a traced Python loop. torch.export's graph stays made of
    ATen operators (portable without funcloss); custom operators do not compose with
    torch.func's transforms."""
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch._C._are_functorch_transforms_active()  # read correctly while dynamo traces
    )


def compiling_untransformed() -> bool:
    """True while torch.compile or torch.export traces the loss outside any torch.func
    transform: where an all-ATen rewrite that suits Inductor (and checks values with
    ``torch._assert_async``, which has no batching rule) may replace the eager form."""
    return torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def only_vmap() -> bool:
    """True when every active torch.func transform is a vmap (and nothing is being compiled):
    a batched implementation can then stand in for the per-example one."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return all(str(i.key()) == "TransformType.Vmap" for i in retrieve_all_functorch_interpreters())


def only_reverse_or_vmap() -> bool:
    """True when a torch.func transform is active and every active one is a ``grad``/``vjp``
    (``jacrev``) or a ``vmap`` (no forward mode, no functionalize, nothing compiled or faked):
    an ``autograd.Function`` with a generated vmap rule and no ``jvp`` composes there."""
    if not _functorch_only():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return all(
        str(i.key()) in ("TransformType.Vmap", "TransformType.Grad") for i in retrieve_all_functorch_interpreters()
    )


def differentiated_once(*tensors: Tensor | None) -> bool:
    """Under torch.func, whether the gradient being formed is the last one: a single ``grad``
    level is active and no tensor requires grad below every transform (eager autograd). A
    backward may then skip recording itself (torch.func forms every gradient with
    ``create_graph``, which would keep each chunk's intermediates until it returns)."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    levels = sum(str(i.key()) == "TransformType.Grad" for i in retrieve_all_functorch_interpreters())
    if levels != 1:
        return False
    for t in tensors:
        while t is not None and (
            torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_batchedtensor(t)
        ):
            t = torch._C._functorch.get_unwrapped(t)
        if t is not None and t.requires_grad:
            return False
    return True


def _functorch_only() -> bool:
    return (
        not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is not None
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
    )


def check_reduction(fn: str, reduction: str, allowed: Sequence[str] = ("none", "mean", "sum")) -> None:
    """Raise the ``ValueError`` torch raises for an unknown reduction."""
    if reduction not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(
            f"{fn}(...): expected reduction to be one of {choices}, got {reduction!r}. "
            f"{reduction} is not a valid value for reduction."
        )


def warn_if_broadcast(fn: str, input: Tensor, target: Tensor) -> None:
    """torch warns (and then broadcasts) when a regression target's size differs from the input's."""
    if input.shape != target.shape and not torch.compiler.is_compiling():
        warnings.warn(
            f"{fn}(...): using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            UserWarning,
            stacklevel=4,  # loss -> its autocast wrapper -> the caller
        )


def check_same_shape(fn: str, input: Tensor, target: Tensor, *, exc: type[Exception] = ValueError) -> None:
    if input.shape != target.shape:
        raise exc(
            f"{fn}(...): expected target of the input's shape {tuple(input.shape)}, got "
            f"{tuple(target.shape)}. Reshape the target, or use reduction='none' and broadcast "
            "explicitly."
        )


def check_values(
    ok: Tensor | bool | Callable[[], Tensor],
    exc: type[Exception],
    message: str | Callable[[], str],
    *,
    device_assert: bool = False,
) -> None:
    """Raise ``exc(message)`` if ``ok`` is false; a no-op under transforms and compile, and on
    the meta device (no values to read).

    ``ok`` is a boolean tensor (all elements must hold), a function returning one (called only
    in eager mode, so a transform pays nothing for the check), or a Python bool. ``message``
    may be a function, called only to raise: a message formatted from integer arguments must
    be, since torch.compile with dynamic shapes cannot format their symbols. With
    ``device_assert``, a tensor on an accelerator is checked the way torch's own kernels check
    it there: asynchronously, with no host synchronisation (a failure surfaces as a
    device-side assertion ``RuntimeError`` at a later synchronising call).
    """
    if isinstance(ok, bool):
        if not ok:
            raise exc(message if isinstance(message, str) else message())
        return
    if not is_eager():
        return
    if callable(ok):
        ok = ok()
    if ok.device.type == "meta":
        return
    if device_assert and on_accelerator(ok):
        torch._assert_async(ok.all(), message if isinstance(message, str) else message())
        return
    if not bool(ok.all()):
        raise exc(message if isinstance(message, str) else message())  # formatted only to raise


def check_range(
    t: Tensor,
    low: float,
    high: float,
    exc: type[Exception],
    message: str,
    *,
    on_device: Literal["read", "assert", "skip"] = "read",
) -> None:
    """Raise ``exc(message)`` unless every element of ``t`` lies in ``[low, high]`` (NaN fails);
    a no-op under transforms and compile, and on the meta device.

    On the CPU: one ``aminmax`` pass. On an accelerator, as torch checks the same input there:
    ``"read"`` reads the range back (a host synchronisation), ``"assert"`` makes an
    asynchronous device-side assertion, ``"skip"`` leaves it to a later op's own bounds check.
    """
    if not is_eager() or t.numel() == 0 or t.device.type == "meta":
        return
    if on_accelerator(t) and on_device != "read":
        if on_device == "assert":
            torch._assert_async(((t >= low) & (t <= high)).all(), message)
        return
    lo, hi = torch.stack(list(torch.aminmax(t))).tolist()
    if not (lo >= low and hi <= high):
        raise exc(message)


def on_accelerator(t: Tensor) -> bool:
    """Whether ``t``'s values are not at hand on the host: reading one back costs a
    synchronisation (an accelerator) or is impossible (the meta device)."""
    return t.device.type != "cpu"
