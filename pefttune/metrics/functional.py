"""Image-text retrieval metrics as pure tensor functions (no state, no distributed logic).

The protocol is the one of LAVIS and the DueT paper, for evaluation sets where an image has several
captions (COCO 5k and Flickr30k 1k have five):

* **Image -> text.** The candidates are all captions. An image's rank is the best (smallest) rank of any
  of its own captions, so R@K is the fraction of images with *at least one* of their captions in the
  top K (a hit rate, not information-retrieval recall).
* **Text -> image.** The candidates are all images. Each caption has exactly one relevant image.

**Ranks and ties.** A query's outcome is three counts: the non-relevant candidates scoring strictly
higher than its best relevant candidate (``ahead``), those scoring exactly as high (``tied``) and the
relevant candidates at that best score (:class:`QueryOutcomes`). A tie rule turns them into a rank:

* ``ties="expected"`` (the default): the tied candidates are put in a uniformly random order and the
  metric is its expectation: rank ``1 + ahead + tied / (relevant_at_best + 1)`` and R@K the probability
  that a relevant candidate lands in the top K. A fully collapsed model (every score equal) scores
  chance: R@1 = (captions of the image) / (all captions) image-to-text, 1 / N_img text-to-image.
* ``ties="pessimistic"``: ties go against the query, rank ``1 + ahead + tied``; a collapsed model gets
  the worst possible ranks (below chance).
* ``ties="optimistic"``: ties favour the query, rank ``1 + ahead``; a collapsed model scores R@1 = 100.
  Kept for comparison with older numbers only: it flatters whatever produces ties.

The rules agree unless a relevant candidate ties with a non-relevant one, which happens with exact
duplicates (identical captions of different images, byte-identical images) or with collapsed
embeddings; :class:`~pefttune.metrics.RetrievalMetrics` reports how many queries tied. Sort-based code
(``argsort``, ``topk``, and so CLIP_benchmark and LAVIS) orders ties in an implementation-defined way
that has nothing to do with relevance; ``expected`` is the mean of what such code reports over all
orders of the tied candidates, without depending on one. ``docs/protocol.md`` gives the reasoning.

**All-zero embeddings.** A zero vector scores exactly 0 against everything, so under the optimistic rule
it would tie its way to rank 1. A ReLU tower can legitimately output one (every channel of its pooled
features negative before the activation: fully fine-tuned EfficientNet-Lite0 did on two low-contrast
UCM images), so it is not an error; it counts as a miss. A query whose embedding is zero, or all of
whose relevant candidates have zero embeddings, gets the worst possible rank (``1 +`` the number of
non-relevant candidates), and a zero caption never serves as an image's best relevant caption. As a
non-relevant candidate a zero embedding keeps its score of 0. :class:`~pefttune.metrics.RetrievalMetrics`
warns with their count.

Neither rule depends on the order of the candidates, so the ranks do not depend on how an evaluation
set was sharded or concatenated, up to the floating-point rounding of the scores themselves, which a
matrix product may compute differently for different layouts (``RetrievalMetrics`` orders samples by id
so that every process ranks identical tensors).

**Memory.** Scores are computed ``chunk_size`` queries at a time: one ``chunk_size x N`` block of scores
exists at once and is counted in place, never the whole ``N_img x N_txt`` matrix. At COCO-5k scale
(25,000 captions) the default chunk of 512 is a 51 MB float32 block. All work happens on the device of
the embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TIES",
    "QueryOutcomes",
    "Ties",
    "collapse_diagnostics",
    "effective_rank",
    "embedding_spread",
    "metrics_from_outcomes",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_outcomes",
    "retrieval_ranks",
    "topk_retrieval",
]

Ties = Literal["expected", "pessimistic", "optimistic"]
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: The rule that cannot flatter a model: ties cost what a random order of the tied candidates costs.
DEFAULT_TIES: Ties = "expected"
_TIES: tuple[str, ...] = ("expected", "pessimistic", "optimistic")
# How many offending ids an error message lists before eliding the rest.
_MAX_LISTED = 10


def _listed(values: Tensor) -> str:
    items = values.flatten().tolist()
    shown = ", ".join(str(v) for v in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        return f"[{shown}, ...] ({len(items)} in total)"
    return f"[{shown}]"


def _check_embeddings(name: str, embeds: Tensor) -> None:
    if not isinstance(embeds, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(embeds.shape)}")
    if not embeds.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {embeds.dtype}")
    if embeds.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(embeds.shape)}); nothing to rank")
    # A NaN compares false with everything, so it would silently give rank 1: refuse it.
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_comparable(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Two embedding matrices to be scored against each other: same width, same device."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same width, got {a.shape[1]} and {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def _check_ids(name: str, ids: Tensor, length: int, length_name: str) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.shape[0] != length:
        raise ValueError(f"{name} has {ids.shape[0]} entries but {length_name} has {length} rows")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _check_ties(ties: str) -> None:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")


def _normalise_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every K in ks must be a positive integer, got {k!r}")
    return tuple(sorted(set(ks)))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Half-precision scores produce many spurious ties (and CPU half matmuls are slow): rank in float32
    # unless the caller already works in float64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _owner_positions(image_ids: Tensor, text_image_ids: Tensor) -> Tensor:
    """Map each caption to the row of its image in ``image_ids``; validate the id relation."""
    sorted_ids, order = torch.sort(image_ids)
    if sorted_ids.numel() > 1:
        repeated = sorted_ids[1:] == sorted_ids[:-1]
        if bool(repeated.any()):
            raise ValueError(
                "image_ids must be unique, but these ids occur more than once: "
                f"{_listed(torch.unique(sorted_ids[1:][repeated]))}. Remove duplicates first "
                "(RetrievalMetrics does this for padded or gathered evaluation sets)."
            )
    # searchsorted gives the insertion point; an id is present iff the id stored there equals it.
    slot = torch.searchsorted(sorted_ids, text_image_ids).clamp_(max=sorted_ids.numel() - 1)
    found = sorted_ids[slot] == text_image_ids
    if not bool(found.all()):
        missing = (~found).nonzero().squeeze(1)
        raise ValueError(
            f"captions at positions {_listed(missing)} belong to image ids "
            f"{_listed(torch.unique(text_image_ids[missing]))} that are not among image_ids"
        )
    owner = order[slot]
    has_caption = torch.zeros(image_ids.numel(), dtype=torch.bool, device=image_ids.device)
    has_caption[owner] = True
    if not bool(has_caption.all()):
        raise ValueError(
            f"images without any caption: ids {_listed(image_ids[~has_caption])}. Every image needs "
            "at least one caption for image-to-text retrieval."
        )
    return owner


def _validated(
    image_embeds: Tensor, image_ids: Tensor, text_embeds: Tensor, text_image_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate retrieval inputs; return (images, captions, owner rows) ready for ranking."""
    _check_embeddings("image_embeds", image_embeds)
    _check_embeddings("text_embeds", text_embeds)
    _check_comparable("image_embeds", image_embeds, "text_embeds", text_embeds)
    _check_ids("image_ids", image_ids, image_embeds.shape[0], "image_embeds")
    _check_ids("text_image_ids", text_image_ids, text_embeds.shape[0], "text_embeds")
    device = image_embeds.device
    owner = _owner_positions(image_ids.to(device, torch.long), text_image_ids.to(device, torch.long))
    dtype = _compute_dtype(image_embeds, text_embeds)
    return image_embeds.to(dtype), text_embeds.to(dtype), owner


# Sums of 0/1 values in float32 are exact up to 2**24; count in column blocks no wider than that.
_EXACT_FLOAT_COUNT = 2**24


def _count_above_and_equal(scores: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the number of scores strictly above ``threshold`` and the number exactly equal to it.

    Destroys ``scores``: after the equality count, the strict comparison writes its 0/1 result into the
    score block itself, so that count needs no extra memory and is about three times faster than
    summing a boolean mask (which torch first converts to int64).
    """
    above = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    equal = torch.zeros_like(above)
    for start in range(0, scores.shape[1], _EXACT_FLOAT_COUNT):
        block = scores[:, start : start + _EXACT_FLOAT_COUNT]
        equal += (block == threshold).sum(1)
        above += block.gt_(threshold).sum(1).long()
    return above, equal


@dataclass(frozen=True)
class QueryOutcomes:
    """Where each query's best relevant candidate landed, before any tie rule is applied.

    Every tie rule is a function of three counts per query, so keeping them (rather than ranks) lets one
    evaluation be reported under any rule and lets per-query hit rates be recomputed later (the paired
    bootstrap of :mod:`pefttune.benchmark.stats` reads them from a run's saved ranks).

    Attributes:
        ahead: Non-relevant candidates scoring strictly higher than the best relevant one [N] (long).
        tied: Non-relevant candidates scoring exactly as high as the best relevant one [N] (long).
        relevant_at_best: Relevant candidates at that best score [N] (long, >= 1): image-to-text, an
            image's captions that tie with each other; always 1 text-to-image.
    """

    ahead: Tensor
    tied: Tensor
    relevant_at_best: Tensor

    def ranks(self, ties: Ties = "expected") -> Tensor:
        """Per-query rank under a tie rule.

        Returns:
            ``optimistic``: ``1 + ahead``; ``pessimistic``: ``1 + ahead + tied`` (both ``torch.long``);
            ``expected``: ``1 + ahead + tied / (relevant_at_best + 1)`` (float64), the mean position of
            the first relevant candidate when tied candidates are put in a uniformly random order.
        """
        _check_ties(ties)
        if ties == "optimistic":
            return self.ahead + 1
        if ties == "pessimistic":
            return self.ahead + self.tied + 1
        return 1.0 + self.ahead.double() + self.tied.double() / (self.relevant_at_best.double() + 1.0)

    def hit_rate(self, k: int, ties: Ties = "expected") -> Tensor:
        """Per-query probability that a relevant item is in the top ``k`` (0 or 1 for the fixed rules).

        Under ``expected`` the ``t`` tied non-relevant and ``r`` tied relevant candidates take a uniformly
        random order after the ``ahead`` ones; a relevant one is among the first ``m = k - ahead`` of that
        block unless all ``m`` are non-relevant: ``P = 1 - C(t, m) / C(t + r, m)`` for ``0 <= m <= t``
        (0 for ``m <= 0``, 1 for ``m > t``).

        Returns:
            float64 [N].
        """
        _check_ties(ties)
        if ties != "expected":
            return (self.ranks(ties) <= k).double()
        t = self.tied.double()
        r = self.relevant_at_best.double()
        m = (k - self.ahead).double()
        inside = m.clamp(min=0.0).minimum(t)
        # log C(t, m) - log C(t + r, m), with lgamma for large counts.
        log_ratio = torch.lgamma(t + 1) - torch.lgamma(t - inside + 1)
        log_ratio = log_ratio - torch.lgamma(t + r + 1) + torch.lgamma(t + r - inside + 1)
        probability = 1.0 - torch.exp(log_ratio)
        probability = torch.where(m <= 0, torch.zeros_like(probability), probability)
        return torch.where(m > t, torch.ones_like(probability), probability)

    @property
    def tied_queries(self) -> int:
        """Queries whose best relevant candidate ties with a non-relevant one (where the rule matters)."""
        return int((self.tied > 0).sum())


def _image_to_text_outcomes(
    images: Tensor, texts: Tensor, owner: Tensor, chunk_size: int, zero_texts: Tensor
) -> QueryOutcomes:
    n_img = images.shape[0]
    # Group captions by owning image so that the captions of a chunk of images form one slice.
    by_owner = torch.argsort(owner, stable=True)
    offsets = [0, *torch.bincount(owner, minlength=n_img).cumsum(0).tolist()]
    ahead = torch.empty(n_img, dtype=torch.long, device=images.device)
    tied = torch.empty_like(ahead)
    relevant_at_best = torch.empty_like(ahead)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        scores = images[start:stop] @ texts.T
        captions = by_owner[offsets[start] : offsets[stop]]
        rows = owner[captions] - start
        # The relevant scores come out of the same matmul as the candidates' scores, so a relevant
        # caption can never look "strictly higher" than itself through rounding.
        relevant = scores[rows, captions]
        # A zero caption is never an image's best relevant one (see "All-zero embeddings").
        relevant = relevant.masked_fill(zero_texts[captions], float("-inf"))
        best = torch.full((stop - start,), float("-inf"), dtype=scores.dtype, device=scores.device)
        best.scatter_reduce_(0, rows, relevant, reduce="amax")
        live_at_best = torch.zeros_like(best, dtype=torch.long)
        live_at_best.scatter_add_(0, rows, (relevant >= best[rows]).long())
        above, equal = _count_above_and_equal(scores, best[:, None])
        ahead[start:stop] = above
        # A zero caption of the image's own counts as a candidate scoring 0, like a non-relevant one.
        tied[start:stop] = equal - live_at_best
        relevant_at_best[start:stop] = live_at_best.clamp(min=1)
        # Free this chunk's scores before the next matmul, so that two blocks never coexist.
        del scores
    return QueryOutcomes(ahead, tied, relevant_at_best)


def _text_to_image_outcomes(images: Tensor, texts: Tensor, owner: Tensor, chunk_size: int) -> QueryOutcomes:
    n_txt = texts.shape[0]
    ahead = torch.empty(n_txt, dtype=torch.long, device=texts.device)
    tied = torch.empty_like(ahead)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        scores = texts[start:stop] @ images.T
        best = scores.gather(1, owner[start:stop, None])
        above, equal = _count_above_and_equal(scores, best)
        ahead[start:stop] = above
        # The relevant image itself is "equal": it is not a tie.
        tied[start:stop] = equal - 1
        # Free this chunk's scores before the next matmul, so that two blocks never coexist.
        del scores
    return QueryOutcomes(ahead, tied, torch.ones_like(ahead))


def retrieval_outcomes(
    image_embeds: Tensor,
    image_ids: Tensor,
    text_embeds: Tensor,
    text_image_ids: Tensor,
    *,
    chunk_size: int = 512,
) -> tuple[QueryOutcomes, QueryOutcomes]:
    """Per-query outcomes (candidates ahead, tied, relevant at best) of both directions.

    Inputs as :func:`retrieval_ranks`. Queries whose embedding is zero, or whose relevant candidates are
    all zero, get the worst outcome: every non-relevant candidate ahead, no tie.

    Returns:
        ``(i2t, t2i)``: :class:`QueryOutcomes` in input order ([N_img] and [N_txt]).
    """
    _check_chunk_size(chunk_size)
    images, texts, owner = _validated(image_embeds, image_ids, text_embeds, text_image_ids)
    zero_images, zero_texts = ~images.any(dim=1), ~texts.any(dim=1)
    i2t = _image_to_text_outcomes(images, texts, owner, chunk_size, zero_texts)
    t2i = _text_to_image_outcomes(images, texts, owner, chunk_size)
    if bool(zero_images.any()) or bool(zero_texts.any()):
        n_img, n_txt = images.shape[0], texts.shape[0]
        captions = torch.bincount(owner, minlength=n_img)
        live_captions = torch.bincount(owner[~zero_texts], minlength=n_img)
        missed = zero_images | (live_captions == 0)
        i2t.ahead[missed] = n_txt - captions[missed]
        i2t.tied[missed] = 0
        i2t.relevant_at_best[missed] = 1
        missed_txt = zero_texts | zero_images[owner]
        t2i.ahead[missed_txt] = n_img - 1
        t2i.tied[missed_txt] = 0
    return i2t, t2i


def retrieval_ranks(
    image_embeds: Tensor,
    image_ids: Tensor,
    text_embeds: Tensor,
    text_image_ids: Tensor,
    *,
    chunk_size: int = 512,
    ties: Ties = "expected",
) -> tuple[Tensor, Tensor]:
    """Rank of the best relevant candidate for every query, in both directions.

    Scores are dot products, i.e. cosine similarities when the embeddings are L2-normalised (the
    caller's job here; :class:`~pefttune.metrics.RetrievalMetrics` normalises for you). Float16 and
    bfloat16 inputs are ranked in float32, float64 inputs in float64. See the module docstring for the
    rank definition and the tie rules.

    Args:
        image_embeds: Image embeddings [N_img, D].
        image_ids: Unique integer id of each image [N_img].
        text_embeds: Caption embeddings [N_txt, D], on the same device as ``image_embeds``.
        text_image_ids: For each caption, the id of the image it describes [N_txt].
        chunk_size: Queries scored at a time; peak extra memory is about ``chunk_size x N`` scores.
        ties: ``"expected"`` (the default: mean rank under a random order of tied candidates),
            ``"pessimistic"`` (ties go against the query) or ``"optimistic"`` (ties favour it).

    Returns:
        ``(i2t_ranks, t2i_ranks)`` of shapes [N_img] and [N_txt] on the embeddings' device, in input
        order, 1-based (1 = a relevant item is ranked first): ``torch.long`` for the optimistic and
        pessimistic rules, float64 for ``expected`` (fractional where ties occur).

    Raises:
        ValueError: On inconsistent shapes or devices, non-finite embeddings, duplicate image ids, an
            image without captions, a caption whose image id is not in ``image_ids``, or a bad
            ``chunk_size``/``ties``.
        TypeError: If embeddings are not floating point or ids are not integers.
    """
    _check_ties(ties)
    i2t, t2i = retrieval_outcomes(image_embeds, image_ids, text_embeds, text_image_ids, chunk_size=chunk_size)
    return i2t.ranks(ties), t2i.ranks(ties)


def count_zero_rows(embeds: Tensor) -> int:
    """How many rows of ``embeds`` are all zero (they count as misses, see the module docstring)."""
    return int((~embeds.any(dim=1)).sum())


def _median(ranks: Tensor) -> float:
    # Like numpy.median: the mean of the two middle values for an even count (torch.median would
    # return the lower one).
    values = torch.sort(ranks).values
    n = values.numel()
    if n % 2:
        return float(values[n // 2])
    return (float(values[n // 2 - 1]) + float(values[n // 2])) / 2.0


def metrics_from_ranks(
    i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Summarise per-query ranks into the reported retrieval metrics.

    R@K is the share of ranks <= K, which is right for the ``optimistic`` and ``pessimistic`` rules; under
    ``expected`` a fractional rank does not say whether the hit is in the top K (use
    :func:`metrics_from_outcomes`, which :func:`retrieval_metrics` does).

    Args:
        i2t_ranks: 1-based ranks of the image queries [N_img].
        t2i_ranks: 1-based ranks of the caption queries [N_txt].
        ks: Cut-offs K for R@K (deduplicated and sorted).

    Returns:
        A dict of Python floats: ``i2t_R@K`` and ``t2i_R@K`` for each K (percent, 0-100),
        ``i2t_mean_R`` and ``t2i_mean_R`` (mean of that direction's R@K, the figure DueT reports),
        ``rsum`` (sum of all R@K of both directions; with the default ks the usual sum of six),
        ``i2t_median_rank``, ``i2t_mean_rank``, ``t2i_median_rank`` and ``t2i_mean_rank``. The median
        of an even number of ranks is the mean of the two middle ones, as in ``numpy.median``.

    Raises:
        ValueError: If ``ks`` is empty or holds a non-positive K, or a rank tensor is empty or not 1-D.
    """
    ks = _normalise_ks(ks)
    ranks = {"i2t": i2t_ranks, "t2i": t2i_ranks}
    recalls: dict[str, list[float]] = {}
    for direction, direction_ranks in ranks.items():
        if direction_ranks.ndim != 1 or direction_ranks.numel() == 0:
            raise ValueError(
                f"{direction} ranks must be a non-empty 1-D tensor, got shape {tuple(direction_ranks.shape)}"
            )
        n = direction_ranks.numel()
        recalls[direction] = [100.0 * int((direction_ranks <= k).sum()) / n for k in ks]
    return _retrieval_summary(ks, recalls, ranks)


def _retrieval_summary(
    ks: tuple[int, ...], recalls: dict[str, list[float]], ranks: dict[str, torch.Tensor]
) -> dict[str, float]:
    """The reported retrieval metrics from each direction's R@K and ranks (one key order for every caller).

    Args:
        ks: The normalised cut-offs.
        recalls: ``{"i2t": [...], "t2i": [...]}``, R@K in percent in the order of ``ks``.
        ranks: ``{"i2t": ranks, "t2i": ranks}``, 1-D rank (or expected-rank) tensors.

    Returns:
        ``{direction}_R@{k}``, ``{direction}_mean_R``, ``rsum``, ``{direction}_median_rank`` and
        ``{direction}_mean_rank`` (see :func:`metrics_from_ranks`).
    """
    directions = ("i2t", "t2i")
    out: dict[str, float] = {}
    for direction in directions:
        out.update({f"{direction}_R@{k}": r for k, r in zip(ks, recalls[direction], strict=True)})
    for direction in directions:
        out[f"{direction}_mean_R"] = sum(recalls[direction]) / len(recalls[direction])
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in directions for k in ks)
    for direction in directions:
        out[f"{direction}_median_rank"] = _median(ranks[direction])
        out[f"{direction}_mean_rank"] = float(ranks[direction].double().mean())
    return out


def metrics_from_outcomes(
    i2t: QueryOutcomes, t2i: QueryOutcomes, ks: Sequence[int] = DEFAULT_KS, ties: Ties = DEFAULT_TIES
) -> dict[str, float]:
    """Summarise per-query outcomes into the reported retrieval metrics under a tie rule.

    Args:
        i2t: Outcomes of the image queries.
        t2i: Outcomes of the caption queries.
        ks: Cut-offs K for R@K (deduplicated and sorted).
        ties: The tie rule (see the module docstring).

    Returns:
        The keys of :func:`metrics_from_ranks` (R@K under ``expected`` is the mean hit probability, ranks
        are expected ranks), plus ``i2t_tied_queries`` and ``t2i_tied_queries``: how many queries'
        best relevant candidate tied with a non-relevant one (the queries on which the rule matters).

    Raises:
        ValueError: If ``ks`` or ``ties`` is invalid or a direction has no query.
    """
    ks = _normalise_ks(ks)
    _check_ties(ties)
    both = {"i2t": i2t, "t2i": t2i}
    recalls: dict[str, list[float]] = {}
    for direction, outcomes in both.items():
        if outcomes.ahead.ndim != 1 or outcomes.ahead.numel() == 0:
            raise ValueError(f"{direction} outcomes must be non-empty 1-D, got {tuple(outcomes.ahead.shape)}")
        recalls[direction] = [100.0 * float(outcomes.hit_rate(k, ties).mean()) for k in ks]
    ranks = {direction: outcomes.ranks(ties) for direction, outcomes in both.items()}
    out = _retrieval_summary(ks, recalls, ranks)
    out["i2t_tied_queries"] = float(i2t.tied_queries)
    out["t2i_tied_queries"] = float(t2i.tied_queries)
    return out


def retrieval_metrics(
    image_embeds: Tensor,
    image_ids: Tensor,
    text_embeds: Tensor,
    text_image_ids: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 512,
    ties: Ties = DEFAULT_TIES,
) -> dict[str, float]:
    """Image-text retrieval metrics (R@K, mean R, rsum, median and mean rank, tied queries), both directions.

    Equivalent to :func:`retrieval_outcomes` followed by :func:`metrics_from_outcomes`; see those and the
    module docstring for the protocol, the tie rules and the meaning of each key. The embeddings are
    expected to be L2-normalised; they are not normalised here.

    Args:
        image_embeds: Image embeddings [N_img, D].
        image_ids: Unique integer id of each image [N_img].
        text_embeds: Caption embeddings [N_txt, D].
        text_image_ids: For each caption, the id of the image it describes [N_txt].
        ks: Cut-offs K for R@K. A K larger than the number of candidates gives 100.
        chunk_size: Queries scored at a time (bounds memory, does not change the result).
        ties: ``"expected"`` (default), ``"pessimistic"`` or ``"optimistic"``.

    Returns:
        A dict of Python floats; R@K values are percentages (0-100).

    Raises:
        ValueError: On invalid inputs (see :func:`retrieval_ranks`) or invalid ``ks``/``ties``.
        TypeError: If embeddings are not floating point or ids are not integers.
    """
    ks = _normalise_ks(ks)
    _check_ties(ties)
    i2t, t2i = retrieval_outcomes(image_embeds, image_ids, text_embeds, text_image_ids, chunk_size=chunk_size)
    return metrics_from_outcomes(i2t, t2i, ks, ties)


#: Total variance below which a set of unit embeddings counts as collapsed: the mean pairwise cosine is
#: then above 0.99 (mean squared distance between two items = 2 x total variance).
DEFAULT_COLLAPSE_SPREAD = 0.01
#: Effective rank below which embeddings count as degenerate (essentially one direction of variation),
#: applied only with at least :data:`_MIN_ITEMS_FOR_RANK` items (a handful of items has a low rank anyway).
DEFAULT_COLLAPSE_RANK = 1.5
_MIN_ITEMS_FOR_RANK = 8


def embedding_spread(embeds: Tensor) -> float:
    """Total variance across items of L2-normalised embeddings: ``mean_i ||x_i - mean||^2 = 1 - ||mean||^2``.

    It is the sum over dimensions of the per-dimension variance, in [0, 1] for unit vectors: 0 when every
    item has the same embedding (collapse), about 1 when the items point in unrelated directions.
    All-zero rows count as they are (they pull the value down).

    Args:
        embeds: [N, D] embeddings (normalised by the caller).
    """
    x = embeds.double()
    return float(((x - x.mean(dim=0)) ** 2).sum(dim=1).mean())


def effective_rank(embeds: Tensor, max_items: int = 4096) -> float:
    """Effective rank (Roy and Vetterli, 2007) of the centred embeddings: ``exp(entropy(s / sum(s)))``.

    ``s`` are the singular values of the centred [N, D] matrix (from the eigenvalues of the smaller scatter
    matrix). 1 when all variation lies along one direction, up to ``min(N - 1, D)``; 0 when there is no
    variation at all. Above ``max_items`` rows an evenly spaced subset of that many rows is used (the
    estimate of a diagnostic, which keeps a COCO-sized evaluation from paying for a 25k-row product).
    """
    if embeds.shape[0] > max_items:
        embeds = embeds[torch.linspace(0, embeds.shape[0] - 1, max_items, device=embeds.device).long()]
    x = embeds.double()
    x = x - x.mean(dim=0)
    scatter = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    singular = torch.linalg.eigvalsh(scatter).clamp(min=0.0).sqrt()
    total = singular.sum()
    if float(total) <= 1e-12:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_diagnostics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    spread_threshold: float = DEFAULT_COLLAPSE_SPREAD,
    rank_threshold: float = DEFAULT_COLLAPSE_RANK,
) -> dict[str, float]:
    """Whether the evaluated embeddings have collapsed: spread and effective rank of each modality.

    Returns:
        ``image_spread``, ``text_spread`` (:func:`embedding_spread`), ``image_effective_rank``,
        ``text_effective_rank`` (:func:`effective_rank`) and ``collapsed``: 1.0 when either modality's
        spread is below ``spread_threshold``, or its effective rank below ``rank_threshold`` with at
        least 8 items; else 0.0. Retrieval numbers of a collapsed model measure its ties, not its
        quality.
    """
    out: dict[str, float] = {}
    flagged = False
    for name, embeds in (("image", image_embeds), ("text", text_embeds)):
        spread, rank = embedding_spread(embeds), effective_rank(embeds)
        out[f"{name}_spread"] = spread
        out[f"{name}_effective_rank"] = rank
        enough = min(embeds.shape) >= _MIN_ITEMS_FOR_RANK
        flagged = flagged or spread < spread_threshold or (enough and rank < rank_threshold)
    out["collapsed"] = float(flagged)
    return out


def topk_retrieval(
    query_embeds: Tensor, gallery_embeds: Tensor, k: int, *, chunk_size: int = 512
) -> tuple[Tensor, Tensor]:
    """The ``k`` best-scoring gallery items for each query, computed ``chunk_size`` queries at a time.

    Use images as queries and captions as the gallery for image-to-text (or the reverse), e.g. to
    draw retrieval examples. Scores are dot products (cosine for L2-normalised inputs); half
    precision is scored in float32. Among equal scores the order is the one ``torch.topk`` yields,
    which is implementation-defined.

    Args:
        query_embeds: Query embeddings [N_q, D].
        gallery_embeds: Gallery embeddings [N_g, D], on the same device.
        k: How many items to return per query; capped at ``N_g``.
        chunk_size: Queries scored at a time.

    Returns:
        ``(scores, indices)``, both [N_q, min(k, N_g)], sorted by descending score; ``indices`` are
        rows of ``gallery_embeds``.

    Raises:
        ValueError: On shape/device mismatches, non-finite embeddings, or non-positive ``k``/``chunk_size``.
        TypeError: If embeddings are not floating point.
    """
    _check_embeddings("query_embeds", query_embeds)
    _check_embeddings("gallery_embeds", gallery_embeds)
    _check_chunk_size(chunk_size)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    _check_comparable("query_embeds", query_embeds, "gallery_embeds", gallery_embeds)
    dtype = _compute_dtype(query_embeds, gallery_embeds)
    queries, gallery = query_embeds.to(dtype), gallery_embeds.to(dtype)
    k = min(k, gallery.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        top = torch.topk(queries[start : start + chunk_size] @ gallery.T, k, dim=1, largest=True, sorted=True)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)
