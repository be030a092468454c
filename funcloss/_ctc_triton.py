"""CTC's alpha and beta recursions as Triton kernels, for CUDA tensors.

Imported only where Triton is installed (torch's CUDA wheels bring it); `funcloss.losses.
_sequence` falls back to its torch recursion (replayed as CUDA graphs) without it, or with the
environment variable ``FUNCLOSS_TRITON=0``.

Each program runs one sequence through all T steps, one thread per state of its
blank-extended target: the previous step's values of the two states before (alpha) or after
(beta) a state are read back from global memory behind a barrier. Two launches per loss in
place of several kernels per step. The arithmetic is that of the torch recursion: the same
finite stand-in ``NEG`` for log(0), the three-way log-sum-exp taken about its maximum.

Layouts are those of the torch recursion, state-major: emissions ``(T, L, N)``, skip masks
``(L, N)``, alphas padded with two leading states of ``NEG`` ``(T, L + 2, N)``, betas ``(T, L, N)``.

References:
    Graves, A. et al. "Connectionist Temporal Classification: Labelling Unsegmented Sequence
    Data with Recurrent Neural Networks", ICML 2006 (the alpha and beta recursions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


# Lengths and sizes vary from batch to batch (speech): not specialised on, so a new T, L or N
# does not compile a new kernel.
@triton.jit(do_not_specialize=["T", "L", "N"])  # type: ignore[untyped-decorator]
def _alphas_kernel(emit, skip, out, T, L, N, NEG, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    n = tl.program_id(0).to(tl.int64)
    N = tl.cast(N, tl.int64)  # offsets in 64 bits: T * (L + 2) * N may pass 2^31
    s = tl.arange(0, BLOCK)
    valid = s < L
    step_in = L * N  # one step of the emissions
    step_out = (L + 2) * N  # one step of the padded alphas
    skip_s = tl.load(skip + s * N + n, mask=valid, other=NEG)
    # Paths start in the first blank or the first label.
    a = tl.load(emit + s * N + n, mask=valid, other=NEG) + tl.where(s < 2, 0.0, NEG)
    tl.store(out + (s + 2) * N + n, a, mask=valid)
    for t in range(1, T):
        tl.debug_barrier()  # the previous step's stores are visible to every thread
        prev = out + (t - 1) * step_out
        a1 = tl.load(prev + (s + 1) * N + n, mask=valid, other=NEG)  # state s - 1
        a2 = tl.load(prev + s * N + n, mask=valid, other=NEG) + skip_s  # state s - 2, where allowed
        m = tl.maximum(tl.maximum(a, a1), a2)
        a = m + tl.log(tl.exp(a - m) + tl.exp(a1 - m) + tl.exp(a2 - m))
        a += tl.load(emit + t * step_in + s * N + n, mask=valid, other=NEG)
        tl.store(out + t * step_out + (s + 2) * N + n, a, mask=valid)


@triton.jit(do_not_specialize=["T", "L", "N"])  # type: ignore[untyped-decorator]
def _betas_kernel(  # type: ignore[no-untyped-def]
    emit, skip_next, in_len, tgt_len, betas, scratch, T, L, N, NEG, BLOCK: tl.constexpr
):
    n = tl.program_id(0).to(tl.int64)
    N = tl.cast(N, tl.int64)
    s = tl.arange(0, BLOCK)
    valid = s < L
    step = L * N
    targets = tl.load(tgt_len + n)
    last_step = tl.load(in_len + n) - 1
    # A sequence's betas start at its last step, in its last label or the blank after it.
    ends = (s == 2 * targets) | ((s == 2 * targets - 1) & (targets > 0))
    end_beta = tl.where(ends, 0.0, NEG).to(emit.dtype.element_ty)
    skip_s = tl.load(skip_next + s * N + n, mask=valid, other=NEG)  # may s jump to s + 2?
    b = tl.where(last_step == T - 1, end_beta, NEG)
    tl.store(betas + (T - 1) * step + s * N + n, b, mask=valid)
    for i in range(0, T - 1):
        t = T - 2 - i
        # beta_{t+1} + emission_{t+1}, shared through one of two scratch rows: a row is
        # rewritten two steps later, after every thread has passed the barrier in between.
        h = b + tl.load(emit + (t + 1) * step + s * N + n, mask=valid, other=NEG)
        row = scratch + (t % 2) * step
        tl.store(row + s * N + n, h, mask=valid)
        tl.debug_barrier()
        h1 = tl.load(row + (s + 1) * N + n, mask=s + 1 < L, other=NEG)
        h2 = tl.load(row + (s + 2) * N + n, mask=s + 2 < L, other=NEG) + skip_s
        m = tl.maximum(tl.maximum(h, h1), h2)
        b = m + tl.log(tl.exp(h - m) + tl.exp(h1 - m) + tl.exp(h2 - m))
        b = tl.where(last_step == t, end_beta, b)
        tl.store(betas + t * step + s * N + n, b, mask=valid)


def _launch(states: int) -> tuple[int, int]:
    block = max(32, triton.next_power_of_2(states))
    return block, min(8, block // 32)


def alphas(emit: Tensor, skip: Tensor, neg: float) -> Tensor:
    """All alphas ``(T, L + 2, N)`` (two leading rows of ``neg``) from the emissions ``(T, L, N)``
    and the additive skip mask ``(L, N)``, both contiguous."""
    emit, skip = emit.contiguous(), skip.contiguous()
    steps, size, batch = emit.shape
    out = emit.new_empty((steps, size + 2, batch))
    out[:, :2].fill_(neg)
    block, warps = _launch(size)
    with torch.cuda.device(emit.device):  # Triton launches on the current device
        _alphas_kernel[(batch,)](emit, skip, out, steps, size, batch, neg, BLOCK=block, num_warps=warps)
    return out


def betas(emit: Tensor, skip_next: Tensor, in_len: Tensor, tgt_len: Tensor, neg: float) -> Tensor:
    """All betas ``(T, L, N)`` (the emission at their own step excluded) from the emissions
    ``(T, L, N)``, the additive mask of jumps to ``s + 2`` ``(L, N)`` and the lengths."""
    emit, skip_next, in_len, tgt_len = (t.contiguous() for t in (emit, skip_next, in_len, tgt_len))
    steps, size, batch = emit.shape
    out = emit.new_empty((steps, size, batch))
    scratch = emit.new_empty((2, size, batch))
    block, warps = _launch(size)
    with torch.cuda.device(emit.device):
        _betas_kernel[(batch,)](
            emit, skip_next, in_len, tgt_len, out, scratch, steps, size, batch, neg, BLOCK=block, num_warps=warps
        )
    return out
