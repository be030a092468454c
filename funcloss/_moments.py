"""Per-sample gradients and their statistics for Linear and Embedding layers, from one
batched forward and backward.

For a Linear layer on 2-D inputs the gradient of sample ``i`` is the outer product
``g_i a_i^T`` of the layer's output gradient and input, so every per-element statistic over
samples is a matrix product (Goodfellow 2015; Dangel et al. 2020):

.. math::
    \\sum_i g_i a_i^T = G^T A, \\quad \\sum_i (g_i a_i^T)^2 = (G^2)^T (A^2), \\quad
    \\sum_i \\operatorname{sign}(g_i a_i^T) = \\operatorname{sign}(G)^T \\operatorname{sign}(A),

and the squared norm of sample ``i``'s gradient is ``||g_i||^2 ||a_i||^2``. An Embedding's
per-sample gradient touches only the rows of that sample's tokens, so it is summed per (sample,
token) pair. Linear layers on inputs with more dims (sequences) form that layer's per-sample
gradients for one chunk. A convolution's per-sample weight gradients are one grouped
convolution's weight gradient or one einsum over the input's patches, whichever measured
faster for the layer's shape; a normalisation layer's (LayerNorm, GroupNorm, eval-mode
BatchNorm) affine weight and bias get ``sum g_i * x_hat_i`` and ``sum g_i`` over positions.
`grad_stats` folds these into running sums without forming ``B x P`` gradients;
`per_sample_grads` writes ``g_i a_i^T`` (or token rows) straight into its result.

References:
    Goodfellow, I. "Efficient Per-Example Gradient Computations", arXiv:1510.01799, 2015.
    Dangel, F., Kunstner, F. and Hennig, P. "BackPACK: Packing more into Backprop", ICLR 2020.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
import torch.func as tf
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from ._checks import is_eager, on_accelerator
from ._per_sample import Batch, GradStats, batch_size, call_model, check_scalar_loss, map_batch, rows_of
from .losses import _classification as fl_class
from .losses import _probabilistic as fl_prob
from .losses import _regression as fl_reg


class _Moments:
    """Running sums over samples, for every parameter element at once.

    One ``(4, P)`` buffer holds, per element: the sum, the sum of squares, the sum of signs and
    the number of non-zeros; each parameter is a slice of it. Each chunk's layers write their
    sums (in the data's dtype) into a ``(4, P)`` chunk buffer. A single chunk's buffer is the
    result's storage (its sums are already in the data's precision); from the second chunk on
    the sums are kept in float64. The result is computed in place over the flat buffer.
    """

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.shapes = {k: p.shape for k, p in params.items()}
        self.offsets: dict[str, slice] = {}
        start = 0
        for k, p in params.items():
            self.offsets[k] = slice(start, start + p.numel())
            start += p.numel()
        first = next(iter(params.values()))
        self.size, self.dtype, self.device = start, first.dtype, first.device
        self.first: Tensor | None = None  # the first chunk's sums, until a second chunk comes
        self.acc: Tensor | None = None  # float64 totals, from the second chunk on
        self.chunk: Tensor | None = None
        self.norms: list[Tensor] = []

    def slot(self, name: str) -> Tensor:
        """The ``(4, numel)`` slice of this chunk's buffer that belongs to ``name``; every
        parameter's slot is written once per chunk."""
        if self.chunk is None:
            self.chunk = torch.empty(4, self.size, dtype=self.dtype, device=self.device)
        return self.chunk[:, self.offsets[name]]

    def end_chunk(self) -> None:
        assert self.chunk is not None, "end_chunk() before any slot was written"
        if self.acc is not None:
            self.acc.add_(self.chunk)
        elif self.first is None:
            self.first, self.chunk = self.chunk, None  # the next chunk takes a new buffer
        else:
            self.acc = self.first.to(torch.float64).add_(self.chunk)
            self.first = None

    def add_dense(self, name: str, g: Tensor, norms: Tensor) -> None:
        """Sums of explicit per-sample gradients ``g`` (b, *shape)."""
        flat = g.reshape(g.size(0), -1)
        slot = self.slot(name)
        squares = flat * flat
        signs = flat.sign()
        torch.sum(flat, 0, out=slot[0])
        torch.sum(squares, 0, out=slot[1])
        torch.sum(signs, 0, out=slot[2])
        torch.sum(signs.abs_(), 0, out=slot[3])
        norms += squares.sum(1)

    def add_linears(self, layers: list[tuple[str | None, str | None, Tensor, Tensor]], norms: Tensor) -> None:
        """Sums for Linear layers on 2-D inputs, given per layer its weight's and bias's names
        (None where not trainable), ``G`` (b, out) and ``A`` (b, in).

        A weight's per-sample gradients are ``g_i a_i^T``: its four sums are one batched
        matmul of ``[G, G^2, sign G, |sign G|]^T`` and ``[A, A^2, sign A, |sign A|]``; a
        bias's per-sample gradients are ``g_i``, whose sums are the row sums of the same left
        factor. Squared norms: ``||g_i||^2 (||a_i||^2 + 1)`` with a bias, ``||g_i||^2 ||a_i||^2``
        without. The layers' ``G`` (and ``A``) share one powers buffer side by side, so each
        power is one kernel for all layers.
        """
        gs = [g for _, _, g, _ in layers]
        g_sizes = tuple(g.size(1) for g in gs)
        a_sizes = tuple(a.size(1) if w is not None else 0 for w, _, _, a in layers)
        b, g_total, a_total = gs[0].size(0), sum(g_sizes), sum(a_sizes)
        products = max(g * a for g, a in zip(g_sizes, a_sizes))
        # All temporaries of this call in one scratch buffer kept between calls.
        scratch = _scratch(4 * (b * (g_total + a_total) + products), gs[0].dtype, gs[0].device)
        left_end, right_end = 4 * b * g_total, 4 * b * (g_total + a_total)
        left = _powers(gs, scratch[:left_end])  # (4, b, sum of outs)
        inputs = [a for w, _, _, a in layers if w is not None]
        right = _powers(inputs, scratch[left_end:right_end]) if inputs else None
        product_buffer = scratch[right_end:]
        # Per layer and sample: ||g_i||^2 and ||a_i||^2 (+1 where the layer has a bias; 1 for a
        # bias alone).
        g_norms = torch.empty(len(layers), b, dtype=left.dtype, device=left.device)
        a_norms = torch.empty_like(g_norms)
        g_start = a_start = 0
        for k, (g_size, a_size) in enumerate(zip(g_sizes, a_sizes)):
            torch.sum(left[1, :, g_start : g_start + g_size], 1, out=g_norms[k])
            if a_size:
                assert right is not None
                torch.sum(right[1, :, a_start : a_start + a_size], 1, out=a_norms[k])
            else:
                a_norms[k].zero_()  # a bias alone: the 1 is added below
            g_start += g_size
            a_start += a_size
        biased = tuple(bias is not None or a_size == 0 for (_, bias, _, _), a_size in zip(layers, a_sizes))
        if any(biased):
            a_norms.add_(_ones_at(biased, a_norms.dtype, a_norms.device).unsqueeze(1))
        norms.add_(torch.linalg.vecdot(g_norms, a_norms, dim=0))
        g_start = a_start = 0
        for (weight, bias, _, _), g_size, a_size in zip(layers, g_sizes, a_sizes):
            block = left[:, :, g_start : g_start + g_size].transpose(1, 2)  # (4, out, b)
            if weight is not None:
                assert right is not None
                product = product_buffer[: 4 * g_size * a_size].view(4, g_size, a_size)
                torch.bmm(block, right[:, :, a_start : a_start + a_size], out=product)
                self.slot(weight).view(4, g_size, a_size).copy_(product)
            if bias is not None:
                torch.sum(block, 2, out=self.slot(bias))
            g_start += g_size
            a_start += a_size

    def add_rows(self, name: str, rows: Tensor, per_row: Tensor, spare: Tensor) -> Tensor:
        """Sums of per-(sample, row) gradients ``per_row`` (pairs, D) that touch rows ``rows``
        of a ``(V, D)`` parameter (an embedding). Returns the per-pair squared norms ``(pairs,)``.

        The powers go one after another through ``spare``, a buffer of ``per_row``'s shape:
        fresh memory is what costs most here (its pages fault in), not the arithmetic."""
        slot = self.slot(name).view(4, *self.shapes[name])
        slot.zero_()
        if per_row.dtype != slot.dtype:
            per_row, spare = per_row.to(slot.dtype), torch.empty_like(per_row, dtype=slot.dtype)
        slot[0].index_add_(0, rows, per_row)
        scratch = torch.mul(per_row, per_row, out=spare)
        slot[1].index_add_(0, rows, scratch)
        sq_norms = scratch.sum(1)
        slot[2].index_add_(0, rows, torch.sign(per_row, out=scratch))
        slot[3].index_add_(0, rows, scratch.abs_())
        return sq_norms

    def result(self, count: int) -> GradStats:
        stats = self.acc if self.acc is not None else self.first
        assert stats is not None, "result() before any chunk"
        total, squares, _, nonzero = stats.unbind(0)  # owned here: computed in place
        sum_sq_norm = torch.dot(total, total)
        if count > 1:
            squares.addcmul_(total, total, value=-1.0 / count).clamp_min_(0).div_(count - 1)
        else:
            squares.fill_(float("nan"))
        total.div_(count)
        nonzero.neg_().add_(count)  # now the number of exact zeros
        out = stats.to(self.dtype)
        norms = self.norms[0] if len(self.norms) == 1 else torch.cat(self.norms)

        parts = out.split_with_sizes([sl.stop - sl.start for sl in self.offsets.values()], 1)
        blocks = {k: part.view(4, *self.shapes[k]).unbind(0) for k, part in zip(self.offsets, parts)}
        return GradStats(
            count=count,
            mean={k: v[0] for k, v in blocks.items()},
            variance={k: v[1] for k, v in blocks.items()},
            sign_sum={k: v[2] for k, v in blocks.items()},
            zeros={k: v[3] for k, v in blocks.items()},
            sq_norms=norms.to(self.dtype),
            sum_sq_norm=sum_sq_norm.to(self.dtype),
        )


def _powers(xs: list[Tensor], buffer: Tensor) -> Tensor:
    """``stack([x, x^2, sign(x), |sign(x)|])`` of the 2-D tensors ``xs`` (same rows) placed
    side by side along dim 1, written into the flat ``buffer``: the ``xs`` and their signs
    first, then both squared by one multiply (``sign(x)^2 = |sign(x)|``)."""
    out = buffer.view(4, xs[0].size(0), -1)
    torch.cat(xs, 1, out=out[0])
    torch.sign(out[0], out=out[2])
    firsts = out[0::2]
    torch.mul(firsts, firsts, out=out[1::2])
    return out


@functools.lru_cache(maxsize=64)
def _ones_at(flags: tuple[bool, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """1 where ``flags`` is set, else 0, as a tensor."""
    return torch.tensor(flags, dtype=dtype).to(device)


# Scratch kept between calls, per thread and (dtype, device), up to this many elements (16 MiB
# of float32): fresh memory costs more than the arithmetic on these temporaries (its pages
# fault in on every call).
_SCRATCH_LIMIT = 1 << 22
_scratch_buffers = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of ``numel`` elements for temporaries that do not outlive the call."""
    if numel > _SCRATCH_LIMIT:
        return torch.empty(numel, dtype=dtype, device=device)
    kept: dict[tuple[torch.dtype, torch.device], Tensor] = _scratch_buffers.__dict__.setdefault("kept", {})
    buffer = kept.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = kept[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


_CLASS_LOSSES: dict[Callable[..., Tensor], frozenset[str]] = {
    fl_class.cross_entropy: frozenset({"label_smoothing"}),
    F.cross_entropy: frozenset({"label_smoothing"}),
    fl_class.nll_loss: frozenset(),
    F.nll_loss: frozenset(),
}
_ELEMENTWISE_LOSSES: dict[Callable[..., Tensor], frozenset[str]] = {
    fl_reg.l1_loss: frozenset(),
    F.l1_loss: frozenset(),
    fl_reg.mse_loss: frozenset(),
    F.mse_loss: frozenset(),
    fl_reg.huber_loss: frozenset({"delta"}),
    F.huber_loss: frozenset({"delta"}),
    fl_reg.smooth_l1_loss: frozenset({"beta"}),
    F.smooth_l1_loss: frozenset({"beta"}),
    fl_prob.binary_cross_entropy_with_logits: frozenset(),
    F.binary_cross_entropy_with_logits: frozenset(),
}


def _unwrapped(
    loss_fn: Callable[..., Tensor], loss_kwargs: Mapping[str, Any]
) -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """The function under keyword-only ``functools.partial`` layers, and all the keywords."""
    kwargs = dict(loss_kwargs)
    while isinstance(loss_fn, functools.partial) and not loss_fn.args:
        kwargs = {**loss_fn.keywords, **kwargs}
        loss_fn = loss_fn.func
    return loss_fn, kwargs


def _output_grad(
    loss_fn: Callable[..., Tensor], loss_kwargs: Mapping[str, Any]
) -> Callable[[Tensor, Tensor], Tensor | None] | None:
    """For `cross_entropy` and `nll_loss` (funcloss's or torch's) with class indices, the
    gradient of the summed per-sample losses with respect to the model's output, in closed
    form (no graph through the loss); None for any other loss.

    Sample ``n``'s cross-entropy is ``-sum_c q_nc log softmax(z_n)_c`` with
    ``q_n = (1 - eps) e_{y_n} + eps / C`` (``eps`` the label smoothing), whose gradient is
    ``softmax(z_n) - q_n``; its NLL of log-probabilities ``z_n`` is ``-z_{n, y_n}``, with
    gradient ``-e_{y_n}``. The calls that qualify are those `_rowwise` takes (2-D float32 or
    float64 scores, 1-D int64 class indices, none ignored, eager mode), outside autocast
    (whose precision the loss's own graph keeps). A target out of range raises the loss's
    ``IndexError`` (on an accelerator, the scatter's device-side assertion). Where a call does
    not qualify, the returned function gives None.
    """
    fn, kwargs = _unwrapped(loss_fn, loss_kwargs)
    if fn not in _CLASS_LOSSES or not set(kwargs) <= _CLASS_LOSSES[fn]:
        return None
    softmax = fn in (fl_class.cross_entropy, F.cross_entropy)
    eps = kwargs.get("label_smoothing", 0.0)
    if not isinstance(eps, float | int) or not 0.0 <= eps <= 1.0:
        return None  # the loss's own call reports it

    def grad(out: Tensor, target: Tensor) -> Tensor | None:
        if (
            out.dim() != 2
            or out.dtype not in (torch.float32, torch.float64)
            or target.shape != out.shape[:1]
            or target.dtype != torch.int64
            or not is_eager()
            or torch.is_autocast_enabled(out.device.type)
        ):
            return None
        classes = out.size(1)
        if on_accelerator(target):
            # One synchronisation, as the per-sample losses' own check; a target out of range
            # fails the scatter's device-side bounds check, as torch's kernels do.
            if bool((target == -100).any()):
                return None
        elif not fl_class._check_in_range(target, classes, -100):
            return None  # some target ignored
        with torch.no_grad():
            if softmax:
                g = torch.softmax(out, 1)
                if eps:
                    g.sub_(eps / classes)
                return g.scatter_(1, target.unsqueeze(1), eps - 1.0, reduce="add")
            return torch.zeros_like(out).scatter_(1, target.unsqueeze(1), -1.0, reduce="add")

    return grad


def _rowwise(
    loss_fn: Callable[..., Tensor], loss_kwargs: Mapping[str, Any]
) -> Callable[[Tensor, Tensor], Tensor | None] | None:
    """For a known loss whose value on a batch of one sample is its unreduced value averaged
    over that sample's positions, the per-sample losses in one batched call (no ``vmap``);
    None for any other loss.

    Class losses qualify without weights (a batch of one divides by its own target's weight)
    for 2-D scores and 1-D class indices with no ignored target (one of those alone is 0 / 0);
    elementwise losses for a target of the input's shape. Where a call does not qualify, the
    returned function gives None and the caller vmaps the loss over samples.
    """
    loss_fn, kwargs = _unwrapped(loss_fn, loss_kwargs)
    if loss_fn in _CLASS_LOSSES and set(kwargs) <= _CLASS_LOSSES[loss_fn]:
        fn = loss_fn

        def classes(out: Tensor, target: Tensor) -> Tensor | None:
            if out.dim() != 2 or target.shape != out.shape[:1] or target.is_floating_point():
                return None
            if not is_eager() or bool((target == -100).any()):
                return None
            return fn(out, target, reduction="none", **kwargs)

        return classes
    if loss_fn in _ELEMENTWISE_LOSSES and set(kwargs) <= _ELEMENTWISE_LOSSES[loss_fn]:
        fn = loss_fn

        def elementwise(out: Tensor, target: Tensor) -> Tensor | None:
            if out.shape != target.shape or out.dim() < 1:
                return None
            return fn(out, target, reduction="none", **kwargs).reshape(out.size(0), -1).mean(1)

        return elementwise
    return None


_CONVS = (nn.Conv1d, nn.Conv2d)
# Normalisation layers whose affine parameters get per-sample gradients from their input and
# output gradient: LayerNorm and GroupNorm normalise each sample by itself, BatchNorm in eval
# mode by its running statistics (an affine map per sample).
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _supported_layers(model: nn.Module) -> dict[str, nn.Module] | None:
    """Modules owning trainable parameters, if all are Linear, plain Embedding, plain Conv1d or
    Conv2d, LayerNorm, GroupNorm or BatchNorm in eval mode with running statistics; else None."""
    layers: dict[str, nn.Module] = {}
    owned: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        own = [p for p in module._parameters.values() if p is not None and p.requires_grad]
        if not own:
            continue
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                return None
        elif isinstance(module, _CONVS):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                return None
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None or module.running_var is None:
                return None
        elif not isinstance(module, (nn.Linear, nn.LayerNorm, nn.GroupNorm)):
            return None
        if name in layers or any(id(p) in owned for p in own):
            return None  # a module or parameter reached twice: shared
        layers[name] = module
        owned.update(id(p) for p in own)
    return layers or None


def _recorder(
    calls: list[tuple[Tensor | None, Tensor]],
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Tensor], None]:
    """A forward hook (``with_kwargs=True``) that records each call's (input, output); the
    input passed by keyword too (``layer(input=x)``), None if neither."""

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
        calls.append((args[0] if args else kwargs.get("input"), output))

    return record


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


class _Unsupported(Exception):
    """The model is not one this path handles (a layer ran more or less than once)."""


def _captured(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    loss_fn: Callable[..., Tensor],
    inputs: Batch,
    targets: Batch,
    chunk_size: int,
    loss_kwargs: Mapping[str, Any],
    fn: str,
) -> Iterator[tuple[slice, list[tuple[str, nn.Module, Tensor, Tensor]]]]:
    """Per chunk: each layer's input and the gradient of the summed per-sample losses with
    respect to its output, from one batched forward and one backward."""

    def per_sample_loss(out: Any, target: Batch) -> Tensor:
        return check_scalar_loss(loss_fn(as_batch_of_one(out), as_batch_of_one(target), **loss_kwargs), fn)

    def as_batch_of_one(sample: Any) -> Any:
        return map_batch(sample, lambda t: t.unsqueeze(0))

    rowwise = _rowwise(loss_fn, loss_kwargs)
    output_grad = _output_grad(loss_fn, loss_kwargs)

    def batched_loss(out: Any, target: Batch) -> Tensor:
        # The one-call form takes one output tensor and one target tensor.
        if rowwise is not None and isinstance(out, Tensor) and isinstance(target, Tensor):
            losses = rowwise(out, target)
            if losses is not None:
                return losses
        per_sample: Tensor = tf.vmap(per_sample_loss)(out, target)
        return per_sample

    n = batch_size(inputs)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        whole = chunk_size >= n
        chunk_inputs = inputs if whole else rows_of(inputs, rows)
        chunk_targets = targets if whole else rows_of(targets, rows)
        seen: dict[str, list[tuple[Tensor | None, Tensor]]] = {name: [] for name in layers}
        handles = [
            module.register_forward_hook(_recorder(seen[name]), with_kwargs=True) for name, module in layers.items()
        ]
        # Like torch.func.grad, work inside a caller's no_grad block.
        with torch.enable_grad():
            try:
                out = call_model(model, chunk_inputs)
            finally:
                for handle in handles:
                    handle.remove()
            if any(len(calls) != 1 or calls[0][0] is None for calls in seen.values()):
                raise _Unsupported
            names = list(layers)
            outputs = [seen[name][0][1] for name in names]
            closed = None
            if output_grad is not None and isinstance(out, Tensor) and isinstance(chunk_targets, Tensor):
                closed = output_grad(out, chunk_targets)
            if closed is not None:
                grads = torch.autograd.grad(out, outputs, closed, allow_unused=True)
            else:
                grads = torch.autograd.grad(batched_loss(out, chunk_targets).sum(), outputs, allow_unused=True)
        captured = []
        for name, grad_out in zip(names, grads):
            layer_in, layer_out = seen[name][0]
            assert layer_in is not None  # checked above
            grad_out = torch.zeros_like(layer_out) if grad_out is None else grad_out
            captured.append((name, layers[name], layer_in.detach(), grad_out))  # grad_out has no graph
        yield rows, captured


@torch.no_grad()  # the sums record no graph; each chunk's forward enables grad for itself
def layer_moments(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Batch,
    targets: Batch,
    *,
    chunk_size: int,
    loss_kwargs: Mapping[str, Any],
    params: Mapping[str, Tensor],
    progress: bool = False,
) -> GradStats | None:
    """`GradStats` by per-layer moments (no per-sample gradient is formed for 2-D Linear
    inputs), or None when the model is not made of supported layers (or a layer runs more or
    less than once per forward)."""
    layers = _supported_layers(model)
    if layers is None:
        return None
    acc = _Moments(params)
    n = batch_size(inputs)
    try:
        for rows, captured in _captured(model, layers, loss_fn, inputs, targets, chunk_size, loss_kwargs, "grad_stats"):
            norms = torch.zeros(rows.stop - rows.start, dtype=torch.float64, device=acc.device)
            linears: dict[tuple[torch.dtype, torch.dtype], list[tuple[str | None, str | None, Tensor, Tensor]]] = {}
            for name, module, layer_in, grad_out in captured:
                if isinstance(module, nn.Linear) and layer_in.dim() == 2:
                    # Linear layers on 2-D inputs are summed together (fewer, larger kernels).
                    weight_key = _key(name, "weight") if module.weight.requires_grad else None
                    bias_key = _key(name, "bias") if module.bias is not None and module.bias.requires_grad else None
                    group = linears.setdefault((grad_out.dtype, layer_in.dtype), [])
                    group.append((weight_key, bias_key, grad_out, layer_in))
                else:
                    _fold(acc, name, module, layer_in, grad_out, norms)
            for group in linears.values():
                acc.add_linears(group, norms)
            acc.end_chunk()
            acc.norms.append(norms)
            if progress:
                print(f"\rgrad_stats: {rows.stop}/{n} samples", end="", file=sys.stderr)
    except _Unsupported:
        return None
    if progress:
        print(file=sys.stderr)
    return acc.result(n)


@torch.no_grad()  # as layer_moments
def layer_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Batch,
    targets: Batch,
    *,
    chunk_size: int,
    loss_kwargs: Mapping[str, Any],
    progress: bool = False,
) -> dict[str, Tensor] | None:
    """Per-sample gradients ``{name: (B, *shape)}`` from layer inputs and output gradients
    (``g_i a_i^T`` per Linear, token rows per Embedding, the rules above for convolutions and
    normalisations), written in place chunk by chunk; or None for other models."""
    layers = _supported_layers(model)
    if layers is None:
        return None
    n = batch_size(inputs)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # A convolution's per-sample weight gradients come out of their own kernel: with the whole
    # batch in one chunk they are the result as they come (no copy into a buffer).
    direct: dict[str, Tensor] | None = {} if chunk_size >= n else None
    skip = {_key(k, "weight") for k, m in layers.items() if isinstance(m, _CONVS)} if direct is not None else set()
    result = {
        name: torch.empty((n, *p.shape), dtype=p.dtype, device=p.device) for name, p in trainable if name not in skip
    }
    try:
        for rows, captured in _captured(
            model, layers, loss_fn, inputs, targets, chunk_size, loss_kwargs, "per_sample_grads"
        ):
            b = rows.stop - rows.start
            views = {k: v[rows].view(b, -1) for k, v in result.items()}
            for name, module, layer_in, grad_out in captured:
                _write_per_sample(views, name, module, layer_in, grad_out, direct)
            if progress:
                print(f"\rper_sample_grads: {rows.stop}/{n} samples", end="", file=sys.stderr)
    except _Unsupported:
        return None
    if progress:
        print(file=sys.stderr)
    if direct:
        return {name: result[name] if name in result else direct[name] for name, _ in trainable}
    return result


def _write_per_sample(
    views: Mapping[str, Tensor],
    name: str,
    module: nn.Module,
    a: Tensor,
    g: Tensor,
    direct: dict[str, Tensor] | None = None,
) -> None:
    """Write the chunk's per-sample gradients of ``module``'s parameters into ``views``
    (``{param: (b, numel)}``, row slices of the result); with ``direct``, a convolution's
    weight gradients (the whole batch) go there as computed instead."""
    b = g.size(0)
    weight = cast(Tensor, module.weight)
    if isinstance(module, _CONVS):
        if weight.requires_grad:
            grads = _conv_weight_grads(module, a, g)
            if direct is not None:
                direct[_key(name, "weight")] = grads.to(weight.dtype).reshape(b, *weight.shape)
            else:
                views[_key(name, "weight")].view(b, weight.size(0), -1).copy_(grads)
        if module.bias is not None and module.bias.requires_grad:
            torch.sum(g, dim=tuple(range(2, g.dim())), out=views[_key(name, "bias")])
        return
    if isinstance(module, _NORMS):
        weight_grads, bias_grads = _norm_grads(module, a, g)
        for leaf, grads in (("weight", weight_grads), ("bias", bias_grads)):
            if _key(name, leaf) in views:
                views[_key(name, leaf)].copy_(grads.reshape(b, -1))
        return
    if isinstance(module, nn.Embedding):
        vocab, dim = weight.shape
        ids = a.reshape(b, -1)
        grads = g.reshape(b, -1, dim)
        if module.padding_idx is not None:
            grads = grads * (ids != module.padding_idx).unsqueeze(2)
        out = views[_key(name, "weight")].view(b, vocab, dim)
        sample = torch.arange(b, device=ids.device).unsqueeze(1).expand_as(ids)
        out.zero_().index_put_((sample, ids), grads, accumulate=True)
        return
    bias = cast(Tensor | None, module.bias)
    if weight.requires_grad:
        out = views[_key(name, "weight")].view(b, *weight.shape)
        if a.dim() == 2:
            torch.mul(g.unsqueeze(2), a.unsqueeze(1), out=out)
        else:
            g3, a3 = g.reshape(b, -1, g.size(-1)), a.reshape(b, -1, a.size(-1))
            out.copy_(torch.bmm(g3.transpose(1, 2), a3))
    if bias is not None and bias.requires_grad:
        out = views[_key(name, "bias")]
        out.copy_(g if g.dim() == 2 else g.reshape(b, -1, g.size(-1)).sum(1))


def _norm_grads(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of a normalisation layer's affine weight and bias.

    The layer computes ``y = x_hat * w + b`` with ``x_hat`` its input normalised (per sample
    over the normalised shape for LayerNorm, per sample and group for GroupNorm, by the running
    statistics for BatchNorm in eval mode), so sample ``i``'s gradients are
    ``sum_positions g_i * x_hat_i`` and ``sum_positions g_i``: ``(b, *normalized_shape)`` for
    LayerNorm, ``(b, C)`` for the others. ``x_hat`` is recomputed from the recorded input.
    """
    a = a.to(g.dtype)
    if isinstance(module, nn.LayerNorm):
        if a.dim() <= len(module.normalized_shape):
            raise _Unsupported  # no sample dim outside the normalised shape
        x_hat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
        dims = tuple(range(1, a.dim() - len(module.normalized_shape)))
    else:
        if a.dim() < 2:
            raise _Unsupported
        if isinstance(module, nn.GroupNorm):
            x_hat = F.group_norm(a, module.num_groups, None, None, module.eps)
        else:
            bn = cast(nn.modules.batchnorm._BatchNorm, module)
            assert bn.running_mean is not None and bn.running_var is not None  # checked in _supported_layers
            shape = (1, -1) + (1,) * (a.dim() - 2)
            mean, var = bn.running_mean.to(g.dtype).view(shape), bn.running_var.to(g.dtype).view(shape)
            x_hat = (a - mean) * torch.rsqrt(var + bn.eps)
        dims = tuple(range(2, a.dim()))
    weighted = g * x_hat
    return (weighted.sum(dims), g.sum(dims)) if dims else (weighted, g)


def _conv_weight_grads(module: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample Conv2d (or Conv1d) weight gradients ``(b, out, in * kh * kw)``.

    Sample ``i``'s gradient for weight ``[o, c, u, v]`` is
    ``sum_{h, w} g[i, o, h, w] a_pad[i, c, h s_h + u d_h, w s_w + v d_w]``: the output gradient
    contracted with the input's patches. Two ways to compute it, either exact:

    - the weight gradient of one grouped convolution with the samples as groups: input
      ``(1, b * in, H, W)``, output gradient ``(1, b * out, H', W')``, ``groups=b`` (Rochette
      et al. 2019), which the convolution backends compute without forming the patches;
    - one einsum of the output gradient with a strided view of the (padded) input's patches.

    Which is faster depends on the shape, by up to 8x either way on the CPU (the grouped form
    won for most stride-1 layers tried, the einsum for some strided ones and for one input
    channel with a stride), so on the CPU both are timed at a shape's first use and the faster
    is kept for that shape (`_fastest`). The einsum is a candidate only where its patches take
    no more memory than the per-sample gradients (or ``2**22`` values). On accelerators,
    where the time cannot be measured (under tracing), and under
    ``torch.use_deterministic_algorithms(True)`` (results that do not depend on a timing), the
    einsum is taken for one input channel with a stride, else the grouped form.

    References:
        Rochette, G., Manoel, A. and Tramel, E. W. "Efficient Per-Example Gradient
        Computations in Convolutional Neural Networks", arXiv:1912.06015, 2019.
    """
    b, out = g.size(0), g.size(1)
    if isinstance(module, nn.Conv1d):  # as a Conv2d of height 1
        if a.dim() != 3:
            raise _Unsupported  # an unbatched input: no sample dim
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        (kh, kw), (sh, sw), (dh, dw) = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        ph, pw = 0, cast(tuple[int], module.padding)[0]
    else:
        if a.dim() != 4:
            raise _Unsupported
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        ph, pw = cast(tuple[int, int], module.padding)
    a = a.to(g.dtype)  # under autocast the forward ran in g's (lower) precision

    def grouped() -> Tensor:
        grads: Tensor = conv2d_weight(  # type: ignore[no-untyped-call]
            a.reshape(1, -1, *a.shape[2:]),
            (b * out, module.in_channels, kh, kw),
            g.reshape(1, -1, *g.shape[2:]),
            stride=(sh, sw),
            padding=(ph, pw),
            dilation=(dh, dw),
            groups=b,
        )
        return grads.view(b, out, -1)

    def patches() -> Tensor:
        padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
        s_b, s_c, s_h, s_w = padded.stride()
        ho, wo = g.shape[2:]
        view = padded.as_strided(
            (b, padded.size(1), ho, wo, kh, kw), (s_b, s_c, s_h * sh, s_w * sw, s_h * dh, s_w * dw)
        )
        return torch.einsum("bohw,bihwkl->boikl", g, view).reshape(b, out, -1)

    default = "patches" if module.in_channels == 1 and (sh, sw) != (1, 1) else "grouped"
    ways = {"patches": patches, "grouped": grouped}
    # The einsum forms the patches, b * in * kh * kw * H' * W' values: it is a candidate only
    # where they take no more memory than the per-sample gradients it returns (or 2**22).
    patch_values = b * module.in_channels * kh * kw * g.size(2) * g.size(3)
    if default != "patches" and patch_values > max(b * out * module.in_channels * kh * kw, 1 << 22):
        del ways["patches"]
    key = ("conv", tuple(a.shape), tuple(g.shape), kh, kw, sh, sw, dh, dw, ph, pw, g.dtype)
    # Under torch.use_deterministic_algorithms(True) the choice is the fixed rule, so that the
    # result's rounding does not depend on a timing (the same bits in every process).
    timed = g.device.type == "cpu" and is_eager() and not torch.are_deterministic_algorithms_enabled()
    return _fastest(key, ways, default=default, timed=timed)


# Per problem key, the name of the way `_fastest` measured fastest; cleared when it reaches
# this many keys.
_FASTEST_KEYS = 1024
_fastest_choice: dict[tuple[object, ...], str] = {}


def _fastest(key: tuple[object, ...], ways: Mapping[str, Callable[[], Tensor]], *, default: str, timed: bool) -> Tensor:
    """The result of the way (equivalent computations, by name) that measured fastest for
    ``key`` (a CPU problem). At a key's first use each way runs twice and the second run is
    timed (the first pays one-time setup), each run's result dropped at once (no two ways'
    memory held together); the fastest's name is kept and it runs once more for the result.
    Without ``timed`` (an accelerator's asynchronous kernels, tracing) ``default`` runs."""
    if not timed:
        return ways[default]()
    name = _fastest_choice.get(key)
    if name is None:
        times = {}
        for candidate, way in ways.items():
            way()
            start = time.perf_counter()
            way()
            times[candidate] = time.perf_counter() - start
        name = min(times, key=times.__getitem__)
        if len(_fastest_choice) >= _FASTEST_KEYS:
            _fastest_choice.clear()
        _fastest_choice[key] = name
    return ways[name]()


def _fold(acc: _Moments, name: str, module: nn.Module, a: Tensor, g: Tensor, norms: Tensor) -> None:
    b = g.size(0)
    weight = cast(Tensor, module.weight)
    if isinstance(module, _CONVS):
        if weight.requires_grad:
            acc.add_dense(_key(name, "weight"), _conv_weight_grads(module, a, g), norms)
        if module.bias is not None and module.bias.requires_grad:
            acc.add_dense(_key(name, "bias"), g.sum(tuple(range(2, g.dim()))), norms)
        return
    if isinstance(module, _NORMS):
        weight_grads, bias_grads = _norm_grads(module, a, g)
        for leaf, grads in (("weight", weight_grads), ("bias", bias_grads)):
            param = module._parameters.get(leaf)
            if param is not None and param.requires_grad:
                acc.add_dense(_key(name, leaf), grads, norms)
        return
    if isinstance(module, nn.Embedding):
        dim = weight.size(1)
        ids = a.reshape(b, -1)
        # One key per (token, sample) pair, token-major, so that the pairs come out sorted by
        # token (the row sums below scatter faster into sorted rows); shifts split it again.
        shift = max(1, (b - 1).bit_length())
        key = (ids.long() << shift).add_(torch.arange(b, device=ids.device).unsqueeze(1))
        pairs, where = torch.unique(key.reshape(-1), return_inverse=True)
        size = pairs.numel() * dim
        per_pair, spare = _scratch(2 * size, g.dtype, g.device).view(2, -1, dim).unbind(0)
        per_pair.zero_().index_add_(0, where, g.reshape(-1, dim))
        token, sample = pairs >> shift, pairs & ((1 << shift) - 1)
        if module.padding_idx is not None:
            per_pair.mul_((token != module.padding_idx).unsqueeze(1))
        sq_norms = acc.add_rows(_key(name, "weight"), token, per_pair, spare)
        norms.index_add_(0, sample, sq_norms.to(norms.dtype))
        return
    bias = cast(Tensor | None, module.bias)
    # A Linear layer on inputs (b, ..., in): a sum of outer products per sample, formed for this chunk.
    g3, a3 = g.reshape(b, -1, g.size(-1)), a.reshape(b, -1, a.size(-1))
    if weight.requires_grad:
        acc.add_dense(_key(name, "weight"), torch.einsum("bto,bti->boi", g3, a3), norms)
    if bias is not None and bias.requires_grad:
        acc.add_dense(_key(name, "bias"), g3.sum(1), norms)
