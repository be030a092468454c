"""One case per loss: the funcloss function, its torch reference, and how to make inputs.

A case's ``make`` turns a seeded `Sampler` and a choice of options into an `Example`. The
options are a mapping from name to the choices it may take; the first choice of each is the
default. The test suite draws options with hypothesis; ``python -m funcloss check`` and the
benchmarks use the defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import funcloss as fl

Options = Mapping[str, Any]


class Sampler:
    """Random tensors from one seeded generator, on one device and dtype."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.device = torch.device(device)

    def _out(self, t: Tensor) -> Tensor:
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)

    def normal(self, shape: Sequence[int], scale: float = 1.0) -> Tensor:
        return self._out(torch.randn(tuple(shape), generator=self.gen, dtype=torch.float64) * scale)

    def uniform(self, shape: Sequence[int], low: float = 0.0, high: float = 1.0) -> Tensor:
        u = torch.rand(tuple(shape), generator=self.gen, dtype=torch.float64)
        return self._out(low + (high - low) * u)

    def integers(self, shape: Sequence[int], low: int, high: int) -> Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.gen).to(self.device)

    def signs(self, shape: Sequence[int]) -> Tensor:
        return self._out(self.integers(shape, 0, 2).double() * 2 - 1)


@dataclass(frozen=True)
class Example:
    """Arguments for one call, and what the harness needs to know about them.

    Attributes:
        args: positional arguments (the same for funcloss and torch).
        kwargs: keyword arguments.
        diff: positions in ``args`` of the tensors to differentiate.
        in_dims: per positional argument, its batch dim for ``vmap`` (None: shared), or None
            when the example has no batch dim to map over.
        kw_dims: batch dims of tensor keyword arguments (missing: shared).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    diff: tuple[int, ...] = (0,)
    in_dims: tuple[int | None, ...] | None = None
    kw_dims: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class LossCase:
    """A loss, its torch.nn.functional reference, and how to make its inputs."""

    name: str
    ours: Callable[..., Tensor]
    theirs: Callable[..., Tensor]
    make: Callable[[Sampler, Options], Example]
    options: Mapping[str, Sequence[Any]]
    # Where torch's own loss breaks under torch.func (measured; see TORCH_SEMANTICS.md).
    torch_breaks: frozenset[str] = field(default_factory=frozenset)
    # torch supports float16/bfloat16 for this loss on CPU.
    half: bool = True

    def defaults(self) -> dict[str, Any]:
        return {k: v[0] for k, v in self.options.items()}


ELEMENTWISE_SHAPES: list[tuple[int, ...]] = [(4, 3), (5,), (), (0, 3), (2, 3, 2), (1, 1)]
REDUCTIONS = ["mean", "sum", "none"]


def _batched(shape: Sequence[int], n: int) -> tuple[int | None, ...] | None:
    return tuple([0] * n) if len(shape) >= 1 and shape[0] > 0 else None


def _pair(s: Sampler, o: Options, *, target: Callable[[Sequence[int]], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    shape = o["shape"]
    x = s.normal(shape)
    y = target(shape) if target is not None else s.normal(shape)
    return x, y


def _make_regression(weighted: bool) -> Callable[[Sampler, Options], Example]:
    def make(s: Sampler, o: Options) -> Example:
        x, y = _pair(s, o)
        kw: dict[str, Any] = {"reduction": o["reduction"]}
        for key in ("delta", "beta"):
            if key in o:
                kw[key] = o[key]
        if weighted and o.get("weight"):
            kw["weight"] = s.uniform(o["shape"], 0.1, 2.0)
        return Example((x, y), kw, (0, 1), _batched(o["shape"], 2), {"weight": 0})

    return make


def _make_soft_margin(s: Sampler, o: Options) -> Example:
    x, y = _pair(s, o, target=s.signs)
    return Example((x * 3, y), {"reduction": o["reduction"]}, (0,), _batched(o["shape"], 2))


def _make_hinge(s: Sampler, o: Options) -> Example:
    x, y = _pair(s, o, target=s.signs)
    return Example(
        (x.abs() * 2, y), {"margin": o["margin"], "reduction": o["reduction"]}, (0,), _batched(o["shape"], 2)
    )


def _make_ranking(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x1, x2, y = s.normal(shape), s.normal(shape), s.signs(shape)
    return Example((x1, x2, y), {"margin": o["margin"], "reduction": o["reduction"]}, (0, 1), _batched(shape, 3))


def _make_poisson(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x = s.normal(shape) if o["log_input"] else s.uniform(shape, 0.1, 3.0)
    y = s.integers(shape, 0, 6).to(dtype=x.dtype)
    kw = {"log_input": o["log_input"], "full": o["full"], "reduction": o["reduction"]}
    # torch's target gradient is NaN at y = 0 with full=True (funcloss's is finite): a named test.
    diff = (0,) if o["full"] else (0, 1)
    return Example((x, y), kw, diff, _batched(shape, 2))


def _make_gaussian(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x, y = s.normal(shape), s.normal(shape)
    low = 1e-9 if o["tiny_var"] else 0.1
    var: Tensor | float
    kind = o["var"] if len(shape) >= 1 else "same"
    if kind == "float":
        var = 0.7
    elif kind == "same":
        var = s.uniform(shape, low, 2.0)
    elif kind == "short":
        var = s.uniform(shape[:-1], low, 2.0)
    else:  # one dim of size 1
        var = s.uniform((*shape[:-1], 1), low, 2.0)
    batched = _batched(shape, 2) is not None
    tensor_var = isinstance(var, Tensor)
    kw = {"full": o["full"], "reduction": o["reduction"]}
    in_dims = (0, 0, 0 if tensor_var else None) if batched else None
    return Example((x, y, var), kw, (0, 1, 2) if tensor_var else (0, 1), in_dims)


def _make_bce(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x = s.uniform(shape, 0.02, 0.98)
    y = s.uniform(shape) if o["soft_target"] else s.integers(shape, 0, 2).to(x.dtype)
    kw: dict[str, Any] = {"reduction": o["reduction"]}
    in_dims: tuple[int | None, ...] | None = _batched(shape, 2)
    if o["weight"] and len(shape) >= 1:
        kw["weight"] = s.uniform(shape[-1:], 0.1, 2.0)
        # The per-column weight is shared by every row, so it is not mapped over.
    return Example((x, y), kw, (0, 1), in_dims)


def _make_bce_logits(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x = s.normal(shape, 3.0)
    y = s.uniform(shape) if o["soft_target"] else s.integers(shape, 0, 2).to(x.dtype)
    kw: dict[str, Any] = {"reduction": o["reduction"]}
    if o["weight"] and len(shape) >= 1:
        kw["weight"] = s.uniform(shape[-1:], 0.1, 2.0)
    if o["pos_weight"] and len(shape) >= 1:
        kw["pos_weight"] = s.uniform(shape[-1:], 0.5, 4.0)
    return Example((x, y), kw, (0, 1), _batched(shape, 2))


def _make_kl(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x = torch.log_softmax(s.normal(shape), dim=-1) if len(shape) else s.normal(shape).clamp_max(0)
    logits = s.normal(shape)
    if o["log_target"]:
        y = torch.log_softmax(logits, dim=-1) if len(shape) else logits.clamp_max(0)
    else:
        y = torch.softmax(logits, dim=-1) if len(shape) else logits.sigmoid()
        if o["zeros"]:
            y = y * (s.uniform(shape) > 0.3).to(y.dtype)
    return Example((x, y), {"reduction": o["reduction"], "log_target": o["log_target"]}, (0, 1), _batched(shape, 2))


def _cases() -> list[LossCase]:
    base: dict[str, Sequence[Any]] = {"shape": ELEMENTWISE_SHAPES, "reduction": REDUCTIONS}
    return [
        LossCase("l1_loss", fl.l1_loss, F.l1_loss, _make_regression(True), {**base, "weight": [False, True]}),
        LossCase("mse_loss", fl.mse_loss, F.mse_loss, _make_regression(True), {**base, "weight": [False, True]}),
        LossCase(
            "huber_loss",
            fl.huber_loss,
            F.huber_loss,
            _make_regression(True),
            {**base, "delta": [1.0, 0.5, 2.5], "weight": [False, True]},
        ),
        LossCase(
            "smooth_l1_loss",
            fl.smooth_l1_loss,
            F.smooth_l1_loss,
            _make_regression(False),
            {**base, "beta": [1.0, 0.0, 0.3]},
        ),
        LossCase(
            "soft_margin_loss",
            fl.soft_margin_loss,
            F.soft_margin_loss,
            _make_soft_margin,
            base,
            torch_breaks=frozenset({"vmap", "hessian"}),
        ),
        LossCase(
            "hinge_embedding_loss",
            fl.hinge_embedding_loss,
            F.hinge_embedding_loss,
            _make_hinge,
            {**base, "margin": [1.0, 0.5, 3.0]},
        ),
        LossCase(
            "margin_ranking_loss",
            fl.margin_ranking_loss,
            F.margin_ranking_loss,
            _make_ranking,
            {**base, "margin": [0.0, 0.5]},
            torch_breaks=frozenset({"vmap"}),
        ),
        LossCase(
            "poisson_nll_loss",
            fl.poisson_nll_loss,
            F.poisson_nll_loss,
            _make_poisson,
            {**base, "log_input": [True, False], "full": [False, True]},
        ),
        LossCase(
            "gaussian_nll_loss",
            fl.gaussian_nll_loss,
            F.gaussian_nll_loss,
            _make_gaussian,
            {**base, "var": ["same", "float", "short", "one"], "full": [False, True], "tiny_var": [False, True]},
            torch_breaks=frozenset({"vmap"}),
        ),
        LossCase(
            "binary_cross_entropy",
            fl.binary_cross_entropy,
            F.binary_cross_entropy,
            _make_bce,
            {**base, "soft_target": [True, False], "weight": [False, True]},
        ),
        LossCase(
            "binary_cross_entropy_with_logits",
            fl.binary_cross_entropy_with_logits,
            F.binary_cross_entropy_with_logits,
            _make_bce_logits,
            {**base, "soft_target": [True, False], "weight": [False, True], "pos_weight": [False, True]},
        ),
        LossCase(
            "kl_div",
            fl.kl_div,
            F.kl_div,
            _make_kl,
            {
                **base,
                "reduction": ["batchmean", "sum", "none", "mean"],
                "log_target": [False, True],
                "zeros": [False, True],
            },
            torch_breaks=frozenset({"vmap"}),
        ),
    ]


CASES: dict[str, LossCase] = {c.name: c for c in _cases()}
