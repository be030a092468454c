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
gradients for one chunk. `grad_stats` folds these into running sums without forming ``B x P``
gradients; `per_sample_grads` writes ``g_i a_i^T`` (or token rows) straight into its result.

References:
    Goodfellow, I. "Efficient Per-Example Gradient Computations", arXiv:1510.01799, 2015.
    Dangel, F., Kunstner, F. and Hennig, P. "BackPACK: Packing more into Backprop", ICLR 2020.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
import torch.func as tf
import torch.nn.functional as F
from torch import Tensor, nn

from ._per_sample import GradStats


class _Moments:
    """Running float64 sums over samples, for every parameter element at once.

    One ``(4, P)`` buffer holds, per element: the sum, the sum of squares, the sum of signs and
    the number of non-zeros; each parameter is a slice of it, so a layer's update is one
    in-place add and the result is computed once over the flat buffer.
    """

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.shapes = {k: p.shape for k, p in params.items()}
        self.offsets: dict[str, slice] = {}
        start = 0
        for k, p in params.items():
            self.offsets[k] = slice(start, start + p.numel())
            start += p.numel()
        device = next(iter(params.values())).device
        self.acc = torch.zeros(4, start, dtype=torch.float64, device=device)
        self.norms: list[Tensor] = []

    def slot(self, name: str) -> Tensor:
        """The ``(4, numel)`` slice of the accumulator that belongs to ``name``."""
        return self.acc[:, self.offsets[name]]

    def add_dense(self, name: str, g: Tensor, norms: Tensor) -> None:
        """Fold explicit per-sample gradients ``g`` (b, *shape) into the sums."""
        flat = g.reshape(g.size(0), -1)
        squares = flat * flat
        signs = flat.sign()
        self.slot(name).add_(torch.stack([flat, squares, signs, signs.abs()]).sum(1))
        norms += squares.sum(1)

    def add_outer(self, name: str, g: Tensor, a: Tensor, norms: Tensor) -> None:
        """Fold per-sample gradients ``g_i a_i^T`` given ``G`` (b, out) and ``A`` (b, in): the
        four sums are one batched matmul in the data's dtype."""
        g2, a2 = g * g, a * a
        sg, sa = g.sign(), a.sign()
        left = torch.stack([g, g2, sg, sg.abs()]).transpose(1, 2)
        right = torch.stack([a, a2, sa, sa.abs()])
        self.slot(name).add_(torch.bmm(left, right).reshape(4, -1))
        norms += g2.sum(1) * a2.sum(1)

    def add_rows(self, name: str, rows: Tensor, per_row: Tensor) -> None:
        """Fold per-(sample, row) gradients ``per_row`` (pairs, D) into rows ``rows`` of a
        ``(V, D)`` parameter (an embedding)."""
        squares = per_row * per_row
        signs = per_row.sign()
        stats = torch.stack([per_row, squares, signs, signs.abs()])
        self.slot(name).view(4, *self.shapes[name]).index_add_(1, rows, stats)

    def result(self, count: int, params: Mapping[str, Tensor]) -> GradStats:
        total, squares, signs, nonzero = self.acc
        mean = total / count
        if count > 1:
            var = (squares - total * mean).clamp_min(0) / (count - 1)
        else:
            var = torch.full_like(mean, float("nan"))
        dtype = next(iter(params.values())).dtype
        stats = torch.stack([mean, var, signs, count - nonzero]).to(dtype)

        def split(row: Tensor) -> dict[str, Tensor]:
            return {k: row[sl].view(self.shapes[k]) for k, sl in self.offsets.items()}

        return GradStats(
            count=count,
            mean=split(stats[0]),
            variance=split(stats[1]),
            sign_sum=split(stats[2]),
            zeros=split(stats[3]),
            sq_norms=torch.cat(self.norms).to(dtype),
            sum_sq_norm=(total * total).sum().to(dtype),
        )


def _supported_layers(model: nn.Module) -> dict[str, nn.Module] | None:
    """Modules owning trainable parameters, if all are Linear, plain Embedding or plain Conv2d;
    else None."""
    layers: dict[str, nn.Module] = {}
    owned = 0
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                return None
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                return None
        elif not isinstance(module, nn.Linear):
            return None
        layers[name] = module
        owned += len(own)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if owned != len(trainable) or not layers:
        return None  # shared parameters, or parameters used outside their module
    return layers


def _recorder(calls: list[tuple[Tensor, Tensor]]) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
    """A forward hook that records each call's (input, output)."""

    def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        calls.append((args[0], output))

    return record


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


class _Unsupported(Exception):
    """The model is not one this path handles (a layer ran more or less than once)."""


def _captured(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int,
    loss_kwargs: Mapping[str, Any],
) -> Iterator[tuple[slice, list[tuple[str, nn.Module, Tensor, Tensor]]]]:
    """Per chunk: each layer's input and the gradient of the summed per-sample losses with
    respect to its output, from one batched forward and one backward."""

    def per_sample_loss(out: Tensor, target: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), target.unsqueeze(0), **loss_kwargs)

    batched_loss = tf.vmap(per_sample_loss)
    n = inputs.size(0)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
        handles = [module.register_forward_hook(_recorder(seen[name])) for name, module in layers.items()]
        # Like torch.func.grad, work inside a caller's no_grad block.
        with torch.enable_grad():
            try:
                out = model(inputs[rows])
            finally:
                for handle in handles:
                    handle.remove()
            if any(len(calls) != 1 for calls in seen.values()):
                raise _Unsupported
            names = list(layers)
            outputs = [seen[name][0][1] for name in names]
            grads = torch.autograd.grad(batched_loss(out, targets[rows]).sum(), outputs, allow_unused=True)
        captured = []
        for name, grad_out in zip(names, grads):
            layer_in, layer_out = seen[name][0]
            grad_out = torch.zeros_like(layer_out) if grad_out is None else grad_out
            captured.append((name, layers[name], layer_in.detach(), grad_out.detach()))
        yield rows, captured


def layer_moments(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: int,
    loss_kwargs: Mapping[str, Any],
    progress: bool = False,
) -> GradStats | None:
    """`GradStats` by per-layer moments (no per-sample gradient is formed for 2-D Linear
    inputs), or None when the model is not made of supported layers (or a layer runs more or
    less than once per forward)."""
    layers = _supported_layers(model)
    if layers is None:
        return None
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    acc = _Moments(params)
    n = inputs.size(0)
    try:
        for rows, captured in _captured(model, layers, loss_fn, inputs, targets, chunk_size, loss_kwargs):
            norms = torch.zeros(rows.stop - rows.start, dtype=torch.float64, device=inputs.device)
            for name, module, layer_in, grad_out in captured:
                _fold(acc, name, module, layer_in, grad_out, norms)
            acc.norms.append(norms)
            if progress:
                print(f"\rgrad_stats: {rows.stop}/{n} samples", end="", file=sys.stderr)
    except _Unsupported:
        return None
    if progress:
        print(file=sys.stderr)
    return acc.result(n, params)


def layer_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: int,
    loss_kwargs: Mapping[str, Any],
) -> dict[str, Tensor] | None:
    """Per-sample gradients ``{name: (B, *shape)}`` from layer inputs and output gradients
    (``g_i a_i^T`` per Linear, token rows per Embedding), written in place chunk by chunk; or
    None for other models."""
    layers = _supported_layers(model)
    if layers is None:
        return None
    n = inputs.size(0)
    result = {
        name: torch.empty((n, *p.shape), dtype=p.dtype, device=p.device)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    try:
        for rows, captured in _captured(model, layers, loss_fn, inputs, targets, chunk_size, loss_kwargs):
            b = rows.stop - rows.start
            views = {k: v[rows].view(b, -1) for k, v in result.items()}
            for name, module, layer_in, grad_out in captured:
                _write_per_sample(views, name, module, layer_in, grad_out)
    except _Unsupported:
        return None
    return result


def _write_per_sample(views: Mapping[str, Tensor], name: str, module: nn.Module, a: Tensor, g: Tensor) -> None:
    """Write the chunk's per-sample gradients of ``module``'s parameters into ``views``
    (``{param: (b, numel)}``, possibly strided slices of a shared buffer)."""
    b = g.size(0)
    weight = cast(Tensor, module.weight)
    if isinstance(module, nn.Conv2d):
        if weight.requires_grad:
            views[_key(name, "weight")].view(b, weight.size(0), -1).copy_(_conv_weight_grads(module, a, g))
        if module.bias is not None and module.bias.requires_grad:
            torch.sum(g, dim=(2, 3), out=views[_key(name, "bias")])
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


def _conv_weight_grads(module: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample Conv2d weight gradients ``(b, out, in * kh * kw)``: each sample's output
    gradient ``(out, L)`` times its unfolded input ``(in * kh * kw, L)`` transposed."""
    b = g.size(0)
    unfolded = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # type: ignore[arg-type]
    return torch.bmm(g.reshape(b, g.size(1), -1), unfolded.transpose(1, 2))


def _fold(acc: _Moments, name: str, module: nn.Module, a: Tensor, g: Tensor, norms: Tensor) -> None:
    b = g.size(0)
    weight = cast(Tensor, module.weight)
    if isinstance(module, nn.Conv2d):
        if weight.requires_grad:
            acc.add_dense(_key(name, "weight"), _conv_weight_grads(module, a, g), norms)
        if module.bias is not None and module.bias.requires_grad:
            acc.add_dense(_key(name, "bias"), g.sum((2, 3)), norms)
        return
    if isinstance(module, nn.Embedding):
        vocab, dim = weight.shape
        ids = a.reshape(b, -1)
        key = (torch.arange(b, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)
        pairs, where = torch.unique(key, return_inverse=True)
        per_pair = torch.zeros(pairs.numel(), dim, dtype=torch.float64, device=g.device)
        per_pair.index_add_(0, where, g.reshape(-1, dim).double())
        token, sample = pairs % vocab, pairs // vocab
        if module.padding_idx is not None:
            per_pair = per_pair * (token != module.padding_idx).unsqueeze(1)
        acc.add_rows(_key(name, "weight"), token, per_pair)
        norms.index_add_(0, sample, (per_pair * per_pair).sum(1))
        return
    bias = cast(Tensor | None, module.bias)
    if a.dim() == 2:
        if weight.requires_grad:
            acc.add_outer(_key(name, "weight"), g, a, norms)
        if bias is not None and bias.requires_grad:
            acc.add_dense(_key(name, "bias"), g, norms)
        return
    # Inputs (b, ..., in): a sum of outer products per sample, formed for this chunk.
    g3, a3 = g.reshape(b, -1, g.size(-1)), a.reshape(b, -1, a.size(-1))
    if weight.requires_grad:
        acc.add_dense(_key(name, "weight"), torch.einsum("bto,bti->boi", g3, a3), norms)
    if bias is not None and bias.requires_grad:
        acc.add_dense(_key(name, "bias"), g3.sum(1), norms)
