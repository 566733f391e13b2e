"""Evaluation metrics: image-text retrieval and zero-shot classification.

Functional forms (pure tensor functions) live in :mod:`pefttune.metrics.functional` and
:mod:`pefttune.metrics.zeroshot`; the ``torchmetrics.Metric`` classes accumulate over batches and
processes and call them.
"""

from pefttune.metrics.functional import (
    DEFAULT_TIES,
    QueryOutcomes,
    collapse_diagnostics,
    effective_rank,
    embedding_spread,
    metrics_from_outcomes,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_outcomes,
    retrieval_ranks,
    topk_retrieval,
)
from pefttune.metrics.retrieval import RankedQueries, RetrievalMetrics
from pefttune.metrics.zeroshot import (
    ZeroShotAccuracy,
    class_embeddings,
    harmonic_mean,
    top1_accuracy,
    zero_shot_logits,
)

__all__ = [
    "DEFAULT_TIES",
    "QueryOutcomes",
    "RankedQueries",
    "RetrievalMetrics",
    "ZeroShotAccuracy",
    "class_embeddings",
    "collapse_diagnostics",
    "effective_rank",
    "embedding_spread",
    "harmonic_mean",
    "metrics_from_outcomes",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_outcomes",
    "retrieval_ranks",
    "top1_accuracy",
    "topk_retrieval",
    "zero_shot_logits",
]
