"""Evaluation metrics: image-text retrieval and zero-shot classification.

Functional forms (pure tensor functions) live in :mod:`pefttune.metrics.functional` and
:mod:`pefttune.metrics.zeroshot`; the ``torchmetrics.Metric`` classes accumulate over batches and
processes and call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefttune._lazy import lazy_attributes

# name -> the module that defines it; imported on first use (PEP 562).
_LAZY = {
    "DEFAULT_TIES": "pefttune.metrics.functional",
    "QueryOutcomes": "pefttune.metrics.functional",
    "RankedQueries": "pefttune.metrics.retrieval",
    "RetrievalMetrics": "pefttune.metrics.retrieval",
    "ZeroShotAccuracy": "pefttune.metrics.zeroshot",
    "class_embeddings": "pefttune.metrics.zeroshot",
    "collapse_diagnostics": "pefttune.metrics.functional",
    "effective_rank": "pefttune.metrics.functional",
    "embedding_spread": "pefttune.metrics.functional",
    "harmonic_mean": "pefttune.metrics.zeroshot",
    "metrics_from_outcomes": "pefttune.metrics.functional",
    "metrics_from_ranks": "pefttune.metrics.functional",
    "retrieval_metrics": "pefttune.metrics.functional",
    "retrieval_outcomes": "pefttune.metrics.functional",
    "retrieval_ranks": "pefttune.metrics.functional",
    "top1_accuracy": "pefttune.metrics.zeroshot",
    "topk_retrieval": "pefttune.metrics.functional",
    "zero_shot_logits": "pefttune.metrics.zeroshot",
}

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

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
