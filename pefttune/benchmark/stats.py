"""Statistics of sweep results: intervals over seeds and paired comparisons between methods.

* :func:`mean_ci`: the mean of a quantity over seeds with its Student-t interval (SciPy's t distribution).
* :func:`paired_seed_difference`: the mean over shared seeds of the difference between two methods, with a
  paired Student-t interval. All methods of a suite share seeds, data and test queries, so the differences
  remove what the seeds change for every method alike (the generated data, the caption draw).
* :func:`paired_bootstrap_rsum`: the difference in RSUM between two methods from their per-query outcomes
  (:class:`~pefttune.metrics.RankedQueries`, saved by each run), with a percentile interval from a paired
  bootstrap over the test queries: each replicate resamples the test images with replacement (an image
  together with all of its captions, which are correlated queries) and uses the *same* resample for both
  methods. With several seeds, each replicate averages the seeds' resampled differences, so the interval
  measures how much the figure would move on another test set of the same size, for these trained models.

``docs/benchmarks.md`` ("How methods are compared") states the procedure and the decision rule.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from pefttune.metrics import RankedQueries
from pefttune.metrics.functional import DEFAULT_KS, Ties

DEFAULT_RESAMPLES = 2000


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom (SciPy)."""
    return float(scipy_stats.t.cdf(t, df))


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (SciPy).

    Raises:
        ValueError: If ``p`` is outside (0, 1) or ``df`` is not positive.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    return float(scipy_stats.t.ppf(p, df))


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values and the half-width of its confidence interval (None for n = 1).

    Attributes:
        mean: The sample mean.
        ci: Half-width of the two-sided interval: t_{(1+level)/2, n-1} * s / sqrt(n).
        n: Number of values.
        std: Sample standard deviation (n - 1 in the denominator), None for n = 1.
    """

    mean: float
    ci: float | None
    n: int
    std: float | None


def mean_ci(values: Sequence[float], level: float = 0.95) -> Summary:
    """The mean of ``values`` with a Student-t confidence interval at ``level`` (none for one value)."""
    data = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not data:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(data)
    if len(data) == 1:
        return Summary(mean, None, 1, None)
    std = statistics.stdev(data)
    half = student_t_quantile(0.5 + level / 2.0, len(data) - 1) * std / math.sqrt(len(data))
    return Summary(mean, half, len(data), std)


@dataclass(frozen=True)
class Difference:
    """A difference between two methods (``method - reference``) with a two-sided interval.

    Attributes:
        estimate: The observed difference.
        low: Lower end of the interval (None when it cannot be computed, e.g. from one seed).
        high: Upper end of the interval.
        n: Number of paired units behind it (seeds, or test images for the bootstrap).
    """

    estimate: float
    low: float | None
    high: float | None
    n: int

    @property
    def has_interval(self) -> bool:
        """Whether an interval was computed."""
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool | None:
        """True if the interval lies entirely on one side of 0; None without an interval."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


def paired_seed_difference(
    method: Mapping[int, float], reference: Mapping[int, float], level: float = 0.95
) -> Difference | None:
    """Mean over the shared seeds of ``method[seed] - reference[seed]``, with a paired Student-t interval.

    Returns:
        None when the two share no seed; a difference without interval for one shared seed.
    """
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        return None
    diffs = [float(method[s]) - float(reference[s]) for s in seeds]
    summary = mean_ci(diffs, level)
    if summary.ci is None:
        return Difference(summary.mean, None, None, len(seeds))
    return Difference(summary.mean, summary.mean - summary.ci, summary.mean + summary.ci, len(seeds))


@dataclass(frozen=True)
class _PerImage:
    """One evaluation's per-query RSUM contributions, grouped by test image (the bootstrap's unit)."""

    image_ids: np.ndarray
    i2t: np.ndarray  # [N_img]: sum over K of the image query's hit probability
    t2i_sum: np.ndarray  # [N_img]: sum over the image's captions of (sum over K of their hit probability)
    t2i_count: np.ndarray  # [N_img]: the image's number of captions
    caption_ids: np.ndarray


def _per_image(queries: RankedQueries, ks: Sequence[int], ties: Ties) -> _PerImage:
    i2t = sum(queries.i2t.hit_rate(k, ties) for k in ks).numpy()  # type: ignore[union-attr]
    t2i = sum(queries.t2i.hit_rate(k, ties) for k in ks).numpy()  # type: ignore[union-attr]
    image_ids = queries.image_ids.numpy()
    owner = np.searchsorted(image_ids, queries.caption_image_ids.numpy())
    return _PerImage(
        image_ids=image_ids,
        i2t=np.asarray(i2t, dtype=np.float64),
        t2i_sum=np.bincount(owner, weights=t2i, minlength=image_ids.size),
        t2i_count=np.bincount(owner, minlength=image_ids.size).astype(np.float64),
        caption_ids=queries.caption_ids.numpy(),
    )


def _check_same_queries(a: _PerImage, b: _PerImage, where: str) -> None:
    if not (np.array_equal(a.image_ids, b.image_ids) and np.array_equal(a.caption_ids, b.caption_ids)):
        raise ValueError(
            f"{where}: the two evaluations ranked different test queries ({a.image_ids.size} vs "
            f"{b.image_ids.size} images, {a.caption_ids.size} vs {b.caption_ids.size} captions, or other "
            "ids); a paired comparison needs the same test split"
        )


def paired_bootstrap_rsum(
    pairs: Sequence[tuple[RankedQueries, RankedQueries]],
    ks: Sequence[int] = DEFAULT_KS,
    ties: Ties | None = None,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    where: str = "paired bootstrap",
) -> Difference:
    """RSUM(method) - RSUM(reference), averaged over seeds, with a paired bootstrap interval over test images.

    Args:
        pairs: Per seed, ``(method's queries, reference's queries)``; both of a pair must cover the same
            test images and captions.
        ks: The K of the R@K that RSUM sums.
        ties: Tie rule (default: the one the method's run reported with).
        level: Coverage of the percentile interval.
        resamples: Bootstrap replicates.
        seed: Seed of the resampling (the result is reproducible).
        where: Named in error messages.

    Returns:
        The observed mean difference and its percentile interval; ``n`` is the number of test images
        (of the first pair).

    Raises:
        ValueError: Without pairs, or when a pair's two evaluations ranked different queries.
    """
    if not pairs:
        raise ValueError(f"{where}: no pair of evaluations to compare")
    rng = np.random.default_rng(seed)
    observed = []
    replicates = np.zeros(resamples)
    for number, (method, reference) in enumerate(pairs):
        rule: Ties = ties or method.ties
        a, b = _per_image(method, ks, rule), _per_image(reference, ks, rule)
        _check_same_queries(a, b, f"{where} (pair {number})")
        d_i2t = a.i2t - b.i2t
        d_t2i = a.t2i_sum - b.t2i_sum
        n = d_i2t.size
        observed.append(100.0 * (d_i2t.mean() + d_t2i.sum() / a.t2i_count.sum()))
        index = rng.integers(0, n, size=(resamples, n))
        # Captions follow their image: t2i R@K of a replicate is over the resampled images' captions.
        replicates += 100.0 * (
            d_i2t[index].mean(axis=1) + d_t2i[index].sum(axis=1) / a.t2i_count[index].sum(axis=1)
        )
    replicates /= len(pairs)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return Difference(float(np.mean(observed)), float(low), float(high), int(pairs[0][0].image_ids.numel()))
