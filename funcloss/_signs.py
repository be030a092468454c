"""Gradient-sign inspection: agreement, AND-masks, conflicts between loss terms, reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.func as tf
from torch import Tensor, nn

from ._combinators import LossSum
from ._per_sample import Batch, GradStats, functional_forward

Grads = dict[str, Tensor]

__all__ = [
    "Conflicts",
    "SignReport",
    "and_mask",
    "gradient_conflicts",
    "model_terms",
    "sample_disagreement",
    "sign_agreement",
    "sign_report",
]


def sign_agreement(grads: Mapping[str, Tensor] | GradStats) -> Grads:
    """Per element, ``|mean_i sign(g_i)|`` over the leading (sample) axis.

    1 means every sample pushes the parameter the same way, 0 that they are evenly split.
    Exact zeros (a dead ReLU, an unused embedding row) count as abstentions: they stay in the
    denominator, so a parameter most samples do not touch has low agreement.

    Args:
        grads: ``{name: (B, ...)}`` per-sample gradients, or a `GradStats`.
    """
    if isinstance(grads, GradStats):
        return grads.sign_agreement
    return {k: g.sign().mean(0).abs() for k, g in grads.items()}


def sample_disagreement(grads: Mapping[str, Tensor], threshold: float = 0.5) -> Tensor:
    """Per sample, how often it pushes against the batch where the batch agrees.

    Over the parameter elements whose sign agreement is at least ``threshold`` (the batch's
    consensus), the fraction where the sample's gradient has the opposite sign. Mislabelled or
    atypical samples score high.

    Args:
        grads: ``{name: (B, ...)}`` per-sample gradients.
        threshold: agreement that makes an element part of the consensus (0.5: three quarters of
            the samples agree).

    Returns:
        ``(B,)``, each in [0, 1]; NaN if no element reaches the threshold.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"sample_disagreement(...): expected threshold in [0, 1], got {threshold}.")
    b = next(iter(grads.values())).size(0)
    signs = torch.cat([g.reshape(b, -1).sign() for g in grads.values()], dim=1)
    majority = signs.mean(0)
    consensus = majority.abs() >= threshold
    against = (signs * majority.sign() < 0) & consensus
    return against.sum(1).to(majority.dtype) / consensus.sum().to(majority.dtype)


def _mean(grads: Mapping[str, Tensor] | GradStats) -> Grads:
    return dict(grads.mean) if isinstance(grads, GradStats) else {k: g.mean(0) for k, g in grads.items()}


def and_mask(grads: Mapping[str, Tensor] | GradStats, threshold: float, *, rescale: bool = False) -> Grads:
    """The AND-mask: the mean gradient where the samples agree in sign, zero elsewhere.

    .. math::
        m_j = [\\, |\\tfrac1B \\textstyle\\sum_i \\operatorname{sign}(g_{ij})| \\ge \\tau \\,], \\qquad
        \\tilde g_j = m_j \\, \\bar g_j

    With ``rescale``, each tensor is multiplied by ``numel / kept`` so the masked gradient keeps
    about the scale of the unmasked one.

    Args:
        grads: per-sample (or per-environment) gradients ``{name: (B, ...)}``, or a `GradStats`.
        threshold: ``tau`` in [0, 1].
        rescale: compensate for the masked-out fraction, per tensor.

    References:
        Parascandolo, G. et al. "Learning explanations that are hard to vary", ICLR 2021.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"and_mask(...): expected threshold in [0, 1], got {threshold}.")
    agreement = sign_agreement(grads)
    out: Grads = {}
    for k, m in _mean(grads).items():
        keep = (agreement[k] >= threshold).to(m.dtype)
        masked = m * keep
        if rescale:
            masked = masked * (keep.numel() / keep.sum().clamp_min(1))
        out[k] = masked
    return out


@dataclass(frozen=True)
class Conflicts:
    """The gradients of a loss's terms and how they conflict.

    Attributes:
        names: the terms, in order.
        grads: ``{term: {param: gradient}}``.
        cosine: ``(K, K)`` pairwise cosine similarity of the flattened term gradients.
        sign_disagreement: ``(K, K)`` fraction of parameter elements where both terms' gradients
            are non-zero and of opposite sign.
    """

    names: tuple[str, ...]
    grads: dict[str, Grads]
    cosine: Tensor
    sign_disagreement: Tensor

    def conflicting_pairs(self) -> list[tuple[str, str, float]]:
        """Pairs with negative cosine (PCGrad's conflict), most conflicting first."""
        pairs = [
            (self.names[i], self.names[j], float(self.cosine[i, j]))
            for i in range(len(self.names))
            for j in range(i + 1, len(self.names))
            if self.cosine[i, j] < 0
        ]
        return sorted(pairs, key=lambda p: p[2])

    def __str__(self) -> str:
        width = max(len(n) for n in self.names)
        # Each column as wide as its term's name (at least a value's width): names are never cut.
        cols = [max(len(n), 6) for n in self.names]
        lines = [f"{'':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(self.names, cols))]
        for i, a in enumerate(self.names):
            lines.append(
                f"{a:<{width}}  " + "  ".join(f"{float(self.cosine[i, j]):>{w}.3f}" for j, w in enumerate(cols))
            )
        return "cosine similarity of term gradients\n" + "\n".join(lines)


def gradient_conflicts(
    terms: Mapping[str, Callable[..., Tensor]],
    params: Mapping[str, Tensor],
    *args: Any,
    **kwargs: Any,
) -> Conflicts:
    """Each term's gradient and the pairwise conflicts between them.

    Each term is called as ``term(params, *args, **kwargs)`` and differentiated with respect to
    ``params``. For a `LossSum` over a model's outputs, `model_terms` builds these functions.

    References:
        Yu, T. et al. "Gradient Surgery for Multi-Task Learning" (PCGrad), NeurIPS 2020.
    """
    if len(terms) < 2:
        raise ValueError(f"gradient_conflicts(...): expected at least two terms, got {len(terms)}.")
    names = tuple(terms)
    p = dict(params)
    grads = {name: dict(tf.grad(term)(p, *args, **kwargs)) for name, term in terms.items()}
    flat = torch.stack([torch.cat([g.reshape(-1) for g in grads[n].values()]) for n in names])
    norms = flat.norm(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)
    cosine = (flat @ flat.T) / (norms[:, None] * norms[None, :])
    signs = flat.sign()
    opposite = (signs[:, None, :] * signs[None, :, :] < 0).to(flat.dtype).mean(-1)
    return Conflicts(names, grads, cosine, opposite)


def model_terms(
    model: nn.Module, loss: LossSum[...]
) -> dict[str, Callable[[Mapping[str, Tensor], Batch, Any], Tensor]]:
    """The terms of ``loss`` as functions of ``(params, inputs, targets)`` through ``model``,
    for `gradient_conflicts` (each term weighted as in the sum). ``inputs`` is a tensor, or a
    tuple (``model(*inputs)``) or mapping (``model(**inputs)``) of tensors."""
    buffers = dict(model.named_buffers())

    def term_fn(name: str) -> Callable[[Mapping[str, Tensor], Batch, Any], Tensor]:
        def fn(params: Mapping[str, Tensor], inputs: Batch, targets: Any) -> Tensor:
            out = functional_forward(model, params, buffers, inputs)
            return loss.terms[name](out, targets) * loss.weight(name)

        return fn

    return {name: term_fn(name) for name in loss.terms}


@dataclass(frozen=True)
class SignReport:
    """Per parameter tensor: where its mean gradient points and how much the samples agree."""

    rows: list[dict[str, Any]]

    def __str__(self) -> str:
        # The name and shape columns are as wide as their longest entry: nothing is cut.
        shapes = [str(tuple(r["shape"])) for r in self.rows]
        nw = max([len("parameter"), *(len(r["name"]) for r in self.rows)])
        sw = max([len("shape"), *(len(s) for s in shapes)])
        header = (
            f"{'parameter':<{nw}} {'shape':<{sw}} {'+ mean':>7} {'- mean':>7} {'0 mean':>7} {'agree':>7} {'GSNR':>9}"
        )
        lines = [header, "-" * len(header)]
        for r, shape in zip(self.rows, shapes):
            lines.append(
                f"{r['name']:<{nw}} {shape:<{sw}} {r['positive']:>7.1%} {r['negative']:>7.1%} "
                f"{r['zero']:>7.1%} {r['agreement']:>7.3f} {r['gsnr']:>9.3g}"
            )
        return "\n".join(lines)


def sign_report(stats: GradStats | Mapping[str, Tensor]) -> SignReport:
    """A per-layer table: fraction of positive/negative/zero mean-gradient elements, mean sign
    agreement and median GSNR. ``print(sign_report(stats))`` shows it.

    Args:
        stats: a `GradStats`, or per-sample gradients ``{name: (B, ...)}`` (summarised by
            `GradStats.from_grads`).
    """
    if not isinstance(stats, GradStats):
        stats = GradStats.from_grads(stats)
    agreement = stats.sign_agreement
    gsnr = stats.gsnr
    rows = []
    for name, m in stats.mean.items():
        finite = gsnr[name][torch.isfinite(gsnr[name])]
        rows.append(
            {
                "name": name,
                "shape": tuple(m.shape),
                "positive": float((m > 0).double().mean()),
                "negative": float((m < 0).double().mean()),
                "zero": float((m == 0).double().mean()),
                "agreement": float(agreement[name].double().mean()),
                "gsnr": float(finite.double().median()) if finite.numel() else float("nan"),
            }
        )
    return SignReport(rows)
