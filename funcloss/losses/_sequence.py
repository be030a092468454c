"""Connectionist temporal classification (CTC) loss."""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autocast import float32_under_autocast
from .._checks import check_reduction, check_values, compiled_plainly, has_tangent, is_eager, only_vmap
from .._graphs import replayed
from .._typing import Reduction

# Whether CUDA tensors take the Triton kernels of `funcloss._ctc_triton` where Triton is
# installed (off with the environment variable FUNCLOSS_TRITON=0, read at import).
triton_enabled = os.environ.get("FUNCLOSS_TRITON", "1") != "0"


class _Kernels(Protocol):
    def alphas(self, emit: Tensor, skip: Tensor, neg: float) -> Tensor: ...

    def betas(self, emit: Tensor, skip_next: Tensor, in_len: Tensor, tgt_len: Tensor, neg: float) -> Tensor: ...


@functools.cache
def _triton_kernels() -> _Kernels | None:
    try:
        from .. import _ctc_triton
    except ImportError:  # no Triton: the torch recursion, as CUDA graphs
        return None
    return _ctc_triton


def _triton(x: Tensor) -> _Kernels | None:
    """The Triton recursions for ``x`` (CUDA, float32 or float64), or None."""
    if not triton_enabled or not x.is_cuda or x.dtype not in (torch.float32, torch.float64):
        return None
    return _triton_kernels()


def _neg(dtype: torch.dtype) -> float:
    """A finite stand-in for log(0): far below any real log-likelihood, far above overflow.

    With -inf, unreachable states would give 0 * inf = NaN in the backward pass; with this,
    their weight is exp(-huge) = 0 exactly and every gradient stays finite.
    """
    return -1e30 if dtype in (torch.float32, torch.float64) else -1e4


def _as_lengths(fn: str, name: str, lengths: Tensor | list[int] | tuple[int, ...], device: torch.device) -> Tensor:
    t = lengths if isinstance(lengths, Tensor) else torch.tensor(list(lengths), device=device)
    if t.is_floating_point():
        raise RuntimeError(f"{fn}(...): expected integer {name}, got {t.dtype}.")
    return t.to(device=device, dtype=torch.int64)


def _padded_targets(targets: Tensor, target_lengths: Tensor, batch: int) -> Tensor:
    """``(N, S)`` targets from padded ``(N, S)`` or concatenated 1-D targets."""
    if targets.dim() == 2:
        return targets
    # Concatenated: row n is targets[offset_n : offset_n + len_n].
    width = int(target_lengths.max()) if is_eager() and batch and not targets.is_meta else targets.numel()
    offsets = torch.cumsum(target_lengths, 0) - target_lengths
    pos = offsets.unsqueeze(1) + torch.arange(width, device=targets.device)
    inside = torch.arange(width, device=targets.device) < target_lengths.unsqueeze(1)
    pos = torch.where(inside, pos, torch.zeros_like(pos)).clamp_max(max(targets.numel() - 1, 0))
    return targets[pos] if targets.numel() else targets.new_zeros((batch, width))


@float32_under_autocast
def ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | list[int] | tuple[int, ...],
    target_lengths: Tensor | list[int] | tuple[int, ...],
    blank: int = 0,
    reduction: Reduction = "mean",
    zero_infinity: bool = False,
) -> Tensor:
    """CTC loss: ``-log p(target | input)`` summed over every alignment.

    With the target ``y`` extended by blanks to ``l' = (b, y_1, b, y_2, ..., b)`` (length
    ``L = 2S + 1``), the forward variables obey, in log space,

    .. math::
        \\alpha_t(s) = \\log\\!\\sum_{k \\in K(s)} e^{\\alpha_{t-1}(k)} + \\log p_t(l'_s),
        \\qquad \\ell = -\\log\\left(e^{\\alpha_{T-1}(L-1)} + e^{\\alpha_{T-1}(L-2)}\\right)

    where ``K(s) = {s, s-1}``, plus ``s-2`` when ``l'_s`` is not blank and differs from
    ``l'_{s-2}``. The recursion is vectorised over the batch and the label positions; only time
    is a loop, so autograd, ``vmap``, ``jvp`` and ``hessian`` all work. On CUDA, in eager mode,
    the alpha and beta recursions are one Triton kernel each where Triton is installed (torch's
    CUDA wheels bring it; ``FUNCLOSS_TRITON=0`` turns this off), and they run with the few
    kernels around them as CUDA graphs from the second call of the same shapes on (launches,
    not the GPU's work, are the cost there; ``FUNCLOSS_CUDA_GRAPHS=0`` turns this off).

    ``"mean"`` divides each sequence's loss by its target length (at least 1), then averages
    over the batch. An impossible alignment (input too short for the target) gives ``inf``, or
    0 under ``zero_infinity``; either way its gradient is zero (torch's is NaN without
    ``zero_infinity``, which turns every parameter's gradient NaN once summed over the batch).

    Gradients differ from torch's by design when ``log_probs`` is not a ``log_softmax``
    output: torch's backward returns ``exp(log_probs) - gamma`` (the gradient with respect to
    the logits, assuming a log_softmax before), funcloss returns the true derivative ``-gamma``.
    Chained through ``log_softmax`` (the documented use) the two agree.

    Args:
        log_probs: ``(T, N, C)`` or unbatched ``(T, C)`` log-probabilities (time-major).
        targets: ``(N, S)`` padded, or 1-D concatenated (``sum(target_lengths)``), class indices
            in ``[0, C)`` other than ``blank`` (checked in eager mode). With unbatched
            log-probs a 1-D target is the one sequence's ``target_length`` labels.
        input_lengths: ``(N,)``, each ``<= T``.
        target_lengths: ``(N,)``, each ``<= S``.
        blank: index of the blank class.
        reduction: ``"none"`` (one loss per sequence) | ``"mean"`` | ``"sum"``.
        zero_infinity: replace infinite losses (and their gradients) by 0.

    References:
        Graves, A. et al. "Connectionist Temporal Classification: Labelling Unsegmented Sequence
        Data with Recurrent Neural Networks", ICML 2006.

    See also: ``torch.nn.functional.ctc_loss``.
    """
    check_reduction("ctc_loss", reduction)
    if log_probs.dim() not in (2, 3):
        raise (IndexError if log_probs.dim() == 0 else RuntimeError)(
            f"ctc_loss(...): expected log_probs (T, N, C) or (T, C), got {tuple(log_probs.shape)}."
        )
    if targets.dim() not in (1, 2):
        raise RuntimeError(
            f"ctc_loss(...): expected targets (N, S) padded or 1-D concatenated, got {tuple(targets.shape)}."
        )
    device = log_probs.device
    in_len = _as_lengths("ctc_loss", "input_lengths", input_lengths, device)
    tgt_len = _as_lengths("ctc_loss", "target_lengths", target_lengths, device)
    if only_vmap():
        # Under vmap alone the eager loss runs once for every example (see _VmappedCTC.vmap),
        # instead of each of its ops paying vmap's per-op cost.
        vmapped: Tensor = _VmappedCTC.apply(log_probs, targets, in_len, tgt_len, blank, reduction, zero_infinity)  # type: ignore[no-untyped-call]
        return vmapped
    unbatched = log_probs.dim() == 2
    if unbatched:
        # A 1-D target stays the concatenated form (of one sequence: exactly target_length
        # labels, as torch checks); a (1, S) one is padded.
        log_probs = log_probs.unsqueeze(1)
        in_len, tgt_len = in_len.reshape(1), tgt_len.reshape(1)
    steps, batch, classes = log_probs.shape
    if log_probs.numel() == 0:
        raise RuntimeError(f"ctc_loss(...): expected non-empty log_probs, got shape {tuple(log_probs.shape)}.")
    if not 0 <= blank < classes:
        raise RuntimeError(f"ctc_loss(...): expected blank in [0, {classes - 1}], got {blank}.")
    if in_len.shape != (batch,) or tgt_len.shape != (batch,):
        raise RuntimeError(
            f"ctc_loss(...): expected input_lengths and target_lengths of shape ({batch},), got "
            f"{tuple(in_len.shape)} and {tuple(tgt_len.shape)}."
        )
    check_values(
        lambda: (in_len >= 0) & (in_len <= steps) & (tgt_len >= 0),
        RuntimeError,
        lambda: f"ctc_loss(...): expected 0 <= input_lengths <= {steps} and target_lengths >= 0.",
    )
    if targets.dim() == 2 and targets.size(0) != batch:
        raise RuntimeError(
            f"ctc_loss(...): expected padded targets with one row per sequence ({batch}, S), got "
            f"{tuple(targets.shape)}."
        )
    if targets.dim() == 1:
        check_values(
            lambda: tgt_len.sum() == targets.numel(),
            RuntimeError,
            lambda: (
                f"ctc_loss(...): expected concatenated targets with sum(target_lengths) = {int(tgt_len.sum())} "
                f"elements, got {targets.numel()}."
            ),
        )
    padded = _padded_targets(targets.long(), tgt_len, batch)
    width = padded.size(1)
    check_values(
        lambda: tgt_len <= width,
        RuntimeError,
        lambda: f"ctc_loss(...): expected target_lengths <= the padded target width {width}.",
    )
    valid = torch.arange(width, device=device) < tgt_len.unsqueeze(1)
    labels = torch.where(valid, padded, torch.full_like(padded, blank)).clamp(0, classes - 1)
    _check_labels(padded, valid, classes, blank)
    ll = _log_likelihood(log_probs, labels, in_len, tgt_len, blank)
    neg = _neg(log_probs.dtype)
    infeasible = ll < neg / 2
    fill = torch.zeros_like(ll) if zero_infinity else torch.full_like(ll, float("inf"))
    loss = torch.where(infeasible, fill, -ll)
    if reduction == "mean":
        return (loss / tgt_len.clamp_min(1).to(loss.dtype)).mean()
    if reduction == "sum":
        return loss.sum()
    return loss[0] if unbatched else loss


class _VmappedCTC(torch.autograd.Function):
    """`ctc_loss` under ``vmap`` alone: the vmap rule folds the examples into the batch of one
    eager call (recorded by autograd as eager code is) and reduces per example.

    Called only where every active transform is a ``vmap``. Its ``forward`` and ``backward``
    run only where no input is batched at any level (``vmap`` then lowers the call to plain
    autograd): the eager loss, and its gradient with respect to ``log_probs`` recomputed.
    """

    @staticmethod
    def forward(
        log_probs: Tensor,
        targets: Tensor,
        in_len: Tensor,
        tgt_len: Tensor,
        blank: int,
        reduction: Reduction,
        zero_infinity: bool,
    ) -> Tensor:
        return ctc_loss(log_probs, targets, in_len, tgt_len, blank, reduction, zero_infinity)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        log_probs, targets, in_len, tgt_len, *options = inputs
        ctx.save_for_backward(log_probs, targets, in_len, tgt_len)
        ctx.options = options

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        log_probs, targets, in_len, tgt_len = ctx.saved_tensors
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        with torch.enable_grad():
            x = log_probs.detach().requires_grad_()
            (g,) = torch.autograd.grad(ctc_loss(x, targets, in_len, tgt_len, *ctx.options), x, grad)
        return (g, *none)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Tensor, int]:
        """Per example: ``(T, C)`` log-probs with a 1-D or ``(1, S)`` target and scalar (or
        one-element) lengths, or ``(T, N, C)`` with ``(N, S)`` padded or 1-D concatenated
        targets and ``(N,)`` lengths. The examples' sequences become one batch of ``B`` or
        ``B * N`` (concatenated targets stay in that order), whose unreduced losses are
        reduced per example."""
        log_probs, targets, in_len, tgt_len, blank, reduction, zero_infinity = args  # as forward's
        b = info.batch_size
        lp, tg, il, tl = (
            a.movedim(d, 0) if d is not None else a.expand(b, *a.shape)
            for a, d in zip((log_probs, targets, in_len, tgt_len), in_dims)
        )
        il, tl = il.reshape(-1), tl.reshape(-1)
        per_example = lp.dim() == 4  # (B, T, N, C)
        if per_example:
            _, steps, n, classes = lp.shape
            lp = lp.permute(1, 0, 2, 3).reshape(steps, b * n, classes)
            tg = tg.reshape(b * n, -1) if tg.dim() == 3 else tg.reshape(-1)
        else:  # (B, T, C): one sequence per example, its target a row
            lp, tg = lp.transpose(0, 1), tg.reshape(b, -1)
        losses = ctc_loss(lp, tg, il, tl, blank, "none", zero_infinity)
        if reduction == "mean":
            losses = losses / tl.clamp_min(1).to(losses.dtype)
        if not per_example or reduction == "none":
            return (losses.view(b, -1) if per_example else losses), 0
        rows = losses.view(b, -1)
        return (rows.mean(1) if reduction == "mean" else rows.sum(1)), 0


def _check_labels(padded: Tensor, valid: Tensor, classes: int, blank: int) -> None:
    """In eager mode, refuse a target class within ``target_lengths`` outside ``[0, C)``
    (``IndexError``; torch's CPU kernel reads outside ``log_probs`` there) or equal to the blank
    (``RuntimeError``): both read with one synchronisation."""
    if not is_eager() or padded.is_meta:
        return
    inside = (padded >= 0) & (padded < classes)
    out_of_range, blank_label = torch.stack([(valid & ~inside).any(), (valid & (padded == blank)).any()]).tolist()
    if out_of_range:
        bad = int(padded[valid & ~inside][0])
        raise IndexError(
            f"ctc_loss(...): expected target classes in [0, {classes - 1}] within target_lengths, got {bad}. "
            f"log_probs has {classes} classes."
        )
    if blank_label:
        raise RuntimeError(f"ctc_loss(...): expected targets other than the blank ({blank}) within target_lengths.")


def _extended(labels: Tensor, blank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The blank-extended labels ``(N, 2S + 1)`` and the additive mask of allowed skips."""
    batch, width = labels.shape
    blanks = torch.full_like(labels, blank)
    tail = torch.full((batch, 1), blank, dtype=labels.dtype, device=labels.device)
    ext = torch.cat([torch.stack([blanks, labels], dim=-1).reshape(batch, 2 * width), tail], dim=1)
    # s - 2 -> s is allowed when l'_s is a label different from l'_{s-2}.
    prev2 = F.pad(ext, (2, 0), value=blank)[:, :-2]
    allowed = (ext != blank) & (ext != prev2)
    skip = torch.where(
        allowed,
        torch.zeros((), dtype=dtype, device=labels.device),
        torch.full((), _neg(dtype), dtype=dtype, device=labels.device),
    )
    return ext, skip


def _start(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Log-weights of the states a path may start in: the first blank and the first label."""
    first_two = torch.arange(size, device=device) < 2
    return torch.where(
        first_two, torch.zeros((), dtype=dtype, device=device), torch.full((), _neg(dtype), dtype=dtype, device=device)
    )


def _finish(alphas: Tensor, in_len: Tensor, tgt_len: Tensor) -> Tensor:
    """``log p`` from the alphas ``(T, N, L)``: the last two states at each sequence's last step."""
    neg = _neg(alphas.dtype)
    last_t = (in_len - 1).clamp_min(0)
    final = alphas.gather(0, last_t.view(1, -1, 1).expand(1, -1, alphas.size(2)))[0]  # (N, L)
    last = (2 * tgt_len).unsqueeze(1)  # index L_n - 1 of the extended target
    end = final.gather(1, last)[:, 0]
    before = final.gather(1, (last - 1).clamp_min(0))[:, 0]
    before = torch.where(tgt_len > 0, before, torch.full_like(before, neg))
    ll = _logsumexp(end, before)
    # No input at all: the empty target has probability 1, any other target 0.
    empty = torch.where(tgt_len == 0, torch.zeros_like(ll), torch.full_like(ll, neg))
    return torch.where(in_len > 0, ll, empty)


def _logsumexp(*terms: Tensor) -> Tensor:
    """log(sum(exp(terms))) whose first and second derivatives stay finite when a term is ~neg.

    (``torch.logaddexp``'s second derivative is NaN there: exp(huge) / (1 + exp(huge))^2.)
    """
    return torch.logsumexp(torch.stack(terms), dim=0)


def _alpha_step(alpha: Tensor, skip: Tensor, emit_t: Tensor, neg: float) -> Tensor:
    shifted = F.pad(alpha, (2, 0), value=neg)
    return _logsumexp(alpha, shifted[:, 1:-1], shifted[:, :-2] + skip) + emit_t


def _log_likelihood(log_probs: Tensor, labels: Tensor, in_len: Tensor, tgt_len: Tensor, blank: int) -> Tensor:
    """``log p(labels | log_probs)`` per sequence, by the alpha recursion."""
    ext, skip = _extended(labels, blank, log_probs.dtype)
    if is_eager() and not has_tangent(log_probs) and not log_probs.is_meta:
        # Steps past the longest input matter to no sequence. (On the meta device there are no
        # lengths to read: the recorded loop below gives the shapes.)
        used = max(1, int(in_len.max())) if in_len.numel() else 1
        ll: Tensor = _CTCFunction.apply(log_probs[:used], ext, skip, in_len, tgt_len)[0]  # type: ignore[no-untyped-call]
        return ll
    if compiled_plainly():
        compiled: Tensor = torch.ops.funcloss.ctc_alphas(log_probs, ext, skip, in_len, tgt_len)[0]
        return compiled
    steps, batch, _ = log_probs.shape
    size = ext.size(1)
    neg = _neg(log_probs.dtype)
    emit = log_probs.gather(2, ext.unsqueeze(0).expand(steps, batch, size))  # (T, N, L)
    alpha = emit[0] + _start(size, log_probs.dtype, log_probs.device)
    alphas = [alpha]
    for t in range(1, steps):
        alpha = _alpha_step(alpha, skip, emit[t], neg)
        alphas.append(alpha)
    return _finish(torch.stack(alphas), in_len, tgt_len)


def _alphas_no_grad(emit: Tensor, skip: Tensor) -> Tensor:
    """All alphas, state-major: ``(T, L + 2, N)`` with two leading rows of ~log(0), four
    kernels a step.

    ``emit`` is ``(T, L, N)`` and ``skip`` ``(L, N)``. With the batch innermost, the padding
    makes ``alpha_{t-1}(s - 1)`` and ``alpha_{t-1}(s - 2)`` contiguous views, so every kernel
    runs vectorised (a batch-major layout's per-row tails made each step about 2x slower).
    """
    steps, size, batch = emit.shape
    padded = torch.empty((steps, size + 2, batch), dtype=emit.dtype, device=emit.device)
    padded[:, :2].fill_(_neg(emit.dtype))  # the recursion writes all the rows after these
    alphas, minus1, minus2 = padded[:, 2:], padded[:, 1:-1], padded[:, :-2]
    torch.add(emit[0], _start(size, emit.dtype, emit.device).unsqueeze(1), out=alphas[0])
    step, jump = torch.empty_like(skip), torch.empty_like(skip)
    logaddexp, add = torch.logaddexp, torch.add
    for a, a1, a2, out, e in zip(alphas, minus1, minus2, alphas[1:], emit[1:]):
        logaddexp(a, a1, out=step)
        add(a2, skip, out=jump)
        logaddexp(step, jump, out=step)
        add(step, e, out=out)
    return padded


_LOG2E = math.log2(math.e)


def _flat_classes(ext: Tensor, classes: int) -> Tensor:
    """``(L * N,)``: where ``log_probs[t, n, ext[n, s]]`` sits in row ``t`` of the ``(T, N * C)``
    view, state-major (``s`` outer, ``n`` inner)."""
    batch = ext.size(0)
    return (torch.arange(batch, device=ext.device) * classes + ext.t()).reshape(-1)


def _emissions(log_probs: Tensor, ext: Tensor) -> Tensor:
    """``log p_t(l'_s)`` for every step, state and sequence, state-major: ``(T, L, N)``.

    One ``index_select`` along the rows of the ``(T, N * C)`` view, faster on the CPU than a
    ``gather`` from the transposed ``(T, C, N)`` view (2.7x at T=200, N=16, C=40; 1.1x at
    T=50, N=1024, C=20)."""
    steps, batch, classes = log_probs.shape
    rows = log_probs.reshape(steps, batch * classes)
    return rows.index_select(1, _flat_classes(ext, classes)).view(steps, ext.size(1), batch)


def _ctc_forward(log_probs: Tensor, ext: Tensor, skip: Tensor, in_len: Tensor, tgt_len: Tensor) -> tuple[Tensor, ...]:
    """``(log-likelihoods (N,), padded state-major alphas (T, L + 2, N))``, without recording."""
    padded = _alphas_no_grad(_emissions(log_probs, ext), skip.t().contiguous())
    return _finish_padded(padded, in_len, tgt_len), padded


def _finish_padded(padded: Tensor, in_len: Tensor, tgt_len: Tensor) -> Tensor:
    """`_finish` read straight off the padded state-major alphas ``(T, L + 2, N)``, unrecorded.

    State ``s`` is row ``s + 2``, and rows 0 and 1 hold ~log(0): the last label's state
    ``2 S_n`` and the blank after it, ``2 S_n - 1``, are rows ``2 S_n + 2`` and ``2 S_n + 1``,
    and for an empty target the second is row 1, so it needs no mask. Both come out of one
    index into the flat buffer."""
    _, rows, batch = padded.shape
    last_t = (in_len - 1).clamp_min(0)
    at = (last_t * rows + 2 * tgt_len + 1) * batch + torch.arange(batch, device=padded.device)
    before, end = padded.view(-1)[torch.stack([at, at + batch])]
    ll = torch.logaddexp(end, before)
    # No input at all: the empty target has probability 1, any other target 0.
    empty = torch.where(tgt_len == 0, ll.new_zeros(()), ll.new_full((), _neg(ll.dtype)))
    return torch.where(in_len > 0, ll, empty)


def _ctc_forward_triton(
    log_probs: Tensor, ext: Tensor, skip: Tensor, in_len: Tensor, tgt_len: Tensor
) -> tuple[Tensor, ...]:
    """`_ctc_forward` with the recursion as one Triton kernel."""
    kernels = _triton(log_probs)
    assert kernels is not None, "the Triton recursion for a tensor it does not take"
    padded = kernels.alphas(_emissions(log_probs, ext), skip.t().contiguous(), _neg(log_probs.dtype))
    return _finish(padded[:, 2:].transpose(1, 2), in_len, tgt_len), padded


class _CTCFunction(torch.autograd.Function):
    """The alpha recursion without autograd recording, and its gradient from the beta recursion.

    Used in eager mode only (it is several times faster there: no graph of T steps to record
    and replay). Its backward is the posterior occupancy of each (time, label) and is not
    itself differentiable; transforms and compile take the recorded path instead. The second
    output is the padded state-major alphas ``(T, L + 2, N)``, kept for the backward.
    """

    @staticmethod
    def forward(log_probs: Tensor, ext: Tensor, skip: Tensor, in_len: Tensor, tgt_len: Tensor) -> tuple[Tensor, Tensor]:
        # On CUDA a CUDA graph from the second call of the same shapes on (see `_graphs`): the
        # recursion's launches, or the Triton kernel's with the few around it.
        forward = _ctc_forward_triton if _triton(log_probs) is not None else _ctc_forward
        ll, padded = replayed(forward, log_probs, ext, skip, in_len, tgt_len)
        return ll, padded

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        log_probs, ext, skip, in_len, tgt_len = inputs
        ll, alphas = output
        ctx.mark_non_differentiable(alphas)
        ctx.save_for_backward(log_probs, ext, skip, in_len, tgt_len, ll, alphas)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_ll: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        return _ctc_grad(grad_ll, *ctx.saved_tensors), None, None, None, None


def _ctc_grad(*args: Tensor) -> Tensor:
    """The gradient of the log-likelihoods ``ll`` (weighted by ``grad_ll``) with respect to
    ``log_probs``, from the saved alphas ``padded`` and the beta recursion: the posterior
    occupancy of each (time, label), added into its class. The arguments, in this order (the
    backward operator's signature spells them out): ``grad_ll, log_probs, ext, skip, in_len,
    tgt_len, ll, padded``."""
    _, log_probs, _, _, in_len, *_ = args
    if _triton(log_probs) is not None:
        return replayed(_ctc_grad_triton, *args)[0]
    if log_probs.is_cuda:
        # No host read of the lengths: every step checks for sequences ending there, so
        # the recursion's launches depend on the shapes alone (a CUDA graph on GPUs).
        return replayed(_ctc_grad_every_step, *args)[0]
    return _ctc_grad_from(*args, starting=set((in_len - 1).tolist()))


def _ctc_grad_every_step(*args: Tensor) -> tuple[Tensor, ...]:
    return (_ctc_grad_from(*args, starting=None),)


def _ctc_grad_triton(*args: Tensor) -> tuple[Tensor, ...]:
    """`_ctc_grad` (same arguments) with the beta recursion as one Triton kernel."""
    grad_ll, log_probs, ext, skip, in_len, tgt_len, ll, padded = args
    kernels = _triton(log_probs)
    assert kernels is not None, "the Triton recursion for a tensor it does not take"
    emit = _emissions(log_probs, ext)
    betas = kernels.betas(emit, _skip_next(skip), in_len, tgt_len, _neg(log_probs.dtype))
    return (_posterior_grad(grad_ll, log_probs, ext, ll, padded, betas),)


def _skip_next(skip: Tensor) -> Tensor:
    """``(L, N)``: the additive mask of jumps from state ``s`` to ``s + 2`` (``skip`` is that of
    jumps into a state, ``(N, L)``)."""
    return F.pad(skip, (0, 2), value=_neg(skip.dtype))[:, 2:].t().contiguous()


def _ctc_grad_from(*args: Tensor, starting: set[int] | None) -> Tensor:
    """`_ctc_grad` (same arguments), given the steps at which some sequence's beta recursion
    starts (its last step), or None to check every step."""
    grad_ll, log_probs, ext, skip, in_len, tgt_len, ll, padded = args
    steps, batch, _ = log_probs.shape
    size = ext.size(1)
    dtype, device = log_probs.dtype, log_probs.device
    neg = _neg(dtype)
    emit = _emissions(log_probs, ext)
    # beta_t(s): log-probability of finishing from state s at step t (emission at t
    # excluded). It starts at each sequence's last step; later steps hold ~neg, which
    # absorbs whatever is added to it. State-major like the alphas.
    last = 2 * tgt_len
    s_idx = torch.arange(size, device=device).unsqueeze(1)  # (L, 1)
    ends = (s_idx == last) | ((s_idx == last - 1) & (tgt_len > 0))  # (L, N)
    zero = torch.zeros((), dtype=dtype, device=device)
    neg_t = torch.full((), neg, dtype=dtype, device=device)
    end_beta = torch.where(ends, zero, neg_t)
    last_step = in_len - 1
    skip_next = _skip_next(skip)
    betas = torch.empty_like(emit)
    torch.where(last_step == steps - 1, end_beta, neg_t, out=betas[-1])
    ahead = torch.full((size + 2, batch), neg, dtype=dtype, device=device)
    here, next1, next2 = ahead[:size], ahead[1 : size + 1], ahead[2:]
    step, jump = torch.empty_like(end_beta), torch.empty_like(end_beta)
    logaddexp, add = torch.logaddexp, torch.add
    beta_rows, emit_rows = betas.unbind(0), emit.unbind(0)  # one call each, not two views a step
    for t in range(steps - 2, -1, -1):
        add(beta_rows[t + 1], emit_rows[t + 1], out=here)
        logaddexp(here, next1, out=step)
        add(next2, skip_next, out=jump)
        logaddexp(step, jump, out=beta_rows[t])
        if starting is None or t in starting:
            torch.where(last_step == t, end_beta, beta_rows[t], out=beta_rows[t])
    return _posterior_grad(grad_ll, log_probs, ext, ll, padded, betas)


def _posterior_grad(
    grad_ll: Tensor, log_probs: Tensor, ext: Tensor, ll: Tensor, padded: Tensor, betas: Tensor
) -> Tensor:
    """The gradient from the alphas ``padded`` and the ``betas``: each (step, state)'s posterior
    occupancy ``exp(alpha + beta - ll)``, weighted by ``grad_ll`` and added into its class."""
    steps, batch, classes = log_probs.shape
    size = ext.size(1)
    occupancy = betas.add_(padded[:, 2:]).sub_(ll)
    feasible = ll >= _neg(ll.dtype) / 2
    # exp(x) as 2^(x log2 e): the same to rounding, and several times faster on CPU where
    # most states are unreachable (exp's vectorised path falls back for x far below -87).
    posterior = torch.where(feasible, occupancy.mul_(_LOG2E).exp2_(), torch.zeros((), dtype=ll.dtype, device=ll.device))
    # Each state's posterior added into its class's column of the (T, N * C) view.
    weights = (grad_ll * posterior).reshape(steps, size * batch)
    flat = torch.zeros((steps, batch * classes), dtype=ll.dtype, device=ll.device)
    return flat.index_add_(1, _flat_classes(ext, classes), weights).view(log_probs.shape)


# Under torch.compile the recursion runs as one opaque operator: traced, its Python time loop
# would unroll into a graph of T steps, minutes to compile for a few hundred steps and slower
# than eager once compiled. The operator runs the eager recursion above at run time, with its
# beta-recursion backward as a second operator (first derivatives only when compiled).
@torch.library.custom_op("funcloss::ctc_alphas", mutates_args=())
def _ctc_alphas_op(
    log_probs: Tensor, ext: Tensor, skip: Tensor, in_len: Tensor, tgt_len: Tensor
) -> tuple[Tensor, Tensor]:
    """``(log-likelihoods (N,), padded alphas (T, L + 2, N))``, as `_CTCFunction.forward`."""
    ll, padded = _CTCFunction.forward(log_probs, ext, skip, in_len, tgt_len)
    return ll, padded


@_ctc_alphas_op.register_fake
def _ctc_alphas_fake(
    log_probs: Tensor, ext: Tensor, skip: Tensor, in_len: Tensor, tgt_len: Tensor
) -> tuple[Tensor, Tensor]:
    steps, batch, _ = log_probs.shape
    return log_probs.new_empty(batch), log_probs.new_empty(steps, ext.size(1) + 2, batch)


@torch.library.custom_op("funcloss::ctc_alphas_backward", mutates_args=())
def _ctc_alphas_backward_op(
    grad_ll: Tensor,
    log_probs: Tensor,
    ext: Tensor,
    skip: Tensor,
    in_len: Tensor,
    tgt_len: Tensor,
    ll: Tensor,
    padded: Tensor,
) -> Tensor:
    """The gradient with respect to ``log_probs``, as `_ctc_grad` (which reads its inputs and
    writes only fresh tensors)."""
    return _ctc_grad(grad_ll, log_probs, ext, skip, in_len, tgt_len, ll, padded)


@_ctc_alphas_backward_op.register_fake
def _ctc_alphas_backward_fake(*args: Tensor) -> Tensor:
    return torch.empty_like(args[1])  # the gradient of log_probs, the second argument


def _ctc_alphas_setup(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(*inputs, *output)


def _ctc_alphas_backward(ctx: Any, grad_ll: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
    return _ctc_alphas_backward_op(grad_ll, *ctx.saved_tensors), None, None, None, None


_ctc_alphas_op.register_autograd(_ctc_alphas_backward, setup_context=_ctc_alphas_setup)
