"""torch.autocast (mixed precision) as torch's losses meet it.

torch registers most of its loss kernels in autocast's float32 list: under
``torch.autocast``, a float16/bfloat16 input is cast to float32, the loss is computed in
float32, and the result is float32. A funcloss loss is a composition of primitives, most of
which autocast leaves in the input's precision, so without this it would return a half-precision
loss (a mean over a million elements summed in bfloat16 keeps two or three significant digits).
`float32_under_autocast` applies torch's policy to a whole loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")

_LOW = (torch.float16, torch.bfloat16)


def autocast_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The device type of the first tensor argument if autocast is enabled for it, else None."""
    if not torch._C._is_any_autocast_enabled():  # the common case, without touching a tensor
        return None
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            device = a.device.type
            try:
                return device if torch.is_autocast_enabled(device) else None
            except RuntimeError:  # a device type autocast does not know
                return None
    return None


def _to_float32(a: Any, device: str) -> Any:
    if isinstance(a, Tensor) and a.dtype in _LOW and a.device.type == device:
        return a.float()
    return a


def float32_under_autocast(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` as autocast runs the losses on its float32 list: when autocast is enabled
    for the first tensor argument's device, every float16/bfloat16 tensor argument on that
    device is cast to float32 and ``fn`` runs with autocast disabled (so the result is
    float32, and gradients flow back through the casts in the inputs' own dtypes). Otherwise
    ``fn`` runs as called."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        device = autocast_device(args, kwargs)
        if device is None:
            return fn(*args, **kwargs)
        cast_args = tuple(_to_float32(a, device) for a in args)
        cast_kwargs = {k: _to_float32(v, device) for k, v in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return fn(*cast_args, **cast_kwargs)

    return wrapper


def refused_under_autocast(device: str, message: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Raise ``RuntimeError(message)`` when ``fn`` is called with autocast enabled for its
    first tensor argument's device and that device type is ``device`` (torch refuses
    ``binary_cross_entropy`` under CUDA autocast, and so does funcloss)."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if autocast_device(args, kwargs) == device:
                raise RuntimeError(message)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
