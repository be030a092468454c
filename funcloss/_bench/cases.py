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
    # Options for the benchmark's "small", "large", "vmap" (64 examples) and "wide" (1024
    # examples of the same size) inputs (default: elementwise).
    sizes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

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


# --------------------------------------------------------------------------- structured losses

CLASS_SHAPES: list[tuple[int, ...]] = [(4, 5), (5,), (3, 4, 2), (0, 4), (2, 3, 2, 2), (1, 1)]


def _class_target(s: Sampler, shape: Sequence[int], o: Options) -> Tensor:
    classes = shape[1] if len(shape) >= 2 else shape[0]
    tshape = (shape[0], *shape[2:]) if len(shape) >= 2 else ()
    y = s.integers(tshape, 0, classes)
    if o.get("ignore") and y.numel():
        flat = y.reshape(-1).clone()
        flat[0] = o["ignore_index"]
        y = flat.reshape(tshape)
    return y


def _make_cross_entropy(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x = s.normal(shape, 2.0)
    classes = shape[1] if len(shape) >= 2 else shape[0]
    kw: dict[str, Any] = {"reduction": o["reduction"], "label_smoothing": o["label_smoothing"]}
    if o["weight"]:
        kw["weight"] = s.uniform((classes,), 0.2, 2.0)
    in_dims = (0, 0) if len(shape) == 2 and shape[0] > 0 else None
    if o["target"] == "probs":
        class_dim = 0 if len(shape) == 1 else 1
        y = torch.softmax(s.normal(shape), dim=class_dim)
        return Example((x, y), kw, (0, 1), in_dims)
    kw["ignore_index"] = o["ignore_index"]
    return Example((x, _class_target(s, shape, o)), kw, (0,), in_dims)


def _make_nll(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    class_dim = 0 if len(shape) == 1 else 1
    x = torch.log_softmax(s.normal(shape, 2.0), dim=class_dim)
    classes = shape[class_dim]
    kw: dict[str, Any] = {"reduction": o["reduction"], "ignore_index": o["ignore_index"]}
    if o["weight"]:
        kw["weight"] = s.uniform((classes,), 0.2, 2.0)
    in_dims = (0, 0) if len(shape) == 2 and shape[0] > 0 else None
    return Example((x, _class_target(s, shape, o)), kw, (0,), in_dims)


MATRIX_SHAPES: list[tuple[int, ...]] = [(4, 5), (5,), (0, 5), (1, 3), (6, 2)]


def _make_multi_margin(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x = s.normal(shape)
    y = s.integers(shape[:-1], 0, shape[-1])
    kw: dict[str, Any] = {"p": o["p"], "margin": o["margin"], "reduction": o["reduction"]}
    if o["weight"]:
        kw["weight"] = s.uniform(shape[-1:], 0.2, 2.0)
    return Example((x, y), kw, (0,), (0, 0) if len(shape) == 2 and shape[0] else None)


def _make_multilabel_margin(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    classes = shape[-1]
    rows = []
    for _ in range(shape[0] if len(shape) == 2 else 1):
        perm = torch.randperm(classes, generator=s.gen)
        k = int(torch.randint(0, classes + 1, (), generator=s.gen))
        row = perm.clone()
        if k < classes:
            row[k] = -1  # entries after the first -1 are ignored, whatever they are
        rows.append(row)
    y = torch.stack(rows) if rows else torch.zeros((0, classes), dtype=torch.int64)
    if len(shape) == 1:
        y = y[0]
    return Example(
        (s.normal(shape), y.to(s.device)),
        {"reduction": o["reduction"]},
        (0,),
        (0, 0) if len(shape) == 2 and shape[0] else None,
    )


def _make_multilabel_soft_margin(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    y = s.uniform(shape) if o["soft_target"] else s.integers(shape, 0, 2).to(s.dtype)
    kw: dict[str, Any] = {"reduction": o["reduction"]}
    if o["weight"]:
        kw["weight"] = s.uniform(shape[-1:], 0.2, 2.0)
    return Example((s.normal(shape, 2.0), y), kw, (0, 1), (0, 0) if len(shape) == 2 and shape[0] else None)


EMBEDDING_SHAPES: list[tuple[int, ...]] = [(4, 6), (6,), (0, 3), (1, 1), (5, 2)]


def _make_cosine(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    x1, x2 = s.normal(shape), s.normal(shape)
    y = s.signs(shape[:-1])
    kw = {"margin": o["margin"], "reduction": o["reduction"]}
    return Example((x1, x2, y), kw, (0, 1), (0, 0, 0) if len(shape) == 2 and shape[0] else None)


def _make_triplet(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    a, p, n = s.normal(shape), s.normal(shape), s.normal(shape)
    kw = {"margin": o["margin"], "p": o["p"], "swap": o["swap"], "reduction": o["reduction"]}
    return Example((a, p, n), kw, (0, 1, 2), (0, 0, 0) if len(shape) == 2 and shape[0] else None)


def cosine_distance(x1: Tensor, x2: Tensor) -> Tensor:
    """``1 - cos(x1, x2)`` over the last dim: a distance for the triplet case."""
    return 1 - F.cosine_similarity(x1, x2, dim=-1)


def _make_triplet_distance(s: Sampler, o: Options) -> Example:
    shape = o["shape"]
    a, p, n = s.normal(shape), s.normal(shape), s.normal(shape)
    kw: dict[str, Any] = {"margin": o["margin"], "swap": o["swap"], "reduction": o["reduction"]}
    if o["distance"] == "cosine":
        kw["distance_function"] = cosine_distance
    return Example((a, p, n), kw, (0, 1, 2), (0, 0, 0) if len(shape) == 2 and shape[0] else None)


def _ctc_ours(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, **kw: Any) -> Tensor:
    return fl.ctc_loss(torch.log_softmax(logits, -1), targets, input_lengths, target_lengths, **kw)


def _ctc_theirs(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, **kw: Any) -> Tensor:
    if logits.dim() == 2:
        # One example (the vmap loop): torch's unbatched form wants the target trimmed to its
        # length, which reads a value; a batch of one takes the padded row as it is.
        lengths = (input_lengths.reshape(1), target_lengths.reshape(1))
        return F.ctc_loss(torch.log_softmax(logits, -1).unsqueeze(1), targets.unsqueeze(0), *lengths, **kw).reshape(-1)[
            0
        ]
    return F.ctc_loss(torch.log_softmax(logits, -1), targets, input_lengths, target_lengths, **kw)


def _make_ctc(s: Sampler, o: Options) -> Example:
    steps, batch, classes, width = o["size"]
    blank = 0 if o["blank"] == "first" else classes - 1
    logits = s.normal((steps, batch, classes), 2.0)
    # "full": every input uses all T steps and targets are 2/3 to all of S long (the benchmark's
    # workload); "random": any feasible lengths.
    tl = s.integers((batch,), (2 * width) // 3 if o["lengths"] == "full" else 0, width + 1)
    labels = s.integers((batch, width), 1, classes) - (0 if blank == 0 else 1)  # never the blank
    # Each sequence gets at least as many steps as its target needs, unless asked not to.
    repeats = ((labels[:, 1:] == labels[:, :-1]) & (torch.arange(1, width, device=labels.device) < tl[:, None])).sum(1)
    need = (tl + repeats).clamp_max(steps)
    il = need + (s.integers((batch,), 0, steps + 1) % (steps - need + 1))
    if o["lengths"] == "full":
        il = torch.full_like(il, steps)
    if not o["feasible"] and int(tl.max()) > 0:
        k = int(tl.argmax())
        il = il.clone()
        il[k] = max(0, int(tl[k] + repeats[k]) - 1)
    kw = {"blank": blank, "reduction": o["reduction"], "zero_infinity": o["zero_infinity"]}
    infeasible = bool(((tl + repeats) > il).any())
    # An infeasible sequence's gradient is NaN in torch and zero in funcloss (a named test).
    diff = () if infeasible and not o["zero_infinity"] else (0,)
    if o["targets"] == "concatenated":
        flat = torch.cat([labels[n, : int(tl[n])] for n in range(batch)]) if batch else labels.reshape(-1)
        return Example((logits, flat, il, tl), kw, diff, None)
    return Example((logits, labels, il, tl), kw, diff, (1, 0, 0, 0))


def _make_linear_ce(s: Sampler, o: Options) -> Example:
    n, hidden, classes = o["size"]
    x = s.normal((n, hidden))
    w = s.normal((classes, hidden), 0.5)
    kw: dict[str, Any] = {"reduction": o["reduction"], "label_smoothing": o["label_smoothing"]}
    if o["bias"]:
        kw["linear_bias"] = s.normal((classes,))
    if o["weight"]:
        kw["weight"] = s.uniform((classes,), 0.2, 2.0)
    y = s.integers((n,), 0, classes)
    if o["ignore"] and n:
        y = y.clone()
        y[0] = -100
    elif o["ignore_index"] is not None:
        kw["ignore_index"] = o["ignore_index"]
    chunk = {"chunk_size": o["chunk_size"]} if o["chunk_size"] else {}
    return Example((x, w, y), {**kw, **chunk}, (0, 1), (0, None, 0) if n else None)


def _linear_ce_theirs(*args: Any, chunk_size: int | None = None, **kw: Any) -> Tensor:
    del chunk_size  # funcloss's option; torch's default path is unchunked
    if hasattr(F, "linear_cross_entropy"):
        return F.linear_cross_entropy(*args, **kw)
    # torch < 2.13 (a GPU image, say) has no linear_cross_entropy; its documented definition is the oracle.
    x, w, y = args
    return F.cross_entropy(F.linear(x, w, kw.pop("linear_bias", None)), y, **kw)


def device_consistent(oracle: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """torch's class-index loss, with its CPU answer for an unbatched, ignored target under mean.

    For a ``(C,)`` input whose one target equals ``ignore_index``, torch's CPU kernel returns
    NaN (0/0, as for any all-ignored batch) but its CUDA kernel returns 0. funcloss gives NaN on
    every device, so on CUDA this one case is compared with torch on the CPU.
    """

    def theirs(x: Tensor, y: Tensor, **kw: Any) -> Tensor:
        unbatched = x.is_cuda and x.dim() == 1 and y.dim() == 0 and not y.is_floating_point()
        if unbatched and kw.get("reduction", "mean") == "mean" and int(y) == kw.get("ignore_index", -100):
            cpu = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in kw.items()}
            return oracle(x.cpu(), y.cpu(), **cpu).to(x.device)
        return oracle(x, y, **kw)

    return theirs


ADAPTIVE_CUTOFFS = (3, 6)


def _adaptive_ours(x: Tensor, y: Tensor, head: Tensor, p0: Tensor, o0: Tensor, p1: Tensor, o1: Tensor) -> Tensor:
    return fl.adaptive_log_softmax_with_loss(x, y, head, [(p0, o0), (p1, o1)], ADAPTIVE_CUTOFFS).loss


def _adaptive_theirs(x: Tensor, y: Tensor, head: Tensor, p0: Tensor, o0: Tensor, p1: Tensor, o1: Tensor) -> Tensor:
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(head.size(1), 10, list(ADAPTIVE_CUTOFFS), div_value=2.0)
    params = {
        "head.weight": head,
        "tail.0.0.weight": p0,
        "tail.0.1.weight": o0,
        "tail.1.0.weight": p1,
        "tail.1.1.weight": o1,
    }
    loss: Tensor = torch.func.functional_call(module.to(device=x.device, dtype=x.dtype), params, (x, y)).loss
    return loss


def _make_adaptive(s: Sampler, o: Options) -> Example:
    n, hidden = o["size"]
    x = s.normal((n, hidden)) if n else s.normal((hidden,))
    y = s.integers((n,) if n else (), 0, 10)
    h0, h1 = hidden // 2, hidden // 4
    args = (
        x,
        y,
        s.normal((5, hidden), 0.5),
        s.normal((h0, hidden), 0.5),
        s.normal((3, h0), 0.5),
        s.normal((h1, hidden), 0.5),
        s.normal((4, h1), 0.5),
    )
    return Example(args, {}, (0, 2, 3, 4, 5, 6), (0, 0, None, None, None, None, None) if n else None)


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
        *_structured_cases(base),
    ]


def _structured_cases(base: Mapping[str, Sequence[Any]]) -> list[LossCase]:
    red = base["reduction"]
    class_sizes = {
        "small": {"shape": (64, 10)},
        "large": {"shape": (4096, 1000)},
        "vmap": {"shape": (64, 10)},
        "wide": {"shape": (1024, 10)},
    }
    ce_opts = {
        "shape": CLASS_SHAPES,
        "reduction": red,
        "target": ["index", "probs"],
        "weight": [False, True],
        "label_smoothing": [0.0, 0.1, 1.0],
        "ignore": [False, True],
        "ignore_index": [-100, 2],
    }
    return [
        LossCase(
            "cross_entropy",
            fl.cross_entropy,
            device_consistent(F.cross_entropy),
            _make_cross_entropy,
            ce_opts,
            sizes=class_sizes,
        ),
        LossCase(
            "nll_loss",
            fl.nll_loss,
            device_consistent(F.nll_loss),
            _make_nll,
            {
                "shape": CLASS_SHAPES,
                "reduction": red,
                "weight": [False, True],
                "ignore": [False, True],
                "ignore_index": [-100, 2],
            },
            sizes=class_sizes,
        ),
        LossCase(
            "multi_margin_loss",
            fl.multi_margin_loss,
            F.multi_margin_loss,
            _make_multi_margin,
            # No empty batch: torch's mean of one is uninitialised memory (a named test).
            {
                "shape": [s for s in MATRIX_SHAPES if s[0] != 0],
                "reduction": red,
                "p": [1, 2],
                "margin": [1.0, 0.5],
                "weight": [False, True],
            },
            torch_breaks=frozenset({"vmap", "jvp", "hessian"}),
            sizes=class_sizes,
        ),
        LossCase(
            "multilabel_margin_loss",
            fl.multilabel_margin_loss,
            F.multilabel_margin_loss,
            _make_multilabel_margin,
            {"shape": [s for s in MATRIX_SHAPES if s[0] != 0], "reduction": red},
            torch_breaks=frozenset({"vmap", "jvp", "hessian"}),
            sizes={
                "small": {"shape": (64, 10)},
                "large": {"shape": (1024, 100)},
                "vmap": {"shape": (64, 10)},
                "wide": {"shape": (1024, 10)},
            },
        ),
        LossCase(
            "multilabel_soft_margin_loss",
            fl.multilabel_soft_margin_loss,
            F.multilabel_soft_margin_loss,
            _make_multilabel_soft_margin,
            {"shape": MATRIX_SHAPES, "reduction": red, "soft_target": [False, True], "weight": [False, True]},
            sizes=class_sizes,
        ),
        LossCase(
            "cosine_embedding_loss",
            fl.cosine_embedding_loss,
            F.cosine_embedding_loss,
            _make_cosine,
            {"shape": EMBEDDING_SHAPES, "reduction": red, "margin": [0.0, 0.3, -0.2]},
            sizes={
                "small": {"shape": (64, 16)},
                "large": {"shape": (4096, 256)},
                "vmap": {"shape": (64, 16)},
                "wide": {"shape": (1024, 16)},
            },
        ),
        LossCase(
            "triplet_margin_loss",
            fl.triplet_margin_loss,
            F.triplet_margin_loss,
            _make_triplet,
            {"shape": EMBEDDING_SHAPES, "reduction": red, "margin": [1.0, 0.3], "p": [2, 1, 3], "swap": [False, True]},
            torch_breaks=frozenset({"vmap"}),
            sizes={
                "small": {"shape": (64, 16)},
                "large": {"shape": (4096, 256)},
                "vmap": {"shape": (64, 16)},
                "wide": {"shape": (1024, 16)},
            },
        ),
        LossCase(
            "triplet_margin_with_distance_loss",
            fl.triplet_margin_with_distance_loss,
            F.triplet_margin_with_distance_loss,
            _make_triplet_distance,
            {
                "shape": EMBEDDING_SHAPES,
                "reduction": red,
                "margin": [1.0, 0.3],
                "swap": [False, True],
                "distance": ["default", "cosine"],
            },
            sizes={
                "small": {"shape": (64, 16)},
                "large": {"shape": (4096, 256)},
                "vmap": {"shape": (64, 16)},
                "wide": {"shape": (1024, 16)},
            },
        ),
        LossCase(
            "ctc_loss",
            _ctc_ours,
            _ctc_theirs,
            _make_ctc,
            {
                "size": [(6, 3, 5, 3), (8, 2, 4, 2), (1, 1, 3, 1), (10, 2, 6, 4)],
                "reduction": red,
                "targets": ["padded", "concatenated"],
                "zero_infinity": [False, True],
                "feasible": [True, False],
                "blank": ["first", "last"],
                "lengths": ["random", "full"],
            },
            torch_breaks=frozenset({"vmap", "jvp", "hessian"}),
            half=False,
            sizes={
                "small": {"size": (20, 4, 10, 5), "lengths": "full"},
                "large": {"size": (200, 16, 40, 30), "lengths": "full"},
                "vmap": {"size": (50, 64, 20, 10), "lengths": "full"},
                "wide": {"size": (50, 1024, 20, 10), "lengths": "full"},
            },
        ),
        LossCase(
            "linear_cross_entropy",
            fl.linear_cross_entropy,
            _linear_ce_theirs,
            _make_linear_ce,
            {
                "size": [(6, 4, 5), (1, 3, 2), (0, 3, 4), (9, 2, 7)],
                "reduction": red,
                "bias": [False, True],
                "weight": [False, True],
                "label_smoothing": [0.0, 0.2],
                "ignore": [False, True],
                "ignore_index": [None, 1],
                "chunk_size": [None, 2, 4],
            },
            sizes={
                "small": {"size": (64, 32, 10)},
                "large": {"size": (4096, 256, 1000)},
                "vmap": {"size": (64, 32, 10)},
                "wide": {"size": (1024, 32, 10)},
            },
        ),
        LossCase(
            "adaptive_log_softmax_with_loss",
            _adaptive_ours,
            _adaptive_theirs,
            _make_adaptive,
            {"size": [(6, 8), (0, 8), (1, 4), (9, 16)]},
            torch_breaks=frozenset({"vmap"}),
            sizes={
                "small": {"size": (64, 16)},
                "large": {"size": (4096, 256)},
                "vmap": {"size": (64, 16)},
                "wide": {"size": (1024, 16)},
            },
        ),
    ]


CASES: dict[str, LossCase] = {c.name: c for c in _cases()}
