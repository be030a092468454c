"""funcloss: pure-functional, typed losses for PyTorch that compose with torch.func.

Every torch.nn loss as a stateless function with torch.nn.functional's name, arguments and
semantics, written from tensor primitives so that ``grad``, ``vmap``, ``jvp``, ``jacrev``,
``hessian`` and ``torch.compile`` all work; combinators to reduce, weight, mask, scale and sum
losses.
"""

from __future__ import annotations

from ._baselines import Baseline as Baseline
from ._baselines import loss_baseline as loss_baseline
from ._combinators import LossSum as LossSum
from ._combinators import Masked as Masked
from ._combinators import Reduced as Reduced
from ._combinators import Scaled as Scaled
from ._combinators import Weighted as Weighted
from ._combinators import batchmean as batchmean
from ._combinators import loss_sum as loss_sum
from ._combinators import masked as masked
from ._combinators import normalized_sum as normalized_sum
from ._combinators import reduce as reduce
from ._combinators import reduced as reduced
from ._combinators import scaled as scaled
from ._combinators import weighted as weighted
from ._combinators import weighted_mean as weighted_mean
from ._per_sample import GradStats as GradStats
from ._per_sample import grad_stats as grad_stats
from ._per_sample import per_sample_grad as per_sample_grad
from ._per_sample import per_sample_grads as per_sample_grads
from ._signs import Conflicts as Conflicts
from ._signs import SignReport as SignReport
from ._signs import and_mask as and_mask
from ._signs import gradient_conflicts as gradient_conflicts
from ._signs import model_terms as model_terms
from ._signs import sample_disagreement as sample_disagreement
from ._signs import sign_agreement as sign_agreement
from ._signs import sign_report as sign_report
from ._typing import DistanceFunction as DistanceFunction
from ._typing import KLDivReduction as KLDivReduction
from ._typing import Loss as Loss
from ._typing import Reduction as Reduction
from ._typing import WeightBy as WeightBy
from .losses._adaptive import ASMOutput as ASMOutput
from .losses._adaptive import adaptive_log_prob as adaptive_log_prob
from .losses._adaptive import adaptive_log_softmax_with_loss as adaptive_log_softmax_with_loss
from .losses._beyond import ClassWeightMethod as ClassWeightMethod
from .losses._beyond import class_weights as class_weights
from .losses._beyond import focal_loss as focal_loss
from .losses._beyond import positive_weights as positive_weights
from .losses._beyond import quantile_loss as quantile_loss
from .losses._beyond import real_world_weight_cross_entropy as real_world_weight_cross_entropy
from .losses._beyond import robust_loss as robust_loss
from .losses._beyond import sigmoid_focal_loss as sigmoid_focal_loss
from .losses._classification import cross_entropy as cross_entropy
from .losses._classification import linear_cross_entropy as linear_cross_entropy
from .losses._classification import nll_loss as nll_loss
from .losses._embedding import cosine_embedding_loss as cosine_embedding_loss
from .losses._embedding import pairwise_distance as pairwise_distance
from .losses._embedding import triplet_margin_loss as triplet_margin_loss
from .losses._embedding import triplet_margin_with_distance_loss as triplet_margin_with_distance_loss
from .losses._margin import hinge_embedding_loss as hinge_embedding_loss
from .losses._margin import margin_ranking_loss as margin_ranking_loss
from .losses._margin import multi_margin_loss as multi_margin_loss
from .losses._margin import multilabel_margin_loss as multilabel_margin_loss
from .losses._margin import multilabel_soft_margin_loss as multilabel_soft_margin_loss
from .losses._margin import soft_margin_loss as soft_margin_loss
from .losses._probabilistic import binary_cross_entropy as binary_cross_entropy
from .losses._probabilistic import binary_cross_entropy_with_logits as binary_cross_entropy_with_logits
from .losses._probabilistic import kl_div as kl_div
from .losses._regression import gaussian_nll_loss as gaussian_nll_loss
from .losses._regression import huber_loss as huber_loss
from .losses._regression import l1_loss as l1_loss
from .losses._regression import mse_loss as mse_loss
from .losses._regression import poisson_nll_loss as poisson_nll_loss
from .losses._regression import smooth_l1_loss as smooth_l1_loss
from .losses._sequence import ctc_loss as ctc_loss

__version__ = "0.1.0"

__all__ = [
    "ASMOutput",
    "Baseline",
    "ClassWeightMethod",
    "Conflicts",
    "DistanceFunction",
    "GradStats",
    "KLDivReduction",
    "Loss",
    "LossSum",
    "Masked",
    "Reduced",
    "Reduction",
    "Scaled",
    "SignReport",
    "WeightBy",
    "Weighted",
    "adaptive_log_prob",
    "adaptive_log_softmax_with_loss",
    "and_mask",
    "batchmean",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "class_weights",
    "cosine_embedding_loss",
    "cross_entropy",
    "ctc_loss",
    "focal_loss",
    "gaussian_nll_loss",
    "grad_stats",
    "gradient_conflicts",
    "hinge_embedding_loss",
    "huber_loss",
    "kl_div",
    "l1_loss",
    "linear_cross_entropy",
    "loss_baseline",
    "loss_sum",
    "margin_ranking_loss",
    "masked",
    "model_terms",
    "mse_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "nll_loss",
    "normalized_sum",
    "pairwise_distance",
    "per_sample_grad",
    "per_sample_grads",
    "poisson_nll_loss",
    "positive_weights",
    "quantile_loss",
    "real_world_weight_cross_entropy",
    "reduce",
    "reduced",
    "robust_loss",
    "sample_disagreement",
    "scaled",
    "sigmoid_focal_loss",
    "sign_agreement",
    "sign_report",
    "smooth_l1_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "triplet_margin_with_distance_loss",
    "weighted",
    "weighted_mean",
]
