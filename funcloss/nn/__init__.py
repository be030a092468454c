"""Criteria: drop-in replacements for every torch.nn loss class, and `Criterion` for any
functional loss."""

from __future__ import annotations

from ._criteria import AdaptiveLogSoftmaxWithLoss as AdaptiveLogSoftmaxWithLoss
from ._criteria import BCELoss as BCELoss
from ._criteria import BCEWithLogitsLoss as BCEWithLogitsLoss
from ._criteria import CosineEmbeddingLoss as CosineEmbeddingLoss
from ._criteria import Criterion as Criterion
from ._criteria import CrossEntropyLoss as CrossEntropyLoss
from ._criteria import CTCLoss as CTCLoss
from ._criteria import GaussianNLLLoss as GaussianNLLLoss
from ._criteria import HingeEmbeddingLoss as HingeEmbeddingLoss
from ._criteria import HuberLoss as HuberLoss
from ._criteria import KLDivLoss as KLDivLoss
from ._criteria import L1Loss as L1Loss
from ._criteria import LinearCrossEntropyLoss as LinearCrossEntropyLoss
from ._criteria import MarginRankingLoss as MarginRankingLoss
from ._criteria import MSELoss as MSELoss
from ._criteria import MultiLabelMarginLoss as MultiLabelMarginLoss
from ._criteria import MultiLabelSoftMarginLoss as MultiLabelSoftMarginLoss
from ._criteria import MultiMarginLoss as MultiMarginLoss
from ._criteria import NLLLoss as NLLLoss
from ._criteria import PoissonNLLLoss as PoissonNLLLoss
from ._criteria import SmoothL1Loss as SmoothL1Loss
from ._criteria import SoftMarginLoss as SoftMarginLoss
from ._criteria import TripletMarginLoss as TripletMarginLoss
from ._criteria import TripletMarginWithDistanceLoss as TripletMarginWithDistanceLoss
from ._criteria import __all__ as __all__
