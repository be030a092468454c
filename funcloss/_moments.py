"""Per-sample gradient statistics without per-sample gradients, for Linear and Embedding layers.

For a Linear layer on 2-D inputs the gradient of sample ``i`` is the outer product
``g_i a_i^T`` of the layer's output gradient and input, so every per-element statistic over
samples is a matrix product (Goodfellow 2015; Dangel et al. 2020):

.. math::
    \\sum_i g_i a_i^T = G^T A, \\quad \\sum_i (g_i a_i^T)^2 = (G^2)^T (A^2), \\quad
    \\sum_i \\operatorname{sign}(g_i a_i^T) = \\operatorname{sign}(G)^T \\operatorname{sign}(A),

and the squared norm of sample ``i``'s gradient is ``||g_i||^2 ||a_i||^2``. An Embedding's
per-sample gradient touches only the rows of that sample's tokens, so it is summed per (sample,
token) pair. Linear layers on inputs with more dims (sequences) form that layer's per-sample
gradients for one chunk. One batched forward and one backward to the layer outputs per chunk.

References:
    Goodfellow, I. "Efficient Per-Example Gradient Computations", arXiv:1510.01799, 2015.
    Dangel, F., Kunstner, F. and Hennig, P. "BackPACK: Packing more into Backprop", ICLR 2020.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.func as tf
from torch import Tensor, nn

from ._per_sample import GradStats


class _Moments:
    """float64 running sums per parameter: sum, sum of squares, sign sum, non-zero count."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        def zeros(p: Tensor) -> Tensor:
            return torch.zeros(p.shape, dtype=torch.float64, device=p.device)

        self.sum = {k: zeros(p) for k, p in params.items()}
        self.sumsq = {k: zeros(p) for k, p in params.items()}
        self.signs = {k: zeros(p) for k, p in params.items()}
        self.nonzero = {k: zeros(p) for k, p in params.items()}
        self.norms: list[Tensor] = []

    def add_dense(self, name: str, g: Tensor, norms: Tensor) -> None:
        """Fold explicit per-sample gradients ``g`` (b, *shape) into the sums."""
        g = g.double()
        self.sum[name] += g.sum(0)
        self.sumsq[name] += (g * g).sum(0)
        s = g.sign()
        self.signs[name] += s.sum(0)
        self.nonzero[name] += s.abs().sum(0)
        norms += (g * g).reshape(g.size(0), -1).sum(1)

    def add_outer(self, name: str, g: Tensor, a: Tensor, norms: Tensor) -> None:
        """Fold per-sample gradients ``g_i a_i^T`` given ``G`` (b, out) and ``A`` (b, in).

        The four products run as one batched matmul in the data's dtype (a chunk's sums are
        short); the running sums are float64.
        """
        g2, a2 = g * g, a * a
        sg, sa = g.sign(), a.sign()
        left = torch.stack([g, g2, sg, sg.abs()]).transpose(1, 2)
        right = torch.stack([a, a2, sa, sa.abs()])
        total, squares, signs, nonzero = torch.bmm(left, right).double()
        self.sum[name] += total
        self.sumsq[name] += squares
        self.signs[name] += signs
        self.nonzero[name] += nonzero
        norms += (g2.sum(1) * a2.sum(1)).double()

    def result(self, count: int, params: Mapping[str, Tensor]) -> GradStats:
        mean = {k: (s / count).to(params[k].dtype) for k, s in self.sum.items()}
        if count > 1:
            var = {
                k: ((self.sumsq[k] - self.sum[k] ** 2 / count).clamp_min(0) / (count - 1)).to(params[k].dtype)
                for k in self.sum
            }
        else:
            var = {k: torch.full_like(m, float("nan")) for k, m in mean.items()}
        dtype = next(iter(params.values())).dtype
        total_sq = sum((s**2).sum() for s in self.sum.values())
        return GradStats(
            count=count,
            mean=mean,
            variance=var,
            sign_sum={k: v.to(params[k].dtype) for k, v in self.signs.items()},
            zeros={k: (count - v).to(params[k].dtype) for k, v in self.nonzero.items()},
            sq_norms=torch.cat(self.norms).to(dtype),
            sum_sq_norm=torch.as_tensor(total_sq, dtype=torch.float64).to(dtype),
        )


def _supported_layers(model: nn.Module) -> dict[str, nn.Module] | None:
    """Modules owning trainable parameters, if all are Linear or plain Embedding; else None."""
    layers: dict[str, nn.Module] = {}
    owned = 0
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
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
    """`GradStats` by per-layer moments, or None when the model is not made of supported layers
    (or a layer runs more or less than once per forward)."""
    layers = _supported_layers(model)
    if layers is None:
        return None
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    acc = _Moments(params)
    n = inputs.size(0)

    def per_sample_loss(out: Tensor, target: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), target.unsqueeze(0), **loss_kwargs)

    batched_loss = tf.vmap(per_sample_loss)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
        handles = [module.register_forward_hook(_recorder(seen[name])) for name, module in layers.items()]
        try:
            out = model(inputs[rows])
        finally:
            for handle in handles:
                handle.remove()
        if any(len(calls) != 1 for calls in seen.values()):
            return None
        names = list(layers)
        outputs = [seen[name][0][1] for name in names]
        total = batched_loss(out, targets[rows]).sum()
        grads = torch.autograd.grad(total, outputs, allow_unused=True)
        b = rows.stop - rows.start
        norms = torch.zeros(b, dtype=torch.float64, device=inputs.device)
        for name, grad_out in zip(names, grads):
            layer_in, layer_out = seen[name][0]
            grad_out = torch.zeros_like(layer_out) if grad_out is None else grad_out
            _fold(acc, name, layers[name], layer_in.detach(), grad_out.detach(), norms)
        acc.norms.append(norms)
        if progress:
            print(f"\rgrad_stats: {rows.stop}/{n} samples", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return acc.result(n, params)


def _fold(acc: _Moments, name: str, module: nn.Module, a: Tensor, g: Tensor, norms: Tensor) -> None:
    b = g.size(0)
    weight = cast(Tensor, module.weight)
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
        k = _key(name, "weight")
        acc.sum[k].index_add_(0, token, per_pair)
        acc.sumsq[k].index_add_(0, token, per_pair * per_pair)
        s = per_pair.sign()
        acc.signs[k].index_add_(0, token, s)
        acc.nonzero[k].index_add_(0, token, s.abs())
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
