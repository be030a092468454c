"""Per-sample gradients and streamed gradient statistics, through ``torch.func``."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast, overload

import torch
import torch.func as tf
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

P = ParamSpec("P")
T = TypeVar("T")
Randomness = Literal["error", "different", "same"]
Method = Literal["auto", "vmap", "loop"]
Grads = dict[str, Tensor]
# A batch of model inputs or targets: one tensor, or several (each with the sample on dim 0)
# passed positionally (a tuple) or by keyword (a mapping).
Batch = Tensor | tuple[Tensor, ...] | Mapping[str, Tensor]

__all__ = ["GradStats", "grad_stats", "per_sample_grad", "per_sample_grads"]


@overload
def per_sample_grad(  # type: ignore[overload-overlap]  # argnums=0 (the default) is the precise case
    fn: Callable[Concatenate[T, P], Tensor],
    argnums: Literal[0] = 0,
    *,
    in_dims: int | tuple[Any, ...] | None = None,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Callable[Concatenate[T, P], T]: ...


@overload
def per_sample_grad(
    fn: Callable[P, Tensor],
    argnums: int | tuple[int, ...],
    *,
    in_dims: int | tuple[Any, ...] | None = None,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Callable[P, Any]: ...


def per_sample_grad(
    fn: Callable[..., Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    in_dims: int | tuple[Any, ...] | None = None,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Callable[..., Any]:
    """``torch.func.grad`` per example: ``vmap(grad(fn, argnums), in_dims)``.

    ``fn(params, *example)`` returns the scalar loss of one example. The returned function
    takes ``(params, *batch)`` and returns, for each leaf of the differentiated argument, its
    gradient stacked on a leading batch axis.

    Args:
        fn: the loss of one example; the differentiated arguments first by default.
        argnums: which arguments to differentiate (as in ``torch.func.grad``).
        in_dims: vmap's ``in_dims`` (per argument an int, None, or a pytree of them matching
            the argument); default: the differentiated arguments are shared (None), every
            other argument is batched on dim 0.
        chunk_size: examples per vmap chunk (bounds memory; None: all at once). Each chunk's
            gradients are written into one result allocated from the first chunk's, so the
            peak is the result plus one chunk's working set (vmap's own ``chunk_size`` holds
            every chunk and then their concatenation, twice the result).
        randomness: vmap's randomness for dropout and friends: ``"error"`` (default),
            ``"different"`` (a fresh draw per example) or ``"same"``.

    ``scaled_dot_product_attention`` takes its math form during the call: torch's fused
    attention kernels have no vmap rule (they would run once per example). It holds the
    attention weights of every example at once (``B x heads x L x L``): for long sequences,
    bound ``B`` with ``chunk_size``.

    Example:
        >>> g = per_sample_grad(lambda p, x, y: fl.mse_loss(x @ p["w"], y))(params, xs, ys)
        >>> g["w"].shape  # (B, *w.shape)
    """
    if not callable(fn):
        raise TypeError(f"per_sample_grad(...): expected a callable, got {type(fn).__name__}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"per_sample_grad(...): expected chunk_size >= 1 or None, got {chunk_size}.")
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    grad_fn = tf.grad(fn, argnums=argnums)

    def batched(*args: Any) -> Any:
        dims: int | tuple[Any, ...]
        if in_dims is None:
            dims = tuple(None if i in nums else 0 for i in range(len(args)))
        else:
            dims = in_dims
        with _batchable_attention():
            if chunk_size is None:
                return tf.vmap(grad_fn, in_dims=dims, randomness=randomness)(*args)
            return _in_chunks(grad_fn, args, dims, chunk_size, randomness)

    return batched


def _batchable_attention() -> contextlib.AbstractContextManager[object]:
    """Attention (``scaled_dot_product_attention``: nn.MultiheadAttention, nn.Transformer*) in
    its math form: torch's fused attention kernels (CPU flash; CUDA flash, memory-efficient and
    cuDNN) have no vmap batching rule, so vmap would run them once per example, with a
    warning. The math form batches (measured on an H100 at B=64: as fast or faster)."""
    return sdpa_kernel([SDPBackend.MATH])


def _in_chunks(
    fn: Callable[..., Any], args: tuple[Any, ...], dims: int | tuple[Any, ...], size: int, randomness: Randomness
) -> Any:
    """``vmap(fn)(*args)`` over chunks of ``size`` examples, each chunk's outputs (batched on
    dim 0) written into one result allocated from the first chunk's. In-dims that are
    themselves pytrees, or arguments vmap would refuse, go to vmap's own chunking (and its
    errors)."""
    mapped = tf.vmap(fn, in_dims=dims, randomness=randomness)
    per_arg = dims if isinstance(dims, tuple) else (dims,) * len(args)
    sizes: set[int] = set()
    if len(per_arg) == len(args) and all(d is None or isinstance(d, int) for d in per_arg):
        for arg, d in zip(args, per_arg):
            if d is not None:
                leaves = pytree.tree_leaves(arg)
                if not all(isinstance(t, Tensor) and -t.dim() <= d < t.dim() for t in leaves):
                    sizes.add(-1)  # vmap explains
                sizes.update(t.size(d) for t in leaves if isinstance(t, Tensor) and -t.dim() <= d < t.dim())
    if len(sizes) != 1 or -1 in sizes:
        return tf.vmap(fn, in_dims=dims, chunk_size=size, randomness=randomness)(*args)
    (n,) = sizes
    if n <= size:
        return mapped(*args)
    result: list[Tensor] = []
    spec: pytree.TreeSpec | None = None
    for start in range(0, n, size):
        stop = min(n, start + size)
        part = [
            a if d is None else pytree.tree_map(functools.partial(_narrow, dim=d, start=start, stop=stop), a)
            for a, d in zip(args, per_arg)
        ]
        leaves, spec = pytree.tree_flatten(mapped(*part))
        if not result:
            result = [leaf.new_empty((n, *leaf.shape[1:])) for leaf in leaves]
        for out, leaf in zip(result, leaves):
            out[start:stop] = leaf
    assert spec is not None
    return pytree.tree_unflatten(result, spec)


def _narrow(t: Tensor, *, dim: int, start: int, stop: int) -> Tensor:
    return t.narrow(dim, start, stop - start)


def _check_model(model: nn.Module, fn: str) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        where = f"{type(module).__name__} '{name or type(model).__name__}'"
        if module.training:
            raise ValueError(
                f"{fn}(...): expected a model whose forward treats samples independently, got {where} "
                "in training mode, which mixes the batch. Call model.eval() (BatchNorm then uses its running "
                "statistics) or replace it with GroupNorm/LayerNorm."
            )
        if module.running_mean is None:
            raise ValueError(
                f"{fn}(...): expected a model whose forward treats samples independently, got {where} "
                "with track_running_stats=False, which normalises by the batch's statistics even in eval mode. "
                "Replace it with GroupNorm/LayerNorm, or track running statistics."
            )


@contextlib.contextmanager
def _vmap_advice(model: nn.Module, fn: str) -> Iterator[None]:
    """Re-raise a failure of the model's forward under ``vmap`` with advice, where the model
    holds a fused recurrent layer: torch.func cannot batch nn.RNN, nn.GRU or nn.LSTM (their
    flattened-weight kernels), but batches their cells."""
    try:
        yield
    except RuntimeError as e:
        rnn = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)), None)
        if rnn is None:
            raise
        name, module = rnn
        kind = type(module).__name__
        cell = {"RNN": "nn.RNNCell", "GRU": "nn.GRUCell", "LSTM": "nn.LSTMCell"}.get(
            kind, "nn.RNNCell/GRUCell/LSTMCell"
        )
        raise RuntimeError(
            f"{fn}(...): expected a model torch.func.vmap can batch, got {kind} '{name}', whose fused kernel "
            f"it cannot ({e}). Pass method='loop' (one backward per sample), or unroll the sequence with "
            f"{cell} in a Python loop over time steps (the cells batch)."
        ) from e


def _trainable(model: nn.Module, fn: str) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{fn}(...): expected a model with trainable parameters, got {type(model).__name__} with none "
            "(every parameter has requires_grad=False)."
        )
    return params


def check_scalar_loss(loss: Tensor, fn: str) -> Tensor:
    """``loss`` if it is a scalar (one sample's loss), else the error every method raises."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise RuntimeError(
            f"{fn}(...): expected loss_fn to return a scalar for one sample, got {got}. An unreduced loss "
            "has no gradient to take: pass reduction='mean' or 'sum' (or reduce it in loss_fn)."
        )
    return loss


def _example_loss(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    buffers: Mapping[str, Tensor],
    loss_kwargs: Mapping[str, Any],
    fn: str,
) -> Callable[[Grads, Batch, Batch], Tensor]:
    def loss(params: Grads, x: Batch, y: Batch) -> Tensor:
        out = functional_forward(model, params, buffers, map_batch(x, lambda t: t.unsqueeze(0)))
        return check_scalar_loss(loss_fn(out, map_batch(y, lambda t: t.unsqueeze(0)), **loss_kwargs), fn)

    return loss


def functional_forward(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: Batch
) -> Any:
    """``model``'s forward on ``batch`` (a tensor, positional tuple or keyword mapping) with
    ``params`` and ``buffers`` in place of its own."""
    state = (dict(params), dict(buffers))
    return call_model(lambda *args, **kwargs: tf.functional_call(model, state, args, kwargs), batch)


def map_batch(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: fn(v) for k, v in batch.items()}
    return tuple(fn(t) for t in batch)


def _leaves(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    return list(batch.values()) if isinstance(batch, Mapping) else list(batch)


def rows_of(batch: Batch, rows: slice) -> Batch:
    """The samples ``rows`` of every tensor in ``batch``."""
    return map_batch(batch, lambda t: t[rows])


def call_model(model: Callable[..., Any], batch: Batch) -> Any:
    """``model(x)``, ``model(*xs)`` or ``model(**xs)`` for a tensor, tuple or mapping batch."""
    if isinstance(batch, Tensor):
        return model(batch)
    return model(**batch) if isinstance(batch, Mapping) else model(*batch)


def batch_size(batch: Batch) -> int:
    return _leaves(batch)[0].size(0)


def _check_batch(fn: str, inputs: Batch, targets: Batch) -> tuple[Batch, Batch]:
    """``inputs`` and ``targets`` as batches (a list taken as a tuple), checked: tensors with
    one sample count on dim 0."""
    checked: list[Batch] = []
    for what, batch in (("inputs", inputs), ("targets", targets)):
        if isinstance(batch, list):
            batch = tuple(batch)
        if not isinstance(batch, Tensor | tuple | Mapping):
            raise TypeError(
                f"{fn}(...): expected {what} as a Tensor, a tuple of Tensors (positional arguments) or a mapping "
                f"of names to Tensors (keyword arguments), got {type(batch).__name__}."
            )
        leaves = _leaves(batch)
        bad = sorted({type(t).__name__ for t in leaves if not isinstance(t, Tensor)})
        if not leaves or bad:
            raise TypeError(
                f"{fn}(...): expected {what} made of Tensors, got "
                f"{'none' if not leaves else ', '.join(bad)}. Bind constant arguments into the model or the loss "
                "(e.g. with functools.partial) instead."
            )
        checked.append(batch)
    shapes = [tuple(t.shape) for b in checked for t in _leaves(b)]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            f"{fn}(...): expected inputs and targets with the same batch size on dim 0, got shapes "
            f"{', '.join(map(str, shapes))}."
        )
    return checked[0], checked[1]


def _rng_state(devices: list[torch.device]) -> list[Tensor]:
    """The default generators' states: the CPU's, and those of the CUDA ``devices``."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]


def _set_rng_state(states: list[Tensor], devices: list[torch.device]) -> None:
    torch.set_rng_state(states[0])
    for state, device in zip(states[1:], devices):
        torch.cuda.set_rng_state(state, device)


def _differ(a: Tensor, b: Tensor) -> bool:
    return not torch.equal(a, b)


def _loop_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    loss_kwargs: Mapping[str, Any],
    randomness: Randomness,
    fn: str,
    progress: bool,
    total: int,
) -> Callable[[Grads, Batch, Batch], Grads]:
    """``method="loop"``: a chunk's per-sample gradients, one ``torch.autograd.grad`` call per
    sample through the model itself (any model, a fused RNN included; no vmap). Same call form
    as a `per_sample_grad` transform of the example loss.

    Randomness: ``"different"`` lets each sample draw its own; ``"same"`` restores the default
    generators before every sample, so all draw what the first does; ``"error"`` raises if a
    sample's forward or backward draws from them at all."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # The CUDA generators that matter: those of the devices the model is on.
    devices = sorted({p.device for _, p in model.named_parameters() if p.device.type == "cuda"}, key=str)
    done = 0  # samples differentiated by earlier chunks, for the progress line

    def chunk(params: Grads, inputs: Batch, targets: Batch) -> Grads:
        nonlocal done
        del params  # the model's own parameters are differentiated
        b = batch_size(inputs)
        out = {name: torch.empty((b, *p.shape), dtype=p.dtype, device=p.device) for name, p in trainable}
        start = _rng_state(devices) if randomness != "different" else None
        shown = time.monotonic()
        for i in range(b):
            if randomness == "same" and start is not None:
                _set_rng_state(start, devices)
            rows = slice(i, i + 1)
            with torch.enable_grad():
                loss = loss_fn(call_model(model, rows_of(inputs, rows)), rows_of(targets, rows), **loss_kwargs)
                check_scalar_loss(loss, fn)
                grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
            drew = randomness == "error" and start is not None and any(map(_differ, start, _rng_state(devices)))
            if drew:
                raise RuntimeError(
                    f"{fn}(...): expected a model and loss that draw no random numbers under "
                    "randomness='error', got a draw (dropout in training mode, say). Call model.eval(), or "
                    "pass randomness='different' (each sample its own draw) or 'same'."
                )
            for (name, _), g in zip(trainable, grads):
                if g is None:
                    out[name][i].zero_()
                else:
                    out[name][i].copy_(g)
            if progress and time.monotonic() - shown > 0.5:
                shown = time.monotonic()
                print(f"\r{fn}: {done + i + 1}/{total} samples", end="", file=sys.stderr)
        done += b
        return out

    return chunk


def _per_chunk(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    loss_kwargs: Mapping[str, Any],
    randomness: Randomness,
    method: Method,
    fn: str,
    progress: bool,
    total: int,
) -> Callable[[Grads, Batch, Batch], Grads]:
    """A chunk's per-sample gradients ``(params, inputs, targets) -> {name: (b, ...)}``: one
    backward per sample under ``method="loop"``, else ``vmap(grad)`` of the example loss."""
    if method == "loop":
        return _loop_grads(model, loss_fn, loss_kwargs, randomness, fn, progress, total)
    loss = _example_loss(model, loss_fn, dict(model.named_buffers()), loss_kwargs, fn)
    per_example: Callable[[Grads, Batch, Batch], Grads] = per_sample_grad(loss, randomness=randomness)
    return per_example


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Batch,
    targets: Batch,
    *,
    chunk_size: int | None = None,
    randomness: Randomness = "different",
    method: Method = "auto",
    progress: bool = False,
    **loss_kwargs: Any,
) -> Grads:
    """The gradient of every sample's loss with respect to every trainable parameter.

    For each ``i``: the gradient of ``loss_fn(model(inputs[i:i+1]), targets[i:i+1], **loss_kwargs)``,
    stacked as ``{name: (B, *param.shape)}``. Buffers are constants. The model, its parameters
    and their ``.grad`` are left untouched.

    Args:
        model: treats samples independently (BatchNorm in training mode is refused: use
            ``eval()`` or GroupNorm).
        loss_fn: any loss with the ``(output, target)`` call form: a funcloss loss, a
            combination of them, or your own. It must return a scalar for one sample (an
            unreduced ``reduction="none"`` loss is a ``RuntimeError``, whatever the method).
        inputs, targets: batches, dim 0 the sample. Several model inputs (ids and a mask, say)
            go as a tuple (``model(*inputs)``) or a mapping (``model(**inputs)``) of tensors,
            each sliced per sample alike; targets likewise (the loss then gets the tuple or
            mapping).
        chunk_size: samples per chunk, to bound memory (None: all at once). Each chunk's
            gradients are written into the result as they come.
        randomness: dropout and other random ops: ``"different"`` (default, like a real batch:
            each sample draws its own mask), ``"same"`` or ``"error"``.
        progress: print a progress line to stderr, one update per chunk.
        method: ``"auto"``: when every trainable parameter is in an ``nn.Linear``,
            ``nn.Embedding``, ungrouped ``nn.Conv1d``/``nn.Conv2d``, ``nn.LayerNorm``,
            ``nn.GroupNorm`` or eval-mode BatchNorm, from one batched forward and backward
            (``g_i a_i^T`` per Linear, token rows per Embedding, output gradient contracted
            with the input's patches per convolution, ``g_i * x_hat_i`` summed over positions
            per normalisation); otherwise, and with ``"vmap"``, ``vmap(grad(...))``. On the
            CPU a convolution's two exact forms are timed at a layer shape's first use and the
            faster is kept for the process (results may differ between processes in the last
            bits), except under ``torch.use_deterministic_algorithms(True)``, where a fixed
            rule chooses.
            ``"loop"``: one ``torch.autograd.grad`` per sample through the model itself, for
            models ``vmap`` cannot batch (a fused ``nn.LSTM``/``GRU``/``RNN``, custom
            autograd Functions without a vmap rule); about as slow as a Python loop is.
            All assume, as the definition above does, that the model treats samples
            independently.
        **loss_kwargs: passed to ``loss_fn``.

    Memory: ``B x P`` floats for the result, plus the working set of a chunk (``vmap``'s own
    ``chunk_size`` would hold every chunk's gradients and then their concatenation: twice the
    result).
    """
    inputs, targets = _check_batch("per_sample_grads", inputs, targets)
    _check_model(model, "per_sample_grads")
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"per_sample_grads(...): expected method 'auto', 'vmap' or 'loop', got {method!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"per_sample_grads(...): expected chunk_size >= 1 or None, got {chunk_size}.")
    params = _trainable(model, "per_sample_grads")
    n = batch_size(inputs)
    size = chunk_size or n or 1
    if method == "auto" and randomness == "different":
        from ._moments import layer_grads

        fast = layer_grads(model, loss_fn, inputs, targets, chunk_size=size, loss_kwargs=loss_kwargs, progress=progress)
        if fast is not None:
            return fast
    per_chunk = _per_chunk(model, loss_fn, loss_kwargs, randomness, method, "per_sample_grads", progress, n)
    result: Grads = {}
    with _vmap_advice(model, "per_sample_grads"):
        if size >= n:
            result = per_chunk(params, inputs, targets)
        else:
            for rows in _chunks(n, size):
                part: Grads = per_chunk(params, rows_of(inputs, rows), rows_of(targets, rows))
                for k, v in part.items():
                    if k not in result:  # the result is allocated once, from the first chunk's
                        result[k] = v.new_empty((n, *v.shape[1:]))
                    result[k][rows] = v
                if progress:
                    print(f"\rper_sample_grads: {rows.stop}/{n} samples", end="", file=sys.stderr)
    if progress:
        print(f"\rper_sample_grads: {n}/{n} samples" if size >= n else "", file=sys.stderr)
    return result


@dataclass(frozen=True)
class GradStats:
    """Statistics of per-sample (or per-group) gradients, per parameter element.

    Attributes:
        count: number of samples (or groups) the statistics are over.
        mean: ``{name: mean gradient}``.
        variance: unbiased variance per element (NaN when ``count < 2``).
        sign_sum: per element, ``sum_i sign(g_i)``.
        zeros: per element, how many ``g_i`` were exactly 0.
        sq_norms: ``(count,)``, each sample's squared L2 norm over all parameters.
        sum_sq_norm: ``||sum_i g_i||^2`` over all parameters.
    """

    count: int
    mean: Grads
    variance: Grads
    sign_sum: Grads
    zeros: Grads
    sq_norms: Tensor
    sum_sq_norm: Tensor

    @property
    def sign_agreement(self) -> Grads:
        """``|mean_i sign(g_i)|`` per element: 1 when every sample pushes the same way, 0 when
        evenly split. An exact zero (a dead ReLU) is an abstention that counts in the
        denominator: it lowers agreement."""
        return {k: v.abs() / self.count for k, v in self.sign_sum.items()}

    @property
    def gsnr(self) -> Grads:
        """Gradient signal-to-noise ratio ``mean^2 / variance`` per element (Liu et al. 2020).

        NaN where every gradient is 0 (an untouched parameter), inf where they are all equal
        and non-zero."""
        return {k: self.mean[k] ** 2 / self.variance[k] for k in self.mean}

    @classmethod
    def from_grads(cls, grads: Mapping[str, Tensor]) -> GradStats:
        """The statistics of per-sample gradients already at hand, ``{name: (B, ...)}`` (what
        `per_sample_grads` or a `per_sample_grad` transform returns), as `grad_stats` computes
        them."""
        if not grads:
            raise ValueError("GradStats.from_grads(...): expected at least one parameter's gradients, got none.")
        sizes = {k: g.size(0) if g.dim() else None for k, g in grads.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values() or 0 in sizes.values():
            raise ValueError(
                "GradStats.from_grads(...): expected per-sample gradients {name: (B, ...)} with one B >= 1 for "
                f"every parameter, got leading sizes {sizes}."
            )
        running = _Running({k: g[0] for k, g in grads.items()})
        running.add(dict(grads))
        return running.result()

    @property
    def coherence(self) -> Tensor:
        """``||sum_i g_i||^2 / sum_i ||g_i||^2`` (m-coherence, Chatterjee 2020): ``count`` when
        all gradients are equal, about 1 when they are orthogonal, lower when they cancel."""
        return self.sum_sq_norm / self.sq_norms.sum()


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# grad_stats' default chunk: about this many per-sample gradient (and activation) elements.
_CHUNK_ELEMENTS = 1 << 24


def grad_stats(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Batch,
    targets: Batch,
    *,
    chunk_size: int | None = None,
    groups: Tensor | None = None,
    randomness: Randomness = "different",
    progress: bool = False,
    method: Method = "auto",
    **loss_kwargs: Any,
) -> GradStats:
    """Statistics of the per-sample gradients, computed chunk by chunk.

    Never holds ``B x P`` per-sample gradients. When every trainable parameter belongs to a
    layer `per_sample_grads` handles per layer (``method="auto"``: Linear, Embedding, ungrouped
    Conv1d/Conv2d, LayerNorm, GroupNorm, eval-mode BatchNorm), the statistics come from
    per-layer moments of one batched forward and backward per chunk (Linear layers on 2-D
    inputs form no per-sample gradient at all; see ``funcloss._moments``). Otherwise each
    chunk's ``chunk_size x P`` per-sample gradients (``vmap(grad)``) are folded into running
    sums (Chan et al.'s pairwise update for the variance) and dropped.

    Args:
        model, loss_fn, inputs, targets, randomness, **loss_kwargs: as in `per_sample_grads`.
        chunk_size: samples per chunk. Peak extra memory is about ``chunk_size x P`` floats
            plus that chunk's activations. The default takes as many samples as keep
            ``chunk_size x (P + 16 x sample size)`` near ``2**24`` (64 MiB in float32), at
            least 1, so a small model's batch is one chunk.
        groups: ``(B,)`` integer labels (environments, domains, classes): the statistics are
            then over the groups' mean gradients, one "sample" per group, as the AND-mask
            of Parascandolo et al. uses per-environment gradients. Memory ``G x P``.
        progress: print a progress line to stderr.
        method: ``"auto"`` (per-layer moments where the layers allow, else ``vmap``),
            ``"vmap"`` (always per-sample gradients per chunk) or ``"loop"`` (each chunk's
            per-sample gradients one ``torch.autograd.grad`` at a time, for models ``vmap``
            cannot batch, as in `per_sample_grads`). The per-layer path keeps one
            scratch buffer for its temporaries between calls, per thread, dtype and device, of
            at most ``2**22`` elements (16 MiB in float32).

    References:
        Liu, J. et al. "Understanding Why Neural Networks Generalize Well Through GSNR of
        Parameters", ICLR 2020. Chatterjee, S. "Coherent Gradients: An Approach to
        Understanding Generalization in Gradient Descent-based Optimization", ICLR 2020.
        Chan, T. F., Golub, G. H. and LeVeque, R. J. "Updating formulae and a pairwise
        algorithm for computing sample variances", 1979.
    """
    inputs, targets = _check_batch("grad_stats", inputs, targets)
    _check_model(model, "grad_stats")
    n = batch_size(inputs)
    if n == 0:
        raise ValueError("grad_stats(...): expected at least one sample, got an empty batch.")
    params = _trainable(model, "grad_stats")
    if chunk_size is None:
        # Per sample: P gradient elements, and activations taken as 16 times the input.
        per_sample = sum(p.numel() for p in params.values()) + 16 * sum(t[0].numel() for t in _leaves(inputs))
        size = max(1, _CHUNK_ELEMENTS // per_sample)
    else:
        size = chunk_size
    if size < 1:
        raise ValueError(f"grad_stats(...): expected chunk_size >= 1, got {chunk_size}.")
    if groups is not None and (groups.shape != (n,) or groups.is_floating_point()):
        raise ValueError(
            f"grad_stats(...): expected integer groups of shape ({n},), got {groups.dtype} {tuple(groups.shape)}."
        )
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"grad_stats(...): expected method 'auto', 'vmap' or 'loop', got {method!r}.")
    if groups is None and method == "auto" and randomness == "different":
        from ._moments import layer_moments

        fast = layer_moments(
            model,
            loss_fn,
            inputs,
            targets,
            chunk_size=size,
            loss_kwargs=loss_kwargs,
            params=params,
            progress=progress,
        )
        if fast is not None:
            return fast
    per_chunk = _per_chunk(model, loss_fn, loss_kwargs, randomness, method, "grad_stats", progress, n)
    if groups is not None:
        with _vmap_advice(model, "grad_stats"):
            return _group_stats(per_chunk, params, inputs, targets, groups, size, progress)

    acc = _Running(params)
    chunks = list(_chunks(n, size))
    for i, rows in enumerate(chunks):
        with _vmap_advice(model, "grad_stats"):
            acc.add(per_chunk(params, rows_of(inputs, rows), rows_of(targets, rows)))
        if progress:
            print(f"\rgrad_stats: {rows.stop}/{n} samples ({i + 1}/{len(chunks)} chunks)", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return acc.result()


class _Running:
    """Running count, mean, M2, sign sums, zero counts and norms, merged chunk by chunk."""

    def __init__(self, params: Grads) -> None:
        self.count = 0
        self.mean = {k: torch.zeros_like(v) for k, v in params.items()}
        self.m2 = {k: torch.zeros_like(v) for k, v in params.items()}
        self.sign_sum = {k: torch.zeros_like(v) for k, v in params.items()}
        self.zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        self.sq_norms: list[Tensor] = []

    def add(self, grads: Grads) -> None:
        b = next(iter(grads.values())).size(0)
        total = self.count + b
        norms = torch.zeros(b, dtype=next(iter(grads.values())).dtype, device=next(iter(grads.values())).device)
        for k, g in grads.items():
            chunk_mean = g.mean(0)
            chunk_m2 = ((g - chunk_mean) ** 2).sum(0)
            delta = chunk_mean - self.mean[k]
            self.m2[k] += chunk_m2 + delta**2 * (self.count * b / total)
            self.mean[k] += delta * (b / total)
            self.sign_sum[k] += g.sign().sum(0)
            self.zeros[k] += (g == 0).sum(0).to(g.dtype)
            norms += g.reshape(b, -1).pow(2).sum(1)
        self.sq_norms.append(norms)
        self.count = total

    def result(self) -> GradStats:
        c = self.count
        var = {k: v / (c - 1) if c > 1 else torch.full_like(v, math.nan) for k, v in self.m2.items()}
        sum_sq = sum(((m * c) ** 2).sum() for m in self.mean.values())
        return GradStats(
            count=c,
            mean=self.mean,
            variance=var,
            sign_sum=self.sign_sum,
            zeros=self.zeros,
            sq_norms=torch.cat(self.sq_norms),
            sum_sq_norm=cast(Tensor, sum_sq),
        )


def _group_stats(
    per_chunk: Callable[..., Any],
    params: Grads,
    inputs: Batch,
    targets: Batch,
    groups: Tensor,
    size: int,
    progress: bool,
) -> GradStats:
    labels, index = torch.unique(groups, return_inverse=True)
    g_count = labels.numel()
    sums = {k: torch.zeros((g_count, *v.shape), dtype=v.dtype, device=v.device) for k, v in params.items()}
    counts = torch.zeros(g_count, dtype=next(iter(params.values())).dtype, device=groups.device)
    n = batch_size(inputs)
    for rows in _chunks(n, size):
        grads = per_chunk(params, rows_of(inputs, rows), rows_of(targets, rows))
        for k, g in grads.items():
            sums[k].index_add_(0, index[rows], g)
        counts.index_add_(0, index[rows], torch.ones_like(index[rows], dtype=counts.dtype))
        if progress:
            print(f"\rgrad_stats: {rows.stop}/{n} samples", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    acc = _Running(params)
    acc.add({k: s / counts.reshape((-1,) + (1,) * (s.dim() - 1)) for k, s in sums.items()})
    return acc.result()
