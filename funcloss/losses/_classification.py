"""Classification losses: nll_loss, cross_entropy and linear_cross_entropy."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._autocast import autocast_device, float32_under_autocast

if TYPE_CHECKING:  # torch >= 2.13; only read by attribute here, so older torch still imports
    from torch.nn import LinearCrossEntropyOptions

from .._checks import (
    check_reduction,
    compiled_plainly,
    compiling_untransformed,
    differentiated_once,
    has_tangent,
    is_eager,
    on_accelerator,
    only_reverse_or_vmap,
)
from .._combinators import class_values, reduce
from .._typing import Reduction

_HALF = (torch.float16, torch.bfloat16)


def _class_dim(fn: str, input: Tensor, exc: type[Exception] = ValueError) -> int:
    if input.dim() == 0:
        raise exc(f"{fn}(...): expected input with 1 or more dimensions (C,) or (N, C, ...), got a scalar.")
    return 0 if input.dim() == 1 else 1


def _check_index_target(fn: str, input_shape: tuple[int, ...], target: Tensor, class_dim: int) -> Tensor:
    """Check class-index targets against the scores' shape; returns them, an unbatched
    input's one-element ``(1,)`` target (which torch accepts) as a scalar. The checks come in
    torch's order (a batched input's batch size before the target's dtype), so a bad target
    gets torch's exception class."""
    if class_dim == 0:
        _check_index_dtype(fn, target)
        if target.dim() == 1 and target.size(0) == 1:
            return target.reshape(())
        if target.dim() == 1:
            raise ValueError(
                f"{fn}(...): expected a scalar (or one-element) target for unbatched input {input_shape}, got "
                f"{tuple(target.shape)}. For 1D input, 1D target must have size 1."
            )
        if target.dim() != 0:
            raise RuntimeError(
                f"{fn}(...): expected a 0-dim target for unbatched input {input_shape}, got {tuple(target.shape)}."
            )
        return target
    if target.dim() == 0 and input_shape[0] == 0:
        # torch takes a scalar's batch size as 0, which an empty batch matches; its dim 0 then
        # does not exist (after the dtype check, there).
        _check_index_dtype(fn, target)
        raise IndexError(f"{fn}(...): expected a target with a batch dimension for input {input_shape}, got a scalar.")
    if target.dim() == 0 or target.size(0) != input_shape[0]:
        got = target.size(0) if target.dim() else "a scalar"
        raise ValueError(f"{fn}(...): expected input batch_size ({input_shape[0]}) to match target batch_size ({got}).")
    expected = (input_shape[0], *input_shape[2:])
    if tuple(target.shape) != expected:
        raise RuntimeError(f"{fn}(...): expected target size {list(expected)}, got {list(target.shape)}.")
    _check_index_dtype(fn, target)
    return target


def _check_index_dtype(fn: str, target: Tensor) -> None:
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"{fn}(...): expected target dtype to be Long or Byte (class indices), got {target.dtype}. "
            "Convert with target.long(); for class probabilities pass a float target of the input's shape."
        )


def _check_class_weight(fn: str, weight: Tensor | None, classes: int, dtype: torch.dtype | None = None) -> None:
    """The ``(C,)`` shape; with ``dtype`` (class-index targets, whose torch kernels take no
    other), the dtype too."""
    if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
        raise RuntimeError(
            f"{fn}(...): expected a weight tensor of shape ({classes},), one per class, got "
            f"{tuple(weight.shape)}. weight tensor should be defined either for all {classes} classes or no classes."
        )
    if weight is not None and dtype is not None and weight.dtype != dtype:
        raise RuntimeError(
            f"{fn}(...): expected a class weight of the scores' dtype {dtype}, got {weight.dtype}. "
            f"Convert it with weight.to({dtype})."
        )


def _check_in_range(target: Tensor, classes: int, ignore_index: int) -> bool:
    """Raise ``IndexError`` for a target out of range (eager mode only). Returns True when it
    has also established that no target is ``ignore_index`` (so nothing is masked)."""
    if not is_eager() or target.numel() == 0:
        return False
    if on_accelerator(target):
        # No host synchronisation there: as in torch's kernels, a target out of range fails a
        # device-side assertion, that of the gather in `_pick`. Whether any target is ignored
        # stays unknown, so the masked path is taken.
        return False
    bounds = torch.aminmax(target)
    low, high = bounds.min.item(), bounds.max.item()
    if low >= 0 and high < classes:
        return not 0 <= ignore_index < classes or not bool((target == ignore_index).any())
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if bool(bad.any()):
        first = int(target[bad].reshape(-1)[0])
        raise IndexError(
            f"Target {first} is out of bounds. Expected class indices in [0, {classes - 1}] or ignore_index "
            f"({ignore_index})."
        )
    return False


# From this many elements on, `_pick` indexes the flat view on the CPU.
_FLAT_PICK = 1 << 16


@functools.lru_cache(maxsize=8)
def _cached_row_starts(rows: int, classes: int) -> Tensor:
    return torch.arange(0, rows * classes, classes)


def _row_starts(rows: int, classes: int) -> Tensor:
    """``[0, C, 2C, ...]``: where each row of a contiguous CPU ``(rows, C)`` tensor starts in
    its flat view. In plain eager mode it is kept for the next call (training repeats the same
    shape); under a transform, compile or a dispatch mode (fake tensors) it is made afresh."""
    if is_eager() and _get_current_dispatch_mode() is None:
        return _cached_row_starts(rows, classes)
    return torch.arange(0, rows * classes, classes)


def _hits(target: Tensor, classes: int, class_dim: int) -> Tensor:
    """Boolean, broadcasting to the scores' shape: true where the class index along
    ``class_dim`` is the target's."""
    shape = [1] * (target.dim() + 1)
    shape[class_dim] = classes
    return torch.arange(classes, device=target.device).view(shape) == target.unsqueeze(class_dim)


class _GatherScatterless(torch.autograd.Function):
    """``logp[..., target, ...]`` by a gather, whose backward writes ``where(hit, g, 0)`` in one
    elementwise pass instead of scattering into zeros: for compiled graphs of given
    log-probabilities (``nll_loss``), the forward reading N values, not N x C."""

    @staticmethod
    def forward(ctx: Any, logp: Tensor, target: Tensor, class_dim: int) -> Tensor:
        ctx.save_for_backward(target)
        ctx.class_dim = class_dim
        ctx.classes = logp.size(class_dim)
        return logp.gather(class_dim, target.unsqueeze(class_dim)).squeeze(class_dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (target,) = ctx.saved_tensors
        hit = _hits(target, ctx.classes, ctx.class_dim)
        return torch.where(hit, grad.unsqueeze(ctx.class_dim), 0), None, None


def _pick(logp: Tensor, target: Tensor, class_dim: int, *, after_softmax: bool = True) -> Tensor:
    """``logp[..., target, ...]`` along the class dim. On accelerators the gather's own bounds
    check is the (asynchronous) range check. ``after_softmax``: ``logp`` was just formed by a
    log_softmax in this loss (a compiled graph then fuses the pick into it)."""
    if not after_softmax and compiled_plainly():
        # Compiled, of given log-probabilities: a gather forward (the compiled gather checks
        # its bounds) with an elementwise backward, as torch's compiled nll_loss.
        picked: Tensor = _GatherScatterless.apply(logp, target, class_dim)  # type: ignore[no-untyped-call]
        return picked
    if compiling_untransformed():
        # Compiled: a comparison with the class index instead of a gather. Its backward is
        # elementwise, so inductor fuses it with log_softmax's backward into one pass over one
        # buffer (a gather's backward scatters into a second (N, C) one): the memory and time
        # of torch's compiled cross_entropy. The bounds check is a device-side assertion, as
        # the gather's is there.
        classes = logp.size(class_dim)
        torch._assert_async(
            ((target >= 0) & (target < classes)).all(),
            f"Target out of bounds: expected class indices in [0, {classes - 1}] or ignore_index.",
        )
        return torch.where(_hits(target, classes, class_dim), logp, 0).sum(class_dim)
    if logp.dim() == 2 and logp.numel() >= _FLAT_PICK and logp.is_contiguous() and not on_accelerator(logp):
        # Large (N, C): pick from the flat view; index_select's backward (an index_add into a
        # flat buffer) is about twice as fast on CPU as gather's scatter into an (N, C) one.
        # Small inputs take the gather: one kernel instead of four.
        rows, classes = logp.shape
        return logp.reshape(-1).index_select(0, _row_starts(rows, classes) + target)
    return logp.gather(class_dim, target.unsqueeze(class_dim)).squeeze(class_dim)


def _total_path(input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Whether a reduced cross-entropy of a large ``(N, C)`` input takes `_CrossEntropyTotal`:
    training in eager mode, no tangent, and no class weight to differentiate (the Function
    gives the weight no gradient; the composition does)."""
    return (
        input.dim() == 2
        and input.numel() >= _FLAT_PICK
        and target.dim() == 1
        and target.dtype in (torch.int64, torch.uint8)
        and input.requires_grad
        and torch.is_grad_enabled()
        and (weight is None or not weight.requires_grad)
        and is_eager()
        and not has_tangent(input)
    )


def _picked(
    logp: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    class_dim: int,
    *,
    after_softmax: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per position: ``-w[y] logp[y]`` (0 where ignored), the weight ``w[y]`` (0 where ignored)
    and the keep mask."""
    keep = target != ignore_index
    safe = torch.where(keep, target, 0)
    picked = _pick(logp, safe, class_dim, after_softmax=after_softmax)
    kept = keep.to(logp.dtype)
    w = kept if weight is None else class_values(weight, safe) * kept
    return -picked * w, w, keep


def _over(total: Tensor, denominator: Tensor) -> Tensor:
    """``total / denominator``, NaN when the denominator is 0 (every target ignored) but with a
    zero gradient there, as torch's nll/cross-entropy backward gives."""
    # The NaN is a constant, so it carries no gradient; dividing by 1 where the denominator is
    # 0 keeps the other branch's gradient finite. (Weights may be negative: no clamp.)
    empty = denominator == 0
    return torch.where(empty, float("nan"), total / torch.where(empty, 1.0, denominator))


def _class_mean(values: Tensor, w: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return _over(values.sum(), w.sum())
    return reduce(values, reduction)


@float32_under_autocast
def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Negative log-likelihood of class indices, given log-probabilities.

    .. math::
        \\ell_n = -w_{y_n} x_{n, y_n} \\; [y_n \\ne \\text{ignore\\_index}], \\qquad
        \\text{mean} = \\frac{\\sum_n \\ell_n}{\\sum_n w_{y_n} [y_n \\ne \\text{ignore\\_index}]}

    The mean is weighted by the target classes' weights, as in torch: with weights, it is not
    ``none`` followed by ``.mean()``. With every target ignored, the mean is NaN (0 / 0).

    Args:
        input: log-probabilities ``(N, C)``, ``(N, C, d1, ..., dK)`` or unbatched ``(C,)``.
        target: class indices (int64 or uint8) ``(N,)``, ``(N, d1, ..., dK)`` or a scalar; each
            in ``[0, C)`` or equal to ``ignore_index`` (checked in eager mode: ``IndexError``).
        weight: ``(C,)`` per-class weights.
        ignore_index: target value that contributes nothing.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    See also: ``torch.nn.functional.nll_loss``.
    """
    check_reduction("nll_loss", reduction)
    class_dim = _class_dim("nll_loss", input)
    classes = input.size(class_dim)
    target = _check_index_target("nll_loss", tuple(input.shape), target, class_dim)
    if not input.is_floating_point():
        raise NotImplementedError(
            f"nll_loss(...): expected real floating-point log-probabilities, got {input.dtype} (torch's kernel has "
            "no form for it)."
        )
    _check_class_weight("nll_loss", weight, classes, input.dtype)
    target = target.long()
    if _check_in_range(target, classes, ignore_index) and weight is None:
        return _negated(_pick(input, target, class_dim, after_softmax=False), reduction)  # nothing ignored
    values, w, _ = _picked(input, target, weight, ignore_index, class_dim, after_softmax=False)
    return _class_mean(values, w, reduction)


def _negated(picked: Tensor, reduction: Reduction) -> Tensor:
    """``reduce(-picked, reduction)`` with the negation applied to the reduced value: one
    kernel and one autograd node fewer over the picked values (this is the eager path, where
    each costs about as much as the pick)."""
    return -picked if reduction == "none" else reduce(picked, reduction).neg()


def _class_view(weight: Tensor, input: Tensor, class_dim: int) -> Tensor:
    shape = [1] * input.dim()
    shape[class_dim] = -1
    return weight.reshape(shape)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy between logits and class indices or class probabilities.

    With class indices ``y`` and smoothing ``eps`` (``p = log_softmax(x)`` over the class dim):

    .. math::
        \\ell_n = (1 - \\varepsilon)\\, (-w_{y_n} p_{n, y_n})
                  + \\frac{\\varepsilon}{C} \\Big(-\\sum_c w_c\\, p_{n,c}\\Big)

    both terms zero where ``y_n`` is ``ignore_index``; ``"mean"`` divides both sums by
    ``sum_n w_{y_n}`` over kept positions. With class probabilities ``q`` (a float target of the
    input's shape), ``q`` is smoothed to ``q (1 - eps) + eps / C`` and

    .. math::
        \\ell_n = -\\sum_c w_c\\, q_{n,c}\\, p_{n,c}

    where ``"mean"`` divides by ``N d1 ... dK`` (not by the weights).

    Args:
        input: logits ``(N, C)``, ``(N, C, d1, ..., dK)`` or unbatched ``(C,)``.
        target: class indices (int64/uint8) of shape ``(N, d1, ..., dK)`` (or a scalar), or class
            probabilities of the input's shape.
        weight: ``(C,)`` per-class weights.
        ignore_index: class-index target that contributes nothing (not allowed, i.e. must be
            negative, with probabilities).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        label_smoothing: ``eps`` in [0, 1].

    References:
        Szegedy, C. et al. "Rethinking the Inception Architecture for Computer Vision" (label
        smoothing), CVPR 2016.

    Under ``torch.autocast`` the loss is float32, as torch's: on CUDA, as there, the
    log-probabilities of a float16/bfloat16 input are rounded to its dtype before the float32
    loss (torch passes the input's dtype to ``log_softmax``); elsewhere all of it is float32.

    See also: ``torch.nn.functional.cross_entropy``.
    """
    if input.dtype in _HALF and autocast_device((input,), {}) == "cuda":
        class_dim = _class_dim("cross_entropy", input, IndexError)
        with torch.autocast("cuda", enabled=False):
            logp = torch.log_softmax(input.float(), class_dim).to(input.dtype).float()
            return _cross_entropy(
                logp,
                target.float() if target.dtype in _HALF else target,
                weight.float() if weight is not None and weight.dtype in _HALF else weight,
                ignore_index=ignore_index,
                reduction=reduction,
                label_smoothing=label_smoothing,
                log_probs=True,
            )
    return _cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


@float32_under_autocast
def _cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    log_probs: bool = False,
) -> Tensor:
    """`cross_entropy` of logits, or (``log_probs``) of log-probabilities already formed."""
    check_reduction("cross_entropy", reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(
            f"cross_entropy(...): expected label_smoothing in [0, 1], got {label_smoothing}. "
            "label_smoothing must be between 0.0 and 1.0."
        )
    if input.dim() == 0 and target.dim() == 0 and not target.is_floating_point():
        # torch reads a target of the input's shape as class probabilities and checks its dtype
        # before the input's dimensions.
        raise RuntimeError(
            "cross_entropy(...): expected input with 1 or more dimensions (C,) or (N, C, ...), got a scalar; "
            f"its {target.dtype} scalar target, of the input's shape, would be class probabilities, which must "
            "be floating point."
        )
    class_dim = _class_dim("cross_entropy", input, IndexError)  # torch: a dimension out of range
    classes = input.size(class_dim)
    _check_class_weight("cross_entropy", weight, classes, None if target.is_floating_point() else input.dtype)
    if reduction != "none" and not log_probs and _total_path(input, target, weight):
        # The training case: the gradient is formed in the forward (one (N, C) buffer).
        target = _check_index_target("cross_entropy", tuple(input.shape), target, class_dim)
        target = target.long()
        _check_in_range(target, classes, ignore_index)
        keep = target != ignore_index
        total: Tensor = _CrossEntropyTotal.apply(  # type: ignore[no-untyped-call]
            input, torch.where(keep, target, 0), weight, keep, label_smoothing, reduction == "mean"
        )
        return total
    logp = input if log_probs else torch.log_softmax(input, dim=class_dim)
    if target.shape == input.shape:
        return _cross_entropy_probs(logp, target, weight, ignore_index, reduction, label_smoothing, class_dim)
    target = _check_index_target("cross_entropy", tuple(input.shape), target, class_dim)
    target = target.long()
    if _check_in_range(target, classes, ignore_index) and weight is None and label_smoothing == 0.0:
        return _negated(_pick(logp, target, class_dim), reduction)  # nothing ignored: a plain mean
    values, w, keep = _picked(logp, target, weight, ignore_index, class_dim)
    nll = _class_mean(values, w, reduction)
    if label_smoothing == 0.0:
        return nll
    weighted_logp = logp if weight is None else logp * _class_view(weight, logp, class_dim)
    smooth = -weighted_logp.sum(class_dim) * keep.to(logp.dtype)
    smooth_reduced = _over(smooth.sum(), w.sum()) if reduction == "mean" else reduce(smooth, reduction)
    return (1 - label_smoothing) * nll + smooth_reduced * (label_smoothing / classes)


def _cross_entropy_probs(
    logp: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    label_smoothing: float,
    class_dim: int,
) -> Tensor:
    if not target.is_floating_point():
        raise RuntimeError(
            f"cross_entropy(...): expected a floating-point target for class probabilities, got {target.dtype}. "
            "For class indices the target has no class dimension."
        )
    if ignore_index >= 0:
        raise RuntimeError(
            f"cross_entropy(...): ignore_index ({ignore_index}) is not supported for floating point target "
            "(class probabilities). Zero the rows' probabilities or use a mask instead."
        )
    classes = logp.size(class_dim)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / classes
    prod = logp * target
    if weight is not None:
        prod = prod * _class_view(weight, logp, class_dim)
    values = -prod.sum(class_dim)
    if reduction == "mean":
        return values.sum() / (logp.numel() // classes) if logp.numel() else values.sum() * float("nan")
    return reduce(values, reduction)


# ----------------------------------------------------------------------------- linear CE


def _linear_logits(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> Tensor:
    """``input @ W.T + b``; a K-dimensional ``W`` of shape ``(C, *out, H)`` gives logits
    ``(N, C, *out)`` (classes on dim 1, as cross_entropy wants them)."""
    if linear_weight.dim() == 2:
        return F.linear(input, linear_weight, linear_bias)
    flat = input @ linear_weight.reshape(-1, linear_weight.size(-1)).T
    if linear_bias is not None:
        flat = flat + linear_bias.reshape(-1)
    return flat.reshape(*input.shape[:-1], *linear_weight.shape[:-1])


_AMP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _amp_dtypes(
    amp: str | None, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[torch.dtype, torch.dtype] | None:
    """The chunked path's ``(matmul dtype, softmax dtype)``: the input's dtype for both outside
    autocast; under autocast for ``amp``, torch's policy for ``cross_entropy(linear(...))``
    (the logits in autocast's dtype, the cross-entropy in float32). None where autocast would
    leave a tensor uncast (float64), or where dtypes differ outside autocast: the plain
    composition handles (or refuses) those as torch does."""
    if amp is None:
        # Mixed dtypes outside autocast: the composition raises torch's error.
        same = linear_weight.dtype == input.dtype and (linear_bias is None or linear_bias.dtype == input.dtype)
        return (input.dtype, input.dtype) if same else None
    tensors = (input, linear_weight) if linear_bias is None else (input, linear_weight, linear_bias)
    if any(t.dtype not in _AMP_DTYPES for t in tensors):
        return None
    return torch.get_autocast_dtype(amp), torch.float32


def _chunk_logits(x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, acc: torch.dtype) -> Tensor:
    """One chunk's logits from ``x``, ``W`` and ``b`` already in the matmul dtype, in ``acc``."""
    logits = _linear_logits(x, linear_weight, linear_bias)
    return logits if logits.dtype == acc else logits.to(acc)


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _autocast_off(device: str) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled for ``device`` (the chunked path casts explicitly)."""
    try:
        return torch.autocast(device, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _chunk_softmax_(
    logits: Tensor,
    target: Tensor,
    class_weight: Tensor | None,
    w_sum: Tensor | float,
    smoothing: bool,
    round_to: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's per-row logsumexp, NLL ``lse - z_y`` and smoothing sum ``lse sum(w) - w . z``
    (zeros unless ``smoothing``), turning ``logits`` into the softmax in place on the way (no
    chunk-sized temporary, unlike ``logsumexp``). With ``round_to``, the NLL and smoothing sum
    are formed from log-probabilities rounded to that dtype, as `cross_entropy` under CUDA
    autocast (the smoothing sum then takes one chunk-sized temporary)."""
    if round_to is not None and smoothing:
        lse = torch.logsumexp(logits, 1)
        logp = (logits - lse[:, None]).to(round_to).to(logits.dtype)
        nll = -logp.gather(1, target[:, None])[:, 0]
        smooth = -(logp.sum(-1) if class_weight is None else logp @ class_weight)
        del logp
        logits.sub_(lse[:, None]).exp_()
        return lse, nll, smooth
    z_y = logits.gather(1, target[:, None])[:, 0]
    dot = None
    if smoothing:
        dot = logits.sum(-1) if class_weight is None else logits @ class_weight
    top = logits.amax(1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(1, keepdim=True)
    logits.div_(sums)
    lse = (top + sums.log_())[:, 0]
    nll = lse - z_y if round_to is None else -(z_y - lse).to(round_to).to(lse.dtype)
    smooth = lse * w_sum - dot if dot is not None else torch.zeros_like(nll)
    return lse, nll, smooth


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-row cross-entropy of ``input @ W.T + b`` without keeping ``(N, C)`` logits.

    The forward keeps only each row's logsumexp; the backward recomputes the logits one chunk
    of rows at a time and turns them into probabilities with the saved logsumexp. Returns the
    per-row unweighted NLL ``lse - z_y``, the per-row smoothing sum
    ``-sum_c w_c logp_c = lse * sum(w) - w . z`` (zeros unless ``smoothing``) and the logsumexp
    (saved for the backward, not differentiable). The logits are computed in ``mm`` and the
    softmax in ``acc`` (`_amp_dtypes`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        class_weight: Tensor | None,
        chunk: int,
        smoothing: bool,
        mm: torch.dtype,
        acc: torch.dtype,
        round_to: torch.dtype | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # Eager mode only: the classic form, whose ``apply`` skips setup_context's per-call
        # signature binding.
        n = input.size(0)
        nll = input.new_empty(n, dtype=acc)
        smooth = input.new_zeros(n, dtype=acc)
        lse = input.new_empty(n, dtype=acc)
        w_sum = float(linear_weight.size(0)) if class_weight is None else class_weight.sum()
        w_mm, b_mm, x_mm = _as(linear_weight, mm), _as(linear_bias, mm), _as(input, mm)
        assert w_mm is not None and x_mm is not None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(x_mm[rows], w_mm, b_mm, acc)
            lse[rows], nll[rows], smooth[rows] = _chunk_softmax_(
                logits, target[rows], class_weight, w_sum, smoothing, round_to
            )
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, class_weight, lse)
        ctx.chunk, ctx.smoothing, ctx.mm = chunk, smoothing, mm
        return nll, smooth, lse

    @staticmethod
    def backward(ctx: Any, g_nll: Tensor, g_smooth: Tensor, g_lse: Tensor) -> tuple[Tensor | None, ...]:
        del g_lse  # not differentiable
        input, linear_weight, linear_bias, target, class_weight, lse = ctx.saved_tensors
        with _autocast_off(input.device.type):
            grads = _linear_ce_grads(
                input,
                linear_weight,
                linear_bias,
                target,
                class_weight,
                lse,
                g_nll,
                g_smooth,
                ctx.chunk,
                ctx.smoothing,
                ctx.mm,
            )
        return (*grads, None, None, None, None, None, None, None)


def _chunk_logit_grads(
    logits: Tensor,
    lse: Tensor | None,
    target: Tensor,
    g_nll: Tensor,
    g_smooth: Tensor,
    w_sum: Tensor | float,
    class_weight: Tensor | None,
    smoothing: bool,
    inplace: bool,
) -> Tensor:
    """The gradient with respect to one chunk's logits of ``sum_r g_nll_r nll_r +
    g_smooth_r smooth_r``: ``d(nll)/dz = p - onehot(y)``, ``d(smooth)/dz = p sum(w) - w``.
    ``inplace`` turns ``logits`` into it with the saved logsumexp ``lse``; otherwise every step
    is differentiable (softmax keeps the dependence on the logits; ``lse`` is not needed)."""
    coef = g_nll[:, None] + g_smooth[:, None] * w_sum if smoothing else g_nll[:, None]
    if inplace:
        assert lse is not None, "the in-place form needs the logsumexp"
        g_logits = logits.sub_(lse[:, None]).exp_().mul_(coef)
        g_logits.scatter_add_(1, target[:, None], -g_nll[:, None])
    else:
        g_logits = torch.softmax(logits, dim=-1) * coef
        g_logits = g_logits.scatter_add(1, target[:, None], -g_nll[:, None])
    if smoothing:
        g_logits = g_logits - g_smooth[:, None] * (1.0 if class_weight is None else class_weight)
    return g_logits


def _softmax_grads_(
    probs: Tensor,
    target: Tensor,
    g_nll: Tensor,
    g_smooth: Tensor,
    w_sum: Tensor | float,
    class_weight: Tensor | None,
    smoothing: bool,
) -> Tensor:
    """`_chunk_logit_grads` from a chunk's softmax ``probs``, in place."""
    coef = g_nll[:, None] + g_smooth[:, None] * w_sum if smoothing else g_nll[:, None]
    g_logits = probs.mul_(coef)
    g_logits.scatter_add_(1, target[:, None], -g_nll[:, None])
    if smoothing:
        g_logits.sub_(g_smooth[:, None] * (1.0 if class_weight is None else class_weight))
    return g_logits


def _linear_ce_grads(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    lse: Tensor,
    g_nll: Tensor,
    g_smooth: Tensor,
    chunk: int,
    smoothing: bool,
    mm: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of ``sum_r g_nll_r nll_r + g_smooth_r smooth_r`` with respect to the input,
    weight and bias, recomputing the logits one chunk of rows at a time (the matmuls in ``mm``,
    the softmax in ``lse``'s dtype; weight and bias gradients summed over chunks in at least
    float32's precision). Under create_graph (the backward itself differentiated) nothing is
    updated in place."""
    inplace = not torch.is_grad_enabled()
    acc = lse.dtype
    g_input = torch.empty_like(input)
    total = torch.promote_types(linear_weight.dtype, acc)
    g_weight = torch.zeros(linear_weight.shape, dtype=total, device=linear_weight.device)
    g_bias = None if linear_bias is None else torch.zeros(linear_bias.shape, dtype=total, device=linear_bias.device)
    w_sum = float(linear_weight.size(0)) if class_weight is None else class_weight.sum()
    w_mm, b_mm, x_mm = _as(linear_weight, mm), _as(linear_bias, mm), _as(input, mm)
    assert w_mm is not None and x_mm is not None
    for start in range(0, input.size(0), chunk):
        rows = slice(start, start + chunk)
        x = x_mm[rows]
        logits = _chunk_logits(x, w_mm, b_mm, acc)
        g_logits = _chunk_logit_grads(
            logits, lse[rows], target[rows], g_nll[rows], g_smooth[rows], w_sum, class_weight, smoothing, inplace
        )
        g_mm = g_logits.to(mm)
        g_input[rows] = g_mm @ w_mm
        if inplace and g_weight.dtype == mm:
            g_weight.addmm_(g_mm.T, x)
        elif inplace:
            g_weight += g_mm.T @ x
        else:
            g_weight = g_weight + g_mm.T @ x
        if g_bias is not None:
            g_bias = g_bias + g_mm.sum(0)
    bias = None if g_bias is None or linear_bias is None else g_bias.to(linear_bias.dtype)
    return g_input, g_weight.to(linear_weight.dtype), bias


class _TransformedLinearCE(torch.autograd.Function):
    """`_ChunkedLinearCE` for torch.func's reverse-mode transforms and ``vmap`` (``grad``,
    ``vjp``, ``jacrev``, ``vmap(grad(...))``): per-row NLL and smoothing sum of
    ``input @ W.T + b`` chunk by chunk, so that under ``grad`` the ``(N, C)`` logits are never
    kept for the backward (torch.func does not run checkpointing's saved-tensor hooks).

    The forward keeps nothing of the logits; the backward recomputes each chunk's logits and
    softmax with differentiable, out-of-place primitives, so a transform of the backward
    (``jacrev(jacrev(...))``) is exact, and ``vmap`` batches both through the generated rule.
    There is no ``jvp``: under forward mode the caller takes the plain composition.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        class_weight: Tensor | None,
        chunk: int,
        smoothing: bool,
        last: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        nll: list[Tensor] = []
        smooth: list[Tensor] = []
        lse: list[Tensor] = []
        w_sum = float(linear_weight.size(0)) if class_weight is None else class_weight.sum()
        for start in range(0, input.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = _linear_logits(input[rows], linear_weight, linear_bias)
            parts = _chunk_softmax_(logits, target[rows], class_weight, w_sum, smoothing)
            for out, part in zip((lse, nll, smooth), parts):
                out.append(part)
        return torch.cat(nll), torch.cat(smooth), torch.cat(lse)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        input, linear_weight, linear_bias, target, class_weight, chunk, smoothing, last = inputs
        lse = output[2]
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, class_weight, lse)
        ctx.chunk, ctx.smoothing, ctx.last = chunk, smoothing, last

    @staticmethod
    def backward(ctx: Any, g_nll: Tensor, g_smooth: Tensor, g_lse: Tensor) -> tuple[Tensor | None, ...]:
        del g_lse  # not differentiable
        # ``last``: no transform differentiates this backward, so it records nothing (torch.func
        # would otherwise keep every chunk's softmax until the gradient is returned) and turns
        # each chunk's logits into their gradient in place, from the saved logsumexp.
        with torch.no_grad() if ctx.last else contextlib.nullcontext():
            return _TransformedLinearCE._grads(ctx, g_nll, g_smooth)

    @staticmethod
    def _grads(ctx: Any, g_nll: Tensor, g_smooth: Tensor) -> tuple[Tensor | None, ...]:
        input, linear_weight, linear_bias, target, class_weight, lse = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        w_sum = float(linear_weight.size(0)) if class_weight is None else class_weight.sum()
        g_input, g_weight, g_bias = [], None, None
        for start in range(0, input.size(0), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            x = input[rows]
            logits = _linear_logits(x, linear_weight, linear_bias)
            if ctx.last:
                coef = g_nll[rows, None] + g_smooth[rows, None] * w_sum if ctx.smoothing else g_nll[rows, None]
                # Out of place by coef: under jacrev the cotangent may be batched where the
                # logits are not. The product is then batched like both.
                g_logits = logits.sub_(lse[rows, None]).exp_() * coef
                g_logits.scatter_add_(1, target[rows, None], -g_nll[rows, None])
                if ctx.smoothing:
                    g_logits.sub_(g_smooth[rows, None] * (1.0 if class_weight is None else class_weight))
            else:
                g_logits = _chunk_logit_grads(
                    logits,
                    None,
                    target[rows],
                    g_nll[rows],
                    g_smooth[rows],
                    w_sum,
                    class_weight,
                    ctx.smoothing,
                    inplace=False,
                )
            if need_input:
                g_input.append(g_logits @ linear_weight)
            if need_weight:
                part = g_logits.T @ x
                g_weight = part if g_weight is None else g_weight + part
            if need_bias:
                g_bias = g_logits.sum(0) if g_bias is None else g_bias + g_logits.sum(0)
        return (torch.cat(g_input) if need_input else None), g_weight, g_bias, None, None, None, None, None


class _ChunkedLinearCETotal(torch.autograd.Function):
    """The ``"mean"``/``"sum"`` linear cross-entropy as one scalar (weighted per row as
    `_reduction_coefficients` gives), chunk by chunk, with its first-order gradients formed in
    the forward from each chunk's softmax (so the backward does not recompute them) and scaled
    by the incoming gradient in the backward. A backward under create_graph, or a second
    backward (retain_graph), recomputes the gradients from the inputs with `_linear_ce_grads`,
    so double backward stays exact. The logits are computed in ``mm``, the softmax in ``acc``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        class_weight: Tensor | None,
        keep: Tensor,
        chunk: int,
        eps: float,
        mean: bool,
        precompute: bool,
        mm: torch.dtype,
        acc: torch.dtype,
        round_to: torch.dtype | None,
    ) -> Tensor:
        total, lse, g_nll, g_smooth, g_input, g_weight, g_bias = _linear_ce_total(
            input,
            linear_weight,
            linear_bias,
            target,
            class_weight,
            keep,
            chunk,
            eps,
            mean,
            tuple(precompute and need for need in ctx.needs_input_grad[:3]),
            mm,
            acc,
            round_to,
        )
        precompute = any(g is not None for g in (g_input, g_weight, g_bias))
        ctx.save_for_backward(input, linear_weight, linear_bias, target, class_weight, lse, g_nll, g_smooth)
        ctx.grads = (g_input, g_weight, g_bias) if precompute else None
        ctx.chunk, ctx.smoothing, ctx.mm = chunk, eps != 0.0, mm
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rest = (None,) * 10
        if ctx.grads is not None and not torch.is_grad_enabled():
            grads, ctx.grads = ctx.grads, None  # scaled in place once; a second backward recomputes
            return (*(None if g is None else g.mul_(grad) for g in grads), *rest)
        input, linear_weight, linear_bias, target, class_weight, lse, g_nll, g_smooth = ctx.saved_tensors
        with _autocast_off(input.device.type):
            grads = _linear_ce_grads(
                input,
                linear_weight,
                linear_bias,
                target,
                class_weight,
                lse,
                g_nll * grad,
                g_smooth * grad,
                ctx.chunk,
                ctx.smoothing,
                ctx.mm,
            )
        return (*grads, *rest)


def _linear_ce_total(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    keep: Tensor,
    chunk: int,
    eps: float,
    mean: bool,
    needs: tuple[bool, ...],
    mm: torch.dtype,
    acc: torch.dtype,
    round_to: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The reduced loss chunk by chunk: ``(total, lse, g_nll, g_smooth, g_input, g_weight,
    g_bias)``, the gradients (of the input, weight and bias, where ``needs`` says) formed from
    each chunk's softmax, the weight and bias ones in the parameters' dtypes (None where not
    needed); NaN where the mean's denominator is 0."""
    n, classes = input.size(0), linear_weight.size(0)
    g_nll, g_smooth, empty = _reduction_coefficients(target, class_weight, keep, eps, classes, mean, acc)
    smoothing = eps != 0.0
    w_sum = float(classes) if class_weight is None else class_weight.sum()
    # Weight and bias gradients summed over the chunks in at least float32's precision.
    total_dtype = torch.promote_types(linear_weight.dtype, acc)
    g_input = torch.empty_like(input) if needs[0] else None
    g_weight = torch.zeros(linear_weight.shape, dtype=total_dtype, device=input.device) if needs[1] else None
    g_bias = (
        torch.zeros(linear_bias.shape, dtype=total_dtype, device=input.device)
        if linear_bias is not None and needs[2]
        else None
    )
    precompute = any(g is not None for g in (g_input, g_weight, g_bias))
    w_mm, b_mm, x_mm = _as(linear_weight, mm), _as(linear_bias, mm), _as(input, mm)
    assert w_mm is not None and x_mm is not None
    lse = input.new_empty(n, dtype=acc)
    total = torch.zeros((), dtype=acc, device=input.device)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        x = x_mm[rows]
        probs = _chunk_logits(x, w_mm, b_mm, acc)
        lse[rows], row_nll, row_smooth = _chunk_softmax_(probs, target[rows], class_weight, w_sum, smoothing, round_to)
        total += torch.dot(g_nll[rows], row_nll)
        if smoothing:
            total += torch.dot(g_smooth[rows], row_smooth)
        if precompute:
            g_mm = _softmax_grads_(probs, target[rows], g_nll[rows], g_smooth[rows], w_sum, class_weight, smoothing).to(
                mm
            )
            if g_input is not None and g_input.dtype == mm:
                torch.mm(g_mm, w_mm, out=g_input[rows])
            elif g_input is not None:
                g_input[rows] = g_mm @ w_mm
            if g_weight is not None and g_weight.dtype == mm:
                g_weight.addmm_(g_mm.T, x)
            elif g_weight is not None:
                g_weight += g_mm.T @ x
            if g_bias is not None:
                g_bias += g_mm.sum(0)
    bias_dtype = linear_weight.dtype if linear_bias is None else linear_bias.dtype
    total = torch.where(empty, torch.full_like(total, float("nan")), total)
    return total, lse, g_nll, g_smooth, g_input, _as(g_weight, linear_weight.dtype), _as(g_bias, bias_dtype)


def _reduction_coefficients(
    target: Tensor, class_weight: Tensor | None, keep: Tensor, eps: float, classes: int, mean: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row weights of a reduced class loss ``sum_r g_nll_r nll_r + g_smooth_r smooth_r``:
    ``g_nll = (1 - eps) a / D``, ``g_smooth = eps / C keep / D`` with ``a = w[y] keep`` and
    ``D = sum(a)`` for the mean (1 for the sum); and whether ``D = 0`` (then the coefficients
    are 0 and the loss NaN, as `_over` gives)."""
    kept = keep.to(dtype)
    a = kept if class_weight is None else class_weight[target] * kept
    den = a.sum() if mean else torch.ones((), dtype=dtype, device=keep.device)
    empty = den == 0
    scale = torch.where(empty, torch.zeros_like(den), 1 / torch.where(empty, torch.ones_like(den), den))
    g_nll = a * (scale * (1 - eps))
    g_smooth = kept * (scale * (eps / classes)) if eps != 0.0 else torch.zeros_like(kept)
    return g_nll, g_smooth, empty


class _CrossEntropyTotal(torch.autograd.Function):
    """``"mean"``/``"sum"`` cross-entropy of ``(N, C)`` logits and class indices, whose gradient
    ``g_nll (p - onehot(y)) + g_smooth (p sum(w) - w)`` is formed in the forward in the one
    ``(N, C)`` buffer that held the softmax; the backward scales it in place. A backward under
    create_graph, or a second backward, recomputes it with differentiable ops.
    """

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, target: Tensor, class_weight: Tensor | None, keep: Tensor, eps: float, mean: bool
    ) -> Tensor:
        classes = input.size(1)
        g_nll, g_smooth, empty = _reduction_coefficients(target, class_weight, keep, eps, classes, mean, input.dtype)
        smoothing = eps != 0.0
        ctx.save_for_backward(input, target, class_weight, g_nll, g_smooth)
        if smoothing:
            w_sum = float(classes) if class_weight is None else class_weight.sum()
            # The smoothing term sums every class's log-probability: formed as log_softmax.
            logp = torch.log_softmax(input, dim=1)
            total = -torch.dot(g_nll, logp.gather(1, target[:, None])[:, 0])
            dot = logp.sum(-1) if class_weight is None else logp @ class_weight
            total = total - torch.dot(g_smooth, dot)
            ctx.grad = _softmax_grads_(logp.exp_(), target, g_nll, g_smooth, w_sum, class_weight, True)
            ctx.row_scale = None
        else:
            # One exponential pass, the softmax's (log_softmax and then exp took two). The
            # target's log-probability is x_y - max_c x_c + log(max_c p_c): the largest
            # probability is at least 1/C, so its log is exact where p_y may underflow, and
            # x_y - max x is formed before anything of the size of x is added (as in
            # log_softmax, large logits lose nothing).
            probs = torch.softmax(input, dim=1)
            top = probs.amax(1).log_()
            picked = input.gather(1, target[:, None])[:, 0].sub_(input.amax(1)).add_(top)
            total = -torch.dot(g_nll, picked)
            # p - onehot(y); the backward's one multiply applies each row's g_nll with the
            # incoming gradient (one pass over the buffer where scaling here took a second).
            ctx.grad = probs.scatter_(1, target[:, None], -1.0, reduce="add")
            ctx.row_scale = g_nll[:, None]
        ctx.smoothing = smoothing
        return torch.where(empty, torch.full_like(total, float("nan")), total)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rest = (None,) * 5
        if ctx.grad is not None and not torch.is_grad_enabled():
            g_input, ctx.grad = ctx.grad, None  # scaled in place once; a second backward recomputes
            return (g_input.mul_(grad if ctx.row_scale is None else ctx.row_scale * grad), *rest)
        input, target, class_weight, g_nll, g_smooth = ctx.saved_tensors
        w_sum = float(input.size(1)) if class_weight is None else class_weight.sum()
        g_input = _chunk_logit_grads(
            input, None, target, g_nll * grad, g_smooth * grad, w_sum, class_weight, ctx.smoothing, False
        )
        return (g_input, *rest)


def _rows_per_chunk(
    options: LinearCrossEntropyOptions | None, chunk_size: int | None, input: Tensor, classes: int
) -> int:
    """Rows per chunk: ``chunk_size``; or what ``options`` gives in torch (its documented
    ``batch_chunk_size`` / ``chunking_method`` rules); or enough rows for about 32M logits."""
    rows, features = input.shape
    if options is not None and chunk_size is not None:
        raise ValueError(
            f"linear_cross_entropy(...): expected chunk_size or options, got both (chunk_size={chunk_size}, "
            f"options={options}). Pass one."
        )
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"linear_cross_entropy(...): expected chunk_size >= 1, got {chunk_size}.")
        return chunk_size
    if options is None:
        return max(1, (1 << 25) // max(classes, 1))
    method = options.chunking_method
    if method == "auto":
        # torch's per-(device, dtype) picks: CPU half precision "aspect_ratio", else "aspect_ratio:2".
        half = input.dtype in (torch.float16, torch.bfloat16)
        method = (
            None
            if options.batch_chunk_size is not None
            else ("aspect_ratio" if input.device.type == "cpu" and half else "aspect_ratio:2")
        )
    if method is None:
        return max(1, min(options.batch_chunk_size or rows, rows))
    _, _, factor = method.partition(":")
    per_row = -(-classes // max(features, 1))  # logits per row over inputs per row, rounded up
    target = max(1, -(-rows // per_row))
    size = max(1, min((1 << (target - 1).bit_length()) // int(factor or 1), rows))
    if options.batch_chunk_size is not None and options.batch_chunk_size != size:
        raise ValueError(
            f"linear_cross_entropy(...): options.batch_chunk_size ({options.batch_chunk_size}) and "
            f"chunking_method {method!r} give different chunk sizes ({options.batch_chunk_size} vs {size}). "
            "Pass only one."
        )
    return size


# Under torch.compile (no transform around it) the chunked loss runs as one opaque operator
# whose body is `_TransformedLinearCE`'s chunk loop, with a second operator for its backward:
# traced, the composition would hold all (N, C) logits, which is what this loss exists to
# avoid. First derivatives only, as torch's chunked path.
@torch.library.custom_op("funcloss::linear_ce_rows", mutates_args=())
def _linear_ce_rows_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    chunk: int,
    smoothing: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row NLL, smoothing sum and logsumexp, as `_TransformedLinearCE.forward`."""
    with torch.no_grad():
        nll, smooth, lse = _TransformedLinearCE.forward(
            input, linear_weight, linear_bias, target, class_weight, chunk, smoothing, True
        )
    return nll, smooth, lse


@_linear_ce_rows_op.register_fake
def _linear_ce_rows_fake(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    chunk: int,
    smoothing: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dtype, n = torch.promote_types(input.dtype, linear_weight.dtype), input.size(0)
    return input.new_empty(n, dtype=dtype), input.new_empty(n, dtype=dtype), input.new_empty(n, dtype=dtype)


@torch.library.custom_op("funcloss::linear_ce_rows_backward", mutates_args=())
def _linear_ce_rows_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    lse: Tensor,
    g_nll: Tensor,
    g_smooth: Tensor,
    chunk: int,
    smoothing: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for the input, weight and bias (empty without a bias), by `_linear_ce_grads`
    (each chunk's logits recomputed and turned into their gradient in place)."""
    with torch.no_grad():
        g_input, g_weight, g_bias = _linear_ce_grads(
            input, linear_weight, linear_bias, target, class_weight, lse, g_nll, g_smooth, chunk, smoothing, input.dtype
        )
    return g_input, g_weight, linear_weight.new_empty(0) if g_bias is None else g_bias


@_linear_ce_rows_backward_op.register_fake
def _linear_ce_rows_backward_fake(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    lse: Tensor,
    g_nll: Tensor,
    g_smooth: Tensor,
    chunk: int,
    smoothing: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    bias = linear_weight.new_empty(0) if linear_bias is None else torch.empty_like(linear_bias)
    return torch.empty_like(input), torch.empty_like(linear_weight), bias


@torch.library.custom_op("funcloss::linear_ce_total", mutates_args=())
def _linear_ce_total_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    keep: Tensor,
    chunk: int,
    eps: float,
    mean: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reduced loss and, where ``needs`` says, the gradients of the input, weight and bias
    formed from each chunk's softmax (empty where not needed), as `_ChunkedLinearCETotal`."""
    dtype = torch.promote_types(input.dtype, linear_weight.dtype)
    with torch.no_grad():
        total, _, _, _, *grads = _linear_ce_total(
            input,
            linear_weight,
            linear_bias,
            target,
            class_weight,
            keep,
            chunk,
            eps,
            mean,
            tuple(needs),
            dtype,
            dtype,
            None,
        )
    g_input, g_weight, g_bias = (input.new_empty(0) if g is None else g for g in grads)
    return total, g_input, g_weight, g_bias


@_linear_ce_total_op.register_fake
def _linear_ce_total_fake(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    keep: Tensor,
    chunk: int,
    eps: float,
    mean: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = torch.promote_types(input.dtype, linear_weight.dtype)
    like = (input, linear_weight, linear_bias)
    g_input, g_weight, g_bias = (
        torch.empty_like(t) if t is not None and need else input.new_empty(0) for t, need in zip(like, needs)
    )
    return input.new_empty((), dtype=dtype), g_input, g_weight, g_bias


def _linear_ce_total_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.save_for_backward(*output[1:])
    ctx.needs = inputs[-1]


def _linear_ce_total_backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    grads = (g * grad if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
    return (*grads, None, None, None, None, None, None, None)


_linear_ce_total_op.register_autograd(_linear_ce_total_backward, setup_context=_linear_ce_total_setup)


def _linear_ce_rows_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    input, linear_weight, linear_bias, target, class_weight, chunk, smoothing = inputs
    ctx.save_for_backward(input, linear_weight, linear_bias, target, class_weight, output[2])
    ctx.chunk, ctx.smoothing = chunk, smoothing


def _linear_ce_rows_backward(ctx: Any, g_nll: Tensor, g_smooth: Tensor, g_lse: Tensor) -> tuple[Tensor | None, ...]:
    input, linear_weight, linear_bias, target, class_weight, lse = ctx.saved_tensors
    g_input, g_weight, g_bias = _linear_ce_rows_backward_op(
        input, linear_weight, linear_bias, target, class_weight, lse, g_nll, g_smooth, ctx.chunk, ctx.smoothing
    )
    return g_input, g_weight, None if linear_bias is None else g_bias, None, None, None, None


_linear_ce_rows_op.register_autograd(_linear_ce_rows_backward, setup_context=_linear_ce_rows_setup)


def _transformed_linear_ce(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    safe: Tensor,
    keep: Tensor,
    weight: Tensor | None,
    reduction: Reduction,
    label_smoothing: float,
    chunk: int,
) -> Tensor:
    """`linear_cross_entropy` for checked class-index targets (``safe``: ignored ones replaced
    by 0, ``keep``: the others) under torch.func's ``grad``/``vjp``/``vmap``, through
    `_TransformedLinearCE`."""
    classes = linear_weight.size(0)
    per_row: tuple[Tensor, Tensor, Tensor] = _TransformedLinearCE.apply(  # type: ignore[no-untyped-call]
        input,
        linear_weight,
        linear_bias,
        safe,
        weight,
        chunk,
        label_smoothing != 0.0,
        differentiated_once(input, linear_weight, linear_bias),
    )
    values, row_weight = _row_losses(per_row, safe, keep, weight, label_smoothing, classes)
    return _class_mean(values, row_weight, reduction)


def _row_losses(
    per_row: tuple[Tensor, Tensor, Tensor],
    safe: Tensor,
    keep: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    classes: int,
) -> tuple[Tensor, Tensor]:
    """Each row's loss from a chunked Function's per-row NLL and smoothing sum, and its weight
    ``w[y]`` (0 where ignored), the mean's denominator."""
    nll, smooth, _ = per_row
    kept = keep.to(nll.dtype)
    row_weight = kept if weight is None else class_values(weight, safe) * kept
    values = nll * row_weight
    if label_smoothing != 0.0:
        values = (1 - label_smoothing) * values + (smooth * kept) * (label_smoothing / classes)
    return values, row_weight


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: Reduction = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: LinearCrossEntropyOptions | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without ever holding
    the full ``(N, C)`` logits.

    In eager mode with class-index targets, rows are processed ``chunk_size`` at a time, so
    peak memory is ``O(chunk_size x C)`` instead of ``O(N x C)`` (the point for large
    vocabularies). With ``"mean"``/``"sum"`` the gradients are formed in the forward from each
    chunk's softmax and scaled in the backward (no logits are recomputed); with ``"none"``, under
    ``create_graph``, or for a second backward, the backward recomputes each chunk's logits from
    the saved logsumexp, so double backward stays exact.
    Under ``torch.autocast`` the chunks follow torch's policy for the composition: each chunk's
    logits are computed in autocast's dtype, its softmax and loss in float32 (the result is
    float32), and the weight and bias gradients are summed over chunks in float32.
    Under torch.func's ``grad``, ``vjp``/``jacrev`` and ``vmap`` (and their nestings, such as
    per-example gradients), more rows than one chunk also run chunk by chunk (outside autocast):
    the forward keeps no logits and the backward recomputes each chunk's. Under torch.compile
    (outside autocast and any torch.func transform) the chunked loss is one custom operator
    (``funcloss::linear_ce_total``, gradients formed in the forward, for "mean"/"sum";
    ``funcloss::linear_ce_rows`` for "none"), with first derivatives (as torch's chunked path). Under
    forward mode (``jvp``, ``jacfwd``, ``hessian``), compiled transforms and torch.export the
    same value is computed as a plain composition, so every transform works. So is a class
    ``weight`` that requires grad (torch refuses one), and float64 tensors under autocast.

    Args:
        input: ``(N, H)`` or unbatched ``(H,)``.
        linear_weight: ``(C, H)``, or ``(C, *out_features, H)`` for a K-dimensional loss
            (logits ``(N, C, *out_features)``; computed unchunked).
        target: class indices ``(N,)`` / ``(N, *out_features)`` (or a scalar), or probabilities
            of the logits' shape.
        linear_bias: ``(C,)`` or ``(C, *out_features)``.
        weight, reduction, ignore_index, label_smoothing: as in `cross_entropy`
            (``ignore_index=None`` means -100, and is an error with probabilities).
        options: a ``torch.nn.LinearCrossEntropyOptions``. Its ``batch_chunk_size`` and
            ``chunking_method`` pick the rows per chunk as in torch (``"auto"`` as torch picks
            for the input's device and dtype). ``acc_policy``, ``acc_dtype`` and
            ``allow_retain_graph`` do not apply: chunks are computed in the input's dtype (under
            autocast, as described above), and
            the backward recomputes them, so ``retain_graph`` and double backward always work.
            Unlike torch, funcloss also chunks without ``options``.
        chunk_size: rows per chunk (default: enough rows for about 32M logits, at least 1).
            Give this or ``options``, not both.

    See also: ``torch.nn.functional.linear_cross_entropy``.
    """
    check_reduction("linear_cross_entropy", reduction)
    if input.dim() not in (1, 2):
        raise RuntimeError(f"linear_cross_entropy(...): expected input with dimensionality 1 or 2, got {input.dim()}.")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            "linear_cross_entropy(...): expected linear_weight (C, H) or (C, *out_features, H), got shape "
            f"{tuple(linear_weight.shape)}."
        )
    if input.size(-1) != linear_weight.size(-1):
        raise RuntimeError(
            "linear_cross_entropy(...): expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.size(-1)} and {linear_weight.size(-1)}."
        )
    classes = linear_weight.size(0)
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (classes, *out_features):
        raise RuntimeError(
            f"linear_cross_entropy(...): expected linear_bias shape {(classes, *out_features)}, "
            f"got {tuple(linear_bias.shape)}."
        )
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"linear_cross_entropy(...): a K-dimensional linear_weight {tuple(linear_weight.shape)} needs batched "
            f"input (N, {input.size(-1)}), got {tuple(input.shape)}."
        )
    logits_shape = (*input.shape[:-1], classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise RuntimeError(
            "linear_cross_entropy(...): ignore_index cannot be specified when target contains probabilities."
        )
    index = -100 if ignore_index is None else ignore_index
    amp = autocast_device((input,), {})
    dtypes = _amp_dtypes(amp, input, linear_weight, linear_bias)
    chunkable = (
        dtypes is not None
        and not has_tangent(input, linear_weight, linear_bias)
        # The chunked Functions do not differentiate a class weight (torch refuses one that
        # requires grad); the composition does.
        and not (weight is not None and weight.requires_grad)
        and not probabilities
        and not out_features
        and input.dim() == 2
        and target.dtype in (torch.int64, torch.uint8)
    )
    chunked = chunkable and is_eager()
    # Under torch.func's reverse mode and vmap, and compiled: chunked too, once there is more
    # than a chunk.
    beyond_a_chunk = (
        chunkable
        and not chunked
        and amp is None
        and input.size(0) > _rows_per_chunk(options, chunk_size, input, classes)
    )
    transformed = beyond_a_chunk and only_reverse_or_vmap()
    compiled = beyond_a_chunk and compiled_plainly()
    if not (chunked or transformed or compiled) or dtypes is None:
        # Under autocast, as torch: the logits in autocast's precision, the cross-entropy in float32.
        logits = _linear_logits(input, linear_weight, linear_bias)
        return cross_entropy(
            logits, target, weight, ignore_index=index, reduction=reduction, label_smoothing=label_smoothing
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"linear_cross_entropy(...): expected label_smoothing in [0, 1], got {label_smoothing}.")
    target = _check_index_target("linear_cross_entropy", logits_shape, target, 1)
    _check_class_weight("linear_cross_entropy", weight, classes)
    mm, acc = dtypes
    if amp is not None and weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()  # as cross_entropy's float32 autocast policy casts it
    if options is None:  # torch's reference path (its default) takes no other class-weight dtype
        _check_class_weight("linear_cross_entropy", weight, classes, acc)
    elif weight is not None:  # its chunked path (given options) casts the weight
        weight = weight.to(acc)
    target = target.long()
    _check_in_range(target, classes, index)
    keep = target != index
    safe = torch.where(keep, target, 0)
    chunk = _rows_per_chunk(options, chunk_size, input, classes)
    # As the composition's cross_entropy under CUDA autocast: log-probabilities in the logits' dtype.
    round_to = mm if amp == "cuda" and mm in _HALF else None
    if transformed:
        return _transformed_linear_ce(
            input, linear_weight, linear_bias, safe, keep, weight, reduction, label_smoothing, chunk
        )
    if compiled and reduction != "none":
        # As in eager mode: the gradients formed in the forward, scaled in the backward.
        needs = [
            torch.is_grad_enabled() and t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)
        ]
        reduced: Tensor = torch.ops.funcloss.linear_ce_total(
            input,
            linear_weight,
            linear_bias,
            safe,
            weight,
            keep,
            int(chunk),
            float(label_smoothing),
            reduction == "mean",
            needs,
        )[0]
        return reduced
    if compiled:
        rows: tuple[Tensor, Tensor, Tensor] = torch.ops.funcloss.linear_ce_rows(
            input, linear_weight, linear_bias, safe, weight, int(chunk), label_smoothing != 0.0
        )
        values, row_weight = _row_losses(rows, safe, keep, weight, label_smoothing, classes)
        return _class_mean(values, row_weight, reduction)
    with contextlib.nullcontext() if amp is None else _autocast_off(amp):
        if reduction != "none":
            total: Tensor = _ChunkedLinearCETotal.apply(  # type: ignore[no-untyped-call]
                input,
                linear_weight,
                linear_bias,
                safe,
                weight,
                keep,
                int(chunk),
                label_smoothing,
                reduction == "mean",
                torch.is_grad_enabled(),
                mm,
                acc,
                round_to,
            )
            return total
        per_row: tuple[Tensor, Tensor, Tensor] = _ChunkedLinearCE.apply(  # type: ignore[no-untyped-call]
            input, linear_weight, linear_bias, safe, weight, int(chunk), label_smoothing != 0.0, mm, acc, round_to
        )
    return _row_losses(per_row, safe, keep, weight, label_smoothing, classes)[0]
